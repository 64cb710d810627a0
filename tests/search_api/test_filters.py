"""Filters on every search route, the hints read from the query text, each hit's metadata,
GET /images/{key}/info, GET /facets and the /health counts, on indexes the test makes with
metadata: the NumPy test backend (also served as a remote index: searches batched), FAISS and a
real Milvus standalone (small: searched exactly, so a filtered page can be checked against the
photos the filter matches)."""
from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import RequestLimits, Settings
from indexer.photo_filter import PhotoFilter
from indexer.faiss_index import FaissIndex
from indexer.repository import IndexRepository
from objectstore import LocalStore
from search_api import text_queries
from search_api.main import build_service, create_app
from tests.indexer.numpy_index import NumpyIndex

S, B, I = "/search_images_by_text", "/search_images_by_texts", "/search_images_by_image"


def _ts(*date) -> float:
    return datetime(*date, tzinfo=timezone.utc).timestamp()


def _photos() -> dict[str, dict | None]:
    """key -> metadata: a summer at the beach in Portugal, a winter in Norway, a few photos
    without a position, and some without any metadata (indexed before it existed)."""
    photos: dict[str, dict | None] = {}
    for i in range(12):
        photos[f"2023/beach/IMG_{i:04d}.HEIC"] = {
            "taken_at": _ts(2023, 7, 1 + i, 10), "taken_at_source": "exif",
            "camera_make": "Apple", "camera_model": "iPhone 12",
            "lat": 38.69 + i / 1000, "lon": -9.21, "city": "Lisbon", "region": "Lisbon",
            "country": "Portugal", "country_code": "PT",
            "width": 4032, "height": 3024, "orientation": 1, "bytes": 2_000_000,
            "content_type": "image/heic", "folder": "2023/beach"}
    for i in range(8):
        photos[f"2024/Snow/DSC{i:05d}.jpg"] = {
            "taken_at": _ts(2024, 1, 10 + i, 12), "taken_at_source": "exif",
            "camera_make": "Canon", "camera_model": "Canon EOS R6",
            "lat": 69.65, "lon": 18.96, "city": "Tromsø", "region": "Troms",
            "country": "Norway", "country_code": "NO",
            "width": 3000, "height": 4000, "orientation": 1, "bytes": 5_000_000,
            "content_type": "image/jpeg", "folder": "2024/Snow"}
    for i in range(4):
        photos[f"scans/scan{i}.png"] = {
            "taken_at": _ts(2019, 5, 1), "taken_at_source": "modified",
            "width": 800, "height": 800, "content_type": "image/png", "folder": "scans"}
    for i in range(4):
        photos[f"old/photo{i}.jpg"] = None
    return photos


PHOTOS = _photos()
BEACH = {k for k in PHOTOS if k.startswith("2023/beach/")}
SNOW = {k for k in PHOTOS if k.startswith("2024/Snow/")}


class RemoteNumpyIndex(NumpyIndex):
    """The NumPy backend served as a remote one: searches go through the service's batcher."""
    remote = True


def _index(kind: str, tmp, request):
    if kind == "numpy":
        return NumpyIndex(tmp / "index" / "numpy")
    if kind == "numpy-remote":
        return RemoteNumpyIndex(tmp / "index" / "numpy")
    if kind == "faiss":
        return FaissIndex(IndexRepository(tmp / "index"))
    from indexer.milvus_index import MilvusIndex

    server = request.getfixturevalue("milvus_server")
    return MilvusIndex(server.uri, prefix=f"t_filters_{uuid.uuid4().hex[:8]}", timeout_s=5.0)


@pytest.fixture(scope="module", params=["numpy", "numpy-remote", "faiss", "milvus"])
def app(request, tmp_path_factory, encoder):
    tmp = tmp_path_factory.mktemp(f"filters-{request.param}")
    keys = list(PHOTOS)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(keys), encoder.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = _index(request.param, tmp, request)
    index.rebuild(encoder.model_id, keys, encoder.scoring.image_vectors(emb),
                  [f"etag{i}" for i in range(len(keys))], info=list(PHOTOS.values()))
    settings = Settings(index_dir=str(tmp / "index"), reload_interval_s=0, milvus_refresh_s=60,
                        _env_file=None)
    service = build_service(settings, encoder=encoder, index=index,
                            store=LocalStore(tmp / "store", "b"))
    yield create_app(settings, service)
    if request.param == "milvus":
        for name in index.versions():
            index.client.drop_collection(name)
        index.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def _keys(body) -> list[str]:
    return [h["key"] for h in body["results"]]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def _error_locs(r) -> list[list[str]]:
    """Each error's place, from "filters" on (JSON bodies say ["filters", ...], the upload
    form, as FastAPI's form fields do, ["body", "filters", ...])."""
    assert r.status_code == 422, r.text
    return [e["loc"][e["loc"].index("filters"):] if "filters" in e["loc"] else e["loc"]
            for e in r.json()["detail"]]


