"""The vector-index contract, run against every backend of tests/indexer/conftest.py
`CONTRACT_BACKENDS` (the `backend` fixture): FAISS files, a real Milvus standalone server
(tests/conftest.py `milvus_server`), milvus-lite (the same API in-process on a local file) and the
test-only NumPy backend. Same search results and scores, same update / delete / prune /
publish-in-parts behaviour, same `python -m indexer` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.settings import Settings, get_settings
from indexer.faiss_index import FaissIndex
from indexer.milvus_index import MilvusIndex
from indexer.vector_index import BACKENDS, DraftGone, IndexLoadError, open_index

from .helpers import PREFIX, unit_vectors

MODEL = "test-model-1a2b3c"
DIM = 32


def _keys(n, start=0):
    return [f"{PREFIX}{i:05d}.jpg" for i in range(start, start + n)]


def exact_top(vectors, keys, queries, k=10):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[keys[j] for j in row] for row in order], np.take_along_axis(scores, order, 1)


def recall(found, truth, k=10):
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def test_search_matches_exact_inner_product(backend):
    vectors, keys = unit_vectors(3000, DIM, seed=1), _keys(3000)
    out = backend.rebuild(MODEL, keys, vectors, [f"e{i}" for i in range(3000)])
    assert out["count"] == 3000 and backend.indexed(MODEL).count == 3000
    queries = unit_vectors(100, DIM, seed=2)
    view = backend.view(MODEL)
    assert (view.version, view.count, view.dim, view.model_id) == \
        (backend.published(MODEL), 3000, DIM, MODEL)
    scores, found = view.search(queries, 10)
    truth, truth_scores = exact_top(vectors, keys, queries)
    assert recall(found, truth) >= 0.95
    by_key = dict(zip(keys, vectors))
    for row_scores, row_keys, q in zip(scores, found, queries):  # the score is <q, v>
        np.testing.assert_allclose(row_scores, [by_key[k] @ q for k in row_keys], atol=1e-5)
    _, read_keys, values = view.search(queries[:3], 5, readback=DIM - 1)
    for row_keys, row_values in zip(read_keys, values):  # each hit's stored component DIM-1
        assert row_values.dtype == np.float32 and len(row_values) == len(row_keys) == 5
        np.testing.assert_array_equal(row_values, [by_key[k][DIM - 1] for k in row_keys])
    with pytest.raises(ValueError):
        view.search(queries[:1], 5, readback=DIM)
    some = found[0][:4]  # vectors come back as stored
    np.testing.assert_array_equal(view.stored_vectors(some), [by_key[k] for k in some])


def test_update_upserts_by_key_deletes_and_reruns_change_nothing(backend):
    vectors, keys = unit_vectors(40, DIM, seed=3), _keys(40)
    backend.rebuild(MODEL, keys, vectors, ["v1"] * 40)
    changed, fresh = keys[:5], _keys(5, start=100)
    new_vecs = unit_vectors(10, DIM, seed=4)
    out = backend.update(MODEL, changed + fresh, new_vecs, ["v2"] * 10, delete=keys[30:33])
    assert out["count"] == 40 + 5 - 3
    state = backend.indexed(MODEL)
    assert state.count == 42 and set(state.etags) == set(keys[:30] + keys[33:] + fresh)
    assert all(state.etags[k] == "v2" for k in changed + fresh)
    # the changed vectors are searched, not the old ones
    scores, found = backend.view(MODEL).search(new_vecs[:5], 1)
    assert [r[0] for r in found] == changed and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    # the same update again: same contents
    backend.update(MODEL, changed + fresh, new_vecs, ["v2"] * 10, delete=keys[30:33])
    assert backend.indexed(MODEL).etags == state.etags
    assert backend.update(MODEL, [], None, [], delete=fresh)["changed"]
    assert backend.indexed(MODEL).count == 37
    # another model has nothing published: an update of it is a rebuild's job
    assert backend.update("other-model", fresh, new_vecs[5:], ["v"] * 5) is None


def test_a_version_written_in_parts_is_invisible_until_published(backend):
    backend.rebuild(MODEL, _keys(10), unit_vectors(10, DIM, seed=5), ["a"] * 10)
    first = backend.status(MODEL)["version"]
    version = backend.begin(MODEL, DIM)
    vecs = unit_vectors(30, DIM, seed=6)
    backend.write(version, _keys(20), vecs[:20], ["b"] * 20, part="p0")
    backend.write(version, _keys(20, 10), vecs[10:], ["b"] * 20, part="p1")  # overlaps p0
    backend.write(version, _keys(20, 10), vecs[10:], ["b"] * 20, part="p1")  # a retried part
    assert backend.indexed(MODEL).count == 10  # readers still see the first version
    assert backend.publish(version)["count"] == 30
    st = backend.status(MODEL)
    assert st["version"] == version != first and st["count"] == 30 and st["model_id"] == MODEL
    assert backend.view(MODEL).count == 30 and backend.published(MODEL) == version
    assert backend.view(MODEL, first).count == 10  # an older version, by name
    # prune keeps the published one and the newest `keep`
    third = backend.rebuild(MODEL, _keys(3), vecs[:3], ["c"] * 3)["version"]
    pruned = backend.prune(1)
    assert first in pruned["removed"] and third not in pruned["removed"]
    assert backend.status(MODEL)["version"] == third
    assert backend.versions() == [third]


def test_an_update_written_in_parts_applies_to_the_published_version(backend):
    keys, vecs = _keys(10), unit_vectors(12, DIM, seed=7)
    base = backend.rebuild(MODEL, keys, vecs[:10], ["a"] * 10)["version"]
    draft = backend.begin(MODEL, DIM, base=base)
    backend.write(draft, _keys(2, 10), vecs[10:], ["b"] * 2, part="00000")
    backend.write(draft, [], None, [], part="00001")
    backend.remove(draft, keys[:3], part="00001")
    out = backend.publish(draft, parts=["00000", "00001"])
    state = backend.indexed(MODEL)
    assert out["version"] == state.version == backend.published(MODEL) and out["count"] == 9
    assert sorted(state.etags) == sorted(keys[3:] + _keys(2, 10))
    assert state.etags[_keys(1, 10)[0]] == "b"
    with pytest.raises(DraftGone):  # an update applies to the published version only
        backend.begin(MODEL, DIM, base="20000101T000000000000Z-000000")


def test_an_unpublished_version_can_be_discarded(backend):
    version = backend.begin(MODEL, DIM)
    backend.write(version, _keys(3), unit_vectors(3, DIM), ["x"] * 3)
    backend.discard(version)
    assert backend.versions() == [] and backend.indexed(MODEL) is None


def test_a_model_never_searches_another_models_version(backend):
    backend.rebuild(MODEL, _keys(5), unit_vectors(5, DIM), ["a"] * 5)
    with pytest.raises(IndexLoadError):
        backend.view("another-model-ffff")
    assert backend.view(MODEL).model_id == MODEL


def test_faiss_prune_removes_drafts_of_dead_runs_only(tmp_path):
    """A draft nobody wrote to for DRAFT_ABANDONED_S is a dead run's; a recent one may be live."""
    import os
    import time

    from indexer.faiss_index import DRAFT_ABANDONED_S, DRAFT_PREFIX

    index = FaissIndex(tmp_path / "index")
    keys = _keys(20)
    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    published = index.rebuild("m", keys, vectors, ["e"] * 20)["version"]
    dead, live = index.begin("m", 8), index.begin("m", 8)
    old = time.time() - DRAFT_ABANDONED_S - 60
    os.utime(index.repo.versions_dir / (DRAFT_PREFIX + dead), (old, old))
    report = index.prune(keep=5)
    assert report["removed"] == [DRAFT_PREFIX + dead] and report["current"] == published
    index.write(live, keys[:3], vectors[:3], ["e"] * 3)  # the live run goes on
    assert index.publish(live)["count"] == 3


