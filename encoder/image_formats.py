"""Which files are photos, and the decoders beyond Pillow's own (torch-free).

The one owner of the list of image formats: every listing (the index's, `python -m indexer
add`'s, a Flickr8k folder's) asks `is_image_key`, and decoding asks `is_raw_key`. Extensions are
matched case-insensitively (`.JPG`, `.Heic`).

    Pillow          JPEG, PNG, WebP, GIF (first frame), BMP, TIFF (first page), AVIF
    pillow-heif     HEIC / HEIF (registered with Pillow on import of this module)
    rawpy (LibRaw)  camera RAW: DNG, CR2, CR3, NEF, NRW, ARW, RAF, ORF, RW2, PEF, SRW; the
                    embedded preview when there is one, else a demosaic (half size when that
                    is still large enough), both within the pixel limit

RAW is decided by the name, not by content: many RAW files are TIFF containers whose first
image is a tiny thumbnail that Pillow would happily decode instead of the photo.
"""
from __future__ import annotations

import io
import posixpath
import threading

from PIL import Image

# Pillow decoders a photo may be opened with (no EPS, which would run Ghostscript, no exotic
# codecs)
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
# extension -> content type (stored with the object; what the original is served as)
PILLOW_SUFFIXES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".jfif": "image/jpeg",
    ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp",
    ".tif": "image/tiff", ".tiff": "image/tiff",
    ".heic": "image/heic", ".heif": "image/heif", ".hif": "image/heif", ".avif": "image/avif",
}
RAW_SUFFIXES = {
    ".dng": "image/x-adobe-dng", ".cr2": "image/x-canon-cr2", ".cr3": "image/x-canon-cr3",
    ".nef": "image/x-nikon-nef", ".nrw": "image/x-nikon-nrw", ".arw": "image/x-sony-arw",
    ".raf": "image/x-fuji-raf", ".orf": "image/x-olympus-orf", ".rw2": "image/x-panasonic-rw2",
    ".pef": "image/x-pentax-pef", ".srw": "image/x-samsung-srw",
}
IMAGE_SUFFIXES = tuple(PILLOW_SUFFIXES) + tuple(RAW_SUFFIXES)
# what a browser shows inline (the rest is served as a download, or as a thumbnail)
BROWSER_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp",
                           "image/avif"})


def suffix_of(key: str) -> str:
    """The extension of a key or file name, lower case ('' when none)."""
    return posixpath.splitext(key)[1].lower()


def is_image_key(key: str) -> bool:
    """A key (or file name) the index embeds: a known photo extension, any case; never a hidden
    file (`.DS_Store`, macOS `._IMG_1.JPG` resource forks)."""
    return not posixpath.basename(key).startswith(".") and suffix_of(key) in IMAGE_SUFFIXES


def is_raw_key(key: str) -> bool:
    return suffix_of(key) in RAW_SUFFIXES


def content_type(key: str) -> str:
    s = suffix_of(key)
    return PILLOW_SUFFIXES.get(s) or RAW_SUFFIXES.get(s) or "application/octet-stream"


_registered = False
_register_lock = threading.Lock()


def register_decoders() -> None:
    """HEIC/HEIF through pillow-heif (AVIF is Pillow's own); once per process."""
    global _registered
    with _register_lock:
        if not _registered:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _registered = True


def decoder_versions() -> str:
    """The decoders in use, e.g. for remembering refusals: a file refused by one set of
    decoders is tried again by another."""
    import pillow_heif
    import PIL
    import rawpy

    return f"pillow {PIL.__version__}, pillow-heif {pillow_heif.__version__}, " \
           f"rawpy {rawpy.__version__}"


# --- camera RAW --------------------------------------------------------------------------------
class RawRefused(ValueError):
    """LibRaw cannot read the file, or it is over the pixel limit (a message for BadImage)."""


class RawTooLarge(RawRefused):
    """More pixels than the limit allows."""


