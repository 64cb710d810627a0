"""More search: by image, pagination, min_score, the batch route, thumbnails, and concurrent
queries sharing one forward pass giving the same answers as one by one."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.search_api.helpers import PREFIX

S = "/search_images_by_text"
# every image of the tiny set (24), so that there is something to page through
SERVICE_OPTIONS = dict(split="all")


def _keys(r):
    assert r.status_code == 200, r.text
    return [x["key"] for x in r.json()["results"]]


def test_text_pages_tile_the_full_ranking(client):
    full = client.post(S, json={"query": "a yellow circle", "top_k": 24}).json()
    assert full["total"] == 24 and len(full["results"]) == 24
    pages = []
    for offset in range(0, 24, 5):
        r = client.post(S, json={"query": "a yellow circle", "top_k": 5, "offset": offset})
        body = r.json()
        assert [h["rank"] for h in body["results"]] == list(range(offset + 1,
                                                                 min(offset + 5, 24) + 1))
        pages += _keys(r)
    assert pages == [h["key"] for h in full["results"]]
    beyond = client.post(S, json={"query": "a yellow circle", "top_k": 5, "offset": 24}).json()
    assert beyond["results"] == [] and beyond["total"] == 24


def test_min_score_drops_weak_matches(client):
    full = client.post(S, json={"query": "a black square", "top_k": 24}).json()["results"]
    cut = full[5]["score"]
    r = client.post(S, json={"query": "a black square", "top_k": 24, "min_score": cut}).json()
    assert [h["key"] for h in r["results"]] == [h["key"] for h in full if h["score"] >= cut]
    assert all(h["score"] >= cut for h in r["results"])
    none = client.post(S, json={"query": "a black square", "min_score": 1.0}).json()
    assert none["results"] == [] or none["results"][0]["score"] >= 1.0
    # the same from a form
    f = client.post(S, data={"text": "a black square", "top_k": "24", "min_score": str(cut)})
    assert _keys(f) == [h["key"] for h in r["results"]]


def test_search_by_image_finds_itself_and_pages(client, tiny_flickr):
    root, meta = tiny_flickr
    name = meta["names"][9]
    data = (root / "Images" / name).read_bytes()
    first = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                        data={"top_k": "4"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["results"][0]["key"] == PREFIX + name
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert body["total"] == 24 and body["query"] == name
    second = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                         data={"top_k": "4", "offset": "4"})
    assert [h["rank"] for h in second.json()["results"]] == [5, 6, 7, 8]
    both = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                       data={"top_k": "8"})
    assert _keys(both) == _keys(first) + _keys(second)
    strict = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                         data={"top_k": "8", "min_score": "0.999"})
    assert _keys(strict) == [PREFIX + name]


def test_batch_route_json_and_form(client):
    queries = ["a red circle", "a white square", "green"]
    batch = client.post("/search_images_by_texts", json={"queries": queries, "top_k": 3})
    assert batch.status_code == 200
    out = batch.json()
    assert [o["query"] for o in out] == queries
    for q, o in zip(queries, out):  # same as one at a time
        assert [h["key"] for h in o["results"]] == _keys(client.post(S, json={"query": q,
                                                                              "top_k": 3}))
    # forms: repeated fields, or the older one-field JSON list
    rep = client.post("/search_images_by_texts", data={"queries": queries, "top_k": "3"})
    js = client.post("/search_images_by_texts", data={"queries": '["a red circle", "a white '
                                                                 'square", "green"]', "top_k": "3"})
    assert rep.json() == out and js.json() == out
    single = client.post("/search_images_by_texts", data={"queries": "[red] thing", "top_k": "1"})
    assert [o["query"] for o in single.json()] == ["[red] thing"]


def test_thumbnails(client):
    key = client.post(S, json={"query": "red"}).json()["results"][0]["key"]
    full = client.get(f"/images/{key}")
    thumb = client.get(f"/images/{key}", params={"size": 48})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(thumb.content))
    assert max(im.size) == 48 and len(thumb.content) < len(full.content)
    again = client.get(f"/images/{key}", params={"size": 48})
    assert again.content == thumb.content  # served from the cache


def test_concurrent_queries_match_sequential(client, svc):
    """Queries that arrive together are encoded in one batch; answers must not change."""
    queries = [f"a {c} {s}" for c in ("red", "green", "blue", "black") for s in ("circle", "square")]
    alone = {q: client.post("/encode_text", json={"text": q}).json()["embedding"] for q in queries}
    calls = {"n": 0}
    real = svc.service.encoders.texts.fn

    def counting(texts):
        calls["n"] += 1
        return real(texts)

    svc.service.encoders.texts.fn = counting
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(
                lambda q: client.post("/encode_text", json={"text": q}).json()["embedding"],
                queries * 3))
    finally:
        svc.service.encoders.texts.fn = real
    for q, vec in zip(queries * 3, together):
        assert np.allclose(vec, alone[q], atol=1e-5), q
    assert calls["n"] <= len(queries) * 3


def test_hubness_corrected_model_reports_cosine_and_ranks_by_corrected_score(
        tiny_flickr, tmp_path, small_checkpoint):
    """With a query bank the index is 257-d: results rank by cosine minus the image's hubness
    term (`score`) and report the plain cosine (`similarity`)."""
    import torch
    import torch.nn.functional as F
    from fastapi.testclient import TestClient

    from encoder import Encoder, load_checkpoint, save_checkpoint
    from tests.search_api.helpers import build_service

    root, _ = tiny_flickr
    loaded = load_checkpoint(small_checkpoint)
    loaded.model.set_query_bank(F.normalize(torch.randn(40, 64, generator=torch.Generator()
                                                        .manual_seed(1)), dim=-1))
    path = tmp_path / "corrected.pt"
    save_checkpoint(loaded.model, path)
    enc = Encoder.from_checkpoint(str(path))
    svc = build_service(tmp_path, root, enc)
    assert svc.repo.read_manifest()["dim"] == 65
    with TestClient(svc.app) as client:
        res = client.post("/search_images_by_text", json={"query": "a red circle", "top_k": 5})
        assert res.status_code == 200, res.text
        hits = res.json()["results"]
    q = enc.encode_texts(["a red circle"])[0]
    emb = enc.scoring.embeddings(svc.service.index.current.stored_vectors([h["key"] for h in hits]))
    bias = enc.scoring.image_bias(emb)
    for h, v, b in zip(hits, emb, bias):
        assert h["similarity"] == pytest.approx(float(q @ v), abs=1e-4)  # plain cosine
        assert h["score"] == pytest.approx(float(q @ v - b), abs=1e-4)  # minus the bias
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
