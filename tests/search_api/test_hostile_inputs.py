"""Hostile inputs must not stall, bloat or break the service for everyone: broken index
versions (refused, errors cleared once fixed), what /health reveals (no server paths, bounded
echo), result URLs independent of the Host header, EXIF orientation, over-long image keys, and
memory under a burst of worst-case uploads (a real uvicorn process, RSS from /proc)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy.ports import free_port
from search_api.testing import encode, huge_canvas_gif, rss_mb, transparent_png
from tests.search_api.helpers import PREFIX, build_service, republish

ROOT = Path(__file__).resolve().parents[2]
KEY = "hostile-key"
AUTH = {"X-API-Key": KEY}
SERVICE_OPTIONS = dict(api_key=KEY)


def _reload(c):
    r = c.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _search_ok(c, version):
    s = c.post("/search_images_by_text", json={"query": "red", "top_k": 3})
    assert s.status_code == 200, s.text
    assert s.json()["index_version"] == version and len(s.json()["results"]) == 3


# --- broken index versions ------------------------------------------------------------------
def _short_table(vdir):
    from tests.indexer.helpers import read_key_table_file, write_key_table

    t = read_key_table_file(vdir)
    write_key_table(vdir, t.slice(0, t.num_rows - 1))  # checksum kept consistent


BROKEN = {
    "manifest-null": lambda v: (v / "manifest.json").write_text("null"),
    "manifest-list": lambda v: (v / "manifest.json").write_text("[]"),
    "checksums-list": lambda v: (v / "manifest.json").write_text(json.dumps(
        {**json.loads((v / "manifest.json").read_text()), "checksums": ["index.faiss"]})),
    "table-shorter-than-index": _short_table,
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_version_refused_old_one_keeps_serving(fresh_svc, case):
    with TestClient(fresh_svc.app, raise_server_exceptions=False) as c:
        before = fresh_svc.service.index.current.version
        version, _ = republish(fresh_svc.repo, keep=slice(0, 4))
        BROKEN[case](fresh_svc.repo.versions_dir / version)
        r = _reload(c)
        assert r["changed"] is False and r["version"] == before and r["error"]
        assert version in r["error"] and str(fresh_svc.root) not in r["error"]
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["index_version"] == before
        _search_ok(c, before)


def test_garbage_pointer_then_restored_clears_the_error(fresh_svc):
    with TestClient(fresh_svc.app, raise_server_exceptions=False) as c:
        before = fresh_svc.service.index.current.version
        current = fresh_svc.repo.root / "CURRENT"
        current.write_bytes(b"\xff\xfe\xfa not utf-8")
        r = _reload(c)
        assert r["changed"] is False and "CURRENT" in r["error"] and "UTF-8" in r["error"]
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["last_reload_error"]
        _search_ok(c, before)
        current.write_text(before + "\n")  # put back
        assert _reload(c)["error"] is None
        assert c.get("/health").json()["last_reload_error"] is None


def test_watcher_clears_the_error_when_the_pointer_is_put_back(fresh_svc):
    before = fresh_svc.service.index.current.version
    version, _ = republish(fresh_svc.repo, keep=slice(0, 2))
    (fresh_svc.repo.versions_dir / version / "manifest.json").write_text("null")
    fresh_svc.service.index.reload(retry_failed=False)
    assert fresh_svc.service.index.last_error
    fresh_svc.repo._point_current(before)
    fresh_svc.service.index.reload(retry_failed=False)
    assert fresh_svc.service.index.last_error is None and fresh_svc.service.index.current.version == before


# --- what /health reveals -------------------------------------------------------------------
def test_health_with_a_1mb_pointer_is_small_and_echoes_nothing(fresh_svc):
    with TestClient(fresh_svc.app, raise_server_exceptions=False) as c:
        (fresh_svc.repo.root / "CURRENT").write_bytes(b"A" * 1_000_000)
        _reload(c)
        h = c.get("/health")
        assert h.status_code == 200 and len(h.content) < 2000, len(h.content)
        assert "AAAA" not in h.text and "too long" in h.json()["last_reload_error"]


def test_health_names_no_server_paths(fresh_svc):
    with TestClient(fresh_svc.app, raise_server_exceptions=False) as c:
        shutil.rmtree(fresh_svc.store.root)  # the local store directory disappears
        (fresh_svc.repo.root / "CURRENT").write_text("20990101T000000000000Z-nosuch\n")
        _reload(c)
        h = c.get("/health")
        assert h.status_code == 200
        body = h.json()
        assert body["store"].startswith("error:") and body["last_reload_error"]
        assert str(fresh_svc.root) not in h.text and "/tmp" not in h.text, h.text
        r = c.get(f"/images/{PREFIX}1000_red_circle.jpg")
        assert str(fresh_svc.root) not in r.text


# --- URLs, keys ----------------------------------------------------------------------------
def test_result_urls_ignore_the_host_header(fresh_svc):
    with TestClient(fresh_svc.app) as c:
        r = c.post("/search_images_by_text", json={"query": "red", "top_k": 2},
                   headers={"Host": "evil.example"})
        assert r.status_code == 200
        for hit in r.json()["results"]:
            assert hit["url"].startswith("/images/" + PREFIX) and "evil" not in hit["url"]
            assert c.get(hit["url"]).status_code == 200


def test_result_urls_use_the_public_base_url(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    svc = build_service(tmp_path, root, encoder, public_base_url="https://search.example.org/")
    with TestClient(svc.app) as c:
        r = c.post("/search_images_by_text", json={"query": "red", "top_k": 2},
                   headers={"Host": "evil.example"})
        for hit in r.json()["results"]:
            assert hit["url"].startswith("https://search.example.org/images/" + PREFIX)


@pytest.mark.parametrize("part", ["a" * 256, "é" * 200, "x" * 1000])
def test_over_long_image_key_is_404(fresh_svc, part):
    with TestClient(fresh_svc.app, raise_server_exceptions=False) as c:
        for url in (f"/images/{PREFIX}{part}", f"/images/{PREFIX}{part}?size=64",
                    f"/images/{PREFIX}{part}/y.jpg"):
            r = c.get(url)
            assert r.status_code == 404, (url[:50], r.status_code, r.text[:200])
            assert len(r.content) < 1000


# --- EXIF ---------------------------------------------------------------------------------
def test_exif_rotated_upload_embeds_like_the_upright_image(fresh_svc):
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (60, 120, 3), np.uint8)).resize((240, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    tagged = encode(stored, "PNG", exif=exif.tobytes())
    upright = encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG")
    with TestClient(fresh_svc.app) as c:
        def emb(data):
            r = c.post("/encode_image", files={"image": ("x.png", data, "image/png")},
                       headers=AUTH)
            assert r.status_code == 200, r.text
            return np.array(r.json()["embedding"])
        a, b, plain = emb(tagged), emb(upright), emb(encode(stored, "PNG"))
        assert np.allclose(a, b, atol=1e-5)
        assert not np.allclose(a, plain, atol=1e-3)


# --- memory under a burst of worst-case uploads ------------------------------------------------
def test_burst_of_worst_case_uploads_stays_bounded_and_memory_comes_back(tmp_path,
                                                                         small_checkpoint):
    import httpx

    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(small_checkpoint), "INDEX_DIR": str(tmp_path / "i"),
           "LOCAL_STORE_DIR": str(tmp_path / "s"), "IMAGE_RUNTIME": "torch",
           "TEXT_RUNTIME": "torch", "RELOAD_INTERVAL_S": "0", "API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "search_api", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    images = [("g.gif", huge_canvas_gif(), "image/gif"), ("p.png", transparent_png(), "image/png")]
    assert len(images[0][1]) < 100 and len(images[1][1]) < 300_000
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=300) as c:  # warm up: each kind once
            for name, data, ct in images:
                r = c.post("/encode_image", files={"image": (name, data, ct)})
                assert r.status_code == 200, r.text
        time.sleep(1)
        base = rss_mb(proc.pid)
        peak, stop, statuses = [base], threading.Event(), []

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.01)

        def client(i):
            with httpx.Client(base_url=url, timeout=300) as c:
                for k in range(2):
                    name, data, ct = images[(i + k) % 2]
                    r = c.post("/encode_image", files={"image": (name, data, ct)})
                    statuses.append(r.status_code)

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        time.sleep(10)
        stop.set()
        sampler.join()
        settled = rss_mb(proc.pid)
        figures = {"base": base, "peak": peak[0], "settled": settled}
        assert statuses == [200] * 32, statuses
        # before: each request held ~450 MB, 16 at once took GBs and RSS never came back
        assert peak[0] - base <= 400, figures
        assert settled - base <= 150, figures
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