@pytest.mark.parametrize("kind", ["milvus", "milvus-lite"])
def test_milvus_prune_removes_drafts_that_can_never_publish(kind, request, tmp_path):
    """A collection begun on a version no longer published (its run died, or was overtaken: the
    shards refuse to publish it) or DRAFT_ABANDONED_S ago goes at once, whatever `keep`; a
    version once published and a live run's draft stay."""
    from tests.indexer.conftest import backend_settings

    index = open_index(backend_settings(kind, request, tmp_path))
    try:
        vectors = unit_vectors(4, DIM)
        first = index.rebuild(MODEL, _keys(4), vectors, ["a"] * 4)["version"]
        dead = index.begin(MODEL, DIM)  # begun on `first`, its writer gone
        index.write(dead, _keys(2), vectors[:2], ["b"] * 2)
        second = index.rebuild(MODEL, _keys(4), vectors, ["c"] * 4)["version"]
        live, old = index.begin(MODEL, DIM), index.begin(MODEL, DIM)
        index.client.alter_collection_properties(old, {"draft_begun": "0"})  # 1970's
        report = index.prune(keep=5)
        assert report["removed"] == [dead, old] and report["current"] == [second]
        assert index.versions() == [first, second, live]
        index.write(live, _keys(3), vectors[:3], ["d"] * 3)  # the live run goes on
        assert index.publish(live)["count"] == 3 and index.published(MODEL) == live
        assert index.prune(keep=5)["removed"] == []  # published once: versions now
    finally:
        if kind == "milvus":  # leave the shared server clean
            for name in index.versions():
                index.client.drop_collection(name)
        index.close()