# --- filters inside the search ----------------------------------------------------------------
@pytest.mark.parametrize("filters,expected", [
    ({"country": "portugal"}, BEACH),
    ({"country": "NO"}, SNOW),
    ({"folders": ["2024/Snow/"]}, SNOW),
    ({"folders": ["2023", "scans"]}, BEACH | {k for k in PHOTOS if k.startswith("scans/")}),
    ({"taken_after": "2023-07-05", "taken_before": "2023-07-09T00:00:00Z"},
     {f"2023/beach/IMG_{i:04d}.HEIC" for i in range(4, 8)}),
    ({"camera": "canon eos r6"}, SNOW),
    ({"city": "Tromsø", "orientation": "portrait"}, SNOW),
    ({"near": {"lat": 38.7, "lon": -9.2, "km": 50}}, BEACH),
    ({"has_position": False, "min_width": 500}, {k for k in PHOTOS if k.startswith("scans/")}),
])
def test_a_filter_keeps_exactly_the_matching_photos(client, filters, expected):
    body = _ok(client.post(S, json={"text": "a photo", "top_k": 30, "filters": filters}))
    assert set(_keys(body)) == expected and body["total"] == len(expected)
    assert body["filters"] == PhotoFilter.model_validate(filters).model_dump(
        mode="json", exclude_none=True)
    # a page is full whenever that many match (the filter is inside the search)
    page = _ok(client.post(S, json={"text": "a photo", "top_k": 3, "filters": filters}))
    assert len(page["results"]) == 3 and set(_keys(page)) <= expected
    assert _keys(page) == _keys(body)[:3]
    assert page["total"] == len(expected)  # counted by the index, not the version's size


def test_a_filter_nobody_matches_is_an_empty_page(client):
    body = _ok(client.post(S, json={"text": "a photo", "filters": {"country": "Chile"}}))
    assert body["results"] == [] and body["total"] == 0
    batch = _ok(client.post(B, json={"queries": ["a", "b"], "filters": {"city": "Nowhere"}}))
    assert [(b["total"], b["results"]) for b in batch] == [(0, []), (0, [])]


def test_an_empty_filter_restricts_nothing(client):
    plain = _ok(client.post(S, json={"text": "a photo", "top_k": 10}))
    for empty in ({}, None, {"folders": []}):
        body = _ok(client.post(S, json={"text": "a photo", "top_k": 10, "filters": empty}))
        assert _keys(body) == _keys(plain) and body["total"] == len(PHOTOS)
        assert body["filters"] == {}


@pytest.mark.parametrize("filters,field", [
    ({"colour": "red"}, "colour"),
    ({"taken_after": "2024-01-01", "taken_before": "2023-01-01"}, "taken_before"),
    ({"taken_after": "last summer"}, "taken_after"),
    ({"taken_before": "2023-13-45"}, "taken_before"),
    ({"near": {"lat": 91, "lon": 0, "km": 5}}, "near"),
    ({"near": {"lat": 0, "lon": 0, "km": 0}}, "near"),
    ({"orientation": "sideways"}, "orientation"),
    ({"min_width": -1}, "min_width"),
    ({"country": "x" * 1000}, "country"),
    ({"folders": [f"f{i}" for i in range(RequestLimits.MAX_FILTER_FOLDERS + 1)]}, "folders"),
])
def test_a_bad_filter_is_a_422_naming_the_field(client, filters, field):
    for route, body in ((S, {"text": "a photo"}), (B, {"queries": ["a photo"]})):
        locs = _error_locs(client.post(route, json={**body, "filters": filters}))
        assert any(loc[:2] == ["filters", field] for loc in locs), locs
    r = client.post(I, files={"image": ("x.png", _png(), "image/png")},
                    data={"filters": json.dumps(filters)})
    assert any(loc[:2] == ["filters", field] for loc in _error_locs(r)), r.text


