"""The API on the Milvus backend, against a real Milvus standalone server: nothing held locally,
the same scores as FAISS, /health with alias / collection / count, an alias switch under
concurrent queries, and Milvus stopped and started again under a running service."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.settings import Settings
from flickr8k.sources import open_source
from indexer import pipeline
from indexer.ingest import ingest
from indexer.faiss_index import FaissIndex
from indexer.milvus_index import MilvusIndex
from indexer.repository import IndexRepository
from objectstore import LocalStore
from search_api.main import build_service, create_app

from .helpers import PREFIX, serve

QUERIES = ["a red circle", "a blue square", "the green circle in the middle", "yellow square",
           "a picture of a black circle", "white"]


@pytest.fixture(scope="module")
def milvus_service(milvus_server, tiny_flickr, encoder, tmp_path_factory):
    """A store with the tiny dataset indexed into Milvus, and an app on the Milvus backend
    (alias re-resolved every 0.2 s). Shared by this module's tests, in file order: the alias
    switch publishes a smaller version, the last test stops Milvus."""
    root, _ = tiny_flickr
    tmp_path = tmp_path_factory.mktemp("milvus-api")
    milvus_prefix = f"t_api_{uuid.uuid4().hex[:8]}"
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="all", progress=False)
    index = MilvusIndex(milvus_server.uri, prefix=milvus_prefix, timeout_s=2.0)
    pipeline.rebuild(store, encoder, index, PREFIX, progress=False)
    settings = Settings(index_backend="milvus", milvus_uri=milvus_server.uri,
                        milvus_collection_prefix=milvus_prefix, reload_interval_s=0,
                        milvus_refresh_s=0.2, index_dir=str(tmp_path / "no-index-here"))
    service = build_service(settings, encoder=encoder, index=index, store=store)
    yield create_app(settings, service), service, index, store
    for name in index.versions():
        index.client.drop_collection(name)


def _search(client, text, top_k=5):
    return client.post("/search_images_by_text", json={"text": text, "top_k": top_k})


def test_same_results_and_scores_as_faiss(milvus_service, encoder, tmp_path):
    from fastapi.testclient import TestClient

    app, service, index, store = milvus_service
    repo = IndexRepository(tmp_path / "faiss")
    pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    faiss_settings = Settings(index_dir=str(repo.root), reload_interval_s=0)
    faiss_app = create_app(faiss_settings,
                           build_service(faiss_settings, encoder=encoder, store=store))
    with TestClient(app) as m, TestClient(faiss_app) as f:
        for text in QUERIES:
            got, want = _search(m, text, 10).json(), _search(f, text, 10).json()
            assert [h["key"] for h in got["results"]] == [h["key"] for h in want["results"]]
            np.testing.assert_allclose([h["score"] for h in got["results"]],
                                       [h["score"] for h in want["results"]], atol=1e-5)
            np.testing.assert_allclose([h["similarity"] for h in got["results"]],
                                       [h["similarity"] for h in want["results"]], atol=1e-5)
            assert got["total"] == want["total"] == 24
            assert got["index_version"] == index.published(encoder.model_id)
        batch = m.post("/search_images_by_texts", json={"queries": QUERIES[:3], "top_k": 3})
        assert [[h["key"] for h in r["results"]] for r in batch.json()] == \
            [[h["key"] for h in _search(f, t, 3).json()["results"]] for t in QUERIES[:3]]


def test_dedupe_collapses_as_on_faiss(milvus_service, encoder, tmp_path, monkeypatch):
    """dedupe=true on Milvus: without a report, the ranked photos' vectors (read back from the
    collection) collapse as FAISS's do; with a report of the served collection, its groups."""
    from fastapi.testclient import TestClient

    import search_api.dedupe as dedupe
    from indexer.duplicates import DuplicateGroup, DuplicateReport, report_path, write_report

    monkeypatch.setattr(dedupe, "DEFAULT_THRESHOLD", 0.5)  # the tiny model's photos are near
    app, service, index, store = milvus_service
    repo = IndexRepository(tmp_path / "faiss")
    pipeline.rebuild(store, encoder, FaissIndex(repo), PREFIX, progress=False)
    faiss_settings = Settings(index_dir=str(repo.root), reload_interval_s=0)
    faiss_app = create_app(faiss_settings,
                           build_service(faiss_settings, encoder=encoder, store=store))
    ask = {"text": QUERIES[0], "top_k": 4, "dedupe": True}
    with TestClient(app) as m, TestClient(faiss_app) as f:
        for offset in (0, 4):
            got = m.post("/search_images_by_text", json={**ask, "offset": offset}).json()
            want = f.post("/search_images_by_text", json={**ask, "offset": offset}).json()
            assert got["dedupe"] == want["dedupe"] == "page"
            assert [(h["key"], h["duplicates"], h["duplicate_keys"]) for h in got["results"]] \
                == [(h["key"], h["duplicates"], h["duplicate_keys"]) for h in want["results"]]
            assert got["total"] == want["total"]
        ranked = [h["key"] for h in _search(m, QUERIES[0], 24).json()["results"]]
        path = report_path(Path(service.duplicates_report).parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        view = service.index.current
        write_report(DuplicateReport(view.version, encoder.model_id, "milvus", 0.85, view.count,
                                     [DuplicateGroup(sorted(ranked[:3]), 0.9)]), path)
        try:
            body = m.post("/search_images_by_text", json=ask).json()
            assert body["dedupe"] == "report"
            assert body["results"][0]["key"] == ranked[0]
            assert body["results"][0]["duplicates"] == 2
            assert [h["key"] for h in body["results"][1:]] == ranked[3:6]
        finally:
            path.unlink()


def test_health_reports_backend_alias_collection_and_count(milvus_service, encoder):
    from fastapi.testclient import TestClient

    app, service, index, _ = milvus_service
    with TestClient(app) as c:
        h = c.get("/health").json()
        assert service.index.backend == "milvus" and service.index.watch_s == 0.2
    assert h["status"] == "ok" and h["index_backend"] == "milvus"
    assert h["index_alias"] == index.alias(encoder.model_id)
    assert h["index_collection"] == h["index_version"] == index.published(encoder.model_id)
    assert h["vector_count"] == 24
    assert service.index._thread is None  # the refresher stops with the app


def test_alias_switch_while_eight_threads_query(milvus_service, encoder, monkeypatch):
    from indexer.milvus_index import MilvusView

    app, service, index, _ = milvus_service
    calls = []
    real_search = MilvusView.search

    def counted(self, queries, k, readback=None):
        calls.append(len(queries))
        return real_search(self, queries, k, readback=readback)

    monkeypatch.setattr(MilvusView, "search", counted)
    model = encoder.model_id
    old = index.published(model)
    old_keys = set(index.indexed(model).etags)
    # the next version: half the images, the same vectors (no re-embedding)
    keys = sorted(old_keys)[::2]
    vectors = index.view(model).stored_vectors(keys)
    answers, errors = [], []
    stop = threading.Event()

    with serve(app) as base:
        def client_loop(n):
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    r = _search(c, QUERIES[n % len(QUERIES)], 24)
                    if r.status_code != 200:
                        errors.append((r.status_code, r.text[:200]))
                        continue
                    body = r.json()
                    answers.append((body["index_version"],
                                    {h["key"] for h in body["results"]}))

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        version = index.begin(model, vectors.shape[1])
        index.write(version, keys, vectors, ["e"] * len(keys))
        index.publish(version)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(v == version for v, _ in answers[-8:]):
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    seen = {v for v, _ in answers}
    assert seen == {old, version}
    for v, got in answers:  # each answer comes from the version it names, entirely
        assert got == (old_keys if v == old else set(keys))
    # concurrent queries shared Milvus calls (IndexHolder.search batches them)
    assert sum(calls) >= len(answers) and len(calls) < len(answers)


def test_milvus_down_means_503_and_degraded_then_it_recovers(milvus_service, milvus_server):
    app, service, index, _ = milvus_service
    with serve(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert _search(c, "a red circle").status_code == 200
        milvus_server.stop()
        try:
            r = _search(c, "a red circle")
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"  # the holder asks Milvus again within 0.2 s
            detail = r.json()["detail"]
            assert "Milvus" in detail and "does not answer" in detail
            assert "Traceback" not in r.text and "/" not in detail and "127.0.0.1" not in detail
            h = c.get("/health").json()
            assert h["status"] == "degraded" and h["index_backend"] == "milvus"
            assert "Milvus" in h["last_reload_error"]
            assert _search(c, "a blue square").status_code == 503
        finally:
            milvus_server.start()
        # back without a restart of the service (the collection loads again first)
        deadline = time.monotonic() + 120
        while True:
            r = _search(c, "a red circle")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 503, r.text
            time.sleep(1.0)
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        assert c.get("/health").json()["status"] == "ok"
