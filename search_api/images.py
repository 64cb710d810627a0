"""Uploaded and stored images: safe decoding, and thumbnails for the web page.

Uploads are checked before any pixel is decoded: only common raster formats are opened (no EPS,
which would run Ghostscript, no exotic codecs), and the pixel count in the header is compared
with the limit, so a small file that would decompress to gigabytes (a "decompression bomb") is
refused without being decoded. Errors are domain errors (BadImage, ImageTooLarge); errors.py
gives them their HTTP status.
"""
from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict

from PIL import Image, UnidentifiedImageError

from encoder.preprocessing import BadImage, decode_image

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
SAFE_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"}


class ImageTooLarge(ValueError):
    """An upload over the byte limit, or an image with more pixels than allowed."""


def check_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; BadImage / ImageTooLarge when unusable."""
    if not data:
        raise BadImage("the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not a JPEG, PNG, WebP, GIF or BMP image (or the file is damaged)") \
            from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    if w <= 0 or h <= 0:
        raise BadImage("zero width or height")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image has too many pixels: {w}x{h} = {w * h} (limit {max_pixels})")
    return fmt, w, h


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an upload -> RGB image (alpha composited on white, CMYK converted)."""
    check_header(data, max_pixels)
    try:
        return decode_image(data, max_pixels)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from None
    except Exception as exc:  # a crafted file can make a decoder raise almost anything
        raise BadImage(f"cannot decode it ({type(exc).__name__}: {exc})") from None


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    img = decode_image(data, max_pixels)  # BadImage for a stored object that is not an image
    img.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, optimize=False)
    return buf.getvalue()


class LRUBytes:
    """A small thread-safe LRU of thumbnails (key -> bytes)."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value: bytes) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
