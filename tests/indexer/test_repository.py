"""Index versions, atomic publish, corruption detection, and the rebuild/update/status cycle."""

import dataclasses

import numpy as np
import pytest

from indexer.repository import IndexLoadError, IndexRepository


def test_publish_and_load_round_trip(tmp_path):
    repo = IndexRepository(tmp_path)
    assert repo.current_version() is None
    v = publish_random(repo)
    assert repo.current_version() == v
    loaded = repo.load()
    assert loaded.count == 5 and loaded.model_id == "m-1"
    scores, keys = loaded.search(unit_vectors(5)[:1], 3)
    assert keys[0][0] == f"{PREFIX}0.jpg" and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    m = repo.read_manifest()
    assert m["dim"] == 8 and m["count"] == 5 and set(m["checksums"]) == {"index.faiss", "table.arrow"}


def test_top_k_larger_than_index(tmp_path):
    repo = IndexRepository(tmp_path)
    publish_random(repo, n=3)
    scores, keys = repo.load().search(unit_vectors(2), 10)
    assert scores.shape == (2, 3) and len(keys[0]) == 3


def test_corrupt_or_missing_files_are_detected(tmp_path):
    repo = IndexRepository(tmp_path)
    v = publish_random(repo)
    f = tmp_path / "versions" / v / "index.faiss"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IndexLoadError, match="corrupt"):
        repo.load()
    f.unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        repo.load()


def test_model_mismatch_is_refused(tmp_path):
    repo = IndexRepository(tmp_path)
    publish_random(repo, model_id="model-a")
    with pytest.raises(IndexLoadError, match="built by model model-a"):
        repo.load(expect_model_id="model-b")


def test_failed_publish_leaves_no_partial_version(tmp_path, monkeypatch):
    repo = IndexRepository(tmp_path)
    good = publish_random(repo)
    import faiss

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError):
        publish_random(repo)
    assert repo.list_versions() == [good] and repo.current_version() == good
    assert not list((tmp_path / "versions").glob(".tmp-*"))


def test_prune_keeps_current(tmp_path):
    repo = IndexRepository(tmp_path)
    versions = [publish_random(repo) for _ in range(4)]
    removed = repo.prune(keep=2)
    assert removed == versions[:2] and repo.list_versions() == versions[2:]


# --- broken versions: each is refused with a clear IndexLoadError, before it can be served ---
import hashlib  # noqa: E402
import json  # noqa: E402
import pyarrow as pa  # noqa: E402

from indexer.key_table import KeyTable  # noqa: E402
from tests.indexer.helpers import (PREFIX, publish_random, read_key_table_file,  # noqa: E402
                                   to_legacy_table, unit_vectors, write_key_table)


def _rewrite(vdir, name, content: bytes | str, fix_checksum=True):
    """Replace a file of a version; keep the manifest's checksum consistent (a broken version
    that is self-consistent must still be refused)."""
    data = content.encode() if isinstance(content, str) else content
    (vdir / name).write_bytes(data)
    if fix_checksum and name != "manifest.json":
        m = json.loads((vdir / "manifest.json").read_text())
        m["checksums"][name] = hashlib.sha256(data).hexdigest()
        (vdir / "manifest.json").write_text(json.dumps(m))


def _edit_table(vdir, edit):
    """A version with the table.json of before, edited."""
    to_legacy_table(vdir)
    table = json.loads((vdir / "table.json").read_text())
    edit(table)
    _rewrite(vdir, "table.json", json.dumps(table))


def _legacy_table(vdir, content):
    to_legacy_table(vdir)
    _rewrite(vdir, "table.json", content)


def _edit_arrow(vdir, edit, orders=True):
    """table.arrow with its columns edited as lists (`orders`: the sort orders made again for
    the edited columns, as the writer would)."""
    table = read_key_table_file(vdir)
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    edit(cols)
    if orders:
        made = KeyTable.from_columns(cols["id"], cols["key"], cols["etag"]).table
        cols["key_order"] = made.column("key_order").to_pylist()
        cols["id_order"] = made.column("id_order").to_pylist()
    write_key_table(vdir, pa.table(cols))


def _arrow_column(vdir, name, array):
    table = read_key_table_file(vdir)
    write_key_table(vdir, table.set_column(table.column_names.index(name), name, array))


