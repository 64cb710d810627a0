"""`dedupe=true` on the search routes: near duplicates collapse into the best-ranked photo of
each group, with a count; groups from the duplicates report of the served version, else from the
ranked photos' own vectors; offset and top_k count collapsed results."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import RequestLimits
from indexer.duplicates import DuplicateGroup, DuplicateReport, report_path, write_report
from tests.search_api.helpers import republish

SERVICE_OPTIONS = {"split": "all"}
TEXT = "a red circle"
# the tiny test model's pictures are near one another: at this threshold some collapse
LOW = 0.5


def _ranking(client, **extra) -> list[str]:
    body = client.post("/search_images_by_text",
                       json={"text": TEXT, "top_k": 100, **extra}).json()
    return [h["key"] for h in body["results"]]


def _write(svc, groups: list[list[str]], version: str | None = None,
           photos: int | None = None) -> None:
    view = svc.service.index.current
    report = DuplicateReport(version or view.version, svc.service.model_id, "faiss", 0.85,
                             view.count if photos is None else photos,
                             [DuplicateGroup(sorted(g), 0.9) for g in groups])
    write_report(report, report_path(svc.settings.index_dir))


def _greedy(keys: list[str], vectors: dict[str, np.ndarray], threshold: float) -> dict:
    """What collapsing by vectors should give: kept key -> keys collapsed into it."""
    kept: dict[str, list[str]] = {}
    for key in keys:
        home = next((k for k in kept if float(vectors[k] @ vectors[key]) > threshold), None)
        if home is None:
            kept[key] = []
        else:
            kept[home].append(key)
    return kept


def _embeddings(svc) -> dict[str, np.ndarray]:
    view = svc.service.index.current
    keys = list(view.keys)
    stored = svc.service.encoders.scoring.embeddings(view.stored_vectors(keys))
    return dict(zip(keys, stored))


def test_report_groups_collapse_into_the_best_ranked_and_pages_count_collapsed(fresh_svc):
    svc = fresh_svc
    with TestClient(svc.app) as client:
        r = _ranking(client)
        assert len(r) == 24
        _write(svc, [[r[0], r[2], r[5]], [r[1], r[3]]])
        body = client.post("/search_images_by_text",
                           json={"text": TEXT, "top_k": 3, "dedupe": True}).json()
        assert body["dedupe"] == "report"
        hits = body["results"]
        assert [h["key"] for h in hits] == [r[0], r[1], r[4]]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert [h["duplicates"] for h in hits] == [2, 1, 0]
        assert [h["duplicate_keys"] for h in hits] == [[r[2], r[5]], [r[3]], []]
        assert body["total"] == 24 - 3
        nxt = client.post("/search_images_by_text",
                          json={"text": TEXT, "top_k": 2, "offset": 3, "dedupe": True}).json()
        assert [(h["key"], h["rank"]) for h in nxt["results"]] == [(r[6], 4), (r[7], 5)]
        # without dedupe: as before, no dedupe fields
        plain = client.post("/search_images_by_text", json={"text": TEXT, "top_k": 3}).json()
        assert [h["key"] for h in plain["results"]] == r[:3] and "dedupe" not in plain
        assert "duplicates" not in plain["results"][0]


def test_without_a_report_the_ranked_photos_vectors_collapse_at_the_threshold(fresh_svc,
                                                                             monkeypatch):
    import search_api.dedupe as dedupe

    svc = fresh_svc
    monkeypatch.setattr(dedupe, "DEFAULT_THRESHOLD", LOW)
    with TestClient(svc.app) as client:
        r = _ranking(client)
        want = _greedy(r, _embeddings(svc), LOW)
        assert len(want) < len(r)  # something collapses at this threshold
        body = client.post("/search_images_by_text",
                           json={"text": TEXT, "top_k": 100, "dedupe": True}).json()
        assert body["dedupe"] == "page"
        assert [h["key"] for h in body["results"]] == list(want)
        assert [h["duplicates"] for h in body["results"]] == [len(v) for v in want.values()]
        assert body["total"] == len(want)

        # pages of two, one after another: the same list, nothing twice
        pages = []
        for offset in range(0, len(want) + 2, 2):
            pages += client.post("/search_images_by_text", json={
                "text": TEXT, "top_k": 2, "offset": offset, "dedupe": True}).json()["results"]
        assert [h["key"] for h in pages] == list(want)
        assert [h["rank"] for h in pages] == list(range(1, len(want) + 1))

        # a report of another version is not used; a damaged one is as none
        _write(svc, [[r[0], r[1]]], version="20000101T000000000000Z-aaaaaa")
        again = client.post("/search_images_by_text",
                            json={"text": TEXT, "top_k": 100, "dedupe": True}).json()
        assert again["dedupe"] == "page" and again["results"] == body["results"]
        report_path(svc.settings.index_dir).write_text("{damaged")
        again = client.post("/search_images_by_text",
                            json={"text": TEXT, "top_k": 100, "dedupe": True})
        assert again.status_code == 200 and again.json()["dedupe"] == "page"


def test_a_report_not_covering_every_photo_adds_the_vectors(fresh_svc, monkeypatch):
    import search_api.dedupe as dedupe

    svc = fresh_svc
    monkeypatch.setattr(dedupe, "DEFAULT_THRESHOLD", LOW)
    with TestClient(svc.app) as client:
        r = _ranking(client)
        _write(svc, [[r[0], r[-1]]], photos=23)  # one photo more since (an in-place update)
        body = client.post("/search_images_by_text",
                           json={"text": TEXT, "top_k": 100, "dedupe": True}).json()
        assert body["dedupe"] == "report+page"
        first = body["results"][0]
        assert first["key"] == r[0] and r[-1] in first["duplicate_keys"]
        shown = [h["key"] for h in body["results"]]
        collapsed = [k for h in body["results"] for k in h["duplicate_keys"]]
        assert sorted(shown + collapsed) == sorted(r)  # each photo once, shown or collapsed


def test_every_search_route_takes_dedupe(fresh_svc):
    svc = fresh_svc
    with TestClient(svc.app) as client:
        r = _ranking(client)
        _write(svc, [r[:4]])
        ask = {"top_k": 3, "dedupe": True}
        terms = client.post("/search_images_by_text",
                            json={"terms": {"positive": [{"text": TEXT}]}, **ask}).json()
        assert terms["dedupe"] == "report" and terms["results"][0]["duplicates"] == 3

        batch = client.post("/search_images_by_texts",
                            json={"queries": [TEXT, TEXT + " - grass"], **ask}).json()
        assert [b["dedupe"] for b in batch] == ["report", "report"]
        assert [h["key"] for h in batch[0]["results"]] == [r[0], r[4], r[5]]

        by_key = client.post("/search_images_by_key", json={"keys": [r[10]], **ask}).json()
        assert by_key["dedupe"] == "report"
        found = [h["key"] for h in by_key["results"]]
        assert sum(k in r[:4] for k in found) <= 1 and r[10] not in found

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
        upload = client.post("/search_images_by_image",
                             files={"image": ("x.png", buf.getvalue(), "image/png")},
                             data={"top_k": "3", "dedupe": "true"}).json()
        assert upload["dedupe"] == "report"
        assert sum(h["key"] in r[:4] for h in upload["results"]) <= 1

        # given embeddings: their own vectors (no report describes them)
        same = [1.0] + [0.0] * (svc.service.encoders.dim - 1)
        other = [0.0, 1.0] + [0.0] * (svc.service.encoders.dim - 2)
        given = client.post("/search_images_by_text", json={
            "text": TEXT, "top_k": 5, "dedupe": True, "image_embeddings": [
                {"filename": "a", "embedding": same}, {"filename": "b", "embedding": other},
                {"filename": "a2", "embedding": same}]}).json()
        assert given["dedupe"] == "page" and given["total"] == 2
        by_name = {h["key"]: h for h in given["results"]}
        assert sorted(by_name) == ["a", "b"]
        assert by_name["a"]["duplicate_keys"] == ["a2"] and by_name["b"]["duplicates"] == 0


def test_bounds_and_bad_values(fresh_svc):
    svc = fresh_svc
    with TestClient(svc.app) as client:
        r = _ranking(client)
        _write(svc, [r])  # every photo one group: one result
        body = client.post("/search_images_by_text",
                           json={"text": TEXT, "top_k": 5, "dedupe": True}).json()
        assert [h["key"] for h in body["results"]] == [r[0]] and body["total"] == 1
        assert body["results"][0]["duplicates"] == 23
        assert len(body["results"][0]["duplicate_keys"]) == RequestLimits.MAX_COLLAPSED_KEYS
        deep = client.post("/search_images_by_text", json={
            "text": TEXT, "top_k": 5, "offset": 3, "dedupe": True})
        assert deep.status_code == 200 and deep.json()["results"] == []
        for bad in ("yes", 1, None, "true"):
            assert client.post("/search_images_by_text", json={
                "text": TEXT, "dedupe": bad}).status_code == 422, bad
        form = client.post("/search_images_by_text", data={"text": TEXT, "dedupe": "true"})
        assert form.status_code == 200 and form.json()["dedupe"] == "report"
        # a new version served: the report no longer describes it
        republish(svc.repo, slice(0, 5))
        assert svc.service.index.reload()["changed"]
        body = client.post("/search_images_by_text",
                           json={"text": TEXT, "top_k": 5, "dedupe": True}).json()
        assert body["dedupe"] == "page" and len(body["results"]) <= 5


@pytest.mark.parametrize("filters", [{"min_width": 1}])
def test_filters_and_dedupe_together(fresh_svc, filters):
    svc = fresh_svc
    with TestClient(svc.app) as client:
        r = _ranking(client, filters=filters)
        _write(svc, [r[:2]])
        body = client.post("/search_images_by_text", json={
            "text": TEXT, "top_k": 3, "dedupe": True, "filters": filters}).json()
        assert [h["key"] for h in body["results"]] == [r[0], r[2], r[3]]
        assert body["total"] == len(r) - 1


def test_collapse_on_its_own_is_prefix_stable():
    """A longer ranking never changes how its first photos collapse (pages of a deeper search
    agree with a shallower one), by report groups and by vectors alike."""
    from search_api.dedupe import Groups, collapse

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8))
    vectors = np.repeat(base, 5, axis=0) + 0.05 * rng.normal(size=(30, 8))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))[rng.permutation(30)]
    keys = [f"k{i:02d}" for i in range(30)]
    for groups in (Groups("page", 0.9, None, True),
                   Groups("report+page", 0.9, {"k00": 0, "k29": 0, "k05": 1, "k06": 1}, True),
                   Groups("report", 0.9, {"k00": 0, "k29": 0}, False)):
        whole = collapse(keys, groups, vectors)
        assert sorted(whole.kept + [j for v in whole.into.values() for j in v]) == \
            list(range(30))
        for n in (1, 7, 13, 29):
            part = collapse(keys[:n], groups, vectors[:n])
            assert part.kept == [i for i in whole.kept if i < n]
            assert all(part.into[i] == [j for j in whole.into[i] if j < n] for i in part.kept)
    whole = collapse(keys, Groups("page", 0.9, None, True), vectors)
    assert len(whole.kept) == 6  # the six bases, five near copies each
    report = collapse(keys, Groups("report", 0.9, {"k00": 0, "k29": 0}, False))
    assert report.into[0] == [29] and len(report.kept) == 29
