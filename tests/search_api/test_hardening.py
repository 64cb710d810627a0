"""Hardening: every bad input gets a clear 4xx JSON error (never a 5xx); odd but valid images
work; the API key guards upload and admin routes; body, pixel, query and top_k limits hold."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from search_api.testing import cmyk_jpeg, encode, jpeg_with_header_size, png_bomb, png_with_alpha
from tests.search_api.helpers import PREFIX
from tests.conftest import make_image
from tests.photo_samples import dng_bytes

KEY = "test-key-123"
MAX_UPLOAD = 1_000_000
SERVICE_OPTIONS = dict(api_key=KEY, max_top_k=50, max_upload_bytes=MAX_UPLOAD)
CLIENT_OPTIONS = dict(raise_server_exceptions=False)


JPEG = make_image("red", "circle", 7)
AUTH = {"X-API-Key": KEY}


def _json(body) -> dict:
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def _raw(data: bytes, ctype: str | None = "application/json") -> dict:
    return {"content": data, "headers": {"content-type": ctype} if ctype else {}}


def _upload(data: bytes, name: str = "x.jpg", ctype: str = "image/jpeg", **fields) -> dict:
    return {"files": {"image": (name, data, ctype)}, "data": {k: str(v) for k, v in fields.items()},
            "headers": AUTH}


def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"a" * n


S = "/search_images_by_text"
B = "/search_images_by_texts"
IMG = "/search_images_by_image"
E = "/encode_image"

# (id, method, path, request kwargs (callable for lazily built bodies), expected status)
BAD_INPUTS = [
    # --- text queries ---------------------------------------------------------------------
    ("empty-query", "POST", S, _json({"query": ""}), 422),
    ("whitespace-query", "POST", S, _json({"query": " \t\n  "}), 422),
    ("10kB-query", "POST", S, _json({"query": "x" * 10_000}), 422),
    ("10kB-emoji-query", "POST", S, _json({"query": "\U0001F436" * 10_000}), 422),
    ("missing-query", "POST", S, _json({"top_k": 3}), 422),
    ("null-query", "POST", S, _json({"query": None}), 422),
    ("number-query", "POST", S, _json({"query": 42}), 422),
    ("list-query", "POST", S, _json({"query": ["a", "b"]}), 422),
    ("top_k-0", "POST", S, _json({"query": "dog", "top_k": 0}), 422),
    ("top_k-minus-1", "POST", S, _json({"query": "dog", "top_k": -1}), 422),
    ("top_k-10^6", "POST", S, _json({"query": "dog", "top_k": 10**6}), 422),
    ("top_k-word", "POST", S, _json({"query": "dog", "top_k": "many"}), 422),
    ("top_k-numeric-string", "POST", S, _json({"query": "dog", "top_k": "5"}), 422),
    ("top_k-fraction", "POST", S, _json({"query": "dog", "top_k": 2.5}), 422),
    ("top_k-bool", "POST", S, _json({"query": "dog", "top_k": True}), 422),
    ("top_k-5000-digits", "POST", S, _raw(b'{"query": "dog", "top_k": ' + b"9" * 5000 + b"}"), 400),
    ("offset-negative", "POST", S, _json({"query": "dog", "offset": -5}), 422),
    ("offset-huge", "POST", S, _json({"query": "dog", "offset": 10**9}), 422),
    ("min_score-7", "POST", S, _json({"query": "dog", "min_score": 7}), 422),
    ("min_score-word", "POST", S, _json({"query": "dog", "min_score": "high"}), 422),
    ("min_score-NaN", "POST", S, _raw(b'{"query": "dog", "min_score": NaN}'), 400),
    ("top_k-Infinity", "POST", S, _raw(b'{"query": "dog", "top_k": Infinity}'), 400),
    ("form-top_k-word", "POST", S, {"data": {"text": "dog", "top_k": "abc"}}, 422),
    ("form-top_k-empty", "POST", S, {"data": {"text": "dog", "top_k": ""}}, 422),
    ("form-empty-text", "POST", S, {"data": {"text": ""}}, 422),
    # --- bodies and content types -----------------------------------------------------------
    ("not-json", "POST", S, _raw(b"{not json"), 400),
    ("json-array", "POST", S, _raw(b"[1, 2]"), 422),
    ("json-string", "POST", S, _raw(b'"dog"'), 422),
    ("empty-json-body", "POST", S, _raw(b""), 400),
    ("deeply-nested-json", "POST", S, _raw(b"[" * 100_000), 400),
    ("invalid-utf8-json", "POST", S, _raw(b'{"query": "\xff\xfe dog"}'), 400),
    ("text-plain", "POST", S, _raw(b"query=dog", "text/plain"), 415),
    ("xml", "POST", S, _raw(b"<query>dog</query>", "application/xml"), 415),
    ("no-content-type", "POST", S, _raw(b'{"query": "dog"}', None), 415),
    ("body-over-limit", "POST", S, _raw(b'{"query": "' + b"a" * (MAX_UPLOAD + 100_000) + b'"}'), 413),
    ("chunked-body-over-limit", "POST", S,
     lambda: {"content": _chunks(MAX_UPLOAD + 200_000), "headers": {"content-type": "application/json"}},
     413),
    ("embeddings-wrong-dim", "POST", S,
     _json({"query": "dog", "image_embeddings": [{"filename": "a", "embedding": [0.1, 0.2]}]}), 422),
    ("embeddings-ragged", "POST", S, _json({"query": "dog", "image_embeddings": [
        {"filename": "a", "embedding": [0.1] * 64}, {"filename": "b", "embedding": [0.1] * 63}]}), 422),
    ("embeddings-not-json-form", "POST", S, {"data": {"text": "dog", "image_embeddings": "nope"}}, 422),
    ("embeddings-strings", "POST", S,
     _json({"query": "dog", "image_embeddings": [{"filename": "a", "embedding": ["x"] * 64}]}), 422),
    ("wrong-method", "GET", S, {}, 405),
    ("unknown-route", "GET", "/search", {}, 404),
    # --- batch --------------------------------------------------------------------------------
    ("batch-empty-list", "POST", B, _json({"queries": []}), 422),
    ("batch-too-many", "POST", B, _json({"queries": ["dog"] * 33}), 422),
    ("batch-blank-item", "POST", B, _json({"queries": ["dog", "   "]}), 422),
    ("batch-not-a-list", "POST", B, _json({"queries": "dog"}), 422),
    ("batch-long-item", "POST", B, _json({"queries": ["dog", "y" * 5000]}), 422),
    # --- filters ------------------------------------------------------------------------------
    ("filters-not-an-object", "POST", S, _json({"query": "dog", "filters": ["Norway"]}), 422),
    ("filters-unknown-field", "POST", S, _json({"query": "dog", "filters": {"album": "x"}}), 422),
    ("filters-reversed-range", "POST", S, _json({"query": "dog", "filters": {
        "taken_after": "2024-01-01", "taken_before": "2023-01-01"}}), 422),
    ("filters-bad-date", "POST", S, _json({"query": "dog", "filters": {"taken_after": "July"}}),
     422),
    ("filters-unix-date", "POST", S, _json({"query": "dog", "filters": {"taken_after": 10**12}}),
     422),
    ("filters-year-0", "POST", S, _json({"query": "dog", "filters": {
        "taken_after": "0000-01-01T00:00:00Z"}}), 422),
    ("filters-near-NaN", "POST", S, _raw(b'{"query": "dog", "filters": {"near": '
                                         b'{"lat": NaN, "lon": 0, "km": 1}}}'), 400),
    ("filters-near-1e308-km", "POST", S, _json({"query": "dog", "filters": {
        "near": {"lat": 0, "lon": 0, "km": 1e308}}}), 422),
    ("filters-control-char-city", "POST", S, _json({"query": "dog", "filters": {
        "city": "Lis\x00bon"}}), 422),
    ("filters-10k-folders", "POST", S, _json({"query": "dog", "filters": {
        "folders": ["f"] * 10_000}}), 422),
    ("filters-deep-json", "POST", S, _raw(b'{"query": "dog", "filters": ' + b"[" * 100_000), 400),
    ("filters-form-not-json", "POST", S, {"data": {"text": "dog", "filters": "{country"}}, 422),
    ("filters-batch-bad", "POST", B, _json({"queries": ["dog"], "filters": {"min_width": -1}}),
     422),
    ("filters-upload-not-json", "POST", IMG, _upload(JPEG, filters="{"), 422),
    ("filters-upload-unknown", "POST", IMG, _upload(JPEG, filters='{"colour": "red"}'), 422),
    ("parse_hints-word", "POST", S, _json({"query": "dog", "parse_hints": "maybe"}), 422),
    ("facets-limit-0", "GET", "/facets?limit=0", {}, 422),
    ("facets-limit-huge", "GET", "/facets?limit=1000000", {}, 422),
    ("info-dotdot", "GET", "/images/%2e%2e/%2e%2e/etc/passwd/info", {}, 404),
    ("info-missing", "GET", "/images/flickr8k/images/missing.jpg/info", {}, 404),
    # --- image uploads ------------------------------------------------------------------------
    ("zero-byte-file", "POST", IMG, _upload(b""), 400),
    ("truncated-jpeg", "POST", IMG, _upload(JPEG[:300]), 400),
    ("text-as-jpg", "POST", IMG, _upload(b"this is not an image at all"), 400),
    ("html-as-png", "POST", IMG, _upload(b"<html><script>alert(1)</script></html>", "x.png",
                                       "image/png"), 400),
    ("pdf-as-jpg", "POST", IMG, _upload(b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF"), 400),
    ("svg", "POST", IMG, _upload(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                               "x.svg", "image/svg+xml"), 400),
    # TIFF, HEIC and AVIF uploads are photos (tests/search_api/test_photo_formats.py); TGA is not
    ("tga-not-allowed", "POST", IMG,
     lambda: _upload(encode(Image.new("RGB", (8, 8)), "TGA"), "x.tga", "image/x-tga"), 400),
    ("camera-raw-upload", "POST", IMG,  # LibRaw reads stored files only, never uploads
     lambda: _upload(dng_bytes(16, 16), "x.dng", "image/x-adobe-dng"), 400),
    ("png-bomb-20000x20000", "POST", IMG, lambda: _upload(png_bomb(), "bomb.png", "image/png"), 413),
    ("jpeg-header-30000x30000", "POST", IMG,
     lambda: _upload(jpeg_with_header_size(JPEG, 30_000, 30_000)), 413),
    ("image-over-upload-limit", "POST", IMG, lambda: _upload(b"\xff\xd8\xff" + b"0" * (MAX_UPLOAD + 10)),
     413),
    ("image-wrong-field-name", "POST", IMG,
     {"files": {"photo": ("x.jpg", JPEG, "image/jpeg")}, "headers": AUTH}, 422),
    ("image-as-text-field", "POST", IMG, {"data": {"image": "not a file"}, "headers": AUTH}, 422),
    ("image-search-json-body", "POST", IMG, {**_json({"image": "x"}), "headers": {
        "content-type": "application/json", **AUTH}}, 422),
    ("image-search-top_k-0", "POST", IMG, _upload(JPEG, top_k=0), 422),
    ("image-search-offset-word", "POST", IMG, _upload(JPEG, offset="abc"), 422),
    ("encode-image-empty", "POST", E, _upload(b""), 400),
    ("encode-image-truncated", "POST", E, _upload(JPEG[:200]), 400),
    # --- API key --------------------------------------------------------------------------------
    ("upload-without-key", "POST", IMG, {"files": {"image": ("x.jpg", JPEG, "image/jpeg")}}, 401),
    ("upload-wrong-key", "POST", E, {"files": {"image": ("x.jpg", JPEG, "image/jpeg")},
                                     "headers": {"X-API-Key": "wrong"}}, 401),
    ("admin-without-key", "POST", "/admin/reload", {}, 401),
    ("admin-wrong-key", "POST", "/admin/reload", {"headers": {"X-API-Key": KEY + "x"}}, 401),
    # --- /images/{key} --------------------------------------------------------------------------
    ("dotdot-etc-passwd", "GET", "/images/%2e%2e/%2e%2e/etc/passwd", {}, 404),
    ("prefix-then-dotdot", "GET", "/images/flickr8k/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd", {},
     404),
    ("encoded-slashes-dotdot", "GET", "/images/flickr8k%2fimages%2f..%2f..%2fCURRENT", {}, 404),
    ("absolute-path-key", "GET", "/images//etc/passwd", {}, 404),
    ("nul-in-key", "GET", "/images/flickr8k/images/a%00.jpg", {}, 404),
    ("backslash-key", "GET", "/images/flickr8k%5Cimages%5C..%5C..%5Cx", {}, 404),
    ("key-outside-prefix", "GET", "/images/flickr8k/text/Flickr8k.token.txt", {}, 404),
    ("missing-image", "GET", "/images/flickr8k/images/missing.jpg", {}, 404),
    ("2000-char-key", "GET", "/images/flickr8k/images/" + "a" * 2000 + ".jpg", {}, 404),
    ("thumbnail-size-0", "GET", f"/images/{PREFIX}x.jpg?size=0", {}, 422),
    ("thumbnail-size-huge", "GET", f"/images/{PREFIX}x.jpg?size=50000", {}, 422),
    ("thumbnail-size-word", "GET", f"/images/{PREFIX}x.jpg?size=big", {}, 422),
]


def test_at_least_30_distinct_bad_inputs():
    ids = [b[0] for b in BAD_INPUTS]
    assert len(set(ids)) == len(ids) >= 30


@pytest.mark.parametrize("name,method,path,kwargs,status", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_clear_4xx_json(client, name, method, path, kwargs, status):
    kwargs = kwargs() if callable(kwargs) else kwargs
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert detail and (isinstance(detail, str) or all("msg" in e for e in detail))
    assert b"root:" not in r.content  # nothing from /etc/passwd, ever
    assert len(r.content) < 4096  # errors do not echo a 10 kB query or a 1 MB body back


def test_service_still_healthy_after_bad_inputs(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.post(S, json={"query": "a red circle", "top_k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


# --- odd but valid input: accepted and working (200) -----------------------------------------
VALID_ODD_IMAGES = [
    ("png-with-alpha", png_with_alpha, "x.png", "image/png"),
    ("cmyk-jpeg", cmyk_jpeg, "x.jpg", "image/jpeg"),
    ("grayscale-jpeg", lambda: encode(Image.new("L", (40, 30), 128), "JPEG"), "g.jpg", "image/jpeg"),
    ("palette-gif", lambda: encode(Image.new("P", (20, 20), 3), "GIF"), "p.gif", "image/gif"),
    ("webp", lambda: encode(Image.new("RGB", (20, 20), (9, 200, 9)), "WEBP"), "w.webp", "image/webp"),
    ("16-bit-png", lambda: encode(Image.new("I;16", (16, 16), 300), "PNG"), "d.png", "image/png"),
    ("1x1-png", lambda: encode(Image.new("RGB", (1, 1)), "PNG"), "one.png", "image/png"),
    ("wrong-extension", lambda: JPEG, "actually-a-jpeg.png", "application/octet-stream"),
]


@pytest.mark.parametrize("name,make,filename,ctype", VALID_ODD_IMAGES,
                         ids=[v[0] for v in VALID_ODD_IMAGES])
def test_odd_but_valid_images_work(client, name, make, filename, ctype):
    r = client.post(IMG, files={"image": (filename, make(), ctype)}, data={"top_k": "3"}, headers=AUTH)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and all(-1.0 <= x["score"] <= 1.0001 for x in res)


def test_png_alpha_is_composited_on_white(client):
    """A transparent background must not turn into black: the alpha PNG embeds like the same
    picture drawn on white."""
    on_white = Image.open(io.BytesIO(png_with_alpha())).convert("RGBA")
    flat = Image.new("RGB", on_white.size, (255, 255, 255))
    flat.paste(on_white, mask=on_white.split()[3])
    a = client.post(E, files={"image": ("a.png", png_with_alpha(), "image/png")}, headers=AUTH)
    b = client.post(E, files={"image": ("b.png", encode(flat, "PNG"), "image/png")}, headers=AUTH)
    va, vb = a.json()["embedding"], b.json()["embedding"]
    assert sum(x * y for x, y in zip(va, vb)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("query", [
    "\U0001F436\U0001F415 dog on the beach \U0001F3D6",  # emoji
    "\U0001F600",  # emoji only
    "Hund im Schnee, schön",  # non-ASCII
    "狗在雪地里玩",  # CJK
    "a" * 1000,  # exactly the limit
    "dog\x00cat",  # a NUL in the middle
    "<script>alert(1)</script>",  # markup is just text
])
def test_unusual_queries_are_answered(client, query):
    r = client.post(S, json={"query": query, "top_k": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2


def test_text_routes_need_no_key_but_uploads_and_admin_do(client):
    assert client.post(S, json={"query": "red"}).status_code == 200
    assert client.post("/encode_text", json={"text": "red"}).status_code == 200
    r = client.post(E, files={"image": ("x.jpg", JPEG, "image/jpeg")})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "X-API-Key"
    assert client.post(E, files={"image": ("x.jpg", JPEG, "image/jpeg")}, headers=AUTH).status_code == 200
    assert client.post("/admin/reload", headers=AUTH).status_code == 200
    h = client.get("/health").json()
    assert h["api_key_required"] is True


def test_openapi_documents_the_key_and_the_limits(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert spec["paths"]["/admin/reload"]["post"]["security"] == [{"APIKeyHeader": []}]
    body = spec["paths"][S]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:  # the request model, in components
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert body["properties"]["top_k"]["maximum"] == 50
    assert body["properties"]["text"]["maxLength"] == 1000
    assert body["properties"]["offset"]["maximum"] == 10_000  # MAX_OFFSET


def test_security_headers(client):
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    img = client.get(f"/images/{PREFIX}" + client.post(S, json={"query": "red"}).json()
                     ["results"][0]["filename"])
    assert img.status_code == 200 and img.headers["x-content-type-options"] == "nosniff"
