"""Image preprocessing without torch: a decoded RGB image -> the normalised [3, S, S] float32
pixels a model's image tower takes, in NumPy and Pillow.

The serving twin of `encoder.preprocessing.eval_transform` (the torch transforms training and
evaluation use), equal to it within the tolerance tests/encoder/test_pixels.py checks on real
photos:

- our models (`resize_mode` None): squash to S x S (bilinear, antialiased), as torchvision's
  `Resize((S, S), antialias=True)`; an image already S x S is not resized (Flickr8k copies)
- open_clip models: open_clip's eval transform, which runs torchvision on PIL images, i.e.
  Pillow's own resize: "shortest" (shorter side to S, then centre crop), "squash", or
  "longest" (longer side to S, then centre pad with black)

`ImageSpec` (what a model's image tower expects) lives here so that torch-free code can hold one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

RESIZE_MODES = (None, "shortest", "squash", "longest")
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageSpec:
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dim: int
    # None: our models' squash-resize (what they were trained on). open_clip models carry their
    # own: "shortest" (+ center crop), "squash" or "longest" (+ pad), and the interpolation.
    # Left out of the repr, which keys cached features (training/features.py): the transform's
    # repr in that key carries them, and our models' existing keys stay valid.
    resize_mode: str | None = field(default=None, repr=False)
    interpolation: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "mean": list(self.mean),
                "std": list(self.std), "out_dim": self.out_dim, "resize_mode": self.resize_mode,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        return cls(d["name"], int(d["input_size"]), tuple(map(float, d["mean"])),
                   tuple(map(float, d["std"])), int(d["out_dim"]), d.get("resize_mode"),
                   d.get("interpolation"))


def _filter(spec: ImageSpec):
    # open_clip: bicubic unless the weights say bilinear; our models: bilinear
    if spec.resize_mode is None:
        return Image.Resampling.BILINEAR
    return _FILTERS.get(spec.interpolation or "bicubic", Image.Resampling.BICUBIC)


def _center_crop_or_pad(img: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """torchvision's center_crop: pad (centred, `fill`) when smaller, then crop the middle."""
    w, h = img.size
    if w < size or h < size:
        left, top = max(0, (size - w) // 2), max(0, (size - h) // 2)
        canvas = Image.new("RGB", (max(w, size), max(h, size)), (fill,) * 3)
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def resized(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """The RGB image at S x S, as the model's eval transform resizes (and crops or pads) it."""
    s = spec.input_size
    if spec.resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {spec.resize_mode!r}; known: {RESIZE_MODES}")
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    if spec.resize_mode in (None, "squash"):
        return img if (w, h) == (s, s) else img.resize((s, s), _filter(spec))
    if spec.resize_mode == "shortest":  # torchvision Resize(int): the long side truncated
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        size = (s, new_long) if w <= h else (new_long, s)
        if size != (w, h):
            img = img.resize(size, _filter(spec))
        return _center_crop_or_pad(img, s)
    ratio = max(h / s, w / s)  # "longest": open_clip's ResizeKeepRatio(longest=1) + pad
    size = (round(w / ratio), round(h / ratio))
    if size != (w, h):
        img = img.resize(size, _filter(spec))
    return _center_crop_or_pad(img, s)


class PixelNormalizer:
    """uint8 RGB -> (x / 255 - mean) / std per channel, as x * scale + offset (float32)."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        mean = np.asarray(spec.mean, np.float64)
        std = np.asarray(spec.std, np.float64)
        self.scale = (1 / (255 * std)).astype(np.float32)[:, None, None]
        self.offset = (-mean / std).astype(np.float32)[:, None, None]

    def __call__(self, img: Image.Image) -> np.ndarray:
        """[3, S, S] float32 pixels of one decoded image."""
        chw = np.asarray(resized(img, self.spec)).transpose(2, 0, 1)  # uint8 [3, S, S]
        x = chw * self.scale
        x += self.offset
        return x

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        s = self.spec.input_size
        if not images:
            return np.zeros((0, 3, s, s), np.float32)
        return np.stack([self(im) for im in images])
