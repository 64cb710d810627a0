"""The photos' metadata in the vector-index contract, on every backend of
tests/indexer/conftest.py: stored with the vectors (a rebuild, an update, a version written in
parts), read back by `view.info`, counted (`info_counts`, `facets`), and filters applied inside
the search: every field, a filter nobody matches, and a full page at 0.5 % selectivity."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from indexer.photo_columns import clean_info, facets, info_counts, public_info
from indexer.photo_filter import PhotoFilter
from indexer.vector_index import IndexLoadError

from .helpers import unit_vectors

MODEL = "test-model-1a2b3c"
DIM = 32
N = 2000
K = 10
DAY = 86400.0
T2019 = 1546300800.0  # 2019-01-01T00:00:00Z
CITIES = [("Lisbon", "Lisbon", "Portugal", "PT", 38.7223, -9.1393),
          ("Porto", "Porto", "Portugal", "PT", 41.1579, -8.6291),
          ("Oslo", "Oslo", "Norway", "NO", 59.9139, 10.7522),
          ("Paris", "Île-de-France", "France", "FR", 48.8566, 2.3522)]
CAMERAS = [("Canon", "Canon EOS R5"), ("Apple", "iPhone 14"), ("FUJIFILM", "X100V")]


def sample_info(i: int) -> dict | None:
    """A varied library: most photos with a date, a camera and a size; 80 % with a position
    and a place; one in 200 (0.5 %) in the rare town; every 97th with no metadata at all."""
    if i % 97 == 96:
        return None
    info = {"taken_at": T2019 + (i * 7919 % 2000) * DAY, "taken_at_source": "exif",
            "width": 4000 if i % 3 else 3000, "height": 3000 if i % 3 else 4000,
            "orientation": 1, "bytes": 1000 + i, "content_type": "image/jpeg"}
    if i % 11 == 0:
        info["width"] = info["height"] = 2000
        info["taken_at_source"] = "modified"
    if i % 5:
        info["camera_make"], info["camera_model"] = CAMERAS[i % 3]
    if i % 200 == 7:  # the rare town: 10 of 2000
        info |= {"city": "Tiny Town", "region": "Nowhere", "country": "Iceland",
                 "country_code": "IS", "lat": 64.0 + (i % 3) * 0.01, "lon": -21.0}
    elif i % 5 != 4:
        city, region, country, code, lat, lon = CITIES[i % 4]
        info |= {"city": city, "region": region, "country": country, "country_code": code,
                 "lat": lat + (i % 13) * 0.01, "lon": lon}
    return info


def sample_key(i: int) -> str:
    return f"{2019 + i % 5}/{['beach', 'snow', 'city'][i % 3]}/{i:05d}.jpg"


@pytest.fixture(scope="module")
def library():
    keys = [sample_key(i) for i in range(N)]
    infos = [sample_info(i) for i in range(N)]
    return keys, unit_vectors(N, DIM, seed=11), [f"e{i}" for i in range(N)], infos


def clustered(n: int, seed: int):
    """n unit vectors around 20 centres (the cluster of each), and 5 queries near clusters
    0..4: photos of the other clusters are far from them."""
    rng = np.random.default_rng(seed)
    centers = unit_vectors(20, DIM, seed=seed + 1)
    cluster = rng.integers(0, 20, n)
    vectors = centers[cluster] + 0.15 * rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = centers[:5] + 0.05
    return centers, cluster, vectors, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact_filtered(vectors, keys, infos, queries, where: PhotoFilter, k=K):
    """The exact top k of the photos the filter passes (row-by-row definition)."""
    rows = np.asarray([i for i, (key, info) in enumerate(zip(keys, infos))
                       if where.matches(clean_info(info, key))], int)
    if not len(rows):
        return [[] for _ in queries], 0
    scores = queries @ vectors[rows].T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[keys[j] for j in rows[row]] for row in top], len(rows)


FILTERS = [
    {"folders": ["2020"]},
    {"folders": ["2021/snow", "2023/beach/"]},
    {"taken_after": "2021-01-01", "taken_before": "2021-07-01"},
    {"taken_before": "2019-03-01"},
    {"camera": "canon eos r5"},
    {"camera": "apple"},
    {"country": "portugal"},
    {"country": "no"},
    {"region": "île-de-france"},
    {"city": "PORTO"},
    {"near": {"lat": 38.75, "lon": -9.14, "km": 20}},
    {"near": {"lat": 40.0, "lon": -9.0, "km": 250}},
    {"near": {"lat": 41.22, "lon": -8.40, "km": 20}},  # most of its box: the box less a few
    {"near": {"lat": 64.01, "lon": -20.98, "km": 1.3}},  # little of its box: a few keys
    {"has_position": True},
    {"has_position": False},
    {"min_width": 3500},
    {"min_height": 3500, "camera": "Canon"},
    {"orientation": "landscape"},
    {"orientation": "portrait", "country": "France"},
    {"orientation": "square"},
    {"city": "tiny town"},  # 0.5 %
]


def test_every_filter_field_inside_the_search(backend, library):
    keys, vectors, etags, infos = library
    backend.rebuild(MODEL, keys, vectors, etags, info=infos)
    view = backend.view(MODEL)
    queries = unit_vectors(20, DIM, seed=12)
    for fields in FILTERS:
        where = PhotoFilter.model_validate(fields)
        truth, matching = exact_filtered(vectors, keys, infos, queries, where)
        assert matching, fields
        assert view.count_matching(where) == matching, fields
        scores, found = view.search(queries, K, where=where)
        # a full page whenever that many photos match, only photos that match
        assert [len(r) for r in found] == [min(K, matching)] * len(queries), fields
        assert scores.shape == (len(queries), min(K, matching))
        passed = {k for k, i in zip(keys, infos) if where.matches(clean_info(i, k))}
        assert all(k in passed for row in found for k in row), fields
        hits = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
        assert hits >= 0.95, (fields, hits)
        by_key = dict(zip(keys, vectors))
        for row_scores, row_keys, q in zip(scores, found, queries):
            np.testing.assert_allclose(row_scores, [by_key[k] @ q for k in row_keys], atol=1e-5)
    # readback follows the filtered hits
    where = PhotoFilter(city="Tiny Town")
    _, found, tails = view.search(queries[:2], K, readback=DIM - 1, where=where)
    by_key = dict(zip(keys, vectors))
    for row_keys, row_tails in zip(found, tails):
        np.testing.assert_array_equal(row_tails, [by_key[k][DIM - 1] for k in row_keys])


def test_a_filter_nobody_matches_gives_empty_rows(backend, library):
    keys, vectors, etags, infos = library
    backend.rebuild(MODEL, keys, vectors, etags, info=infos)
    view = backend.view(MODEL)
    for fields in ({"city": "Atlantis"}, {"taken_after": "2100-01-01"},
                   {"near": {"lat": -80, "lon": 0, "km": 10}}, {"folders": ["nowhere"]},
                   {"country": "Portugal", "city": "Oslo"}, {"camera": "o'brien \"x\" %_\\"}):
        scores, found = view.search(unit_vectors(3, DIM), K, where=PhotoFilter(**fields))
        assert found == [[], [], []] and scores.shape == (3, 0), fields
        assert view.count_matching(PhotoFilter(**fields)) == 0, fields
    # an empty filter restricts nothing
    assert view.count_matching(PhotoFilter()) == view.count
    _, found = view.search(unit_vectors(2, DIM), K, where=PhotoFilter())
    assert [len(r) for r in found] == [K, K]


def test_metadata_round_trip_counts_and_facets(backend, library):
    keys, vectors, etags, infos = library
    backend.rebuild(MODEL, keys, vectors, etags, info=infos)
    view = backend.view(MODEL)
    rows = [clean_info(i, k) for k, i in zip(keys, infos)]
    assert view.info(keys) == [public_info(r) for r in rows]
    assert view.info(["not/indexed.jpg", keys[0]]) == [None, public_info(rows[0])]
    assert view.info_counts() == info_counts(rows)
    assert view.facets() == facets(rows) and view.facets(limit=2) == facets(rows, 2)
    assert view.facets()["year"][0][0] in range(2019, 2025)


def test_metadata_follows_updates_and_parts(backend, library):
    keys, vectors, etags, infos = library
    keys, vectors, etags, infos = keys[:300], vectors[:300], etags[:300], infos[:300]
    base = backend.rebuild(MODEL, keys, vectors, etags, info=infos)["version"]
    # an update: changed rows take their new metadata, deleted rows theirs with them
    moved = {"city": "Oslo", "country": "Norway", "lat": 59.9, "lon": 10.7, "width": 10,
             "height": 20}
    fresh = ["2030/new/a.jpg", "2030/new/b.jpg"]
    backend.update(MODEL, keys[:3] + fresh, vectors[:5], ["v2"] * 5,
                   delete=keys[3:6], info=[moved] * 3 + [{"camera_model": "Z9"}, None])
    view = backend.view(MODEL)
    got = view.info(keys[:7] + fresh)
    assert got[:3] == [public_info(clean_info(moved, k)) for k in keys[:3]]
    assert got[3:6] == [None] * 3
    assert got[6] == public_info(clean_info(infos[6], keys[6]))
    assert got[7] == {"camera_model": "Z9", "folder": "2030/new"}
    # a row written without metadata has none (its folder is not known from info either)
    assert got[8] is None
    where = PhotoFilter(city="oslo", orientation="portrait")
    _, found = view.search(vectors[:1], 50, where=where)
    assert set(found[0]) == {k for k in (keys[:3] + keys[6:]) if
                             where.matches(clean_info(moved if k in keys[:3] else
                                                      infos[keys.index(k)], k))}
    assert set(keys[:3]) <= set(found[0])

    # a version written in parts: each part's rows carry their metadata
    version = backend.begin(MODEL, DIM)
    backend.write(version, keys[:150], vectors[:150], etags[:150], part="p0", info=infos[:150])
    backend.write(version, keys[150:], vectors[150:], etags[150:], part="p1", info=infos[150:])
    backend.publish(version, parts=["p0", "p1"])
    view = backend.view(MODEL)
    assert view.version == version != base
    assert view.info(keys) == [public_info(clean_info(i, k)) for k, i in zip(keys, infos)]
    # an update in parts applies to the published version: untouched rows keep theirs
    draft = backend.begin(MODEL, DIM, base=version)
    backend.write(draft, keys[:2], vectors[:2], ["v3"] * 2, part="00000",
                  info=[{"city": "Paris"}] * 2)
    backend.remove(draft, keys[2:4], part="00001")
    backend.write(draft, [], None, [], part="00001")
    backend.publish(draft, parts=["00000", "00001"])
    view = backend.view(MODEL)
    assert view.info(keys[:5]) == [{"city": "Paris", "folder": folder} for folder in
                                   (k.rsplit("/", 1)[0] for k in keys[:2])] + \
        [None, None, public_info(clean_info(infos[4], keys[4]))]
    _, found = view.search(vectors[:1], 200, where=PhotoFilter(city="paris"))
    truth = {k for k, i in zip(keys[4:], infos[4:]) if i and i.get("city") == "Paris"}
    assert set(found[0]) == truth | set(keys[:2])


def test_a_version_written_without_metadata_matches_no_filter(backend, library):
    keys, vectors, etags, _ = library
    backend.rebuild(MODEL, keys[:100], vectors[:100], etags[:100])
    view = backend.view(MODEL)
    assert view.info(keys[:3]) == [None, None, None]
    assert view.info_counts() == {"with_date": 0, "with_position": 0, "with_place": 0}
    scores, found = view.search(vectors[:2], K, where=PhotoFilter(city="Lisbon"))
    assert found == [[], []] and scores.shape == (2, 0)
    _, found = view.search(vectors[:2], K, where=PhotoFilter())
    assert [len(r) for r in found] == [K, K]


# --- FAISS: the table in each version, and each way a filtered search runs -----------------
def test_faiss_keeps_the_table_in_the_version_under_its_checksum(faiss_index, library):
    from indexer.repository import INFO_FILE

    keys, vectors, etags, infos = library
    version = faiss_index.rebuild(MODEL, keys, vectors, etags, info=infos)["version"]
    vdir = faiss_index.repo.versions_dir / version
    manifest = faiss_index.repo.read_manifest(version)
    assert INFO_FILE in manifest["checksums"] and (vdir / INFO_FILE).is_file()
    # a damaged table fails the validation before anyone searches it
    raw = bytearray((vdir / INFO_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (vdir / INFO_FILE).write_bytes(bytes(raw))
    with pytest.raises(IndexLoadError, match="info.parquet is corrupt"):
        faiss_index.view(MODEL)
    # a table of another length than the version's, under a matching checksum, too
    from core.hashing import sha256_file
    from indexer.photo_table import PhotoTable

    PhotoTable.from_rows([None] * 3).write(vdir / INFO_FILE)
    manifest["checksums"][INFO_FILE] = sha256_file(vdir / INFO_FILE)
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="3 rows for 2000 vectors"):
        faiss_index.view(MODEL)


def test_faiss_versions_made_before_metadata_still_load(faiss_index):
    from .helpers import publish_random

    publish_random(faiss_index.repo, n=20, model_id=MODEL)  # no table, as versions before it
    view = faiss_index.view(MODEL)
    assert view.photos is None and view.info(view.keys[:2]) == [None, None]
    _, found = view.search(unit_vectors(2, 8), 5, where=PhotoFilter(has_position=False))
    assert found == [[], []]
    assert [len(r) for r in view.search(unit_vectors(2, 8), 5)[1]] == [5, 5]
    # an update without metadata keeps it so; one with metadata starts a table
    faiss_index.update(MODEL, ["new/a.jpg"], unit_vectors(1, 8), ["e"])
    assert faiss_index.view(MODEL).photos is None
    faiss_index.update(MODEL, ["new/b.jpg"], unit_vectors(1, 8, seed=3), ["e"],
                       info=[{"city": "Oslo"}])
    view = faiss_index.view(MODEL)
    assert view.info(["new/a.jpg", "new/b.jpg"]) == [None, {"city": "Oslo", "folder": "new"}]
    assert view.search(unit_vectors(1, 8), 5, where=PhotoFilter(city="oslo"))[1] == \
        [["new/b.jpg"]]


def compressed_above(monkeypatch, kind: str) -> None:
    """Small collections indexed as `kind`: IVF above a few vectors; IVF-PQ (+ re-rank) by
    a memory budget they exceed."""
    from indexer import index_policy

    if kind != "flat":
        monkeypatch.setattr(index_policy, "FLAT_MAX_MADDS", 1000)
    if kind == "ivfpq":
        monkeypatch.setattr(index_policy, "INDEX_MEMORY_MB", 1e-3)
        monkeypatch.setattr(index_policy, "PQ_MIN_TRAIN", 1000)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_faiss_filtered_search_paths_give_full_pages(faiss_index, monkeypatch, kind):
    """Selector search (flat; IVF with nprobe raised, and lists added for rows still short)
    and exact search over few ids: a full page of the best passing photos, always."""
    from indexer import repository

    monkeypatch.setattr(repository, "EXACT_MIN_ROWS", 0)
    monkeypatch.setattr(repository, "GATHER_COST", 1e9)  # selector search whenever it can
    compressed_above(monkeypatch, kind)
    n = 6000
    centers, cluster, vectors, queries = clustered(n, seed=5)
    keys = [f"c{c:02d}/{i:05d}.jpg" for i, c in enumerate(cluster)]
    faiss_index.rebuild(MODEL, keys, vectors, ["e"] * n, info=[{}] * n)
    view = faiss_index.view(MODEL)
    assert (view.manifest["index_params"]["kind"] == kind)
    for folders in (["c17"], ["c18", "c19"], [f"c{c:02d}" for c in range(5, 20)]):
        where = PhotoFilter(folders=folders)
        passing = view.passing(where)
        assert passing.ids is None and passing.bitmap is not None
        truth, matching = exact_filtered(vectors, keys, [{}] * n, queries, where, k=50)
        scores, found = view.search(queries, 50, where=where)
        assert [len(r) for r in found] == [50] * 5
        assert np.mean([len(set(f) & set(t)) / 50 for f, t in zip(found, truth)]) >= 0.95
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # few ids: exact search over just them
    monkeypatch.setattr(repository, "GATHER_COST", 1.0)
    view = faiss_index.view(MODEL)
    where = PhotoFilter(folders=["c03"])
    assert view.passing(where).ids is not None
    # (IVF-PQ scores from its fp16 copy of the vectors)
    stored = vectors.astype(np.float16).astype(np.float32) if kind == "ivfpq" else vectors
    truth, _ = exact_filtered(stored, keys, [{}] * n, queries, where, k=50)
    assert view.search(queries, 50, where=where)[1] == truth


def test_photo_table_rows_where_columns_hold_no_value():
    """A library without GPS or camera data leaves those columns empty in every row: a page's
    rows are still each row's known values (and None for a row with none at all)."""
    from indexer.photo_table import PhotoTable

    infos = [{"width": 640, "height": 480, "taken_at": 1.7e9 + i, "taken_at_source": "modified"}
             if i % 3 else None for i in range(9)]
    keys = [f"trip/{i}.jpg" for i in range(9)]
    table = PhotoTable.from_rows([None if i is None else clean_info(i, k)
                                  for k, i in zip(keys, infos)])
    rows = np.array([8, 0, 4, 3, 1])
    got = table.rows(rows)
    assert got == [public_info(table.table.slice(r, 1).to_pylist()[0]) for r in rows]
    assert got[0] == {"width": 640, "height": 480, "taken_at": 1.7e9 + 8,
                      "taken_at_source": "modified", "folder": "trip"}
    assert "lat" not in got[0] and "camera_make" not in got[0]
    assert PhotoTable.from_rows([None, None]).rows(np.array([1, 0])) == [None, None]


