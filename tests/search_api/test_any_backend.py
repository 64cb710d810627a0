"""The service holds any index that speaks the interface (published / view / status / close;
a view's search, info, info_counts, facets):
here an exact NumPy index made in the test, local or "remote" (searches batched). It serves the
same answers as FAISS, swaps versions, refuses another model's, and answers 503 while the index
does not answer."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.vector_index import IndexLoadError, IndexUnavailable
from search_api.main import build_service, create_app

QUERIES = ["a red circle", "a blue square", "the green circle in the middle", "yellow square"]
SERVICE_OPTIONS = dict(split="all")


class ExactView:
    def __init__(self, version: str, model_id: str, keys: list[str], vectors: np.ndarray):
        self.version, self.model_id, self.keys, self.vectors = version, model_id, keys, vectors
        self.count, self.dim = len(keys), vectors.shape[1]

    def search(self, queries, k, readback=None):
        scores = np.asarray(queries, np.float32) @ self.vectors.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, self.count)]
        out = (np.take_along_axis(scores, top, 1), [[self.keys[i] for i in row] for row in top])
        return out if readback is None else out + ([self.vectors[row, readback] for row in top],)

    # a version without photo metadata
    def info(self, keys):
        return [None] * len(keys)

    def count_matching(self, where):
        return self.count if where is None or where.is_empty() else 0

    def info_counts(self):
        return {"with_date": 0, "with_position": 0, "with_place": 0}

    def facets(self, limit=20):
        return {name: [] for name in ("folder", "country", "city", "camera", "year")}


class ExactIndex:
    """Versions in a dict, one published per model; `down` makes every call fail."""

    def __init__(self, remote: bool):
        self.backend, self.remote = "exact", remote
        self.versions: dict[str, ExactView] = {}
        self.published_by: dict[str, str] = {}
        self.down = False
        self.searches = 0

    def _answer(self):
        if self.down:
            raise IndexUnavailable("the exact index does not answer")

    def publish(self, version, model_id, keys, vectors, published_for=None):
        self.versions[version] = ExactView(version, model_id, keys, vectors)
        self.published_by[published_for or model_id] = version

    def published(self, model_id):
        self._answer()
        return self.published_by.get(model_id)

    def view(self, model_id, version=None):
        self._answer()
        view = self.versions[version or self.published_by[model_id]]
        if view.model_id != model_id:
            raise IndexLoadError(f"index version {view.version} was built by {view.model_id}")
        index = self

        class Counted(ExactView):
            def search(self, queries, k, readback=None):
                index._answer()
                index.searches += 1
                return super().search(queries, k, readback)

        return Counted(view.version, view.model_id, view.keys, view.vectors)

    def status(self, model_id):
        self._answer()
        version = self.published_by.get(model_id)
        return {"backend": self.backend, "version": version,
                "count": self.versions[version].count if version else 0}

    def close(self):
        pass


def _search(client, text, top_k=10):
    return client.post("/search_images_by_text", json={"text": text, "top_k": top_k})


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_a_third_backend_serves_like_faiss(svc, client, encoder, remote):
    current = svc.repo.load()
    vectors = current.vectors_of_ids(current.ids)
    index = ExactIndex(remote)
    index.publish("v1", encoder.model_id, list(current.keys), vectors)
    settings = svc.settings.model_copy(update={"milvus_refresh_s": 0.05})
    service = build_service(settings, encoder=encoder, index=index, store=svc.store)
    with TestClient(create_app(settings, service)) as c:
        for text in QUERIES:
            got, want = _search(c, text).json(), _search(client, text).json()
            assert [h["key"] for h in got["results"]] == [h["key"] for h in want["results"]]
            for field in ("score", "similarity"):
                np.testing.assert_allclose([h[field] for h in got["results"]],
                                           [h[field] for h in want["results"]], atol=1e-5)
            assert got["index_version"] == "v1" and got["total"] == want["total"]
        page = c.post("/search_images_by_text",
                      json={"text": QUERIES[0], "top_k": 3, "offset": 3}).json()
        assert [h["rank"] for h in page["results"]] == [4, 5, 6]
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["index_backend"] == "exact" and h["vector_count"] == 24

        # a new version: swapped in on reload; another model's is refused, the old one serves
        index.publish("v2", encoder.model_id, list(current.keys[:6]), vectors[:6])
        assert c.post("/admin/reload").json()["version"] == "v2"
        assert _search(c, QUERIES[0]).json()["total"] == 6
        index.publish("v3", "another-model", list(current.keys), vectors,
                      published_for=encoder.model_id)
        refused = c.post("/admin/reload").json()
        assert not refused["changed"] and "another-model" in refused["error"]
        assert _search(c, QUERIES[0]).json()["index_version"] == "v2"

        # the index stops answering: 503 and degraded, then back without a restart
        index.down = True
        r = _search(c, QUERIES[1])
        assert r.status_code == 503 and "does not answer" in r.json()["detail"]
        assert c.get("/health").json()["status"] == "degraded"
        index.down = False
        index.published_by[encoder.model_id] = "v2"
        c.post("/admin/reload")
        assert _search(c, QUERIES[1]).status_code == 200
    assert index.searches > 0


def test_the_registered_test_backend_serves_like_faiss(svc, client, encoder, tmp_path,
                                                       monkeypatch):
    """The seam end to end: the test-only NumPy backend, registered by one line, is picked by
    INDEX_BACKEND for the index build and for the service, which answers as FAISS does."""
    from indexer import pipeline
    from indexer.vector_index import BACKENDS, open_index

    monkeypatch.setitem(BACKENDS, "numpy", "tests.indexer.numpy_index:NumpyIndex")
    settings = svc.settings.model_copy(update={"index_backend": "numpy",
                                               "index_dir": str(tmp_path / "numpy")})
    writer = open_index(settings)
    built = pipeline.rebuild(svc.store, encoder, writer, svc.settings.images_prefix,
                             progress=False)
    assert built.count == svc.repo.load().count
    service = build_service(settings, encoder=encoder, store=svc.store)
    assert type(service.index.vector_index).__name__ == "NumpyIndex"
    with TestClient(create_app(settings, service)) as numpy_client:
        health = numpy_client.get("/health").json()
        assert health["status"] == "ok" and health["index_backend"] == "numpy"
        for text in QUERIES:
            got, want = _search(numpy_client, text).json(), _search(client, text).json()
            assert [h["key"] for h in got["results"]] == [h["key"] for h in want["results"]]
            np.testing.assert_allclose([h["score"] for h in got["results"]],
                                       [h["score"] for h in want["results"]], atol=1e-5)
            assert got["total"] == want["total"]
    writer.close()
