"""Every photo format the index reads, decoded from samples the test makes: Pillow's formats,
HEIC and AVIF, 16-bit TIFF, and camera RAW through rawpy's real decoder (a pidng DNG: the
embedded preview when there is one, else the demosaic), within the pixel limit."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoder.image_formats import (IMAGE_SUFFIXES, content_type, decoder_versions,
                                   is_image_key, is_raw_key, raw_size, RawTooLarge)
from encoder.preprocessing import BadImage, decode_image
from tests.photo_samples import BLUE, GREEN, RED, dng_bytes, image_bytes


def _close(pixel, color, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, color))


def test_which_keys_are_photos_any_case():
    for key in ("2023/beach/a.JPG", "x/b.heic", "x/c.Heic", "c.HEIF", "d.avif", "e.TIFF",
                "f.tif", "g.gif", "h.bmp", "i.webp", "j.png", "k.jpeg", "raw/l.DNG", "m.cr2",
                "n.CR3", "o.nef", "p.ARW", "q.raf", "r.orf"):
        assert is_image_key(key), key
    for key in ("notes.txt", "x/._b.heic", ".DS_Store", "x/.hidden.jpg", "a.jpg/", "a.svg",
                "a.eps", "noext"):
        assert not is_image_key(key), key
    assert is_raw_key("a/B.NEF") and not is_raw_key("a.tiff")
    assert content_type("x/Y.HEIC") == "image/heic" and content_type("a.JPG") == "image/jpeg"
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
    assert "rawpy" in decoder_versions() and "pillow-heif" in decoder_versions()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"])
def test_each_pillow_format_decodes_to_rgb(fmt):
    data = image_bytes(fmt, (64, 48), RED)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert _close(img.getpixel((32, 24)), RED), (fmt, img.getpixel((32, 24)))


def test_animated_gif_gives_its_first_frame():
    img = decode_image(image_bytes("GIF", (40, 40), GREEN))
    assert _close(img.getpixel((20, 20)), GREEN)


def test_16_bit_tiff_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "TIFF")
    img = decode_image(buf.getvalue())
    assert img.getpixel((0, 0))[0] < 10 and 110 < img.getpixel((32, 24))[0] < 150
    assert img.getpixel((63, 47))[0] > 245


def test_large_heic_is_decoded_at_reduced_size():
    img = decode_image(image_bytes("HEIF", (1200, 1000), BLUE), min_side=224)
    assert max(img.size) < 1200 and min(img.size) >= 224


def test_pixel_limit_applies_to_heic_and_avif():
    for fmt in ("HEIF", "AVIF"):
        with pytest.raises(BadImage, match="too large"):
            decode_image(image_bytes(fmt, (200, 100)), max_pixels=10_000)


def test_dng_without_preview_is_demosaiced_by_libraw():
    data = dng_bytes(64, 48, rgb=(0.6, 0.6, 0.6))
    with pytest.raises(BadImage):  # Pillow alone cannot read it: RAW goes through LibRaw
        decode_image(data)
    img = decode_image(data, raw=True, min_side=None)
    assert img.mode == "RGB" and img.size == (64, 48)
    r, g, b = img.getpixel((32, 24))
    assert min(r, g, b) > 60  # a grey scene comes out grey-ish, not black


def test_dng_embedded_preview_is_used_when_there_is_one():
    preview = image_bytes("JPEG", (32, 24), RED)
    data = dng_bytes(64, 48, rgb=(0.5, 0.5, 0.5), preview=preview)
    img = decode_image(data, raw=True)
    assert img.size == (32, 24) and _close(img.getpixel((16, 12)), RED)  # not the grey mosaic


def test_large_raw_demosaic_is_half_size_and_bounded():
    data = dng_bytes(1000, 600)
    w, h, cost = raw_size(data, 40_000_000, min_side=224)
    assert (w, h) == (1000, 600) and cost < 1000 * 600 * 12
    img = decode_image(data, raw=True, min_side=224)
    assert min(img.size) >= 224 and img.size[0] <= 500
    with pytest.raises(RawTooLarge):
        raw_size(data, 100_000)
    with pytest.raises(BadImage, match="too large"):
        decode_image(data, max_pixels=100_000, raw=True)


@pytest.mark.parametrize("data", [b"", b"not a raw file at all" * 10,
                                  image_bytes("JPEG")[:40]])
def test_garbage_named_raw_is_refused_cleanly(data):
    with pytest.raises(BadImage):
        decode_image(data, raw=True)
