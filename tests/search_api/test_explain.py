"""GET /explain: why a stored photo matched a query. The map is each spatial cell's part of the
photo's match with the query (checked against a direct computation), served as a
PNG overlay or as numbers with each term's share, cached, on FAISS and a real Milvus; unknown
photos are 404s, queries the search refuses and models without a spatial map 422s."""
from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import Settings
from encoder.errors import NoSpatialMap
from flickr8k.sources import open_source
from indexer import pipeline
from indexer.ingest import ingest
from objectstore import LocalStore
from search_api.main import build_service, create_app
from tests.search_api.helpers import PREFIX

E = "/explain"


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def served(request, tmp_path_factory, tiny_flickr, encoder):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"explain-{kind}")
    store = LocalStore(tmp / "store", "b")
    ingest(open_source(str(tiny_flickr[0])), store, split="all", progress=False)
    if kind == "faiss":
        from indexer.faiss_index import FaissIndex
        from indexer.repository import IndexRepository

        index = FaissIndex(IndexRepository(tmp / "index"))
    else:
        from indexer.milvus_index import MilvusIndex

        server = request.getfixturevalue("milvus_server")
        index = MilvusIndex(server.uri, prefix=f"t_explain_{uuid.uuid4().hex[:8]}",
                            timeout_s=5.0)
    pipeline.rebuild(store, encoder, index, PREFIX, progress=False)
    settings = Settings(index_dir=str(tmp / "index"), reload_interval_s=0, milvus_refresh_s=60,
                        explain_cache_items=8, _env_file=None)
    service = build_service(settings, encoder=encoder, index=index, store=store)
    with TestClient(create_app(settings, service)) as client:
        yield client, service, kind
    if kind == "milvus":
        for name in index.versions():
            index.client.drop_collection(name)
        index.close()


def _key(service, word: str) -> str:
    keys = [o.key for o in service.images.store.list(PREFIX)]
    return next(k for k in sorted(keys) if word in k)


def _json_of(client, **params):
    r = client.get(E, params={**params, "format": "json"})
    assert r.status_code == 200, r.text
    return r.json()


def test_png_overlay_of_the_stored_photo(served):
    client, service, _ = served
    key = _key(service, "red_circle")
    r = client.get(E, params={"key": key, "q": "a red circle", "size": 64})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.mode == "RGB" and max(img.size) == 64
    # the heat is over the photo, not instead of it: its colours are still there in places
    photo = Image.open(io.BytesIO(client.get(f"/images/{key}?size=64").content))
    assert img.size == photo.size
    diff = np.abs(np.asarray(img, float) - np.asarray(photo.convert("RGB"), float)).mean(2)
    assert diff.min() < 12 < diff.max()


def test_json_map_is_each_cells_part_of_the_match(served, encoder):
    client, service, _ = served
    key = _key(service, "blue_square")
    body = _json_of(client, key=key, q="a blue square")
    h, w = body["grid"]
    assert (h, w) == (7, 7) and np.asarray(body["map"]).shape == (h, w)
    assert body["box"] == [0, 0, 1, 1]  # our models squash the whole photo into the input
    # the direct computation: the stored photo through the tower's cells and the head
    import torch

    from encoder.preprocessing import decode_image
    from encoder.scoring import cell_map

    image = decode_image(service.images.fetch(key))
    [q] = encoder.encode_texts(["a blue square"])
    with torch.inference_mode():
        cells = encoder.model.cell_embeddings(encoder.preprocess(image)[None])[0].numpy()
    want = cell_map(cells, q)  # each cell's contribution, those against the match at 0
    assert np.allclose(body["map"], want, atol=2e-4)
    assert body["map_max"] == pytest.approx(float(want.max()), abs=1e-4)
    # a one-term query: its whole score is its own
    [term] = body["terms"]
    assert term["share"] == 1.0 and term["text"] == "a blue square"
    assert body["similarity"] == pytest.approx(term["cosine"], abs=1e-6)


