"""Uploaded and stored images: safe decoding, and thumbnails for the web page.

Uploads are checked before any pixel is decoded: only the photo formats of
`encoder.image_formats` are opened (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF, AVIF; no EPS,
which would run Ghostscript, no exotic codecs; camera RAW only for stored files named so), and
the pixel count in the header is compared with the limit, so a small file that would decompress
to gigabytes (a "decompression bomb") is refused without being decoded. Errors are domain errors (BadImage, ImageTooLarge); errors.py
gives them their HTTP status.

Decoding is bounded in memory: images much larger than the model input are decoded at reduced
size (encoder.preprocessing), at most a few decodes run at once and their estimated peak bytes
share a budget (DecodeGate), and freed memory is handed back to the OS after large decodes.
Thumbnails are JPEG whatever the original (a HEIC, TIFF or RAW photo included).
"""
from __future__ import annotations

import asyncio
import io
import threading
import warnings
from collections import deque
from contextlib import asynccontextmanager

from fastapi.concurrency import run_in_threadpool
from PIL import Image, UnidentifiedImageError

from core.memory import release_memory
from encoder.image_formats import PILLOW_FORMATS, RawRefused, RawTooLarge, raw_size
from encoder.preprocessing import DECODE_MIN_SIDE, BadImage, decode_cost, decode_image

FORMATS_DOC = "a JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF image"


class ImageTooLarge(ValueError):
    """An upload over the byte limit, or an image with more pixels than allowed."""


# a decode estimated above this many bytes is followed by malloc_trim
TRIM_AFTER_BYTES = 16 * 1024 * 1024


def check_header(data: bytes, max_pixels: int, min_side: int | None = None
                 ) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; BadImage / ImageTooLarge when unusable."""
    return inspect_image(data, max_pixels, min_side)[:3]


def inspect_image(data: bytes, max_pixels: int, min_side: int | None = None,
                  raw: bool = False) -> tuple[str, int, int, int]:
    """(format, width, height, estimated decode bytes) from the header alone; raw=True: a
    camera RAW file (LibRaw reads the header)."""
    if not data:
        raise BadImage("the image file is empty (0 bytes)")
    if raw:
        try:
            w, h, cost = raw_size(data, max_pixels, min_side)
        except RawTooLarge as exc:
            raise ImageTooLarge(str(exc)) from None
        except RawRefused as exc:
            raise BadImage(str(exc)) from None
        return "RAW", w, h, cost
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
                fmt, (w, h) = im.format, im.size
                cost = decode_cost(im, min_side) if min_side is not None else w * h * 4 * 3
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not {FORMATS_DOC} (or the file is damaged)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    if w <= 0 or h <= 0:
        raise BadImage("zero width or height")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image has too many pixels: {w}x{h} = {w * h} (limit {max_pixels})")
    return fmt, w, h, cost


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an upload -> upright RGB image (alpha composited on white, CMYK converted),
    decoded at reduced size when it is much larger than the model input."""
    check_header(data, max_pixels)
    try:
        return decode_image(data, max_pixels, formats=PILLOW_FORMATS)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from None
    except Exception as exc:  # a crafted file can make a decoder raise almost anything
        raise BadImage(f"cannot decode it ({type(exc).__name__}: {exc})") from None


def make_thumbnail(data: bytes, size: int, max_pixels: int, raw: bool = False) -> bytes:
    """A JPEG at most `size` pixels wide and high, whatever the original's format (BadImage for
    a stored object that is not an image); decoded no larger than needed."""
    img = decode_image(data, max_pixels, min_side=size, raw=raw)
    img.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, optimize=False)
    return buf.getvalue()


class DecodeGate:
    """Admission for image decodes: at most `max_concurrent` at once, and their estimated peak
    bytes together within `budget_bytes` (one decode over the budget runs alone). Waiting is
    asynchronous (no worker thread is held while queued), in arrival order, and works across
    event loops and threads."""

    def __init__(self, max_concurrent: int, budget_bytes: int):
        self.max_concurrent = max(1, max_concurrent)
        self.budget_bytes = max(1, budget_bytes)
        self._lock = threading.Lock()
        self._active = 0
        self._used = 0
        self._waiters: deque = deque()  # [cost, loop, future]

    @property
    def active(self) -> int:
        return self._active

    def _fits(self, cost: int) -> bool:
        return self._active < self.max_concurrent and (
            self._active == 0 or self._used + cost <= self.budget_bytes)

    def _release(self, cost: int) -> None:
        with self._lock:
            self._active -= 1
            self._used -= cost
            while self._waiters and self._fits(self._waiters[0][0]):
                entry = self._waiters.popleft()
                self._active += 1
                self._used += entry[0]
                entry[1].call_soon_threadsafe(self._grant, entry)

    def _grant(self, entry) -> None:
        fut = entry[2]
        if fut.done():  # cancelled while the grant was on its way: hand the slot on
            self._release(entry[0])
        else:
            fut.set_result(None)

    @asynccontextmanager
    async def hold(self, cost: int):
        cost = min(max(0, int(cost)), self.budget_bytes)
        with self._lock:
            if not self._waiters and self._fits(cost):
                self._active += 1
                self._used += cost
                fut = None
            else:
                fut = asyncio.get_running_loop().create_future()
                entry = [cost, asyncio.get_running_loop(), fut]
                self._waiters.append(entry)
        if fut is not None:
            try:
                await fut
            except asyncio.CancelledError:
                with self._lock:
                    if entry in self._waiters:  # never granted
                        self._waiters.remove(entry)
                        raise
                if not fut.cancelled():  # granted, then cancelled: give the slot back
                    self._release(cost)
                raise  # (a cancelled future: _grant gives it back)
        try:
            yield
        finally:
            self._release(cost)


async def decode_gated(gate: DecodeGate, data: bytes, max_pixels: int, decode,
                       min_side: int | None = DECODE_MIN_SIDE, raw: bool = False):
    """Check the header (BadImage / ImageTooLarge), wait for room in the gate, run `decode()`
    in a worker thread, and give memory back to the OS after a large decode."""
    cost = (await run_in_threadpool(inspect_image, data, max_pixels, min_side, raw))[3]
    try:
        async with gate.hold(cost):
            return await run_in_threadpool(decode)
    finally:
        if cost >= TRIM_AFTER_BYTES and gate.active == 0:
            await run_in_threadpool(release_memory)
