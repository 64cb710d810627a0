"""/metrics: Prometheus text with request latency per route, time per stage, the served index."""
from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.search_api.helpers import republish
from tests.conftest import make_image

KEY = "metrics-key"
SERVICE_OPTIONS = dict(api_key=KEY)


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_cover_routes_stages_and_index(svc):
    with TestClient(svc.app) as c:
        for q in ("red", "blue square", "a green circle"):
            assert c.post("/search_images_by_text", json={"query": q, "top_k": 2}).status_code == 200
        key = c.post("/search_images_by_text", json={"query": "red"}).json()["results"][0]["key"]
        assert c.get(f"/images/{key}").status_code == 200
        assert c.get(f"/images/{key}?size=64").status_code == 200
        r = c.post("/search_images_by_image", headers={"X-API-Key": KEY},
                   files={"image": ("a.jpg", make_image("red", "circle", 5), "image/jpeg")})
        assert r.status_code == 200
        c.post("/search_images_by_text", json={"query": ""})  # a 422
        c.get("/no/such/route")  # a 404, no route template

        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = _samples(r.text)

        post = {"method": "POST"}
        assert _value(m, "search_api_request_duration_seconds_count",
                      route="/search_images_by_text", **post) == 5
        assert _value(m, "search_api_request_duration_seconds_count",
                      route="/images/{key:path}", method="GET") == 2
        assert _value(m, "search_api_request_duration_seconds_count",
                      route="/search_images_by_image", **post) == 1
        assert _value(m, "search_api_requests_total", route="/search_images_by_text",
                      status="422", **post) == 1
        assert _value(m, "search_api_requests_total", route="unmatched", status="404",
                      method="GET") == 1
        # latency buckets are cumulative and end in +Inf == count
        assert _value(m, "search_api_request_duration_seconds_bucket",
                      route="/search_images_by_text", le="+Inf", **post) == 5

        for stage in ("text_encode", "index_search", "image_fetch", "image_decode",
                      "image_encode", "thumbnail"):
            assert _value(m, "search_api_stage_duration_seconds_count", stage=stage) >= 1, stage
            assert _value(m, "search_api_stage_duration_seconds_sum", stage=stage) > 0, stage
        assert _value(m, "search_api_stage_duration_seconds_count", stage="text_encode") >= 4
        assert _value(m, "search_api_stage_duration_seconds_count", stage="index_search") >= 5

        h = c.get("/health").json()
        assert _value(m, "search_api_index_vectors") == h["vector_count"] > 0
        assert _value(m, "search_api_index_info", version=h["index_version"],
                      model_id=h["model_id"]) == 1
        assert _value(m, "search_api_index_loaded_timestamp_seconds") > 0
        assert _value(m, "search_api_store_up") == 1


def test_metrics_follow_a_reload(svc):
    with TestClient(svc.app) as c:
        before = _samples(c.get("/metrics").text)
        ok0 = _value(before, "search_api_index_reloads_total", result="ok")
        version, keys = republish(svc.repo, keep=slice(0, 3))
        assert c.post("/admin/reload", headers={"X-API-Key": KEY}).json()["version"] == version
        republish(svc.repo, model_id="not-this-model")
        assert c.post("/admin/reload", headers={"X-API-Key": KEY}).json()["error"]
        m = _samples(c.get("/metrics").text)
        assert _value(m, "search_api_index_vectors") == 3
        assert _value(m, "search_api_index_info", version=version,
                      model_id=svc.service.model_id) == 1
        assert _value(m, "search_api_index_reloads_total", result="ok") == ok0 + 1
        assert _value(m, "search_api_index_reloads_total", result="error") >= 1
        assert _value(m, "search_api_stage_duration_seconds_count", stage="index_load") >= 1
