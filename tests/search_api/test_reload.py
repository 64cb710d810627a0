"""Hot reload: new index versions are swapped in while queries keep flowing (zero failed
requests); versions that cannot be used (another model, corrupt or missing files) are refused and
the old one keeps serving."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.search_api.helpers import build_service, republish, serve

KEY = "reload-key"
SERVICE_OPTIONS = dict(api_key=KEY)


def _served(client) -> str:
    return client.get("/health").json()["index_version"]


def test_hot_reload_under_load_has_zero_failed_requests(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    # the watcher polls every 50 ms; the admin endpoint forces checks in between
    svc = build_service(tmp_path, root, encoder, api_key=KEY, reload_interval_s=0.05)
    first = svc.repo.current_version()
    versions = {first: set(svc.service.index.current.keys)}
    n_all = svc.service.index.current.count
    stop = threading.Event()
    results: list[tuple[str, list[str]]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def answered(version: str) -> int:
        with lock:
            return sum(1 for v, _ in results if v == version)

    def hammer(base: str, worker: int):
        with httpx.Client(base_url=base, timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 7 == 0:
                        r = http.get("/health")
                        ok = r.status_code == 200 and r.json()["status"] == "ok"
                    elif i % 5 == 0:
                        r = http.post("/search_images_by_texts",
                                      json={"queries": ["red", "blue square"], "top_k": 3})
                        ok = r.status_code == 200
                        if ok:
                            for out in r.json():
                                with lock:
                                    results.append((out["index_version"],
                                                    [h["key"] for h in out["results"]]))
                    else:
                        r = http.post("/search_images_by_text",
                                      json={"query": f"a colored shape {worker} {i}",
                                            "top_k": n_all})
                        ok = r.status_code == 200
                        if ok:
                            out = r.json()
                            with lock:
                                results.append((out["index_version"],
                                                [h["key"] for h in out["results"]]))
                    if not ok:
                        failures.append(f"{r.request.url.path}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(f"transport error: {exc!r}")

    with serve(svc.app) as base, httpx.Client(base_url=base, headers={"X-API-Key": KEY}) as admin:
        threads = [threading.Thread(target=hammer, args=(base, w)) for w in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        subsets = [slice(0, 3), slice(3, 6), slice(0, 5), slice(1, 6), None, slice(0, 2)]
        for n, keep in enumerate(subsets):
            version, keys = republish(svc.repo, keep=keep, base=first)
            versions[version] = keys
            if n % 2 == 0:  # forced by the admin endpoint
                r = admin.post("/admin/reload")
                assert r.status_code == 200 and r.json()["version"] == version, r.text
            else:  # noticed by the watcher
                _wait_for(lambda v=version: svc.service.index.current.version == v)
            # let queries run against this version before the next swap
            _wait_for(lambda v=version: answered(v) >= 20, timeout=30)

        # a version built by another model is refused while traffic flows; the old one stays
        served = svc.service.index.current.version
        foreign, _ = republish(svc.repo, model_id="some-other-model-0123")
        r = admin.post("/admin/reload").json()
        assert r["changed"] is False and "model" in r["error"] and r["version"] == served
        time.sleep(0.3)  # the watcher sees it too, and keeps refusing
        assert svc.service.index.current.version == served

        # and the next good version is swapped in again
        good, keys = republish(svc.repo, keep=slice(0, 4), base=first)
        versions[good] = keys
        assert admin.post("/admin/reload").json()["version"] == good
        _wait_for(lambda: answered(good) >= 20, timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=30)

    print(f"hot reload: {len(results)} answers across {len(seen := {v for v, _ in results})} "
          f"versions, {len(failures)} failures")
    assert not failures, failures[:5]
    assert set(versions) - {first} <= seen  # queries ran against every swapped-in version
    assert len(results) >= 20 * len(subsets), len(results)
    assert foreign not in seen
    for version, keys in results:  # atomic swap: every answer comes from one whole version
        assert set(keys) <= versions[version], (version, keys)
    full = [(v, k) for v, k in results if len(k) > 3]
    assert all(len(k) == len(versions[v]) for v, k in full)


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_refuses_index_built_by_another_model(fresh_svc):
    with TestClient(fresh_svc.app) as c:
        before = _served(c)
        foreign, _ = republish(fresh_svc.repo, model_id="another-model-abcdef")
        r = c.post("/admin/reload", headers={"X-API-Key": KEY})
        assert r.status_code == 200
        body = r.json()
        assert body["changed"] is False and body["version"] == before
        assert "another-model-abcdef" in body["error"] and fresh_svc.service.model_id in body["error"]
        h = c.get("/health").json()
        assert h["index_version"] == before and "rebuild" in h["last_reload_error"]
        s = c.post("/search_images_by_text", json={"query": "red", "top_k": 2}).json()
        assert s["index_version"] == before and len(s["results"]) == 2


@pytest.mark.parametrize("damage", ["corrupt-index", "missing-index", "truncated-table",
                                    "corrupt-manifest", "missing-version-dir", "empty-dir"])
def test_damaged_version_at_reload_keeps_old_serving(fresh_svc, damage):
    with TestClient(fresh_svc.app) as c:
        before = _served(c)
        version, _ = republish(fresh_svc.repo, keep=slice(0, 2))
        vdir = fresh_svc.repo.versions_dir / version
        if damage == "corrupt-index":
            data = bytearray((vdir / "index.faiss").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (vdir / "index.faiss").write_bytes(bytes(data))
        elif damage == "missing-index":
            (vdir / "index.faiss").unlink()
        elif damage == "truncated-table":
            data = (vdir / "table.arrow").read_bytes()
            (vdir / "table.arrow").write_bytes(data[:len(data) // 2])
        elif damage == "corrupt-manifest":
            (vdir / "manifest.json").write_text("{ not json")
        elif damage == "missing-version-dir":
            import shutil

            shutil.rmtree(vdir)
        elif damage == "empty-dir":
            for p in vdir.iterdir():
                p.unlink()
        r = c.post("/admin/reload", headers={"X-API-Key": KEY}).json()
        assert r["changed"] is False and r["version"] == before and r["error"], r
        h = c.get("/health").json()
        assert h["index_version"] == before and h["last_reload_error"]
        s = c.post("/search_images_by_text", json={"query": "blue", "top_k": 3})
        assert s.status_code == 200 and s.json()["index_version"] == before
        assert len(s.json()["results"]) == 3


def test_watcher_reports_a_bad_version_once_then_takes_the_next_good_one(fresh_svc):
    version, _ = republish(fresh_svc.repo, keep=slice(0, 2))
    (fresh_svc.repo.versions_dir / version / "index.faiss").write_bytes(b"garbage")
    before = fresh_svc.service.index.current.version
    for _ in range(5):  # what the watcher does every interval
        fresh_svc.service.index.reload(retry_failed=False)
    assert fresh_svc.service.index.reload_counts["error"] == 1 and fresh_svc.service.index.current.version == before
    good, keys = republish(fresh_svc.repo, keep=slice(0, 3), base=before)
    fresh_svc.service.index.reload(retry_failed=False)
    assert fresh_svc.service.index.current.version == good and fresh_svc.service.index.last_error is None
    assert set(fresh_svc.service.index.current.keys) == keys


def test_starts_without_an_index_then_picks_one_up(tiny_flickr, tmp_path, encoder):
    root, _ = tiny_flickr
    svc = build_service(tmp_path / "built", root, encoder, api_key=KEY)
    empty = build_service(tmp_path / "empty", root, encoder, publish=False, api_key=KEY)
    with TestClient(empty.app) as c:
        h = c.get("/health").json()
        assert h["status"] == "degraded" and h["index_version"] is None and h["vector_count"] == 0
        r = c.post("/search_images_by_text", json={"query": "red"})
        assert r.status_code == 503 and "rebuild" in r.json()["detail"]
        r = c.post("/search_images_by_texts", json={"queries": ["red"]})
        assert r.status_code == 503
        # an index appears: copy the built one in and publish it
        cur = svc.repo.load()
        v = empty.repo.commit_version(cur.index, cur.ids, cur.keys, cur.etags, cur.model_id)
        assert c.post("/admin/reload", headers={"X-API-Key": KEY}).json()["version"] == v
        assert c.post("/search_images_by_text", json={"query": "red"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_reload_response_and_manifest_agree(fresh_svc):
    with TestClient(fresh_svc.app) as c:
        version, keys = republish(fresh_svc.repo, keep=slice(0, 4))
        r = c.post("/admin/reload", headers={"X-API-Key": KEY}).json()
        manifest = json.loads((fresh_svc.repo.versions_dir / version / "manifest.json").read_text())
        assert r == {"changed": True, "version": version, "previous": r["previous"],
                     "vector_count": manifest["count"], "error": None}
        assert c.post("/admin/reload", headers={"X-API-Key": KEY}).json()["changed"] is False
