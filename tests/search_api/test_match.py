"""`match`, the one number for people: every hit of every search route carries it (0..100, from
the model's match scale), it falls along the ranking as `score` does, `min_match` filters on it
(JSON, form, batch, upload, given embeddings), and OpenAPI documents it. A model without a scale
answers `match: null` and refuses `min_match`."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.search_api.helpers import PREFIX, build_service

S = "/search_images_by_text"
SERVICE_OPTIONS = dict(split="all")


@pytest.fixture(scope="module")
def encoder(calibrated_encoder):
    return calibrated_encoder


@pytest.fixture(scope="module")
def scale(svc):
    assert svc.service.match_scale is not None
    return svc.service.match_scale


def _check(results, scale, of_cosine=False):
    matches = [h["match"] for h in results]
    assert all(0 <= m <= 100 for m in matches)
    assert matches == sorted(matches, reverse=True)  # falls along the ranking
    to_match = scale.match_cosine if of_cosine else scale.match
    for h in results:
        assert h["match"] == pytest.approx(float(to_match(h["score"])), abs=0.051)


def test_hits_carry_match_in_ranking_order(client, scale):
    r = client.post(S, json={"query": "a red circle", "top_k": 24})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 24
    _check(results, scale)
    # the best match of a query that describes an image is a good one, the tail is not
    assert results[0]["match"] > results[-1]["match"]


def test_min_match_filters_like_min_score(client, scale):
    full = client.post(S, json={"query": "a black square", "top_k": 24}).json()["results"]
    cut = full[5]["match"]
    assert cut > 0
    r = client.post(S, json={"query": "a black square", "top_k": 24, "min_match": cut}).json()
    assert [h["key"] for h in r["results"]] == [h["key"] for h in full if h["match"] >= cut]
    assert len(r["results"]) >= 6
    form = client.post(S, data={"text": "a black square", "top_k": "24", "min_match": str(cut)})
    assert form.status_code == 200
    assert [h["key"] for h in form.json()["results"]] == [h["key"] for h in r["results"]]
    # with min_score too: both apply
    both = client.post(S, json={"query": "a black square", "top_k": 24, "min_match": cut,
                                "min_score": full[2]["score"]}).json()["results"]
    assert [h["key"] for h in both] == [h["key"] for h in full[:3]]
    for bad in (-1, 100.5, "high"):
        assert client.post(S, json={"query": "dog", "min_match": bad}).status_code == 422


def test_batch_and_upload_routes_carry_and_filter_match(client, scale, tiny_flickr):
    out = client.post("/search_images_by_texts",
                      json={"queries": ["a red circle", "green"], "top_k": 5}).json()
    for o in out:
        _check(o["results"], scale)
    cut = out[0]["results"][1]["match"]
    strict = client.post("/search_images_by_texts",
                         json={"queries": ["a red circle"], "top_k": 5, "min_match": cut}).json()
    assert all(h["match"] >= cut for h in strict[0]["results"])
    assert [h["key"] for h in strict[0]["results"]][:2] == \
        [h["key"] for h in out[0]["results"]][:2]

    root, meta = tiny_flickr
    name = meta["names"][3]
    data = (root / "Images" / name).read_bytes()
    up = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                     data={"top_k": "6"})
    assert up.status_code == 200, up.text
    _check(up.json()["results"], scale)
    top = up.json()["results"][0]
    assert top["key"] == PREFIX + name
    only = client.post("/search_images_by_image", files={"image": (name, data, "image/jpeg")},
                       data={"top_k": "6", "min_match": str(top["match"])})
    assert [h["key"] for h in only.json()["results"]][0] == PREFIX + name
    assert all(h["match"] >= top["match"] for h in only.json()["results"])


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "JPEG")
    return buf.getvalue()


def test_given_embeddings_match_by_their_cosine(client, scale):
    embs = []
    for color in ("red", "green", "blue", "white"):
        r = client.post("/encode_image", files={"image": (f"{color}.jpg", _jpeg(color),
                                                          "image/jpeg")})
        embs.append({**r.json(), "filename": f"{color}.jpg"})
    r = client.post(S, json={"text": "a green circle", "top_k": 4, "image_embeddings": embs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    _check(results, scale, of_cosine=True)
    cut = results[1]["match"]
    f = client.post(S, data={"text": "a green circle", "top_k": "4", "min_match": str(cut),
                             "image_embeddings": json.dumps(embs)})
    assert [h["filename"] for h in f.json()["results"]] == \
        [h["filename"] for h in results if h["match"] >= cut]


def test_openapi_documents_match(client):
    schema = client.get("/openapi.json").json()
    hit = schema["components"]["schemas"]["Hit"]
    match = hit["properties"]["match"]
    assert "0..100" in match["description"] and "null" in match["description"]
    assert hit["examples"][0]["match"] == 87.5 and match["examples"] == [87.5]
    # min_match beside min_score in every search body and the upload form
    bodies = [c for c in schema["components"]["schemas"].values()
              if "min_score" in c.get("properties", {})]
    assert len(bodies) >= 3
    for body in bodies:
        assert "`match`" in body["properties"]["min_match"]["description"]


def test_a_model_without_a_scale_answers_null_and_refuses_min_match(tiny_flickr, tmp_path,
                                                                    small_checkpoint):
    import asyncio

    from fastapi.testclient import TestClient

    from encoder import Encoder
    from search_api.search_service import NoMatchScale

    plain = build_service(tmp_path, tiny_flickr[0], Encoder.from_checkpoint(str(small_checkpoint)))
    assert plain.service.match_scale is None
    with TestClient(plain.app) as c:
        r = c.post(S, json={"query": "a red circle", "top_k": 3, "min_match": None})
        assert r.status_code == 200 and [h["match"] for h in r.json()["results"]] == [None] * 3
        # the schema says so: min_match can only be null for this model
        schemas = c.get("/openapi.json").json()["components"]["schemas"].values()
        fields = [c["properties"]["min_match"] for c in schemas
                  if "min_match" in c.get("properties", {})]
        assert len(fields) >= 3
        assert all(f["type"] == "null" and "no match scale" in f["description"] for f in fields)
        for route, kw in ((S, {"json": {"query": "a red circle", "min_match": 50}}),
                          (S, {"data": {"text": "a red circle", "min_match": "50"}}),
                          ("/search_images_by_texts",
                           {"json": {"queries": ["a"], "min_match": 5}})):
            refused = c.post(route, **kw)
            assert refused.status_code == 422, (route, refused.text)
            assert "min_match" in refused.text
    # a service asked directly (an app made before its service knows nothing of the model)
    vec = np.zeros((1, plain.service.encoders.dim), np.float32)
    with pytest.raises(NoMatchScale, match="match scale"):
        asyncio.run(plain.service.search(vec, 3, min_match=50))
    plain.service.close()


def test_demo_prints_match_in_ranking_order(svc, tmp_path, capsys):
    import re

    import demo
    from tests.search_api.helpers import serve

    with serve(svc.app) as url:
        assert demo.main(["--api", url, "--query", "a red circle", "--top_k", "6",
                          "--out", str(tmp_path / "demo.png")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "% match" in ln]
    shown = [int(re.search(r"(\d+)% match", ln).group(1)) for ln in lines]
    assert len(shown) == 6 and shown == sorted(shown, reverse=True)
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert demo.shown({"match": None, "score": -0.1024}) == "score -0.102"
