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


def _read_all(src, names, out):
    """Every image many times; a read that fails or differs is kept, not raised."""
    import zlib

    seen: dict[str, set] = {n: set() for n in names}
    for _ in range(60):
        for n in names:
            try:
                seen[n].add(zlib.crc32(src.read_image(n)))
            except Exception as exc:  # BadZipFile, a bad CRC: what a shared handle gives
                seen[n].add(type(exc).__name__)
    out.put(seen)


def test_zip_source_read_by_forked_workers(tiny_flickr, tmp_path):
    """DataLoader workers are forked from the process that opened the zip: each must read the
    members through its own handle, or they read each other's bytes (bad CRC, wrong image)."""
    import multiprocessing

    root, _ = tiny_flickr
    images_zip, text_zip = zip_flickr8k(root, tmp_path / "zips")
    src = open_source(str(images_zip), str(text_zip), cache_dir=str(tmp_path / "cache"))
    names = src.image_names()
    src.read_image(names[0])  # the parent has used its handle before the fork
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_read_all, args=(src, names, out)) for _ in range(4)]
    for w in workers:
        w.start()
    got = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    import zlib

    want = {n: {zlib.crc32((root / "Images" / n).read_bytes())} for n in names}
    for seen in got:
        assert seen == want
