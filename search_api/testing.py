"""Hostile inputs and a process probe for the API's tests and benchmarks (tests/search_api,
bench/hostile.py): images that are tiny on disk and huge when decoded, odd but valid images, a
JPEG whose header lies about its size, and a process's resident memory.

Here rather than in tests/: the benchmarks import it too, and bench must not depend on the test
tree; it needs nothing beyond the service's own dependencies (Pillow).
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_alpha(size: int = 64) -> bytes:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    for x in range(size // 4, 3 * size // 4):
        for y in range(size // 4, 3 * size // 4):
            im.putpixel((x, y), (220, 30, 30, 255))
    return encode(im, "PNG")


def cmyk_jpeg(size: int = 64) -> bytes:
    return encode(Image.new("CMYK", (size, size), (0, 200, 200, 20)), "JPEG", quality=90)


def _blank_png(width: int, height: int, bit_depth: int, color_type: int, row_bytes: int) -> bytes:
    """A complete PNG of all-zero rows, compressed a block of rows at a time (tiny on disk)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + row_bytes)  # filter byte + pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 100) for _ in range(height // 100)]
    parts += [comp.compress(row * (height % 100)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real, complete 1-bit PNG of width x height (400 Mpx): ~50 kB on disk, gigabytes when
    decoded to RGB."""
    return _blank_png(width, height, 1, 0, (width + 7) // 8)


def transparent_png(w: int = 6300, h: int = 6300) -> bytes:
    """~150 kB: a fully transparent RGBA PNG of w x h (within the pixel limit)."""
    return _blank_png(w, h, 8, 6, w * 4)


def huge_canvas_gif(w: int = 6300, h: int = 6300) -> bytes:
    """43 bytes declaring a w x h canvas (a 1-pixel frame, transparent background)."""
    return (b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
            + b"\x21\xf9\x04\x01\x00\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1)
            + b"\x00\x02\x02\x44\x01\x00\x3b")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (from /proc; NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def jpeg_with_header_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the frame header (SOF0/SOF2) of a JPEG to claim another size."""
    b = bytearray(data)
    i = 2
    while i < len(b):
        marker = b[i + 1]
        length = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            b[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(b)
        i += 2 + length
    raise ValueError("no SOF marker")