def test_photo_table_over_some_rows_and_candidate_rows(library, monkeypatch):
    """`mask(where, rows)` is the whole-table mask at those rows, for every field; the rows
    `candidate_rows` gives hold every passing row, and none is given above `most`."""
    from indexer import photo_table
    from indexer.photo_table import PhotoTable

    keys, _, _, infos = library
    table = PhotoTable.from_rows([None if i is None else clean_info(i, k)
                                  for k, i in zip(keys, infos)])
    rows = np.random.default_rng(3).permutation(N)[:700]
    # a page of rows' metadata, read from the per-column arrays, is the table's own rows
    # (as JSON: an int column gives ints)
    assert json.dumps(table.rows(rows)) == json.dumps(
        [public_info(table.table.slice(r, 1).to_pylist()[0]) for r in rows])
    assert any(r is None for r in table.rows(rows))  # rows without metadata among them
    narrowed = 0
    for fields in FILTERS:
        where = PhotoFilter.model_validate(fields)
        whole = table.mask(where)
        np.testing.assert_array_equal(table.mask(where, rows), whole[rows], err_msg=str(fields))
        count, candidates = table.candidate_rows(where, N)
        assert (count is None) == (candidates is None)
        if candidates is not None:
            narrowed += 1
            assert set(np.flatnonzero(whole)) <= set(candidates.tolist()), fields
            assert count == len(candidates) < N, fields
            assert table.candidate_rows(where, count - 1) == (count, None)
    assert narrowed == 13  # the filters with a folder, a date, a camera or a place
    exact = 0
    for fields in FILTERS:  # one condition a column's order counts: no pass over the table
        where = PhotoFilter.model_validate(fields)
        counted = table.exact_count(where)
        if counted is not None:
            exact += 1
            whole = table.mask(where)
            assert counted == int(whole.sum()), fields
            # its rows, and its test over some rows, without the whole filter
            one = table.one_condition(where)
            assert sorted(one.rows().tolist()) == np.flatnonzero(whole).tolist(), fields
            np.testing.assert_array_equal(one.passes(rows), whole[rows], err_msg=str(fields))
    assert exact == 7  # folders (2), dates (2), region, city (2)
    # a folder filter, looked up for all values at once, is the row-by-row test: the folder
    # or below it, not a longer name
    # (few folders: a set test in Python; many: Arrow's is_in)
    folders = ["2023", "2023/beach", "2023/beachside", "2023/beach/day1", "2024/beach", ""]
    for set_test_max in (4096, 0):
        monkeypatch.setattr(photo_table, "_SET_TEST_MAX", set_test_max)
        table = PhotoTable.from_rows([{"folder": f} for f in folders])
        for asked in (["2023/beach"], ["2023"], ["2024", "2023/beachside"], ["beach"]):
            where = PhotoFilter(folders=asked)
            assert table.mask(where).tolist() == [where.matches({"folder": f}) for f in folders]
        assert isinstance(table._folders_of("folder")[0], list) == bool(set_test_max)


