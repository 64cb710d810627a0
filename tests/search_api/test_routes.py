"""The routes: JSON and the original clients' form fields on the same routes; bad input -> 4xx.
Paging, search by image and the batch route are in test_search.py."""
import io
import json

import pytest
from PIL import Image

from tests.conftest import make_image
SERVICE_OPTIONS = dict(max_top_k=50)


def _jpeg(color="red", shape="circle"):
    return make_image(color, shape, 123)


def test_health(client, encoder):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_id"] == encoder.model_id
    assert h["vector_count"] > 0 and h["index_version"]


def test_encode_text_json_and_form_agree(client):
    a = client.post("/encode_text", json={"text": "a red circle"}).json()
    b = client.post("/encode_text", data={"text": "a red circle"}).json()
    assert a["dim"] == 64 and len(a["embedding"]) == 64
    assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-6)


def test_search_json_and_form(client):
    j = client.post("/search_images_by_text", json={"query": "a blue square", "top_k": 3})
    f = client.post("/search_images_by_text", data={"text": "a blue square", "top_k": "3"})
    assert j.status_code == 200 and f.status_code == 200
    jr, fr = j.json()["results"], f.json()["results"]
    assert [r["key"] for r in jr] == [r["key"] for r in fr] and len(jr) == 3
    for r in jr:
        assert r["similarity"] == r["score"] and r["filename"] == r["key"].rsplit("/", 1)[-1]
    assert jr[0]["score"] >= jr[1]["score"] >= jr[2]["score"]
    img = client.get(jr[0]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    Image.open(io.BytesIO(img.content)).verify()


def test_original_client_flow_with_image_embeddings(client):
    embs = []
    for color in ("red", "green", "blue"):
        r = client.post("/encode_image", files={"image": (f"{color}.jpg", _jpeg(color), "image/jpeg")})
        assert r.status_code == 200, r.text
        embs.append({**r.json(), "filename": f"{color}.jpg"})
    r = client.post("/search_images_by_text",
                    data={"text": "a green circle", "top_k": "2", "image_embeddings": json.dumps(embs)})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 2 and {x["filename"] for x in res} <= {"red.jpg", "green.jpg", "blue.jpg"}
    # ranking exactly these embeddings: scores equal the cosine with the text embedding
    t = client.post("/encode_text", data={"text": "a green circle"}).json()["embedding"]
    byname = {e["filename"]: e["embedding"] for e in embs}
    for x in res:
        cos = sum(a * b for a, b in zip(t, byname[x["filename"]]))
        assert x["similarity"] == pytest.approx(cos, abs=1e-4)


@pytest.mark.parametrize("payload,status", [
    ({"query": ""}, 422),
    ({"query": "   "}, 422),
    ({"query": "x" * 5000}, 422),
    ({"query": "dog", "top_k": 0}, 422),
    ({"query": "dog", "top_k": -1}, 422),
    ({"query": "dog", "top_k": 10**6}, 422),
    ({"query": "dog", "top_k": "many"}, 422),
    ({"top_k": 3}, 422),
    ({"query": "dog", "offset": -5}, 422),
    ({"query": ["a", "b"]}, 422),
    ({"query": "dog", "min_score": 7}, 422),
])
def test_bad_search_input_is_4xx_json(client, payload, status):
    r = client.post("/search_images_by_text", json=payload)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_bad_bodies(client):
    assert client.post("/search_images_by_text", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/search_images_by_text", content=b"[1,2]",
                       headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/search_images_by_text", content=b"text=dog",
                       headers={"content-type": "text/plain"}).status_code == 415
    r = client.post("/search_images_by_text", data={"text": "dog", "image_embeddings": "nope"})
    assert r.status_code == 422


@pytest.mark.parametrize("name,data", [
    ("empty.jpg", b""),
    ("text.jpg", b"this is not an image at all"),
    ("trunc.jpg", None),
])
def test_bad_images_are_400(client, name, data):
    if data is None:
        data = _jpeg()[:200]
    r = client.post("/encode_image", files={"image": (name, data, "image/jpeg")})
    assert r.status_code == 400, r.text
    assert "image" in r.json()["detail"]


def test_missing_image_field(client):
    r = client.post("/encode_image", files={"photo": ("a.jpg", _jpeg(), "image/jpeg")})
    assert r.status_code == 422


@pytest.mark.parametrize("key,status", [
    ("../../etc/passwd", 404),  # an invalid key names no image
    ("flickr8k/images/../../../etc/passwd", 404),
    ("flickr8k/text/Flickr8k.token.txt", 404),
    ("flickr8k/images/missing.jpg", 404),
])
def test_image_route_refuses_bad_keys(client, key, status):
    r = client.get(f"/images/{key}")
    assert r.status_code == status
    assert b"root:" not in r.content


def test_image_route_serves_photos_only(svc, client):
    """Under the images prefix (the whole bucket with IMAGES_PREFIX=) other files may lie: the
    route serves photos, by the one list of photo formats, and nothing else."""
    prefix = svc.settings.images_prefix
    svc.store.put(prefix + "notes/readme.txt", b"not a photo")
    r = client.get(f"/images/{prefix}notes/readme.txt")
    assert r.status_code == 404 and "not a photo" in r.json()["detail"]
    photo = next(o.key for o in svc.store.list(prefix) if o.key.endswith(".jpg"))
    assert client.get(f"/images/{photo}").status_code == 200