def test_form_clients_send_filters_as_json_text(client):
    want = _ok(client.post(S, json={"text": "a photo", "top_k": 30,
                                    "filters": {"folders": ["2024/Snow"]}}))
    got = _ok(client.post(S, data={"text": "a photo", "top_k": "30",
                                   "filters": '{"folders": ["2024/Snow"]}'}))
    assert _keys(got) == _keys(want)
    bad = client.post(S, data={"text": "a photo", "filters": "{not json"})
    assert bad.status_code == 422 and "filters" in bad.text
    r = client.post(I, files={"image": ("x.png", _png(), "image/png")}, data={"filters": "["})
    assert ["filters"] in _error_locs(r)


def test_search_by_image_takes_filters(client):
    files = {"image": ("x.png", _png(), "image/png")}
    body = _ok(client.post(I, files=files, data={"top_k": "30",
                                                 "filters": '{"country": "Norway"}'}))
    assert set(_keys(body)) == SNOW and body["total"] == len(SNOW)
    assert body["filters"] == {"country": "Norway"} and body["encoded_text"] is None
    assert body["hints"] == []
    plain = _ok(client.post(I, files=files, data={"top_k": "5", "filters": ""}))
    assert plain["total"] == len(PHOTOS) and plain["filters"] == {}


def test_batch_filters_apply_to_every_query(client):
    found = _ok(client.post(B, json={"queries": ["a photo", "snow"], "top_k": 30,
                                     "filters": {"folders": ["2023/beach"]}}))
    assert [set(_keys(b)) for b in found] == [BEACH, BEACH]


def test_given_embeddings_match_no_filter(client):
    """Embeddings a client sends carry no metadata: as a version stored without it, they
    match no non-empty filter."""
    given = [{"filename": "a.jpg", "embedding": [1.0] * client.app.state.service.encoders.dim}]
    body = _ok(client.post(S, json={"text": "x", "image_embeddings": given,
                                    "filters": {"country": "Norway"}}))
    assert (body["total"], body["results"], body["filters"]) == (0, [], {"country": "Norway"})
    ok = _ok(client.post(S, json={"text": "in Norway", "image_embeddings": given,
                                  "filters": {}}))
    assert ok["encoded_text"] == "in Norway" and ok["hints"] == [] and ok["total"] == 1
    assert ok["results"][0]["info"] is None


@pytest.mark.parametrize("filters,field", [
    ({"taken_before": -141501}, "taken_before"),
    ({"min_width": "5"}, "min_width"),
    ({"has_position": "true"}, "has_position"),
    ({"has_position": 1}, "has_position"),
    ({"near": {"lat": "38.7", "lon": -9.2, "km": 5}}, "near"),
])
def test_json_filters_are_typed_as_the_schema_says(client, filters, field):
    locs = _error_locs(client.post(S, json={"text": "a photo", "filters": filters}))
    assert any(loc[:2] == ["filters", field] for loc in locs), locs
    r = client.post(S, json={"text": "a photo", "parse_hints": "no"})
    assert r.status_code == 422 and "parse_hints" in r.text


# --- query hints ------------------------------------------------------------------------------
def _norway_hints(text, now, tz):
    """A stand-in parser: reads "in Norway" and the year 2024."""
    if "in Norway 2024" not in text:
        return SimpleNamespace(text=text, filters=PhotoFilter(), hints=[])
    return SimpleNamespace(
        text=text.replace("in Norway 2024", ""),
        filters=PhotoFilter(country="Norway", taken_after=datetime(2024, 1, 1),
                            taken_before=datetime(2025, 1, 1)),
        hints=[SimpleNamespace(field="country", value="Norway", text="in Norway"),
               SimpleNamespace(field="taken", value={"after": datetime(2024, 1, 1),
                                                     "before": datetime(2025, 1, 1)},
                               text="2024")])


@pytest.fixture
def hints(monkeypatch):
    seen = []

    def read(text, now, tz):
        seen.append((now, tz))
        return _norway_hints(text, now, tz)

    monkeypatch.setattr(text_queries, "read_hints", read)
    return seen


def test_hints_become_filters_and_the_rest_is_encoded(client, hints):
    body = _ok(client.post(S, json={"text": "snow in Norway 2024", "top_k": 30}))
    assert set(_keys(body)) == SNOW and body["total"] == len(SNOW)
    assert body["query"] == "snow in Norway 2024" and body["encoded_text"] == "snow"
    assert body["filters"] == {"country": "Norway", "taken_after": "2024-01-01T00:00:00Z",
                               "taken_before": "2025-01-01T00:00:00Z"}
    assert [h["field"] for h in body["hints"]] == ["country", "taken"]
    assert body["hints"][1]["value"]["after"].startswith("2024-01-01")
    assert hints[0][1] == "UTC" and hints[0][0].tzinfo is not None  # the service's clock
    # the ranking is that of the remaining words
    alone = _ok(client.post(S, json={"text": "snow", "top_k": 30,
                                     "filters": {"country": "Norway",
                                                 "taken_after": "2024-01-01",
                                                 "taken_before": "2025-01-01"}}))
    assert _keys(body) == _keys(alone)


