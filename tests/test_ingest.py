"""Ingest from a folder, from the original zips, and from URLs; idempotent by content hash."""
import http.server
import threading
from functools import partial

import pytest

from indexer.ingest import ingest
from flickr8k.format import SourceError, SourceNotFound
from flickr8k.sources import download, open_source, resolve
from objectstore import LocalStore
from tests.conftest import zip_flickr8k


@pytest.fixture
def http_server(tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_folder_ingest_is_idempotent(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path, "b")
    first = ingest(open_source(str(root)), store, progress=False)
    assert first.uploaded == len(meta["names"]) and first.unchanged == 0
    assert first.texts_uploaded == 3
    second = ingest(open_source(str(root)), store, progress=False)
    assert second.uploaded == 0 and second.unchanged == len(meta["names"])
    assert second.texts_uploaded == 0
    keys = {o.key for o in store.list("flickr8k/images/")}
    assert keys == {f"flickr8k/images/{n}" for n in meta["names"]}
    assert store.exists("flickr8k/text/Flickr8k.token.txt")


def test_split_filter_and_changed_content(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    store = LocalStore(tmp_path, "b")
    rep = ingest(open_source(str(root)), store, split="dev", progress=False)
    assert rep.uploaded == len(meta["dev"])
    # a changed object is uploaded again; an unchanged one is not
    store.put(f"flickr8k/images/{meta['dev'][0]}", b"stale")
    rep = ingest(open_source(str(root)), store, split="dev", progress=False)
    assert rep.uploaded == 1 and rep.unchanged == len(meta["dev"]) - 1


def test_zip_ingest_matches_folder(tiny_flickr, tmp_path):
    root, meta = tiny_flickr
    images_zip, _ = zip_flickr8k(root, tmp_path)
    src = open_source(str(images_zip))  # text zip found beside it by name
    assert src.image_names() == sorted(meta["names"])
    assert src.split("dev") == meta["dev"]
    store = LocalStore(tmp_path / "s", "b")
    assert ingest(src, store, progress=False).uploaded == len(meta["names"])


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