def test_a_faiss_update_draft_needs_its_parts_and_its_base(tmp_path):
    index = FaissIndex(tmp_path / "index")
    base = index.rebuild("m", _keys(4), unit_vectors(4, DIM), ["a"] * 4)["version"]
    draft = index.begin("m", DIM, base=base)
    index.write(draft, _keys(1, 10), unit_vectors(1, DIM), ["b"], part="00000")
    with pytest.raises(DraftGone, match="part 00001 of 2 is missing"):
        index.publish(draft, parts=["00000", "00001"])
    index.rebuild("m", _keys(2), unit_vectors(2, DIM), ["c"] * 2)  # someone else publishes
    with pytest.raises(DraftGone, match="no longer published"):
        index.publish(draft)
    index.begin("m", DIM, base=index.published("m"))  # drops the draft of the replaced base
    with pytest.raises(DraftGone):
        index.write(draft, [], None, [], part="00001")


def test_a_faiss_publish_merges_parts_by_key_the_last_part_winning(tmp_path):
    index = FaissIndex(tmp_path / "index")
    version = index.begin("m", DIM)
    vecs = unit_vectors(9, DIM, seed=11)
    keys = [f"{PREFIX}{name}.jpg" for name in ("e", "a", "c", "b", "d", "f")]
    # parts written out of name order; "c" and "b" are in both, and p1 comes after p0 by name
    index.write(version, [keys[2], keys[3], keys[5]], vecs[6:9], ["new"] * 3, part="p1",
                info=[{"city": "late"}, None, {"city": "late"}])
    index.write(version, keys[:5], vecs[:5], ["old"] * 5, part="p0",
                info=[{"city": "early"}] * 5)
    index.write(version, [], None, [], part="p2")
    with pytest.raises(ValueError, match="dimension"):
        index.write(version, keys[:1], unit_vectors(1, DIM + 1), ["x"], part="p3")
    assert index.publish(version)["count"] == 6
    view = index.view("m")
    order = sorted(keys)
    assert list(view.keys) == order  # ids follow key order, as a rebuild's
    expected = {keys[0]: (vecs[0], "old", "early"), keys[1]: (vecs[1], "old", "early"),
                keys[4]: (vecs[4], "old", "early"), keys[2]: (vecs[6], "new", "late"),
                keys[3]: (vecs[7], "new", None), keys[5]: (vecs[8], "new", "late")}
    np.testing.assert_allclose(view.stored_vectors(order),
                               np.stack([expected[k][0] for k in order]), atol=1e-6)
    assert [view.etag_by_key()[k] for k in order] == [expected[k][1] for k in order]
    assert [None if i is None else i.get("city") for i in view.info(order)] == \
        [expected[k][2] for k in order]