def test_term_shares_of_a_two_term_query_sum_to_one(served, encoder):
    client, service, _ = served
    key = _key(service, "green_circle")
    body = _json_of(client, key=key, q="a green circle - 2:a red square")
    terms = body["terms"]
    assert [(t["text"], t["weight"], t["negative"]) for t in terms] == [
        ("a green circle", 1.0, False), ("a red square", 2.0, True)]
    assert sum(t["share"] for t in terms) == pytest.approx(1.0, abs=1e-9)
    assert sum(t["contribution"] for t in terms) == pytest.approx(body["similarity"], abs=1e-9)
    # the similarity is the photo's cosine with the combined query the search ranks by
    e = encoder.encode_texts(["a green circle", "a red square"])
    combined = encoder.scoring.combine(e, [1, -2])
    [[stored]] = [service.index.current.stored_vectors([key])]
    v = encoder.scoring.embeddings(np.asarray(stored)[None])[0]
    assert body["similarity"] == pytest.approx(float(combined @ v / np.linalg.norm(v)),
                                               abs=1e-5)
    # a photo used as a term: key: terms are read from the index as the search reads them
    other = _key(service, "yellow_square")
    keyed = _json_of(client, key=key, q=f"a green circle + key:{other}")
    assert [t.get("key") for t in keyed["terms"]] == [None, other]
    assert sum(t["share"] for t in keyed["terms"]) == pytest.approx(1.0, abs=1e-9)


def test_repeated_explanations_come_from_the_cache(served):
    client, service, _ = served
    key = _key(service, "white_circle")
    first = client.get(E, params={"key": key, "q": "white  circle + sky", "size": 48})
    calls = service.explainer.misses
    again = client.get(E, params={"key": key, "q": "white circle + sky", "size": 48})
    assert first.headers["x-explain-cache"] == "miss" and again.headers["x-explain-cache"] == "hit"
    assert again.content == first.content and service.explainer.misses == calls
    # its JSON too (the same entry), and another size is another entry
    assert client.get(E, params={"key": key, "q": "white circle + sky", "size": 48,
                                 "format": "json"}).headers["x-explain-cache"] == "hit"
    assert client.get(E, params={"key": key, "q": "white circle + sky",
                                 "size": 40}).headers["x-explain-cache"] == "miss"
    assert len(service.explainer._cache) <= 8  # bounded (EXPLAIN_CACHE_ITEMS)


@pytest.mark.parametrize("params,status,text", [
    ({"key": PREFIX + "nope.jpg", "q": "dog"}, 404, "no indexed photo"),
    ({"key": "../../etc/passwd", "q": "dog"}, 404, "invalid image key"),
    ({"key": "elsewhere/a.jpg", "q": "dog"}, 404, "no indexed photo"),
    ({"key": PREFIX + "notes.txt", "q": "dog"}, 404, "no indexed photo"),
    ({"key": "@red_circle", "q": "- dog"}, 422, "positive"),
    ({"key": "@red_circle", "q": "dog + "}, 422, "empty"),
    ({"key": "@red_circle", "q": "   "}, 422, "pattern"),
    ({"key": "@red_circle", "q": "x" * 1001}, 422, "1000"),
    ({"key": "@red_circle", "q": "dog + key:" + PREFIX + "nope.jpg"}, 422, "is in the index"),
    ({"key": "@red_circle", "q": "dog", "size": 5000}, 422, "1024"),
    ({"key": "@red_circle", "q": "dog", "format": "gif"}, 422, "png"),
    ({"q": "dog"}, 422, "key"),
])
def test_bad_requests_are_clear_4xx(served, params, status, text):
    client, service, _ = served
    params = dict(params)
    if params.get("key", "").startswith("@"):
        params["key"] = _key(service, params["key"][1:])
    r = client.get(E, params=params)
    assert r.status_code == status, r.text
    assert text in r.text and str(service.images.store.root) not in r.text


def test_a_model_without_a_spatial_map_is_a_422(served, monkeypatch):
    client, service, _ = served
    encoder = service.encoders.encoder

    def no_map(pixels, query):
        raise NoSpatialMap()

    monkeypatch.setattr(encoder, "explain_map", no_map)
    monkeypatch.setattr(service.explainer, "_cache", None)
    r = client.get(E, params={"key": _key(service, "black_square"), "q": "black"})
    assert r.status_code == 422
    assert r.json()["detail"] == "explanations need a model with a spatial feature map"