def test_the_real_parser_reads_dates_and_places(client):
    body = _ok(client.post(S, json={"text": "snow in Norway in January 2024", "top_k": 30}))
    assert body["encoded_text"] == "snow" and set(_keys(body)) == SNOW
    assert {h["field"] for h in body["hints"]} == {"country", "taken"}
    assert body["filters"]["taken_after"].startswith("2024-01-01")
    named = _ok(client.post(S, json={"text": "a dog named July", "top_k": 30}))
    assert named["hints"] == [] and named["encoded_text"] == "a dog named July"
    assert named["total"] == len(PHOTOS)


def test_parse_hints_false_encodes_the_whole_text(client, hints):
    for body in (_ok(client.post(S, json={"text": "snow in Norway 2024", "top_k": 30,
                                          "parse_hints": False})),
                 _ok(client.post(S, data={"text": "snow in Norway 2024", "top_k": "30",
                                          "parse_hints": "false"})),
                 _ok(client.post(B, json={"queries": ["snow in Norway 2024"], "top_k": 30,
                                          "parse_hints": False}))[0]):
        assert body["hints"] == [] and body["filters"] == {}
        assert body["encoded_text"] == "snow in Norway 2024" and body["total"] == len(PHOTOS)


def test_the_requests_filters_win_over_hints(client, hints):
    body = _ok(client.post(S, json={"text": "snow in Norway 2024", "top_k": 30,
                                    "filters": {"country": "Portugal"}}))
    # the country hint is dropped; the date hint stays (2024) and nothing in Portugal is 2024
    assert [h["field"] for h in body["hints"]] == ["taken"]
    assert body["filters"]["country"] == "Portugal" and body["total"] == 0
    dated = _ok(client.post(S, json={"text": "snow in Norway 2024", "top_k": 30,
                                     "filters": {"taken_before": "2023-01-01"}}))
    # a date bound in the request drops the hinted date range (both bounds)
    assert [h["field"] for h in dated["hints"]] == ["country"]
    assert dated["filters"] == {"country": "Norway", "taken_before": "2023-01-01T00:00:00Z"}
    assert dated["total"] == 0


def test_hints_that_would_make_an_impossible_filter_are_dropped():
    hinted = PhotoFilter(taken_after=datetime(2020, 1, 1))
    hint = {"field": "taken_after", "value": "2020-01-01T00:00:00Z", "text": "after 2020"}
    asked = PhotoFilter(taken_before=datetime(2019, 1, 1))
    assert text_queries.merge_filters(asked, hinted, [hint]) == (asked, [])
    assert text_queries.merge_filters(None, hinted, [hint]) == (hinted, [hint])
    merged, kept = text_queries.merge_filters(PhotoFilter(country="PT"), hinted, [hint])
    assert merged == PhotoFilter(country="PT", taken_after=datetime(2020, 1, 1)) and kept


def test_batch_reads_hints_per_query(client, hints):
    found = _ok(client.post(B, json={"queries": ["snow in Norway 2024", "a photo"],
                                     "top_k": 30}))
    assert set(_keys(found[0])) == SNOW and found[0]["encoded_text"] == "snow"
    assert found[1]["hints"] == [] and found[1]["total"] == len(PHOTOS)


def test_a_text_made_only_of_hints_is_encoded_whole():
    read = text_queries.read_text_query
    original = text_queries.read_hints
    try:
        text_queries.read_hints = lambda text, now, tz: SimpleNamespace(
            text="", filters=PhotoFilter(country="Norway"),
            hints=[{"field": "country", "value": "Norway", "text": "Norway"}])
        q = read("Norway", None, True, datetime.now(timezone.utc), "UTC")
    finally:
        text_queries.read_hints = original
    assert q.encoded_text == "Norway" and q.where == PhotoFilter(country="Norway")


# --- each hit's metadata, one photo's, facets, counts ------------------------------------------
def test_each_hit_carries_its_photos_date_place_camera_and_size(client):
    body = _ok(client.post(S, json={"text": "a photo", "top_k": 30}))
    info = {h["key"]: h["info"] for h in body["results"]}
    assert info["2023/beach/IMG_0003.HEIC"] == {
        "taken_at": "2023-07-04T10:00:00+00:00", "taken_at_source": "exif",
        "place": "Lisbon, Portugal", "camera": "Apple iPhone 12",
        "width": 4032, "height": 3024}
    assert info["2024/Snow/DSC00000.jpg"]["camera"] == "Canon EOS R6"
    assert info["2024/Snow/DSC00000.jpg"]["place"] == "Tromsø, Norway"
    assert info["scans/scan0.png"]["place"] is None
    assert info["scans/scan0.png"]["taken_at_source"] == "modified"
    assert info["old/photo0.jpg"] is None


