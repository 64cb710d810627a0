"""Faults: the object store goes down (search still answers, /health degraded, image bytes 503,
then it recovers), the store or the index is broken at start, the model file is missing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy.ports import free_port
from tests.search_api.helpers import PREFIX, build_service

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.s3
def test_object_store_down_and_back(tiny_flickr, tmp_path, encoder):
    """A SeaweedFS of its own (the shared one must stay up), stopped and restarted mid-test."""
    from deploy import local_s3

    from objectstore import S3Store

    root, _ = tiny_flickr
    port = free_port()
    creds = ("fault-access", "fault-secret-123")
    data_dir = tmp_path / "s3"
    proc = local_s3.start(data_dir, port, *creds)
    try:
        store = S3Store(f"127.0.0.1:{port}", *creds, "faults", timeout=2.0, retries=1)
        svc = build_service(tmp_path, root, encoder, store=store)
        with TestClient(svc.app, raise_server_exceptions=False) as c:
            hit = c.post("/search_images_by_text", json={"query": "red", "top_k": 2}).json()
            key = hit["results"][0]["key"]
            assert c.get(f"/images/{key}").status_code == 200
            assert c.get("/health").json()["status"] == "ok"

            local_s3.stop(proc)  # the store goes down

            r = c.post("/search_images_by_text", json={"query": "a green square", "top_k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3  # search still answers
            h = c.get("/health")
            assert h.status_code == 200
            body = h.json()
            assert body["status"] == "degraded" and body["store"].startswith("error:")
            assert body["index_version"] and body["vector_count"] > 0
            for url in (f"/images/{key}", f"/images/{key}?size=128"):
                img = c.get(url)
                assert img.status_code == 503, img.text
                assert "object store unavailable" in img.json()["detail"]
                assert int(img.headers["Retry-After"]) >= 1  # when the store is tried again
            metrics = c.get("/metrics").text
            assert "search_api_store_up 0.0" in metrics

            proc = local_s3.start(data_dir, port, *creds)  # and comes back with its data
            assert c.get(f"/images/{key}").status_code == 200
            assert c.get("/health").json()["status"] == "ok"
            assert "search_api_store_up 1.0" in c.get("/metrics").text
    finally:
        local_s3.stop(proc)


def test_store_unreachable_and_index_corrupt_at_start(tiny_flickr, tmp_path, encoder,
                                                      small_checkpoint):
    """Nothing answers on the S3 port and CURRENT names a damaged version: the service still
    starts (text search needs neither... once an index is there), /health says why."""
    from core.settings import Settings
    from search_api.main import build_service as build_search_service
    from search_api.main import create_app

    root, _ = tiny_flickr
    svc = build_service(tmp_path, root, encoder)
    version = svc.repo.current_version()
    (svc.repo.versions_dir / version / "table.arrow").write_text("[]")  # checksum mismatch
    settings = Settings(model_path=str(small_checkpoint), index_dir=str(svc.repo.root),
                           store_backend="s3", minio_endpoint=f"127.0.0.1:{free_port()}",
                           reload_interval_s=0, store_retry_s=0)
    service = build_search_service(settings)
    with TestClient(create_app(settings, service), raise_server_exceptions=False) as c:
        h = c.get("/health").json()
        assert h["status"] == "degraded"
        assert h["store"].startswith("error:") and "not reachable" in h["store"]
        assert h["index_version"] is None and "corrupt" in h["last_reload_error"]
        r = c.post("/search_images_by_text", json={"query": "red"})
        assert r.status_code == 503 and r.json()["detail"]
        r = c.get(f"/images/{PREFIX}1000_red_circle.jpg")
        assert r.status_code == 503 and "object store unavailable" in r.json()["detail"]


def _run_service(env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search_api", "--port", str(free_port())],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_model_file_problem_at_start_exits_nonzero(tmp_path, problem):
    model = tmp_path / "model.pt"
    if problem == "corrupt":
        model.write_bytes(b"\x00not a torch checkpoint" * 10)
    p = _run_service({"MODEL_PATH": str(model), "INDEX_DIR": str(tmp_path / "index"),
                      "LOCAL_STORE_DIR": str(tmp_path / "store")})
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start:") and str(model) in last
    assert ("not found" if problem == "missing" else "not a readable checkpoint") in last
    assert "Traceback" not in p.stderr


def test_unloadable_checkpoint_exits_nonzero_in_process(tmp_path, monkeypatch, capsys):
    """Past the cheap pre-flight checks (a zip archive, but not a checkpoint): the same exit 2
    and one clear line, from the torch loader's error."""
    import zipfile

    from search_api.__main__ import main
    from core.settings import get_settings

    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w") as z:
        z.writestr("hello.txt", "not a model")
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
    get_settings.cache_clear()
    try:
        assert main(["--port", str(free_port())]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot start:") and "not a readable checkpoint" in err
