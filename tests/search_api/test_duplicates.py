"""GET /duplicates: the report `python -m indexer duplicates` writes, for the served version only,
paged, largest groups first, each photo with its size and date."""
from __future__ import annotations

from fastapi.testclient import TestClient

from core.settings import RequestLimits
from indexer.duplicates import DuplicateGroup, DuplicateReport, find_duplicates, report_path, \
    write_report
from indexer.faiss_index import FaissIndex
from tests.search_api.helpers import republish

SERVICE_OPTIONS = {"split": "all"}  # photos enough for three groups


def _report(svc, groups: list[list[str]], version: str | None = None) -> DuplicateReport:
    view = svc.service.index.current
    return DuplicateReport(version or view.version, svc.service.model_id, "faiss", 0.85,
                           view.count, [DuplicateGroup(sorted(g), 0.9) for g in groups])


def test_groups_of_the_served_version_paged_largest_first(fresh_svc):
    svc = fresh_svc
    path = report_path(svc.settings.index_dir)
    keys = sorted(svc.service.index.current.keys)
    with TestClient(svc.app) as client:
        r = client.get("/duplicates")
        assert r.status_code == 404 and "python -m indexer duplicates" in r.json()["detail"]

        write_report(_report(svc, [keys[:3], keys[3:5], keys[5:7]]), path)
        r = client.get("/duplicates", params={"limit": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["total_groups"], body["total_photos"], body["offset"]) == (3, 7, 0)
        assert body["index_version"] == svc.service.index.current.version
        assert [g["size"] for g in body["groups"]] == [3, 2]
        photo = body["groups"][0]["photos"][0]
        assert photo["key"] == keys[0] and photo["url"].endswith("/images/" + keys[0])
        assert photo["width"] > 0 and photo["height"] > 0  # from the index's metadata
        assert "taken_at" in photo
        assert str(svc.root) not in r.text  # no server paths

        r = client.get("/duplicates", params={"offset": 2, "limit": 2})
        assert [g["photos"][0]["key"] for g in r.json()["groups"]] == [keys[5]]
        assert client.get("/duplicates", params={"offset": 10}).json()["groups"] == []

        for bad in ({"limit": RequestLimits.MAX_DUPLICATE_GROUPS + 1}, {"limit": 0},
                    {"offset": -1}, {"limit": "x"}):
            assert client.get("/duplicates", params=bad).status_code == 422, bad


def test_a_report_of_another_version_is_a_409_and_a_damaged_one_a_404(fresh_svc):
    svc = fresh_svc
    path = report_path(svc.settings.index_dir)
    with TestClient(svc.app) as client:
        write_report(_report(svc, [sorted(svc.service.index.current.keys)[:2]]), path)
        assert client.get("/duplicates").status_code == 200
        republish(svc.repo, slice(0, 5))
        assert svc.service.index.reload()["changed"]
        r = client.get("/duplicates")
        assert r.status_code == 409 and "python -m indexer duplicates" in r.json()["detail"]
        path.write_text("{damaged")
        r = client.get("/duplicates")
        assert r.status_code == 404 and str(svc.root) not in r.text


def test_the_pass_over_the_served_index_is_what_the_route_serves(fresh_svc):
    svc = fresh_svc
    scoring = svc.service.encoders.scoring
    # the tiny test model's pictures are near one another: a low threshold groups some
    report = find_duplicates(FaissIndex(svc.repo), svc.service.model_id, 0.5,
                             columns=scoring.dim)
    write_report(report, report_path(svc.settings.index_dir))
    with TestClient(svc.app) as client:
        body = client.get("/duplicates", params={"limit": 100}).json()
    assert body["total_groups"] == len(report.groups)
    assert [[p["key"] for p in g["photos"]] for g in body["groups"]] == \
        [g.keys[:RequestLimits.MAX_DUPLICATE_GROUP_PHOTOS] for g in report.groups]
    sizes = [g["size"] for g in body["groups"]]
    assert sizes == sorted(sizes, reverse=True)


def test_a_pass_with_the_pixel_check_says_so(fresh_svc):
    """The route serves both thresholds and the check's parameters; an embedding-only report
    serves nulls there."""
    from indexer.duplicate_check import photo_reader

    svc = fresh_svc
    index = FaissIndex(svc.repo)
    columns = svc.service.encoders.scoring.dim
    path = report_path(svc.settings.index_dir)
    checked = find_duplicates(index, svc.service.model_id, 0.6, columns=columns,
                              read_photo=photo_reader(svc.store), candidate_threshold=0.5)
    assert checked.check.unreadable == 0 and checked.check.checked == checked.check.candidates
    with TestClient(svc.app) as client:
        write_report(checked, path)
        body = client.get("/duplicates").json()
        assert (body["threshold"], body["candidate_threshold"], body["pixel_check"]) == \
            (0.6, 0.5, checked.pixel_check)
        write_report(find_duplicates(index, svc.service.model_id, 0.6, columns=columns), path)
        body = client.get("/duplicates").json()
        assert (body["candidate_threshold"], body["pixel_check"]) == (None, None)
