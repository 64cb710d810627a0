"""decode_image: EXIF orientation, reduced-size decoding of large images (small ones decode
exactly as before), alpha on white, bounded memory for images with a huge canvas."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from core.memory import release_memory
from encoder.preprocessing import DECODE_MIN_SIDE, BadImage, decode_cost, decode_image
from tests.conftest import make_image


def _old_decode(data: bytes) -> Image.Image:
    """decode_image as it was before reduced-size decoding (the reference for small images)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth content with some edges (JPEG-friendly), not noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([127 + 100 * np.sin(x / 37 + seed), 127 + 100 * np.cos(y / 23),
                    127 + 100 * np.sin((x + y) / 51)], axis=-1).astype(np.uint8)
    im = Image.fromarray(rgb)
    ImageDraw.Draw(im).rectangle((w // 4, h // 4, w // 2, h // 2), fill=(250, 20, 20))
    return im


def _mad(a: Image.Image, b: Image.Image, size: int = 224) -> float:
    """Mean absolute difference of two images squashed to the model input (as eval does)."""
    a = np.asarray(a.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)
    b = np.asarray(b.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)
    return float(np.abs(a - b).mean())


def _p_with_transparency(size: int) -> bytes:
    im = Image.new("P", (size, size), 0)
    im.putpalette([0, 0, 0, 20, 200, 20] + [0] * 762)
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=1)
    return _save(im, "GIF", transparency=0)


SMALL = {
    "flickr-like-96": lambda: make_image("red", "circle", 1),
    "jpeg-224": lambda: _save(_photo(224, 224), "JPEG", quality=90),
    "jpeg-500x375": lambda: _save(_photo(500, 375), "JPEG", quality=90),
    "jpeg-895x895": lambda: _save(_photo(895, 895), "JPEG", quality=90),  # < 2 x 448
    "progressive-jpeg": lambda: _save(_photo(600, 400), "JPEG", progressive=True),
    "cmyk-jpeg": lambda: _save(Image.new("CMYK", (300, 200), (0, 200, 200, 20)), "JPEG"),
    "rgba-png": lambda: _save(Image.new("RGBA", (300, 300), (200, 10, 10, 128)), "PNG"),
    "la-png": lambda: _save(Image.new("LA", (100, 50), (80, 60)), "PNG"),
    "p-gif-transparent": lambda: _p_with_transparency(400),
    "png-800": lambda: _save(_photo(800, 600), "PNG"),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_images_not_much_larger_than_the_model_input_decode_exactly_as_before(name):
    data = SMALL[name]()
    new, old = decode_image(data), _old_decode(data)
    assert new.mode == "RGB" and new.size == old.size
    assert np.array_equal(np.asarray(new), np.asarray(old))


def test_tiny_flickr_copies_decode_exactly_as_before(tiny_flickr):
    root, info = tiny_flickr
    for name in info["names"]:
        data = (root / "Images" / name).read_bytes()
        assert np.array_equal(np.asarray(decode_image(data)), np.asarray(_old_decode(data)))


def test_large_jpeg_is_decoded_at_reduced_size_and_looks_the_same():
    data = _save(_photo(4000, 3000), "JPEG", quality=92)
    img = decode_image(data)
    assert min(img.size) >= DECODE_MIN_SIDE and img.size[0] < 4000 / 2  # DCT-scaled (1/4 here)
    assert img.size == (1000, 750)
    full = decode_image(data, min_side=None)
    assert full.size == (4000, 3000)
    assert _mad(img, full) < 2.0  # the same picture at the model's 224 px


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_large_non_jpeg_is_reduced_before_conversion(fmt):
    src = _photo(2000, 1500)
    data = _save(src, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    img = decode_image(data)
    assert img.size == (-(-2000 // 3), 500)  # factor min(2000 // 448, 1500 // 448) = 3
    assert _mad(img, _old_decode(data)) < 2.0


def test_large_transparent_png_is_composited_on_white_at_reduced_size():
    im = Image.new("RGBA", (3000, 2400), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((1000, 800, 1999, 1599), fill=(220, 30, 30, 255))
    ImageDraw.Draw(im).rectangle((0, 0, 999, 799), fill=(0, 0, 255, 128))  # half transparent
    data = _save(im, "PNG")
    img = decode_image(data)
    assert img.size == (600, 480)  # factor 5
    px = np.asarray(img)
    assert tuple(px[-1, -1]) == (255, 255, 255)  # transparent -> white
    assert tuple(px[240, 300]) == (220, 30, 30)  # opaque red stays red
    assert abs(int(px[50, 50][2]) - 255) <= 1 and abs(int(px[50, 50][0]) - 127) <= 2  # blend
    assert _mad(img, _old_decode(data)) < 1.0


def test_large_palette_gif_with_transparency_reduced():
    data = _p_with_transparency(2000)
    img = decode_image(data)
    assert img.size == (500, 500)
    px = np.asarray(img)
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[250, 250]) == (20, 200, 20)
    assert _mad(img, _old_decode(data)) < 1.0


@pytest.mark.parametrize("orientation,expected", [
    (1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(orientation, expected):
    src = Image.new("RGB", (120, 60), (250, 0, 0))
    src.paste((0, 0, 250), (60, 0, 120, 60))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(src, "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert img.size == upright.size
    assert np.array_equal(np.asarray(img), np.asarray(upright))
    if orientation == 6:  # "rotate 90 CW to view": portrait, red on top
        assert img.size == (60, 120)
        r, g, b = img.getpixel((30, 10))
        assert r > 200 and b < 50
    if expected is None:
        assert img.size == (120, 60)


def test_exif_orientation_applied_to_a_large_reduced_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(_photo(2000, 1000), "JPEG", exif=exif.tobytes())
    img = decode_image(data)
    assert img.size == (500, 1000)  # drafted to 1/2, then rotated to portrait


def test_damaged_exif_does_not_reject_the_image():
    src = _save(Image.new("RGB", (50, 40), (1, 2, 3)), "JPEG")
    bad = src[:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\xff" + src[2:]
    img = decode_image(bad)
    assert img.size == (50, 40)


def test_limits_and_garbage_still_refused():
    with pytest.raises(BadImage):
        decode_image(b"")
    with pytest.raises(BadImage):
        decode_image(b"not an image at all")
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(BadImage, match="too large"):
        decode_image(data, max_pixels=99 * 100)


def _huge_canvas_gif(w: int = 6300, h: int = 6300) -> bytes:
    """43 bytes: a GIF whose logical screen is w x h with a 1-pixel frame, transparent index."""
    return (b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
            + b"\x21\xf9\x04\x01\x00\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1)
            + b"\x00\x02\x02\x44\x01\x00\x3b")


def _transparent_png(w: int, h: int) -> bytes:
    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    row = b"\x00" * (1 + w * 4)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * h, 9)) + chunk(b"IEND", b""))


def _peak_rss_add_mb(fn) -> float:
    """Peak RSS added while fn runs, in a fresh process (ru_maxrss is per process)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        q.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)

    p = ctx.Process(target=child)
    p.start()
    out = q.get(timeout=120)
    p.join(30)
    return out


@pytest.mark.parametrize("make,limit_mb", [(_huge_canvas_gif, 120),
                                           (lambda: _transparent_png(6300, 6300), 260)])
def test_huge_canvas_costs_its_loaded_size_not_several_rgba_copies(make, limit_mb):
    """Before: ~450 MB for either (full-size RGBA conversion, compositing, RGB copy). Now: the
    loaded image (40 MB palette, 160 MB RGBA) plus small strips."""
    data = make()
    img = decode_image(data)
    assert img.size == (450, 450) and img.getpixel((10, 10)) == (255, 255, 255)
    assert _peak_rss_add_mb(lambda: (decode_image(data), release_memory())) < limit_mb
    from PIL import Image as _I

    opened = _I.open(io.BytesIO(data))
    assert decode_cost(opened) >= opened.size[0] * opened.size[1]  # the gate's estimate