def _truncate(vdir, name, fix_checksum):
    data = (vdir / name).read_bytes()
    _rewrite(vdir, name, data[:len(data) // 2], fix_checksum=fix_checksum)


def _bad_utf8_keys(vdir):
    table = read_key_table_file(vdir)
    keys = pa.array([b"\xff\xfe" + k for k in table.column("key").cast(pa.binary()).to_pylist()])
    _arrow_column(vdir, "key", keys.view(pa.string()))


def _edit_manifest(vdir, edit):
    m = json.loads((vdir / "manifest.json").read_text())
    edit(m)
    (vdir / "manifest.json").write_text(json.dumps(m))


BROKEN = {
    "manifest-null": (lambda v: _rewrite(v, "manifest.json", "null"), "manifest is corrupt"),
    "manifest-list": (lambda v: _rewrite(v, "manifest.json", "[]"), "manifest is corrupt"),
    "manifest-not-utf8": (lambda v: _rewrite(v, "manifest.json", b"\xff\xfe{"),
                          "manifest is corrupt"),
    "checksums-list": (lambda v: _edit_manifest(v, lambda m: m.update(checksums=["index.faiss"])),
                       "checksums"),
    "checksums-empty": (lambda v: _edit_manifest(v, lambda m: m.update(checksums={})),
                        "no checksum for"),
    "checksums-path": (lambda v: _edit_manifest(
        v, lambda m: m["checksums"].update({"../../etc/passwd": "0" * 64})), "invalid file"),
    "model-id-missing": (lambda v: _edit_manifest(v, lambda m: m.pop("model_id")), "model_id"),
    "dim-string": (lambda v: _edit_manifest(v, lambda m: m.update(dim="8")), "dim"),
    "dim-wrong": (lambda v: _edit_manifest(v, lambda m: m.update(dim=9)), "dimension"),
    "count-wrong": (lambda v: _edit_manifest(v, lambda m: m.update(count=4)), "manifest says"),
    "nprobe-bad": (lambda v: _edit_manifest(v, lambda m: m.update(index_params={"nprobe": "x"})),
                   None),  # flat index: nprobe unused, accepted
    "table-short-keys": (lambda v: _edit_table(v, lambda t: t["keys"].pop()),
                         "index and table disagree"),
    "table-short-all": (lambda v: _edit_table(
        v, lambda t: [t[c].pop() for c in ("ids", "keys", "etags")]), "index and table disagree"),
    "table-null": (lambda v: _legacy_table(v, "null"), "table.json is not an object"),
    "table-ids-missing": (lambda v: _edit_table(v, lambda t: t.pop("ids")), "no list 'ids'"),
    "table-ids-strings": (lambda v: _edit_table(v, lambda t: t.update(ids=[str(i) for i in t["ids"]])),
                          "64-bit integers"),
    "table-ids-huge": (lambda v: _edit_table(v, lambda t: t["ids"].__setitem__(0, 2**70)),
                       "64-bit integers"),
    "table-ids-duplicate": (lambda v: _edit_table(v, lambda t: t["ids"].__setitem__(1, t["ids"][0])),
                            "not unique"),
    "table-ids-not-the-index": (lambda v: _edit_table(v, lambda t: t["ids"].__setitem__(0, 999)),
                                "not the ids the index holds"),
    "table-keys-duplicate": (lambda v: _edit_table(v, lambda t: t["keys"].__setitem__(1, t["keys"][0])),
                             "keys are not unique"),
    "table-etag-number": (lambda v: _edit_table(v, lambda t: t["etags"].__setitem__(0, 5)),
                          "etags must be strings"),
    "table-not-json": (lambda v: _legacy_table(v, "{not json"), "table.json is corrupt"),
    # the key table as written now: table.arrow
    "arrow-checksum": (lambda v: _truncate(v, "table.arrow", fix_checksum=False),
                       "table.arrow is corrupt"),
    "arrow-truncated": (lambda v: _truncate(v, "table.arrow", fix_checksum=True),
                        r"table.arrow is unusable \(not an Arrow IPC file"),
    "arrow-not-arrow": (lambda v: _rewrite(v, "table.arrow", json.dumps({"ids": [1]})),
                        "not an Arrow IPC file"),
    "arrow-no-checksum": (lambda v: _edit_manifest(v, lambda m: m["checksums"].pop("table.arrow")),
                          "no checksum for table.arrow"),
    "arrow-missing": (lambda v: (v / "table.arrow").unlink(), "table.arrow is missing"),
    "arrow-no-etags": (lambda v: write_key_table(v, read_key_table_file(v).drop_columns(["etag"])),
                       "no column 'etag'"),
    "arrow-key-int": (lambda v: _arrow_column(v, "key", pa.array(range(5), pa.int64())),
                      "column key is int64, not string"),
    "arrow-id-string": (lambda v: _arrow_column(v, "id", pa.array([str(i) for i in range(5)])),
                        "column id is string, not int64"),
    "arrow-id-int32": (lambda v: _arrow_column(v, "id", pa.array(range(5), pa.int32())),
                       "column id is int32, not int64"),
    "arrow-etag-null": (lambda v: _arrow_column(v, "etag", pa.array(["e", None, "e", "e", "e"])),
                        "column etag has nulls"),
    "arrow-keys-not-utf8": (_bad_utf8_keys, "buffers are malformed"),
    "arrow-short": (lambda v: _edit_arrow(v, lambda c: [c[n].pop() for n in ("id", "key", "etag")]),
                    r"index and table disagree \(5 vectors; table has 4 rows\)"),
    "arrow-keys-duplicate": (lambda v: _edit_arrow(v, lambda c: c["key"].__setitem__(3, c["key"][1])),
                             r"table.arrow is unusable \(keys are not unique\)"),
    "arrow-ids-duplicate": (lambda v: _edit_arrow(v, lambda c: c["id"].__setitem__(3, c["id"][1])),
                            r"table.arrow is unusable \(ids are not unique\)"),
    "arrow-ids-not-the-index": (lambda v: _edit_arrow(v, lambda c: c["id"].__setitem__(0, 999)),
                                "not the ids the index holds"),
    "arrow-key-order-reversed": (lambda v: _edit_arrow(
        v, lambda c: c["key_order"].reverse(), orders=False), "key_order is not the keys' sort order"),
    "arrow-key-order-repeats": (lambda v: _edit_arrow(
        v, lambda c: c["key_order"].__setitem__(1, c["key_order"][0]), orders=False),
        "key_order is not the keys' sort order"),
    "arrow-id-order-out-of-range": (lambda v: _edit_arrow(
        v, lambda c: c["id_order"].__setitem__(0, 5), orders=False), "id_order holds rows out of range"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_version_is_refused_with_a_clear_error(tmp_path, case):
    repo = IndexRepository(tmp_path)
    v = publish_random(repo)
    damage, expected = BROKEN[case]
    damage(tmp_path / "versions" / v)
    if expected is None:
        assert repo.load().count == 5
        return
    with pytest.raises(IndexLoadError, match=expected) as info:
        repo.load()
    msg = str(info.value)
    assert v in msg and str(tmp_path) not in msg and len(msg) < 400


@pytest.mark.parametrize("content,why", [
    (b"\xff\xfe\x00bad", "not UTF-8"), (b"x" * 1_000_000, "too long"),
    (b"../../../etc", "unexpected characters"), (b"a b", "unexpected characters")])
def test_garbage_current_pointer_is_refused_without_echo(tmp_path, content, why):
    repo = IndexRepository(tmp_path)
    publish_random(repo)
    (tmp_path / "CURRENT").write_bytes(content)
    with pytest.raises(IndexLoadError, match=why) as info:
        repo.current_version()
    assert len(str(info.value)) < 200 and "etc" not in str(info.value)
    with pytest.raises(IndexLoadError):
        repo.load()
    assert repo.read_manifest() is None


def test_version_names_are_not_paths(tmp_path):
    repo = IndexRepository(tmp_path)
    publish_random(repo)
    for bad in ("../versions", "/etc", "a/b", "x" * 200):
        with pytest.raises(IndexLoadError, match="not a valid index version name"):
            repo.load(bad)
    with pytest.raises(IndexLoadError, match="does not exist"):
        repo.load("20990101T000000000000Z-abcdef")


def test_no_index_message_names_no_path(tmp_path):
    with pytest.raises(IndexLoadError) as info:
        IndexRepository(tmp_path / "nowhere").load()
    assert "rebuild" in str(info.value) and str(tmp_path) not in str(info.value)


def test_unreadable_faiss_file_message_names_no_path(tmp_path):
    repo = IndexRepository(tmp_path)
    v = publish_random(repo)
    _rewrite(tmp_path / "versions" / v, "index.faiss", b"garbage garbage garbage")
    with pytest.raises(IndexLoadError, match="cannot read index.faiss") as info:
        repo.load()
    assert str(tmp_path) not in str(info.value)


def test_ivf_version_is_validated_too(tmp_path):
    from indexer.index_policy import IndexSpec, build_index

    repo = IndexRepository(tmp_path)
    vecs = unit_vectors(300)
    ids = np.arange(1000, 1300, dtype=np.int64)
    index, _ = build_index(vecs, ids, IndexSpec(kind="ivf", nlist=4, nprobe=2))
    v = repo.commit_version(index, ids, [f"k{i}" for i in ids], ["e"] * 300, "m")
    assert repo.load().count == 300
    _edit_table(tmp_path / "versions" / v, lambda t: t["ids"].__setitem__(5, 5))
    with pytest.raises(IndexLoadError, match="not the ids the index holds"):
        repo.load()


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_loaded_version_is_mapped_from_its_file_and_an_update_leaves_it_whole(tmp_path, kind):
    """Processes serving one version share its pages; an update writes a copy, never the map."""
    from indexer.faiss_index import FaissIndex
    from indexer.index_policy import IndexSpec, build_index

    n = 300
    vecs = unit_vectors(n, d=16, seed=3)
    keys = [f"{PREFIX}{i}.jpg" for i in range(n)]
    index, params = build_index(vecs, np.arange(n, dtype=np.int64),
                                IndexSpec(kind, 8, 8) if kind == "ivf" else None)
    repo = IndexRepository(tmp_path)
    first = repo.commit_version(index, np.arange(n, dtype=np.int64), keys,
                               [f"e{i}" for i in range(n)], "m-1", extra={"index_params": params})
    served = repo.load()
    assert str(tmp_path / "versions" / first / "index.faiss") in _mapped_files()
    before = (tmp_path / "versions" / first / "index.faiss").read_bytes()

    out = FaissIndex(repo).update("m-1", [f"{PREFIX}new.jpg"], unit_vectors(1, d=16, seed=9),
                                  ["e-new"], delete=keys[:10])
    assert out["changed"] and out["count"] == n - 10 + 1
    # the mapped version still answers as before, and its file is unchanged
    assert (tmp_path / "versions" / first / "index.faiss").read_bytes() == before
    _, found = served.search(vecs[:3], 1)
    assert [k[0] for k in found] == keys[:3]
    latest = repo.load()
    _, found = latest.search(np.vstack([vecs[:1], unit_vectors(1, d=16, seed=9)]), 1)
    assert found[0][0] != keys[0] and found[1][0] == f"{PREFIX}new.jpg"


def test_a_flat_version_is_served_without_an_id_map_of_its_own(tmp_path):
    """A flat version's positions are its table's rows: served as an IndexIDMap, its vectors
    read by row, searches and filters answer as the IndexIDMap2 it was written as; one whose
    index holds the ids in another order keeps FAISS's id -> position map."""
    import faiss

    from indexer.index_policy import new_flat_index
    from indexer.photo_filter import PhotoFilter
    from indexer.photo_table import PhotoTable

    n = 50
    vecs = unit_vectors(n, d=16, seed=4)
    ids = np.arange(100, 100 + n, dtype=np.int64)  # ids that are not rows
    keys = [f"{PREFIX}{i:03d}.jpg" for i in range(n)]
    repo = IndexRepository(tmp_path)
    index = new_flat_index(16)
    index.add_with_ids(vecs, ids)
    photos = PhotoTable.from_rows([{"folder": "even" if i % 2 == 0 else "odd"} for i in range(n)])
    repo.commit_version(index, ids, keys, ["e"] * n, "m-1", photos=photos)
    served = repo.load()
    assert type(served.index) is faiss.IndexIDMap and served.count == n
    np.testing.assert_allclose(served.stored_vectors([keys[7], keys[3]]), vecs[[7, 3]])
    np.testing.assert_allclose(served.vectors_of_ids(ids[::-1]), vecs[::-1])
    with pytest.raises(KeyError):
        served.vectors_of_ids(np.array([7]))
    scores, found = served.search(vecs[:4], 3)
    assert [f[0] for f in found] == keys[:4] and scores[:, 0] == pytest.approx(1, abs=1e-5)
    _, found = served.search(vecs[:4], 3, where=PhotoFilter(folders=["odd"]))
    assert all(int(k[len(PREFIX):len(PREFIX) + 3]) % 2 == 1 for row in found for k in row)
    assert found[1][0] == keys[1]

    shuffled = new_flat_index(16)  # the same ids, added in another order than the table's
    order = np.random.default_rng(0).permutation(n)
    shuffled.add_with_ids(vecs[order], ids[order])
    repo.commit_version(shuffled, ids, keys, ["e"] * n, "m-1")
    kept = repo.load()
    assert type(kept.index) is faiss.IndexIDMap2
    np.testing.assert_allclose(kept.stored_vectors([keys[7], keys[3]]), vecs[[7, 3]])
    assert [f[0] for f in kept.search(vecs[:4], 1)[1]] == keys[:4]


@pytest.mark.parametrize("ids_are_rows", [True, False])
def test_an_ivf_flat_version_is_served_without_a_direct_map(tmp_path, ids_are_rows):
    """Reading an IVF-Flat version builds FAISS's id -> (list, offset) hash map in every
    process; a served version drops it and reads vectors from the lists by table row: the
    same vectors, searches and errors for ids it does not hold. Updates still remove by id
    (they read the file again, map included)."""
    import faiss

    from indexer.index_policy import new_ivf_index

    n, d = 400, 16
    vecs = unit_vectors(n, d=d, seed=5)
    ids = np.arange(n, dtype=np.int64) * (1 if ids_are_rows else 3) + (0 if ids_are_rows else 7)
    keys = [f"{PREFIX}{i:03d}.jpg" for i in range(n)]
    repo = IndexRepository(tmp_path)
    index = new_ivf_index(d, 8)
    index.train(vecs)
    index.add_with_ids(vecs, ids)
    repo.commit_version(index, ids, keys, ["e"] * n, "m-1", extra={"index_params": {"nprobe": 8}})
    served = repo.load()
    ivf = faiss.extract_index_ivf(served.index)
    assert ivf.direct_map.type == faiss.DirectMap.NoMap
    picked = np.array([399, 0, 123, 5, 5])
    # read in one gather from the mapped file's lists; list by list from lists held in memory
    assert served._ivf_mapped_lists is not None
    in_memory = dataclasses.replace(served, index=repo.writable_index(repo.current_version()))
    assert in_memory._ivf_mapped_lists is None
    for version in (served, in_memory):
        np.testing.assert_array_equal(version.vectors_of_ids(ids[picked]), vecs[picked])
    np.testing.assert_array_equal(served.stored_vectors([keys[9], keys[200]]), vecs[[9, 200]])
    for missing in ([-1], [int(ids.max()) + 1], [] if ids_are_rows else [8]):
        if missing:
            with pytest.raises(KeyError):
                served.vectors_of_ids(np.array(missing))
    scores, found, tails = served.search(vecs[:3], 2, readback=d - 1)
    assert [f[0] for f in found] == keys[:3]
    np.testing.assert_allclose([t[0] for t in tails], vecs[:3, -1])
    writable = repo.writable_index(served.version)
    assert faiss.extract_index_ivf(writable).direct_map.type == faiss.DirectMap.Hashtable
    writable.remove_ids(ids[:2])
    assert writable.ntotal == n - 2


@pytest.mark.parametrize("ids_are_rows", [True, False])
def test_info_of_searched_keys_equals_info_found_by_key(tmp_path, monkeypatch, ids_are_rows):
    """A search remembers its hits' rows (`info` of an answer's hits reads them there, not by
    a binary search per key): the metadata is the same either way, for keys searched before,
    keys never searched and keys the version lacks, and the memory stays bounded."""
    import faiss

    from indexer import repository
    from indexer.photo_table import PhotoTable

    n, d = 300, 8
    vecs = unit_vectors(n, d=d, seed=3)
    ids = np.arange(n, dtype=np.int64) * (1 if ids_are_rows else 5) + (0 if ids_are_rows else 2)
    keys = [f"{PREFIX}{i:03d}.jpg" for i in range(n)]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    index.add_with_ids(vecs, ids)
    photos = PhotoTable.from_rows([{"width": 100 + i, "city": f"c{i}"} if i % 3 else None
                                   for i in range(n)])
    repo = IndexRepository(tmp_path)
    repo.commit_version(index, ids, keys, ["e"] * n, "m-1", photos=photos)
    expected = {k: None if i % 3 == 0 else {"width": 100 + i, "city": f"c{i}"}
                for i, k in enumerate(keys)}
    cold = repo.load().info(keys[:40] + ["nope.jpg", 7])
    assert cold == [expected[k] for k in keys[:40]] + [None, None]
    served = repo.load()
    _, found = served.search(vecs[:20], 5)
    hits = [k for row in found for k in row]
    assert [row[0] for row in found] == keys[:20]
    asked = hits + keys[200:210] + ["nope.jpg"]
    assert served.info(asked) == [expected.get(k) for k in asked]
    monkeypatch.setattr(repository, "RECENT_ROWS_MAX", 32)
    for start in range(0, n, 10):  # more hits than it remembers
        served.search(vecs[start:start + 1], 20)
        assert len(served._recent_rows) <= 32 + 20
    assert served.info(keys[::7]) == [expected[k] for k in keys[::7]]
