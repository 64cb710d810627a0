"""Image decoding and preprocessing shared by training, indexing and the API.

Decoding needs Pillow only; the torch transforms (`eval_transform`, `train_transform`) import
torch and torchvision when called, so the service decodes without them (its NumPy twin of the
eval transform is encoder/pixels.py)."""
from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from encoder.image_formats import PILLOW_FORMATS, RawRefused, decode_raw

if TYPE_CHECKING:
    from torchvision.transforms import v2 as T

    from encoder.pixels import ImageSpec

# Flickr8k copies here are squashed to a square; user images are squashed the same way for our
# models (open_clip models use their own resize + crop: eval_transform).
DEFAULT_MAX_PIXELS = 40_000_000
# The models look at 224 px. An image is decoded at reduced size (JPEG DCT scaling, or a box
# reduction right after load) only while both sides stay >= this: twice the model input, so the
# final resize still antialiases from plenty of pixels. Flickr8k copies (224-500 px) are never
# reduced and decode exactly as they always did.
DECODE_MIN_SIDE = 448
# rows converted at a time when a large image is reduced (keeps the RGBA copies small)
_STRIP_ROWS = 256
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
# bytes per pixel of a loaded image, by mode (what decoding costs before any conversion)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "La": 4, "I;16": 2, "I;16B": 2,
               "I;16L": 2, "I;16N": 2}
# formats whose decoder holds its own copy of the pixels before Pillow's
_OWN_BUFFER_FORMATS = ("HEIF", "AVIF")


class BadImage(ValueError):
    """The bytes are not an image we can decode safely."""


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey (TIFF, PNG) as 8-bit grey: Pillow's own conversion clips them."""
    if img.mode.startswith("I;16"):
        return img.point(lambda v: v / 256, "L") if img.mode == "I;16" else \
            img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("I", "F"):
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        return img.point(lambda v: (v - lo) * scale).convert("L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with alpha composited on white."""
    if _has_alpha(img):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _reduced_rgb(img: Image.Image, factor: int) -> Image.Image:
    """`img` box-reduced by `factor`, as RGB on white, a strip of rows at a time: the full-size
    image is never converted (or alpha-composited) as a whole, so a large palette or RGBA image
    costs its loaded size plus a few MB, not several full-size RGBA copies."""
    w, h = img.size
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    step = max(1, _STRIP_ROWS // factor) * factor  # strip borders on block borders
    alpha = _has_alpha(img)
    for y in range(0, h, step):
        strip = img.crop((0, y, w, min(h, y + step)))  # keeps palette and transparency
        strip = strip.convert("RGBA" if alpha else "RGB")
        out.paste(_to_rgb(strip.reduce(factor)), (0, y // factor))  # composite the small one
    return out


def reduction_factor(size: tuple[int, int], min_side: int | None = DECODE_MIN_SIDE) -> int:
    """The integer box reduction applied after load (1: none); both sides stay >= min_side."""
    if not min_side:
        return 1
    return max(1, min(size[0] // min_side, size[1] // min_side))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 min_side: int | None = DECODE_MIN_SIDE,
                 formats: tuple[str, ...] | None = PILLOW_FORMATS,
                 raw: bool = False) -> Image.Image:
    """Decode bytes to an upright RGB PIL image; refuse empty, truncated, non-image or oversized
    input.

    EXIF orientation is applied. Images much larger than the model input are decoded at
    reduced size (JPEG: DCT scaling; others: a box reduction right after load, before any
    conversion) while both sides stay >= `min_side` (None: full size, e.g. for the viewer);
    smaller images decode exactly as before. `formats` restricts the Pillow decoders tried
    (default: the photo formats of `encoder.image_formats`, HEIC/HEIF and AVIF included);
    `raw=True` decodes a camera RAW file (`image_formats.is_raw_key` of its name) through
    LibRaw instead, within the same pixel limit.
    """
    if not data:
        raise BadImage("empty file")
    if raw:
        try:
            img = decode_raw(data, max_pixels, min_side)
        except RawRefused as exc:
            raise BadImage(str(exc)) from None
        factor = reduction_factor(img.size, min_side)
        return img.reduce(factor) if factor > 1 else img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            if min_side and img.format == "JPEG":
                img.draft(img.mode, (min_side, min_side))  # scale 1/2..1/8, sides >= min_side
            img.load()
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"not a decodable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from exc
    try:
        method = _ORIENTATION.get(int(img.getexif().get(0x0112, 1)))  # 0x0112: Orientation
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        method = None
    img = _to_8bit(img)
    factor = reduction_factor(img.size, min_side)
    out = _reduced_rgb(img, factor) if factor > 1 else _to_rgb(img)
    img.close()
    if method is not None:
        out = out.transpose(method)
    return out


def decode_cost(img: Image.Image, min_side: int | None = DECODE_MIN_SIDE) -> int:
    """Bytes that decoding this (opened, not loaded) image will hold at its peak: the loaded
    pixels (after JPEG draft scaling), libjpeg's coefficient buffers for a progressive JPEG,
    and the converted output."""
    w, h = img.size
    s = 1
    if min_side and img.format == "JPEG":
        ratio = min(w // min_side, h // min_side)
        s = next((x for x in (8, 4, 2, 1) if ratio >= x), 1)
    lw, lh = -(-w // s), -(-h // s)
    loaded = lw * lh * _MODE_BYTES.get(img.mode, 4)
    if img.format == "JPEG" and (img.info.get("progressive") or img.info.get("progression")):
        loaded += w * h * 2  # whole-image DCT coefficients, whatever the output scale
    if img.format in _OWN_BUFFER_FORMATS:
        loaded += w * h * 4
    f = reduction_factor((lw, lh), min_side)
    converted = (lw // f + 1) * (lh // f + 1) * 4 * (3 if f == 1 else 2)
    strips = lw * min(lh, _STRIP_ROWS) * 4 * 3 if f > 1 else 0
    return loaded + converted + strips


def eval_transform(spec: ImageSpec):
    """PIL image -> normalised [3, S, S] tensor, as the model was trained to see it."""
    if spec.resize_mode is not None:  # an open_clip model: open_clip's own eval transform
        from open_clip.transform import image_transform

        return image_transform(spec.input_size, is_train=False, mean=spec.mean, std=spec.std,
                               resize_mode=spec.resize_mode, interpolation=spec.interpolation)
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.ToImage(),
        T.Resize((spec.input_size, spec.input_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: ImageSpec) -> T.Compose:
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop((spec.input_size, spec.input_size), scale=(0.5, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ])
