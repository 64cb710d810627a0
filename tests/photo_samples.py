"""Photos in every format the index reads, made by the tests themselves: JPEG, PNG, WebP, GIF
(animated), BMP, TIFF with Pillow, HEIC and AVIF with pillow-heif / Pillow, and camera RAW as a
DNG written by pidng from a NumPy Bayer array (decoded by rawpy's real LibRaw), with or without
an embedded JPEG preview (pidng writes none: `dng_bytes` appends one as a second IFD, the way
cameras store theirs)."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

import encoder.image_formats  # noqa: F401  (registers the HEIF opener)

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40)


def image_bytes(fmt: str, size=(64, 48), color=RED) -> bytes:
    """One image in Pillow format `fmt` (GIF: animated, the first frame `color`)."""
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    if fmt == "GIF":
        frames = [img, Image.new("RGB", size, BLUE), Image.new("RGB", size, GREEN)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100,
                       loop=0)
    else:
        img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP", "HEIF", "AVIF")
                              else {}))
    return buf.getvalue()


def bayer(w: int, h: int, rgb=(0.5, 0.5, 0.5), white=4095) -> np.ndarray:
    """An RGGB mosaic of one colour (fractions of the white level)."""
    a = np.zeros((h, w), np.uint16)
    r, g, b = (int(c * white) for c in rgb)
    a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2] = r, g, g, b
    return a


def dng_bytes(w: int = 64, h: int = 48, rgb=(0.5, 0.5, 0.5),
              preview: bytes | None = None, preview_size=(32, 24)) -> bytes:
    """A 16-bit RGGB DNG (pidng); with `preview` (JPEG bytes of `preview_size`), that JPEG
    appended as a reduced-resolution IFD (NewSubfileType 1), which LibRaw offers as the
    thumbnail."""
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import (CalibrationIlluminant, CFAPattern, DNGVersion, Orientation,
                            PhotometricInterpretation)

    t = DNGTags()
    t.set(Tag.ImageWidth, w)
    t.set(Tag.ImageLength, h)
    t.set(Tag.TileWidth, w)
    t.set(Tag.TileLength, h)
    t.set(Tag.Orientation, Orientation.Horizontal)
    t.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    t.set(Tag.SamplesPerPixel, 1)
    t.set(Tag.BitsPerSample, 16)
    t.set(Tag.CFARepeatPatternDim, [2, 2])
    t.set(Tag.CFAPattern, CFAPattern.RGGB)
    t.set(Tag.BlackLevel, 0)
    t.set(Tag.WhiteLevel, 4095)
    t.set(Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1],
                             [1, 1]])
    t.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    t.set(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])
    t.set(Tag.Make, "Test")
    t.set(Tag.Model, "Bayer")
    t.set(Tag.DNGVersion, DNGVersion.V1_4)
    t.set(Tag.DNGBackwardVersion, DNGVersion.V1_2)
    writer = RAW2DNG()
    writer.options(t, path="", compress=False)
    data = bytes(writer.convert(bayer(w, h, rgb)))
    return data if preview is None else _with_preview(data, preview, *preview_size)


def _with_preview(dng: bytes, jpeg: bytes, w: int, h: int) -> bytes:
    buf = bytearray(dng)
    n_tags = struct.unpack_from("<H", buf, 8)[0]  # pidng writes IFD0 right after the header
    next_ifd_at = 8 + 2 + 12 * n_tags
    buf += b"\0" * (-len(buf) % 4)
    jpeg_at = len(buf)
    buf += jpeg + b"\0" * (-len(jpeg) % 4)
    ifd_at = len(buf)
    tags = [(254, 4, 1), (256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 7), (262, 3, 6),
            (273, 4, jpeg_at), (277, 3, 3), (278, 4, h), (279, 4, len(jpeg))]
    tags[0] = (254, 4, 1)  # NewSubfileType: a reduced-resolution copy
    buf += struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        buf += struct.pack("<HHII", tag, typ, 1, value) if typ == 4 else \
            struct.pack("<HHIHH", tag, typ, 1, value, 0)
    buf += struct.pack("<I", 0)
    struct.pack_into("<I", buf, next_ifd_at, ifd_at)
    return bytes(buf)


def write_library(root: Path) -> dict[str, bytes]:
    """A photo library as people keep one: nested folders by year and trip, mixed-case
    extensions, a HEIC, an AVIF, a TIFF, an animated GIF, a camera RAW with and one without a
    preview, and one broken file. -> relative path: bytes."""
    files = {
        "2023/beach/a.JPG": image_bytes("JPEG", (80, 60), YELLOW),
        "2023/beach/pool.PNG": image_bytes("PNG", (60, 80), BLUE),
        "2023/city/tram.webp": image_bytes("WEBP", (64, 48), GREEN),
        "2023/city/loop.gif": image_bytes("GIF", (48, 48), RED),
        "2023/city/old.bmp": image_bytes("BMP", (40, 40), BLUE),
        "2023/scan.TIFF": image_bytes("TIFF", (70, 50), GREEN),
        "2024/Snow/b.heic": image_bytes("HEIF", (64, 48), BLUE),
        "2024/Snow/c.Avif": image_bytes("AVIF", (64, 48), RED),
        "2024/Snow/raw/c.dng": dng_bytes(64, 48),
        "2024/Snow/raw/d.DNG": dng_bytes(64, 48, preview=image_bytes("JPEG", (32, 24), RED)),
        "2024/Snow/broken.jpg": b"\xff\xd8\xff\xe0 not really a JPEG",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "2024" / "Snow" / "notes.txt").write_text("not a photo")
    (root / "2024" / "Snow" / "._b.heic").write_bytes(b"macOS resource fork")
    return files


BROKEN = "2024/Snow/broken.jpg"


def photo_exif(taken: str | None = "2023:07:14 18:30:05", offset: str | None = "+02:00",
               make: str | None = "Canon", model: str | None = "EOS R6",
               position: tuple[float, float] | None = (38.7223, -9.1393),
               orientation: int | None = None) -> Image.Exif:
    """EXIF as a camera writes it: DateTimeOriginal and OffsetTimeOriginal in the Exif IFD,
    Make/Model (and Orientation) in IFD0, the position as degrees/minutes/seconds rationals
    with N/S and E/W references in the GPS IFD (0x8825). None leaves a field out."""
    exif = Image.Exif()
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    if orientation is not None:
        exif[0x0112] = orientation
    if taken is not None or offset is not None:
        sub = exif.get_ifd(0x8769)
        if taken is not None:
            sub[0x9003] = taken
        if offset is not None:
            sub[0x9011] = offset
    if position is not None:
        gps = exif.get_ifd(0x8825)
        for ref_tag, tag, value, refs in ((1, 2, position[0], "NS"), (3, 4, position[1], "EW")):
            magnitude = abs(value)
            degrees = int(magnitude)
            minutes = int((magnitude - degrees) * 60)
            seconds = round(((magnitude - degrees) * 60 - minutes) * 60, 4)
            gps[ref_tag] = refs[value < 0]
            gps[tag] = (float(degrees), float(minutes), seconds)
    return exif


def photo_bytes(fmt: str, exif: Image.Exif | bytes | None, size=(64, 48),
                color=RED) -> bytes:
    """One image in Pillow format `fmt` (HEIF written by pillow-heif) carrying `exif` (TIFF:
    in its own IFD0, with the Exif and GPS IFDs as sub-IFDs, as cameras and scanners write it)."""
    buf = io.BytesIO()
    if exif is None:
        extra = {}
    elif fmt == "TIFF" and isinstance(exif, Image.Exif):
        tags = dict(exif.items())
        for pointer in (0x8769, 0x8825):
            sub_ifd = dict(exif.get_ifd(pointer))
            if sub_ifd:
                tags[pointer] = sub_ifd
        extra = {"tiffinfo": tags}
    else:
        extra = {"exif": exif if isinstance(exif, bytes) else exif.tobytes()}
    Image.new("RGB", size, color).save(buf, fmt, **extra)
    return buf.getvalue()