def test_image_info_returns_the_stored_metadata(client):
    body = _ok(client.get("/images/2024/Snow/DSC00002.jpg/info"))
    assert body["key"] == "2024/Snow/DSC00002.jpg" and body["country_code"] == "NO"
    assert body["taken_at"] == "2024-01-12T12:00:00+00:00" and body["lat"] == 69.65
    assert body["folder"] == "2024/Snow" and body["content_type"] == "image/jpeg"
    for missing in ("/images/2024/Snow/nope.jpg/info", "/images/old/photo0.jpg/info",
                    "/images/../../etc/passwd/info", "/images/2024/Snow/info",
                    "/images/a%00b.jpg/info", "/images/" + "x/" * 500 + "y.jpg/info"):
        r = client.get(missing)
        assert r.status_code == 404 and "/tmp" not in r.text, r.text
    # the image route itself is not shadowed
    assert client.get("/images/2024/Snow/DSC00002.jpg").status_code == 404  # not in the store


def test_facets_count_what_the_index_holds(client):
    body = _ok(client.get("/facets"))
    assert body["folder"][0] == ["2023/beach", 12]
    assert ["Norway", 8] in body["country"] and ["Canon EOS R6", 8] in body["camera"]
    assert [2023, 12] in body["year"]
    assert len(_ok(client.get("/facets?limit=1"))["folder"]) == 1
    for bad in (0, RequestLimits.MAX_FACET_VALUES + 1, "x"):
        assert client.get(f"/facets?limit={bad}").status_code == 422


def test_health_counts_photos_with_a_date_a_position_a_place(client):
    body = _ok(client.get("/health"))
    assert (body["with_date"], body["with_position"], body["with_place"]) == (20, 20, 20)
    assert body["vector_count"] == len(PHOTOS)


def test_openapi_documents_the_filter_fields_with_examples(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def resolve(node: dict) -> dict:
        for option in node.get("anyOf", [node]):
            if "$ref" in option:
                return components[option["$ref"].rsplit("/", 1)[-1]]
        return node

    def body_of(route: str) -> dict:
        content = schema["paths"][route]["post"]["requestBody"]["content"]
        return resolve(next(iter(content.values()))["schema"])

    for route in (S, B):
        body = body_of(route)["properties"]
        assert "parse_hints" in body
        photo_filter = resolve(body["filters"])
        assert photo_filter.get("examples")
        assert {"folders", "taken_after", "taken_before", "camera", "country", "region",
                "city", "near", "has_position", "min_width", "min_height",
                "orientation"} == set(photo_filter["properties"])
        assert photo_filter["properties"]["folders"]["anyOf"][0]["maxItems"] == \
            RequestLimits.MAX_FILTER_FOLDERS
        examples = {name: prop["examples"][0]
                    for name, prop in photo_filter["properties"].items()}
        assert set(examples) == set(photo_filter["properties"])  # one for every field
        PhotoFilter.model_validate(examples)  # and together they make a valid filter
    upload = body_of(I)["properties"]["filters"]
    assert upload.get("examples") and "JSON" in upload["description"]
    out = components["SearchOut"]["properties"]
    assert {"filters", "hints", "encoded_text"} <= set(out)
    assert "info" in components["Hit"]["properties"]


def test_the_query_time_zone_is_a_setting():
    assert Settings(query_time_zone="Europe/Lisbon", _env_file=None).query_time_zone == \
        "Europe/Lisbon"
    with pytest.raises(ValueError):
        Settings(query_time_zone="Mars/Olympus", _env_file=None)


def test_hit_info_names_the_camera_once():
    from search_api.search_service import hit_info

    def camera(make, model):
        return hit_info({"camera_make": make, "camera_model": model})["camera"]

    assert camera("NIKON CORPORATION", "NIKON D750") == "NIKON D750"
    assert camera("Apple", "iPhone 12") == "Apple iPhone 12"
    assert camera(None, "X100V") == "X100V" and camera("Canon", None) == "Canon"
    assert hit_info({"taken_at": float("nan")})["taken_at"] is None
    assert hit_info(None) is None and hit_info({}) is None
