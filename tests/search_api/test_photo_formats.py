"""A photo library of every format behind the API: each indexed photo (HEIC, AVIF, TIFF, GIF,
camera RAW with and without a preview...) comes back from a search and its thumbnail is served
as JPEG; a HEIC upload searches by image; a stored file the decoders refuse is a 422, not a
500."""
from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer import pipeline
from indexer.faiss_index import FaissIndex
from indexer.ingest import add_folder
from tests.photo_samples import BROKEN, RED, image_bytes, write_library
from tests.search_api.helpers import PREFIX, build_service


@pytest.fixture(scope="module")
def library_client(tiny_flickr, tmp_path_factory, encoder):
    tmp = tmp_path_factory.mktemp("photo_formats")
    files = write_library(tmp / "Photos")
    svc = build_service(tmp, tiny_flickr[0], encoder)
    add_folder(tmp / "Photos", svc.store, PREFIX, "library", progress=False)
    report = pipeline.update(svc.store, encoder, FaissIndex(svc.repo), PREFIX, progress=False)
    assert list(report.failed) == [f"{PREFIX}library/{BROKEN}"]
    with TestClient(svc.app) as client:
        assert client.post("/admin/reload").status_code == 200
        yield client, {f"{PREFIX}library/{k}" for k in files if k != BROKEN}


def test_every_format_is_found_and_thumbnailed_as_jpeg(library_client):
    client, keys = library_client
    hits = client.post("/search_images_by_text", json={"query": "a photo", "top_k": 100}).json()
    found = {h["key"]: h for h in hits["results"]}
    assert keys <= set(found)
    for key in sorted(keys):
        thumb = client.get(found[key]["url"], params={"size": 64})
        assert thumb.status_code == 200, (key, thumb.text)
        assert thumb.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(thumb.content))
        assert im.format == "JPEG" and max(im.size) <= 64, key


def test_raw_thumbnail_uses_the_preview_and_originals_are_safe(library_client):
    client, _ = library_client
    thumb = client.get(f"/images/{PREFIX}library/2024/Snow/raw/d.DNG", params={"size": 64})
    px = Image.open(io.BytesIO(thumb.content)).convert("RGB").getpixel((10, 10))
    assert px[0] > 150 and px[1] < 90  # the red preview, not the grey mosaic
    heic = client.get(f"/images/{PREFIX}library/2024/Snow/b.heic")
    assert heic.status_code == 200 and heic.headers["content-type"] == "application/octet-stream"
    broken = client.get(f"/images/{PREFIX}library/{BROKEN}", params={"size": 64})
    assert broken.status_code == 422


def test_heic_and_avif_uploads_search_by_image(library_client):
    client, _ = library_client
    for fmt, name in (("HEIF", "me.heic"), ("AVIF", "me.avif"), ("TIFF", "me.tif")):
        r = client.post("/search_images_by_image",
                        files={"image": (name, image_bytes(fmt, (64, 48), RED), "image/heic")})
        assert r.status_code == 200 and r.json()["results"], (fmt, r.text)