def test_backends_come_from_the_registry_alone(tmp_path):
    """open_index refuses a name the registry lacks; importing the interface imports no
    backend, and no indexer module but a backend's own names it."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import indexer

    with pytest.raises(ValueError, match="must be one of faiss, milvus"):
        open_index(Settings(_env_file=None, index_backend="elastic"))
    assert set(BACKENDS) >= {"faiss", "milvus"}
    code = ("import sys, indexer.vector_index, indexer.shards, indexer.jobs, indexer.pipeline; "
            "print(sorted(m for m in sys.modules if m in "
            "('indexer.faiss_index', 'indexer.milvus_index', 'faiss', 'pymilvus')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    own = {"faiss_index", "milvus_index", "repository", "index_policy", "vector_index"}
    backend_modules = {f"indexer.{m}" for m in own - {"vector_index"}}
    for path in Path(indexer.__file__).parent.glob("*.py"):
        if path.stem in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in backend_modules, path.name
            elif isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & backend_modules, path.name
            elif isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                assert name not in ("FaissIndex", "MilvusIndex", "IndexRepository"), path.name


def test_milvus_names_and_metric(milvus_server, milvus_prefix):
    index = MilvusIndex(milvus_server.uri, prefix=milvus_prefix)
    try:
        version = index.rebuild("my-model:v1.pt", _keys(4), unit_vectors(4, DIM), ["e"] * 4)[
            "version"]
        assert version.startswith(f"{milvus_prefix}__my_model_v1_pt__")
        alias = index.alias("my-model:v1.pt")
        assert alias == f"{milvus_prefix}__my_model_v1_pt"
        assert index.client.describe_alias(alias)["collection_name"] == version
        idx = index.client.describe_index(version, "vector")
        assert idx["metric_type"] == "IP" and idx["index_type"] == "HNSW"
        assert index.client.describe_collection(version)["consistency_level"] in (2, "Bounded")
    finally:
        for name in index.versions():
            index.client.drop_collection(name)


@pytest.mark.parametrize("kind", ["milvus", "milvus-lite"])
def test_milvus_writes_insert_new_keys_and_upsert_held_ones(kind, request, tmp_path):
    """A fresh version's rows are inserted (an upsert also writes a delete of its key, and
    segments of deletes are compacted and indexed again); rewritten keys are upserted: one row
    per key, the newest etag and vector. A draft's rewrite (a retried part) leaves it without
    auto-compaction; a published collection changed in place gets it back."""
    from tests.indexer.conftest import backend_settings

    index = open_index(backend_settings(kind, request, tmp_path))
    calls = []
    for name in ("insert", "upsert"):
        real = getattr(index.client, name)

        def spy(collection, rows, *a, _name=name, _real=real, **kw):
            calls.append((_name, sorted(r["key"] for r in rows)))
            return _real(collection, rows, *a, **kw)

        setattr(index.client, name, spy)
    try:
        keys, vecs = _keys(6), unit_vectors(6, DIM)
        version = index.begin("m", DIM)
        index.write(version, keys[:4], vecs[:4], ["a"] * 4)
        assert calls == [("insert", keys[:4])]
        calls.clear()
        index.write(version, keys[2:], vecs[2:][::-1], ["b"] * 4)  # 2 held, 2 new
        assert calls == [("insert", keys[4:]), ("upsert", keys[2:4])]
        index.publish(version)
        assert index.status("m")["count"] == 6
        view = index.view("m")
        assert [e for _, e in index.keys_page(version)] == ["a", "a", "b", "b", "b", "b"]
        np.testing.assert_allclose(view.stored_vectors(keys[2:]), vecs[2:][::-1], atol=1e-6)
        def auto_compaction():
            properties = index.client.describe_collection(version).get("properties") or {}
            return properties.get("collection.autocompaction.enabled")

        assert auto_compaction() == "false"  # written once by its rebuild: it keeps still
        index.update("m", keys[:1], vecs[:1], ["c"], delete=[keys[5]])
        assert auto_compaction() == "true"  # changed in place: compacted as usual
        assert index.status("m")["count"] == 5
    finally:
        if kind == "milvus":
            for name in index.versions():
                index.client.drop_collection(name)
        index.close()


# --- the same command line on both backends ------------------------------------------------
@pytest.mark.parametrize("kind", ["faiss", "milvus"])
def test_indexer_commands_behave_alike(kind, request, tmp_path, tiny_flickr, small_checkpoint,
                                       monkeypatch, capsys):
    from flickr8k.sources import open_source
    from indexer import cli
    from indexer.ingest import ingest
    from objectstore import LocalStore

    root, _ = tiny_flickr
    ingest(open_source(str(root)), LocalStore(tmp_path / "store", "b"), split="dev",
           progress=False)
    env = {"STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(tmp_path / "store"),
           "MINIO_BUCKET": "b", "INDEX_DIR": str(tmp_path / "index"),
           "MODEL_PATH": str(small_checkpoint), "INDEX_BACKEND": kind}
    if kind == "milvus":
        env |= {"MILVUS_URI": request.getfixturevalue("milvus_server").uri,
                "MILVUS_COLLECTION_PREFIX": request.getfixturevalue("milvus_prefix")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    monkeypatch.chdir(tmp_path)

    def run(*argv) -> dict:
        assert cli.main(["--quiet", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    try:
        built = run("rebuild")
        assert built["action"] == "rebuilt" and built["count"] == 6
        assert run("update")["action"] == "unchanged"  # a rerun changes nothing
        st = run("status")
        assert (st["backend"], st["count"], st["not_indexed"], st["version"]) == \
            (kind, 6, 0, built["version"])
        assert st["model_matches"] is True
        again = run("rebuild")
        pruned = run("prune", "--keep", "1")
        assert pruned["removed"] == [built["version"]] and pruned["versions"] == 1
        assert run("status")["version"] == again["version"]
    finally:
        if kind == "milvus":
            index = open_index(Settings())
            for name in index.versions():
                index.client.drop_collection(name)
        get_settings.cache_clear()


# --- the invariant: reading a version page by page, verified against the store --------------
def test_keys_page_reads_a_version_in_key_order_page_by_page(backend):
    keys = _keys(25)
    order = np.random.default_rng(9).permutation(25)  # written out of order, in two parts
    version = backend.begin(MODEL, DIM)
    vecs = unit_vectors(25, DIM, seed=9)
    for part, chunk in (("p0", order[:12]), ("p1", order[12:])):
        backend.write(version, [keys[i] for i in chunk], vecs[chunk],
                      [f"e{i}" for i in chunk], part=part)
    backend.publish(version)
    pages, after = [], None
    while page := backend.keys_page(version, after, 10):
        assert len(page) <= 10
        pages.append(page)
        after = page[-1][0]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [r for p in pages for r in p] == [(k, f"e{i}") for i, k in enumerate(keys)]
    assert backend.keys_page(version, keys[-1], 10) == []


def test_verify_reports_missing_stale_extra_and_another_model(backend, tmp_path):
    from indexer.verify import verify
    from objectstore import LocalStore

    store = LocalStore(tmp_path / "store", "b")
    keys = _keys(12)
    infos = [store.put(k, k.encode()) for k in keys]
    store.put(f"{PREFIX}notes.txt", b"not an image")  # not indexed, not reported
    backend.rebuild(MODEL, keys, unit_vectors(12, DIM), [o.etag for o in infos])
    clean = verify(store, backend, PREFIX, MODEL, page=5)
    assert clean.ok and (clean.objects, clean.rows) == (12, 12), clean.summary()
    store.put(keys[3], b"changed")  # stale
    store.put(_keys(1, 50)[0], b"new")  # missing
    store.delete(keys[7])  # extra
    found = verify(store, backend, PREFIX, MODEL, page=5)
    assert not found.ok and not found.wrong_model
    report = found.to_dict()
    assert {k: (report[k]["count"], report[k]["first"]) for k in
            ("missing", "stale", "extra", "duplicated")} == {
        "missing": (1, _keys(1, 50)), "stale": (1, [keys[3]]), "extra": (1, [keys[7]]),
        "duplicated": (0, [])}
    assert "stale: 1" in found.summary() and keys[3] in found.summary()
    other = verify(store, backend, PREFIX, "another-model-ffff")
    assert not other.ok  # FAISS: the published version is another model's; Milvus: none is
    assert other.wrong_model or other.to_dict()["missing"]["count"] == 12


def test_verify_reports_a_key_held_twice_in_a_faiss_table(tmp_path):
    from indexer.index_policy import new_flat_index
    from indexer.verify import verify
    from objectstore import LocalStore

    store = LocalStore(tmp_path / "store", "b")
    keys = _keys(4)
    etags = [store.put(k, b"x").etag for k in keys]
    index = FaissIndex(tmp_path / "index")
    flat = new_flat_index(DIM)
    flat.add_with_ids(unit_vectors(5, DIM), np.arange(5, dtype=np.int64))
    index.repo.commit_version(flat, np.arange(5), keys + [keys[2]], etags + [etags[2]], MODEL)
    for page in (2, 3, 100):  # the second row of the key never lands in a page of its own
        found = verify(store, index, PREFIX, MODEL, page=page).to_dict()
        assert found["duplicated"] == {"count": 1, "first": [keys[2]]} and not found["ok"]
        # a run's check too: a key held twice is never a change in the store
        run = verify(store, index, PREFIX, MODEL, page=page, since=0.0, listed=4).to_dict()
        assert run["duplicated"]["count"] == 1 and not run["ok"]
        assert found["rows"] == 5 and found["missing"]["count"] == found["extra"]["count"] == 0


def test_verify_since_a_plan_reports_what_changed_after_it_apart(backend, tmp_path):
    """A run's check (`since`: when its plan listed the store, `listed`: how many images it
    found): an upload, a change and a deletion made after it are changed during the run, not a
    failure; the same dated before the plan, or more keys gone than the store lost since, are
    keys the run got wrong."""
    import os
    import time

    from indexer.verify import verify
    from objectstore import LocalStore

    store = LocalStore(tmp_path / "store", "b")
    keys, ghost = _keys(12), f"{PREFIX}ghost.jpg"  # ghost: never in the store
    etags = [store.put(k, k.encode()).etag for k in keys]
    long_ago = time.time() - 3600
    for k in keys:
        os.utime(store.root / k, (long_ago, long_ago))
    backend.rebuild(MODEL, keys, unit_vectors(12, DIM), etags)
    since = time.time() - 60  # the plan listed the 12 images a minute ago
    new = _keys(1, 50)[0]
    store.put(keys[3], b"changed"), store.put(new, b"new"), store.delete(keys[7])

    run = verify(store, backend, PREFIX, MODEL, page=5, since=since, listed=12)
    report = run.to_dict()
    assert run.ok and report["since"] == since, run.summary()
    assert report["changed_during_run"] == {
        "count": 3, "uploaded": {"count": 1, "first": [new]},
        "changed": {"count": 1, "first": [keys[3]]}, "deleted": {"count": 1, "first": [keys[7]]}}
    assert all(report[k]["count"] == 0 for k in ("missing", "stale", "extra", "duplicated"))
    assert "changed during this run" in run.summary() and "the next run indexes them" in \
        run.summary()

    now = verify(store, backend, PREFIX, MODEL).to_dict()  # a person's check: the store now
    assert [now[k]["first"] for k in ("missing", "stale", "extra")] == [[new], [keys[3]],
                                                                       [keys[7]]]
    assert not now["ok"] and now["changed_during_run"]["count"] == 0

    # the same changes dated before the plan: the run missed them, and with every image in the
    # store older than the plan nothing can have been deleted during it
    later = time.time() + 60
    missed = verify(store, backend, PREFIX, MODEL, since=later, listed=12).to_dict()
    assert [missed[k]["first"] for k in ("missing", "stale", "extra")] == [[new], [keys[3]],
                                                                          [keys[7]]]
    assert not missed["ok"] and missed["changed_during_run"]["count"] == 0

    # extra keys, judged by count: a key the store never had, in a quiet store, fails; next to
    # a deletion during the run there is room for one, not two, so both are extra; without
    # the plan's count (`--since` on the command line) no extra key is excused
    store.put(keys[3], keys[3].encode()), store.put(keys[7], keys[7].encode()), store.delete(new)
    for k in (keys[3], keys[7]):
        os.utime(store.root / k, (long_ago, long_ago))
    backend.rebuild(MODEL, keys + [ghost], unit_vectors(13, DIM), etags + ["e"])
    quiet = verify(store, backend, PREFIX, MODEL, since=since, listed=12)
    assert not quiet.ok and quiet.found["extra"].first == [ghost]
    store.delete(keys[0])
    busy = verify(store, backend, PREFIX, MODEL, since=since, listed=12)
    assert not busy.ok and busy.found["extra"].first == [keys[0], ghost]
    assert busy.during_run["deleted"].count == 0
    backend.rebuild(MODEL, keys, unit_vectors(12, DIM), etags)
    assert verify(store, backend, PREFIX, MODEL, since=since, listed=12).ok
    assert not verify(store, backend, PREFIX, MODEL, since=since).ok

    # another model is wrong whenever the store changed
    other = verify(store, backend, PREFIX, "another-model-ffff", since=since, listed=12)
    assert not other.ok and (other.wrong_model or other.found["missing"].count == 11)


@pytest.mark.parametrize("kind", ["faiss", "milvus-lite"])
def test_indexer_verify_command(kind, tmp_path, tiny_flickr, small_checkpoint, monkeypatch,
                                capsys):
    """`python -m indexer verify`: exit 0 on a clean index; a changed, an added and a deleted
    image and another model each reported, exit 1."""
    import pymilvus  # noqa: F401  (imported before MILVUS_URI names a file: it reads it then)

    from flickr8k.sources import open_source
    from indexer import cli
    from indexer.ingest import ingest
    from objectstore import LocalStore

    root, _ = tiny_flickr
    store = LocalStore(tmp_path / "store", "b")
    ingest(open_source(str(root)), store, split="dev", progress=False)
    env = {"STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(tmp_path / "store"),
           "MINIO_BUCKET": "b", "INDEX_DIR": str(tmp_path / "index"),
           "MODEL_PATH": str(small_checkpoint),
           "INDEX_BACKEND": "milvus" if kind == "milvus-lite" else kind,
           "MILVUS_URI": str(tmp_path / "lite.db"), "MILVUS_COLLECTION_PREFIX": "t_verify"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    monkeypatch.chdir(tmp_path)

    def verify(*argv) -> tuple[int, dict]:
        rc = cli.main(["--quiet", "verify", "--json", *argv])
        return rc, json.loads(capsys.readouterr().out)

    try:
        assert cli.main(["--quiet", "rebuild"]) == 0
        capsys.readouterr()
        rc, report = verify()
        assert rc == 0 and report["ok"] and report["objects"] == report["rows"] == 6, report
        keys = [o.key for o in store.list(PREFIX)]
        store.put(keys[0], store.get(keys[1]))  # stale: another content under the key
        store.put(PREFIX + "zz-new.jpg", store.get(keys[2]))  # missing
        store.delete(keys[3])  # extra
        rc, report = verify()
        assert rc == 1 and not report["ok"]
        assert (report["stale"]["first"], report["missing"]["first"], report["extra"]["first"]) \
            == ([keys[0]], [PREFIX + "zz-new.jpg"], [keys[3]])
        assert cli.main(["--quiet", "verify"]) == 1  # the summary for people
        assert "MISMATCH" in capsys.readouterr().out
        assert cli.main(["--quiet", "update"]) == 0
        capsys.readouterr()
        assert verify()[0] == 0  # an update repairs it
        monkeypatch.setenv("MODEL_PATH", str(tmp_path / "no-such-model.pt"))
        get_settings.cache_clear()
        rc, report = verify()  # another (here: no) model than the one that built the version
        assert rc == 1 and (report["wrong_model"] or report["missing"]["count"] == 6)
    finally:
        get_settings.cache_clear()


def test_verify_refuses_a_listing_out_of_key_order(faiss_index):
    """A merge-join of unsorted input would report nonsense: it stops instead."""
    from indexer.verify import verify
    from objectstore import ObjectInfo

    class Unsorted:
        def describe(self):
            return "unsorted"

        def list(self, prefix=""):
            return iter([ObjectInfo(f"{PREFIX}b.jpg", 1, "e"), ObjectInfo(f"{PREFIX}a.jpg", 1, "e")])

    faiss_index.rebuild(MODEL, [f"{PREFIX}a.jpg", f"{PREFIX}b.jpg"], unit_vectors(2, DIM),
                        ["e", "e"])
    with pytest.raises(RuntimeError, match="not in key order"):
        verify(Unsorted(), faiss_index, PREFIX, MODEL)
