"""Queries of several terms (typed `dog + beach - people`, `2:sunset`, `key:<photo>`, or the
structured `terms`), POST /search_images_by_key ("more like this"), and their 422s, on the NumPy
test backend (also served as a remote index), FAISS (plain cosine and hubness-corrected) and a
real Milvus standalone. The photos' embeddings are made from the test model's own text
embeddings, so what a combination should rank first is known."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.settings import RequestLimits, Settings
from indexer.faiss_index import FaissIndex
from indexer.repository import IndexRepository
from objectstore import LocalStore
from search_api.main import build_service, create_app
from search_api.query_terms import TermError, from_structured, parse_typed
from tests.indexer.numpy_index import NumpyIndex

S, K = "/search_images_by_text", "/search_images_by_key"


# --- the parser ---------------------------------------------------------------------------------
def _read(text):
    q = parse_typed(text)
    return None if q is None else [("-" if t.negative else "+", t.weight, t.text, t.key)
                                   for t in q.terms]


@pytest.mark.parametrize("text", ["dog on a beach", "a t-shirt", "black-and-white cat",
                                  '"dog"', "C++ code", "2 dogs", "10:30 meeting", "key: lime",
                                  "dog+cat", "rock-n-roll"])
def test_a_plain_text_is_not_a_term_query(text):
    assert parse_typed(text) is None


@pytest.mark.parametrize("text,terms", [
    ("dog + beach - people", [("+", 1, "dog", None), ("+", 1, "beach", None),
                              ("-", 1, "people", None)]),
    ("2:sunset + boat", [("+", 2, "sunset", None), ("+", 1, "boat", None)]),
    ("sunset -0.5:clouds", [("+", 1, "sunset", None), ("-", 0.5, "clouds", None)]),
    ('"rock - paper + scissors" - hands', [("+", 1, "rock - paper + scissors", None),
                                           ("-", 1, "hands", None)]),
    ("+key:holidays/img_01.jpg", [("+", 1, None, "holidays/img_01.jpg")]),
    ('beach + 3:key:"my photos/a b.jpg" - t-shirt', [
        ("+", 1, "beach", None), ("+", 3, None, "my photos/a b.jpg"),
        ("-", 1, "t-shirt", None)]),
])
def test_typed_terms(text, terms):
    assert _read(text) == terms
    again = parse_typed(parse_typed(text).typed())  # the echo reads back as the same query
    assert again.echo() == parse_typed(text).echo()


@pytest.mark.parametrize("text,message", [
    ("- people", "positive"), ("dog + ", "empty"), ("dog - - cat", "empty"),
    ("0:dog + cat", "weight"), ("1000:dog + cat", "weight"),
    (" + ".join(f"w{i}" for i in range(RequestLimits.MAX_QUERY_TERMS + 1)), "MAX_QUERY_TERMS"),
])
def test_bad_typed_terms_name_the_term(text, message):
    with pytest.raises(TermError) as caught:
        parse_typed(text)
    assert message in caught.value.message and caught.value.loc == ("text",)


def test_structured_and_typed_read_alike():
    typed = parse_typed("dog + 2:beach - key:a/b.jpg")
    structured = from_structured({"positive": [{"text": "dog"}, {"text": "beach", "weight": 2}],
                                  "negative": [{"key": "a/b.jpg"}]})
    assert typed.echo() == structured.echo()
    assert structured.terms[2].loc == ("terms", "negative", 0)


# --- the service --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrected_encoder(small_checkpoint, tmp_path_factory):
    """The test model with a query bank: the index holds [v, -b(v)] (hubness correction)."""
    import torch
    import torch.nn.functional as F

    from encoder import Encoder, load_checkpoint, save_checkpoint

    loaded = load_checkpoint(small_checkpoint)
    loaded.model.set_query_bank(F.normalize(torch.randn(
        40, 64, generator=torch.Generator().manual_seed(1)), dim=-1))
    path = tmp_path_factory.mktemp("corrected") / "corrected.pt"
    save_checkpoint(loaded.model, path)
    return Encoder.from_checkpoint(str(path))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _library(encoder):
    """key -> (embedding, metadata): dogs, dogs on grass, grass, a pair of near-duplicates and
    random others; dogs are in Portugal, the rest in Norway."""
    rng = np.random.default_rng(0)
    dog, grass = encoder.encode_texts(["dog", "grass"])
    # the two directions made distinct: an untrained model's texts all look alike
    grass_dir = _unit(grass - (grass @ dog) * dog)
    photos = {}
    for i in range(6):
        photos[f"dogs/dog{i}.jpg"] = (dog + 0.05 * rng.normal(size=dog.shape), "Portugal")
        photos[f"dogs/dog_grass{i}.jpg"] = (dog + 0.9 * grass_dir +
                                             0.05 * rng.normal(size=dog.shape), "Portugal")
        photos[f"grass/grass{i}.jpg"] = (grass_dir + 0.05 * rng.normal(size=dog.shape), "Norway")
    base = rng.normal(size=dog.shape)
    photos["dup/a.jpg"] = (base, "Norway")
    photos["dup/a_copy.jpg"] = (base + 0.01 * rng.normal(size=dog.shape), "Norway")
    for i in range(10):
        photos[f"misc/{i}.jpg"] = (rng.normal(size=dog.shape), "Norway")
    return {k: (_unit(np.asarray(e, np.float32)),
                {"country": c, "folder": k.rsplit("/", 1)[0]}) for k, (e, c) in photos.items()}


class RemoteNumpyIndex(NumpyIndex):
    remote = True


@pytest.fixture(scope="module", params=["numpy", "numpy-remote", "faiss", "faiss-corrected",
                                        "milvus"])
def served(request, tmp_path_factory, encoder, corrected_encoder):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"terms-{kind}")
    enc = corrected_encoder if kind == "faiss-corrected" else encoder
    if kind.startswith("numpy"):
        index = (RemoteNumpyIndex if kind == "numpy-remote" else NumpyIndex)(tmp / "index" / "numpy")
    elif kind.startswith("faiss"):
        index = FaissIndex(IndexRepository(tmp / "index"))
    else:
        from indexer.milvus_index import MilvusIndex

        server = request.getfixturevalue("milvus_server")
        index = MilvusIndex(server.uri, prefix=f"t_terms_{uuid.uuid4().hex[:8]}", timeout_s=5.0)
    photos = _library(enc)
    keys = list(photos)
    emb = np.stack([photos[k][0] for k in keys])
    index.rebuild(enc.model_id, keys, enc.scoring.image_vectors(emb),
                  [f"e{i}" for i in range(len(keys))], info=[photos[k][1] for k in keys])
    settings = Settings(index_dir=str(tmp / "index"), reload_interval_s=0, milvus_refresh_s=60,
                        _env_file=None)
    service = build_service(settings, encoder=enc, index=index,
                            store=LocalStore(tmp / "store", "b"))
    with TestClient(create_app(settings, service)) as client:
        yield client, enc, dict(zip(keys, emb))
    if kind == "milvus":
        for name in index.versions():
            index.client.drop_collection(name)
        index.close()


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def _keys(body):
    return [h["key"] for h in body["results"]]


def _expected(enc, photos, embeddings, weights, exclude=(), k=10):
    """The ranking by the definition: combined query, then each photo's score."""
    q = enc.scoring.combine(np.stack(embeddings), weights)
    keys = [key for key in photos if key not in exclude]
    scores = enc.scoring.scores(q[None], np.stack([photos[key] for key in keys]))[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [keys[i] for i in order], scores[order]


def test_dog_minus_grass_ranks_as_the_combination_and_drops_grass(served):
    client, enc, photos = served
    dog, grass = enc.encode_texts(["dog", "grass"])
    body = _ok(client.post(S, json={"text": "dog - grass", "top_k": 6}))
    want, scores = _expected(enc, photos, [dog, grass], [1, -1], k=6)
    assert _keys(body) == want
    assert [h["score"] for h in body["results"]] == pytest.approx(list(scores), abs=1e-4)
    assert body["terms"] == {"positive": [{"text": "dog", "weight": 1.0}],
                             "negative": [{"text": "grass", "weight": 1.0}]}
    assert body["query"] == "dog - grass" and body["total"] == len(photos)
    # fewer grass photos among the dogs than for "dog" alone
    alone = _keys(_ok(client.post(S, json={"text": "dog", "top_k": 12})))
    minus = _keys(_ok(client.post(S, json={"text": "dog - grass", "top_k": 12})))
    assert sum("grass" in k for k in minus) < sum("grass" in k for k in alone)
    # the structured form is the same query
    same = _ok(client.post(S, json={"terms": {"positive": [{"text": "dog"}],
                                              "negative": [{"text": "grass"}]}, "top_k": 6}))
    assert _keys(same) == _keys(body) and same["terms"] == body["terms"]


def test_a_plain_text_searches_as_before(served):
    client, enc, photos = served
    body = _ok(client.post(S, json={"text": "dog", "top_k": 5}))
    [q] = enc.encode_texts(["dog"])
    assert _keys(body) == _expected(enc, photos, [q], [1], k=5)[0]
    assert body["terms"] == {"positive": [{"text": "dog", "weight": 1.0}], "negative": []}
    assert body["encoded_text"] == "dog"
    # parse_terms false: the whole text is one query, as typed
    raw = _ok(client.post(S, json={"text": "dog - grass", "top_k": 5, "parse_terms": False}))
    [q] = enc.encode_texts(["dog - grass"])
    assert _keys(raw) == _expected(enc, photos, [q], [1], k=5)[0]


def test_a_stored_photo_as_a_term_mixes_with_texts_and_weights(served):
    client, enc, photos = served
    dog, grass = enc.encode_texts(["dog", "grass"])
    body = _ok(client.post(S, json={"text": "2:dog + grass + key:dup/a.jpg", "top_k": 8}))
    want, _ = _expected(enc, photos, [dog, grass, photos["dup/a.jpg"]], [2, 1, 1],
                        exclude={"dup/a.jpg"}, k=8)
    assert _keys(body) == want and "dup/a.jpg" not in _keys(body)
    assert body["total"] == len(photos) - 1
    assert body["terms"]["positive"][2] == {"key": "dup/a.jpg", "weight": 1.0}


def test_more_like_this_by_key(served):
    client, enc, photos = served
    body = _ok(client.post(K, json={"keys": ["dup/a.jpg"], "top_k": 3}))
    assert _keys(body)[0] == "dup/a_copy.jpg" and "dup/a.jpg" not in _keys(body)
    assert body["results"][0]["similarity"] > 0.99
    with_it = _ok(client.post(K, json={"keys": ["dup/a.jpg"], "top_k": 3, "include_terms": True}))
    assert _keys(with_it)[:2] == ["dup/a.jpg", "dup/a_copy.jpg"]
    assert body["terms"] == {"positive": [{"key": "dup/a.jpg", "weight": 1.0}], "negative": []}
    # less like this: away from the grass
    more = _ok(client.post(K, json={"keys": ["dogs/dog_grass0.jpg"],
                                    "negative_keys": ["grass/grass0.jpg"], "top_k": 5}))
    want, _ = _expected(enc, photos, [photos["dogs/dog_grass0.jpg"], photos["grass/grass0.jpg"]],
                        [1, -1], exclude={"dogs/dog_grass0.jpg"}, k=5)
    assert _keys(more) == want
    # pages: the next page goes on where the first stopped
    page2 = _ok(client.post(K, json={"keys": ["dup/a.jpg"], "top_k": 3, "offset": 3}))
    full = _ok(client.post(K, json={"keys": ["dup/a.jpg"], "top_k": 6}))
    assert _keys(full) == _keys(body) + _keys(page2)


def test_filters_apply_to_term_queries(served):
    client, enc, photos = served
    body = _ok(client.post(K, json={"keys": ["dup/a.jpg"], "top_k": 30,
                                    "filters": {"country": "Portugal"}}))
    assert _keys(body) and all(k.startswith("dogs/") for k in _keys(body))
    assert body["total"] == 12 and body["filters"] == {"country": "Portugal"}
    typed = _ok(client.post(S, json={"text": "grass - dog", "top_k": 30,
                                     "filters": {"folders": ["grass"]}}))
    assert set(_keys(typed)) == {f"grass/grass{i}.jpg" for i in range(6)}
    # a positive term photo outside the filter: nothing to leave out, the filter's total
    inside = _ok(client.post(K, json={"keys": ["dogs/dog0.jpg"], "top_k": 30,
                                      "filters": {"folders": ["dogs"]}}))
    assert body["total"] == 12 and inside["total"] == 11
    assert "dogs/dog0.jpg" not in _keys(inside)


def _detail(r):
    assert r.status_code == 422, r.text
    return r.json()["detail"]


@pytest.mark.parametrize("payload,loc,word", [
    ({"text": "dog - dog"}, ["text"], "cancel"),
    ({"text": "dog + key:nowhere.jpg"}, ["text"], "key:nowhere.jpg"),
    ({"text": "- dog"}, ["text"], "- dog"),
    ({"text": "0:dog + cat"}, ["text"], "0:dog"),
    ({"terms": {"positive": [{"text": "dog"}], "negative": [{"key": "x/none.jpg"}]}},
     ["terms", "negative", "0"], "key:x/none.jpg"),
    ({"terms": {"positive": [{"text": "dog"}], "negative": [{"text": "dog"}]}},
     ["terms"], "cancel"),
    ({"terms": {"positive": [], "negative": [{"text": "dog"}]}},
     ["terms", "positive"], None),
    ({"terms": {"positive": [{"text": "dog", "weight": 0}]}},
     ["terms", "positive", "0", "weight"], None),
    ({"terms": {"positive": [{"text": f"w{i}"} for i in range(RequestLimits.MAX_QUERY_TERMS)],
                "negative": [{"text": "x"}]}},
     ["terms", "negative", "0"], "x"),
    ({"text": "dog", "terms": {"positive": [{"text": "cat"}]}}, [], None),
])
def test_bad_terms_are_a_422_naming_the_term(served, payload, loc, word):
    client, _, _ = served
    [error] = _detail(client.post(S, json=payload))
    assert error["loc"][:len(loc)] == loc, error
    if word is not None:
        assert word in error["input"] or word in error["msg"], error


def test_by_key_refuses_what_it_cannot_search(served):
    client, _, _ = served
    [error] = _detail(client.post(K, json={"keys": ["dup/a.jpg", "not/there.jpg"]}))
    assert error["loc"] == ["keys", "1"] and "not/there.jpg" in error["input"]
    assert _detail(client.post(K, json={"keys": []}))
    assert _detail(client.post(K, json={"keys": ["dup/a.jpg"], "negative_keys": ["dup/a.jpg"]}))
    too_many = [f"k{i}" for i in range(RequestLimits.MAX_QUERY_TERMS + 1)]
    assert _detail(client.post(K, json={"keys": too_many}))
    # weights beyond float range are not finite: refused, never a 500
    r = client.post(S, content=b'{"terms": {"positive": [{"text": "dog", "weight": 1e400}]}}',
                    headers={"content-type": "application/json"})
    assert _detail(r)[0]["loc"][-1] == "weight"


def test_form_clients_send_terms_as_json_text(served):
    client, _, _ = served
    want = _ok(client.post(S, json={"text": "dog - grass", "top_k": 4}))
    got = _ok(client.post(S, data={"terms": json.dumps({"positive": [{"text": "dog"}],
                                                        "negative": [{"text": "grass"}]}),
                                   "top_k": "4"}))
    assert _keys(got) == _keys(want)
    by_form = _ok(client.post(K, data={"keys": "dup/a.jpg", "top_k": "2"}))
    assert _keys(by_form)[0] == "dup/a_copy.jpg"


def test_scoring_combine():
    from encoder.scoring import Scoring

    scoring = Scoring(3)
    a, b = np.array([3.0, 0, 0]), np.array([0, 1.0, 0])
    assert scoring.combine(a[None], [2.0]) == pytest.approx([1, 0, 0])
    # each term counts by its weight, whatever its length
    assert scoring.combine(np.stack([a, b]), [1, -1]) == pytest.approx(
        np.array([1, -1, 0]) / np.sqrt(2), abs=1e-6)
    # huge weights do not overflow
    assert scoring.combine(np.stack([a, b]), [1e300, 1e300]) == pytest.approx(
        np.array([1, 1, 0]) / np.sqrt(2), abs=1e-6)
    for weights in ([1, -1], [np.inf, 1], [np.nan, 1]):
        with pytest.raises(ValueError):
            scoring.combine(np.stack([a, a]), weights)


def test_given_embeddings_are_ranked_by_the_combined_query(served):
    client, enc, photos = served
    dog, grass = enc.encode_texts(["dog", "grass"])
    given = [{"filename": k, "embedding": photos[k][:enc.dim].tolist()}
             for k in ("dogs/dog0.jpg", "dogs/dog_grass0.jpg", "grass/grass0.jpg")]
    body = _ok(client.post(S, json={"text": "dog - grass", "image_embeddings": given,
                                    "top_k": 3}))
    q = enc.scoring.combine(np.stack([dog, grass]), [1, -1])
    want = sorted(given, key=lambda g: -float(np.dot(q, g["embedding"])))
    assert _keys(body) == [g["filename"] for g in want]
    assert body["terms"]["negative"] == [{"text": "grass", "weight": 1.0}]


def test_the_batch_route_reads_terms_in_each_query(served):
    client, _, _ = served
    batch = _ok(client.post("/search_images_by_texts",
                            json={"queries": ["dog", "dog - grass", "key:dup/a.jpg"],
                                  "top_k": 4}))
    for query, got in zip(["dog", "dog - grass"], batch):
        assert _keys(got) == _keys(_ok(client.post(S, json={"text": query, "top_k": 4})))
    assert _keys(batch[2]) == _keys(_ok(client.post(K, json={"keys": ["dup/a.jpg"],
                                                             "top_k": 4})))
    assert batch[1]["terms"]["negative"] == [{"text": "grass", "weight": 1.0}]
    [error] = _detail(client.post("/search_images_by_texts",
                                  json={"queries": ["dog", "- cat"]}))
    assert error["loc"] == ["queries", "1"]