def dated_library(faiss_index, monkeypatch, kind: str, n: int, seed: int):
    """A `kind` version of `clustered` photos in folders c<cluster>/s<i % 25>, each with a
    date (its days spread over n days): (view, keys, vectors, infos, queries)."""
    compressed_above(monkeypatch, kind)
    _, cluster, vectors, queries = clustered(n, seed=seed)
    keys = [f"c{c:02d}/s{i % 25:02d}/{i:05d}.jpg" for i, c in enumerate(cluster)]
    infos = [{"taken_at": T2019 + (i * 7919 % n) * DAY, "taken_at_source": "exif"}
             for i in range(n)]
    faiss_index.rebuild(MODEL, keys, vectors, ["e"] * n, info=infos)
    return faiss_index.view(MODEL), keys, vectors, infos, queries


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
@pytest.mark.parametrize("share", [0.5, 0.05, 0.004])
def test_faiss_ivf_first_search_of_a_filter_matches_exact(faiss_index, monkeypatch, share,
                                                          kind):
    """A filter's first search on IVF, before anything is counted: one condition (a date
    range, whole folders) chooses its lists from the version's per-column list counts; a
    filter of several conditions is evaluated over the lists near the query when many pass,
    and counted in full when those hold too few; few passing: from the narrowest condition's
    rows. The best passing photos whichever way."""
    n = 8000
    view, keys, vectors, infos, queries = dated_library(faiss_index, monkeypatch, kind, n, 8)
    assert view.manifest["index_params"]["kind"] == kind
    tried, counted = [], []
    search_near, search_counted = view._search_near, view._search_counted
    monkeypatch.setattr(view, "_search_near",
                        lambda *a: tried.append(search_near(*a)) or tried[-1])
    monkeypatch.setattr(view, "_search_counted",
                        lambda *a: counted.append(search_counted(*a)) or counted[-1])
    start = datetime.fromtimestamp(T2019 + 100 * DAY, timezone.utc)
    end = start + timedelta(days=n * share)
    dates = PhotoFilter(taken_after=start, taken_before=end)
    # the same photos, two conditions (none of them has a position)
    dates_two = PhotoFilter(taken_after=start, taken_before=end, has_position=False)
    # half the library around the queries; or folders far from them (k 50: a page of photos
    # unlike the query needs more lists)
    folders = {0.5: [f"c{c:02d}" for c in range(10)], 0.05: ["c19"],
               0.004: ["c19/s00", "c19/s01"]}[share]
    for where, k in ((dates, K), (dates_two, K), (PhotoFilter(folders=folders), 50)):
        truth, matching = exact_filtered(vectors, keys, infos, queries, where, k=k)
        assert abs(matching / n - share) < share / 2
        tried.clear()
        counted.clear()
        view.forget_filters()
        scores, found = view.search(queries, k, where=where)
        assert [len(r) for r in found] == [min(k, matching)] * 5
        assert np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]) >= 0.95
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
        exact = matching <= view._exact_max_rows(matching, k)
        if where is not dates_two:  # one condition: its lists counted per column, never kept
            assert tried == [] and (counted == [] if exact else counted[-1] is not None)
            assert view._cached_passing(where)[1] is None or exact
        elif matching > min(view._near_above(k), view._subset_most):
            assert len(tried) == 1 and tried[0] is not None  # found near the query
            # searched again (a next page, other words): counted once, and kept
            assert view.search(queries, k, where=where)[1] == found
            assert len(tried) == 1 and view._cached_passing(where)[1].count == matching
        else:
            assert tried == []  # few: from the narrowest condition's rows
        assert view.count_matching(where) == matching
    # a folder's photos far from the queries: found where they are
    view.forget_filters()
    monkeypatch.setattr(view, "_near_above", lambda k: 0)
    small = PhotoFilter(folders=["c19/s00"])
    truth, _ = exact_filtered(vectors, keys, infos, queries, small)
    assert view.search(queries, K, where=small)[1] == truth
    # the lists near the queries hold too few of a filter of several conditions: counted,
    # then searched (and kept)
    view.forget_filters()
    tried.clear()
    monkeypatch.setattr(view, "_search_near", lambda *a: tried.append(None))
    truth, matching = exact_filtered(vectors, keys, infos, queries, dates_two)
    found = view.search(queries, K, where=dates_two)[1]
    assert np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]) >= 0.95
    if matching > min(view._near_above(K), view._subset_most):
        assert tried == [None]
    assert view._cached_passing(dates_two)[1].count == matching


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_faiss_ivf_one_condition_lists_scanned_or_their_passing_photos_scored(
        faiss_index, monkeypatch, kind):
    """A one-condition filter in the lists chosen for it: the lists scanned with its selector,
    or (few of their entries pass) its photos in them scored from their stored vectors, give
    the same hits, whether those photos come from its passing rows or from the lists' photos
    tested."""
    from indexer import repository

    n = 8000
    view, keys, vectors, infos, queries = dated_library(faiss_index, monkeypatch, kind, n, 5)
    start = datetime.fromtimestamp(T2019 + 300 * DAY, timezone.utc)
    filters = [PhotoFilter(taken_after=start, taken_before=start + timedelta(days=400)),
               PhotoFilter(folders=["c01", "c07/s03"])]
    monkeypatch.setattr(view, "_exact_max_rows", lambda *a: 0)  # never exact over them all
    scored = []
    search_exact = view._search_exact
    monkeypatch.setattr(view, "_search_exact", lambda *a: scored.append(1) or search_exact(*a))
    found = {}
    for skip_cost in (0.0, 1e9):  # the lists scanned; their passing photos scored
        monkeypatch.setattr(repository, "SKIP_COST", skip_cost)
        for near_above in (0, n):  # the lists' photos tested; the filter's passing rows
            monkeypatch.setattr(view, "_near_above", lambda k: near_above)
            scored.clear()
            view.forget_filters()
            found[skip_cost, near_above] = [view.search(queries, K, where=w) for w in filters]
            assert len(scored) == (len(filters) if skip_cost else 0)
    for where, (_, want_keys) in zip(filters, found[0.0, 0]):
        truth, _ = exact_filtered(vectors, keys, infos, queries, where)
        assert np.mean([len(set(f) & set(t)) / K for f, t in zip(want_keys, truth)]) >= 0.9
    for (skip_cost, near_above), results in found.items():
        for (scores, hits), (want_scores, want_keys) in zip(results, found[0.0, 0]):
            assert hits == want_keys, (skip_cost, near_above)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_faiss_ivf_list_counts_of_a_filter_equal_its_photos_counted(faiss_index, monkeypatch):
    """The per-list counts a one-condition filter is searched with, read from the version's
    per-column counts (dates: whole blocks of the photos by date and the photos of two partial
    ones; folders: their values' counts), equal its passing photos counted list by list."""
    compressed_above(monkeypatch, "ivf")
    n = 20_000  # more than two blocks of photos by date
    _, cluster, vectors, _ = clustered(n, seed=4)
    keys = [f"c{c:02d}/s{i % 7}/{i:05d}.jpg" for i, c in enumerate(cluster)]
    infos = [{"taken_at": T2019 + (i * 7919 % n) * DAY, "taken_at_source": "exif"}
             if i % 10 else {} for i in range(n)]  # a tenth without a date
    faiss_index.rebuild(MODEL, keys, vectors, ["e"] * n, info=infos)
    view = faiss_index.view(MODEL)
    block, _ = view._lists_by_time
    assert 2 * block < n * 0.9

    def day(d):
        return datetime.fromtimestamp(T2019 + d * DAY, timezone.utc)

    filters = [PhotoFilter(taken_after=day(a), taken_before=day(b))
               for a, b in ((0, 10), (100, 100 + n // 2), (5, n), (-50, 3 * n))]
    filters += [PhotoFilter(taken_before=day(n // 3)), PhotoFilter(taken_after=day(n // 4)),
                PhotoFilter(folders=["c03"]), PhotoFilter(folders=["c01/s2", "c07", "c09/s0"]),
                PhotoFilter(folders=["nowhere"])]
    for where in filters:
        rows = np.flatnonzero(view.photos.mask(where))
        per_list = view._list_counts(view.photos.one_condition(where))
        np.testing.assert_array_equal(per_list, np.bincount(view._list_of_row[rows],
                                                            minlength=view._nlist))
    # several conditions: not one (counted photo by photo instead)
    assert view.photos.one_condition(PhotoFilter(folders=["c03"], taken_before=day(9))) is None


def test_lists_chosen_for_one_query_equal_the_batched_choice():
    """The IVF lists a filter probes (the nearest holding passing photos, until they hold the
    target and at least `wanted` lists): the one-query shortcut chooses as the batched code."""
    from indexer.repository import _chosen

    rng = np.random.default_rng(0)
    for _ in range(500):
        width = int(rng.integers(1, 40))
        counts = rng.integers(0, 5, (1, width)) * (rng.random((1, width)) < 0.6)
        lists = rng.permutation(1000)[:width][None].astype(np.int64)
        scores = np.sort(rng.random((1, width)).astype(np.float32))[:, ::-1]
        target, wanted = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        one = _chosen(lists, scores, counts, target, wanted)
        both = _chosen(*(np.repeat(a, 2, axis=0) for a in (lists, scores, counts)), target, wanted)
        for mine, batched in zip(one, both):
            np.testing.assert_array_equal(mine[0], batched[0])


# --- Milvus: the expression, servers without arithmetic, collections made before -----------
def test_milvus_near_box_holds_the_circle():
    """The bounding box a server without arithmetic reads `near` from holds every point of
    the circle: across the antimeridian and around a pole too."""
    from indexer.milvus_photos import near_box

    rng = np.random.default_rng(3)
    for lat, lon, km in ((10, 179.9, 50), (-10, -179.95, 30), (89.5, 0, 100), (-89, 20, 500),
                         (45, 7, 3000), (0, 0, 1)):
        where = PhotoFilter(near={"lat": lat, "lon": lon, "km": km})
        box = near_box(where.near)
        for _ in range(300):  # points on the circle's edge and inside it
            bearing, dist = rng.uniform(0, 2 * np.pi), km * np.sqrt(rng.uniform(0, 0.999))
            d, p1, l1 = dist / 6371.0088, np.radians(lat), np.radians(lon)
            p2 = np.arcsin(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(bearing))
            l2 = l1 + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(p1),
                                 np.cos(d) - np.sin(p1) * np.sin(p2))
            plat, plon = np.degrees(p2), (np.degrees(l2) + 540) % 360 - 180
            assert where.matches({"lat": plat, "lon": plon})
            expr = box.replace("lat", repr(float(plat))).replace("lon", repr(float(plon)))
            assert eval(expr.replace("(", "( ").replace("==", "=="), {}), (lat, lon, km)


def test_milvus_without_arithmetic_names_the_keys_in_the_circle(tmp_path, library):
    """milvus-lite evaluates the linear test; told it cannot, the backend takes the path of a
    Milvus 2.3 server: the keys inside the circle, or the box less the keys outside it."""
    from indexer.milvus_index import MilvusIndex
    from indexer.vector_index import FilterTooBroad

    keys, vectors, etags, infos = library
    index = MilvusIndex(str(tmp_path / "lite.db"), prefix="t_near")
    try:
        index.rebuild(MODEL, keys, vectors, etags, info=infos)
        index._arithmetic = False
        view = index.view(MODEL)
        # a key no expression can name (control characters) is simply not held
        assert view.info(["a\x00b", keys[0]]) == [None, public_info(clean_info(infos[0],
                                                                               keys[0]))]
        queries = unit_vectors(5, DIM, seed=4)
        for near in ({"lat": 38.75, "lon": -9.14, "km": 20}, {"lat": 40, "lon": -9, "km": 250},
                     {"lat": 41.22, "lon": -8.40, "km": 20},
                     {"lat": 64.01, "lon": -20.98, "km": 1.3}):
            where = PhotoFilter(near=near)
            truth, matching = exact_filtered(vectors, keys, infos, queries, where)
            _, found = view.search(queries, K, where=where)
            assert [len(r) for r in found] == [min(K, matching)] * 5
            assert np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]) >= 0.95
        import indexer.milvus_index as milvus_index

        milvus_index.NEAR_KEYS_MAX, before = 2, milvus_index.NEAR_KEYS_MAX
        index._near_cache.clear()  # the key lists made above are reused a while
        try:
            with pytest.raises(FilterTooBroad, match="smaller radius"):
                view.search(queries, K, where=PhotoFilter(near={"lat": 64.01, "lon": -20.98,
                                                                "km": 1.3}))
        finally:
            milvus_index.NEAR_KEYS_MAX = before
    finally:
        index.close()


def test_milvus_collections_made_before_metadata_still_search(tmp_path, monkeypatch):
    from indexer import milvus_photos
    from indexer.milvus_index import MilvusIndex

    index = MilvusIndex(str(tmp_path / "lite.db"), prefix="t_old")
    try:
        with monkeypatch.context() as m:  # a collection as they were made before
            m.setattr(milvus_photos, "add_fields", lambda schema: None)
            m.setattr(milvus_photos, "add_indexes", lambda params, family: None)
            version = index.begin(MODEL, DIM)
        index._photos.clear()
        keys = [f"old/{i}.jpg" for i in range(30)]
        index.write(version, keys, unit_vectors(30, DIM), ["e"] * 30,
                    info=[{"city": "Oslo"}] * 30)  # no fields to take it: dropped
        index.publish(version)
        view = index.view(MODEL)
        assert view.info(keys[:2]) == [None, None] and view.info_counts()["with_place"] == 0
        assert view.facets()["folder"] == []
        assert view.search(unit_vectors(2, DIM), 5, where=PhotoFilter(city="oslo"))[1] == \
            [[], []]
        assert [len(r) for r in view.search(unit_vectors(2, DIM), 5)[1]] == [5, 5]
        index.update(MODEL, keys[:1], unit_vectors(1, DIM), ["e2"], info=[{"city": "Oslo"}])
        assert index.indexed(MODEL).etags[keys[0]] == "e2"
    finally:
        index.close()