# LibRaw's flip -> the transpose that shows the preview upright (the demosaic applies it)
_RAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90,
             6: Image.Transpose.ROTATE_270}


def _open_raw(data: bytes):
    import rawpy

    raw = rawpy.RawPy()
    try:
        raw.open_buffer(io.BytesIO(data))  # parses the header; nothing is unpacked yet
    except Exception as exc:  # rawpy.LibRawError and its subclasses, or anything LibRaw raises
        raw.close()
        raise RawRefused(f"not a RAW file LibRaw can read ({type(exc).__name__}: {exc})") \
            from None
    return raw


def _half_size(width: int, height: int, min_side: int | None) -> bool:
    """Demosaic at half size (4x less memory, no interpolation) while both sides stay large."""
    return bool(min_side) and min(width, height) // 2 >= min_side


def raw_size(data: bytes, max_pixels: int, min_side: int | None = None) -> tuple[int, int, int]:
    """(width, height, peak bytes of the demosaic) from the header alone; RawRefused when LibRaw
    cannot read it or it has more than `max_pixels` sensor pixels."""
    raw = _open_raw(data)
    try:
        w, h, cost = _check_raw(raw, max_pixels, min_side)
    finally:
        raw.close()
    return w, h, cost + len(data)  # LibRaw reads from its own copy of the file


def _check_raw(raw, max_pixels: int, min_side: int | None) -> tuple[int, int, int]:
    s = raw.sizes
    sensor = int(s.raw_width) * int(s.raw_height)
    w, h = int(s.width), int(s.height)
    if w <= 0 or h <= 0 or sensor <= 0:
        raise RawRefused("RAW file without an image size")
    if max(sensor, w * h) > max_pixels:
        raise RawTooLarge(f"RAW image too large: {w}x{h} pixels (limit {max_pixels})")
    scale = 2 if _half_size(w, h, min_side) else 1
    ow, oh = -(-w // scale), -(-h // scale)
    # unpacked sensor data (16 bit) + LibRaw's 4 x 16-bit image + the 8-bit RGB out + Pillow's
    cost = sensor * 2 + ow * oh * (8 + 3 + 4)
    return w, h, cost


def decode_raw(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """A camera RAW file -> an upright RGB image: its embedded preview (the camera's own
    rendering, cheap), else a demosaic with the camera's white balance, at half size when
    both sides stay >= `min_side`. Raises RawRefused."""
    raw = _open_raw(data)
    try:
        _check_raw(raw, max_pixels, min_side)
        preview = _preview(raw, max_pixels, min_side)
        if preview is not None:
            method = _RAW_FLIP.get(int(raw.sizes.flip))
            return preview.transpose(method) if method is not None else preview
        try:
            raw.unpack()
            rgb = raw.postprocess(half_size=_half_size(raw.sizes.width, raw.sizes.height,
                                                       min_side),
                                  use_camera_wb=True, output_bps=8)
        except Exception as exc:
            raise RawRefused(f"RAW file cannot be demosaiced ({type(exc).__name__}: {exc})") \
                from None
        return Image.fromarray(rgb, "RGB")
    finally:
        raw.close()


def _preview(raw, max_pixels: int, min_side: int | None) -> Image.Image | None:
    """The largest embedded preview, RGB (a JPEG one DCT-scaled while both sides stay >=
    `min_side`), or None when there is none (or it is unusable)."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except Exception:  # LibRawNoThumbnailError, LibRawUnsupportedThumbnailError, ...
        return None
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            with Image.open(io.BytesIO(thumb.data), formats=("JPEG",)) as im:
                if im.size[0] * im.size[1] > max_pixels:
                    return None
                if min_side:
                    im.draft("RGB", (min_side, min_side))
                return im.convert("RGB")
        return Image.fromarray(thumb.data).convert("RGB")  # a bitmap preview
    except Exception:  # a damaged preview: demosaic instead
        return None


register_decoders()
