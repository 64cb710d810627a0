"""Image decoding and preprocessing shared by training, indexing and the API."""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from encoder.backbones import ImageSpec

# Flickr8k copies here are squashed to a square; user images are squashed the same way.
DEFAULT_MAX_PIXELS = 40_000_000


class BadImage(ValueError):
    """The bytes are not an image we can decode safely."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes to an RGB PIL image; refuse empty, truncated, non-image or oversized input."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            img.load()
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"not a decodable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from exc
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def eval_transform(spec: ImageSpec) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.Resize((spec.input_size, spec.input_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: ImageSpec) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop((spec.input_size, spec.input_size), scale=(0.5, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ])
