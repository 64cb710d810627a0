"""Ingest from a folder, from the original zips, and from URLs; idempotent by content hash."""
import http.server
import threading
from functools import partial

import pytest

from flickr8k.format import SourceError, SourceNotFound
from flickr8k.sources import download, open_source, resolve
from tests.conftest import zip_flickr8k


@pytest.fixture
def http_server(tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_url_ingest_downloads_resumes_and_verifies(tiny_flickr, http_server, tmp_path):
    root, meta = tiny_flickr
    served, base = http_server
    images_zip, text_zip = zip_flickr8k(root, served)
    cache = tmp_path / "cache"
    # a partial earlier download is resumed, not restarted
    cache.mkdir()
    full = images_zip.read_bytes()
    (cache / "Flickr8k_Dataset.zip.part").write_bytes(full[: len(full) // 2])
    src = open_source(f"{base}/Flickr8k_Dataset.zip", cache_dir=cache)
    assert (cache / "Flickr8k_Dataset.zip").read_bytes() == full
    assert not (cache / "Flickr8k_Dataset.zip.part").exists()
    assert len(src.image_names("dev")) == len(meta["dev"])


def test_download_rejects_wrong_size_and_bad_url(tiny_flickr, http_server, tmp_path):
    served, base = http_server
    (served / "f.bin").write_bytes(b"x" * 100)
    with pytest.raises(SourceError, match="verification"):
        download(f"{base}/f.bin", tmp_path / "dl" / "f.bin", expected_size=99)
    assert not (tmp_path / "dl" / "f.bin").exists() and not (tmp_path / "dl" / "f.bin.part").exists()
    with pytest.raises(SourceNotFound, match="HTTP 404"):  # permanent: no retry can fix it
        download(f"{base}/missing.zip", tmp_path / "dl" / "m.zip")
    with pytest.raises(SourceNotFound, match="HTTP 404.*FLICKR8K_SOURCE"):
        resolve(f"{base}/missing/Flickr8k_Dataset.zip", cache_dir=tmp_path / "dl")


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="no image folder"):
        open_source(str(tmp_path))
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "x.zip"), str(tmp_path / "x.zip"))
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "nope" / "Flickr8k_Dataset.zip"))
