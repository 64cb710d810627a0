"""A version's key table (table.arrow): read memory-mapped, looked up by binary search, and the
table.json of older versions still read the same."""
import json
import random

import numpy as np
import pyarrow as pa
import pytest

from indexer.index_policy import new_flat_index
from indexer.key_table import KeyTable
from indexer.repository import IndexRepository
from tests.indexer.helpers import publish_random, to_legacy_table, unit_vectors


def _random_keys(n, seed=0):
    """Keys a store may hold: shared prefixes, prefixes of each other, non-ASCII, spaces."""
    rng = random.Random(seed)
    alphabet = "ab/._- é日Z9"
    keys = set()
    while len(keys) < n:
        keys.add("photos/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))))
    return sorted(keys, key=lambda _: rng.random())


def _publish(repo, keys, ids=None):
    n = len(keys)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    index = new_flat_index(8)
    index.add_with_ids(unit_vectors(n), ids)
    return repo.commit_version(index, ids, keys, [f"etag-{k}" for k in keys], "m")


@pytest.mark.parametrize("fence", [1, 5, 256])
def test_key_lookups_agree_with_a_dict(tmp_path, monkeypatch, fence):
    from indexer import key_table

    monkeypatch.setattr(key_table, "_FENCE_EVERY", fence)
    keys = _random_keys(300)
    table = KeyTable.from_columns(np.arange(300) * 7 + 3, keys, ["e"] * 300)
    table.write(tmp_path / "t.arrow")
    mapped = KeyTable.read(tmp_path / "t.arrow")
    row = {k: n for n, k in enumerate(keys)}
    ordered = sorted(keys)
    asked = keys[::3] + _random_keys(60, seed=1) + ordered[:2] + ordered[-2:] + [
        "", "photos/", "\U0010ffff", keys[0] + "x", keys[5][:-1], "photos/\ud800", 5]
    expected = [row.get(k, -1) for k in asked]
    assert len(asked) > key_table._ONE_BY_ONE_MAX  # all at once
    assert mapped.rows_of_keys(asked).tolist() == expected
    assert [mapped.rows_of_keys([k]).tolist() for k in asked] == [[r] for r in expected]
    assert mapped.rows_of_keys(asked[:10]).tolist() == expected[:10]  # one by one
    assert mapped.rows_of_keys([]).tolist() == []
    ids = np.asarray(mapped.ids)
    assert [mapped.row_of_id(int(i)) for i in ids[::7]] == list(range(0, 300, 7))
    assert [mapped.row_of_id(i) for i in (-1, 0, 3, 4, 2096, 2097, 10**12)] == \
        [-1, -1, 0, -1, 299, -1, -1]
    empty = KeyTable.from_columns([], [], [])
    assert empty.rows_of_keys(["a"]).tolist() == [-1] and empty.rows_of_keys(["a"] * 99).tolist() == [-1] * 99


def test_keys_and_etags_read_as_sequences(tmp_path):
    repo = IndexRepository(tmp_path)
    keys = _random_keys(40)
    _publish(repo, keys)
    view = repo.load()
    assert view.keys == keys and keys == view.keys and list(view.keys) == keys
    assert view.keys != keys[:-1] and view.keys != keys[::-1]
    assert len(view.keys) == 40 and view.keys[3] == keys[3] and view.keys[-1] == keys[-1]
    assert view.keys[np.int64(2)] == keys[2] and view.keys[5:9] == keys[5:9]
    assert view.etags[:2] == [f"etag-{k}" for k in keys[:2]]
    with pytest.raises(IndexError):
        view.keys[40]
    assert keys[7] in view.keys and "nope" not in view.keys and 5 not in view.keys
    assert "\ud800" not in view.keys
    assert view.etag_by_key() == {k: f"etag-{k}" for k in keys}
    assert view.id_by_key() == {k: n for n, k in enumerate(keys)}
    assert sorted(view.keys) == sorted(keys) and view.keys == repo.load().keys


def test_lookups_by_key_and_id_on_a_loaded_version(tmp_path):
    repo = IndexRepository(tmp_path)
    keys = _random_keys(50)
    ids = np.random.default_rng(0).permutation(np.arange(1000, 1050))  # ids are not rows
    _publish(repo, keys, ids)
    view = repo.load()
    assert [view.key_of(int(i)) for i in ids] == keys
    with pytest.raises(KeyError):
        view.key_of(3)
    got = view.stored_vectors([keys[9], keys[2]])
    np.testing.assert_allclose(got, unit_vectors(50)[[9, 2]], atol=1e-6)
    with pytest.raises(KeyError) as missing:
        view.stored_vectors([keys[0], "not/held.jpg", "nor/this.jpg"])
    assert missing.value.args == ("not/held.jpg",)
    scores, found = view.search(unit_vectors(50)[[4]], 1)
    assert found == [[keys[4]]]


def test_a_version_with_table_json_still_loads(tmp_path):
    repo = IndexRepository(tmp_path)
    keys = _random_keys(30)
    ids = np.arange(500, 530)
    version = _publish(repo, keys, ids)
    vdir = tmp_path / "versions" / version
    to_legacy_table(vdir)
    assert set(json.loads((vdir / "manifest.json").read_text())["checksums"]) == \
        {"index.faiss", "table.json"} and not (vdir / "table.arrow").exists()
    view = repo.load()
    assert view.keys == keys and view.ids.tolist() == ids.tolist()
    assert view.etags == [f"etag-{k}" for k in keys]
    assert view.key_of(512) == keys[12]
    np.testing.assert_allclose(view.stored_vectors([keys[3]]), unit_vectors(30)[[3]], atol=1e-6)
    assert repo.read_key_table(version) == (keys, [f"etag-{k}" for k in keys])


def test_read_key_table_reads_table_arrow_without_refusing_a_key_held_twice(tmp_path):
    # `indexer verify` reports a key held twice: reading the table must not refuse it
    from tests.indexer.helpers import read_key_table_file, write_key_table

    repo = IndexRepository(tmp_path)
    version = publish_random(repo)
    vdir = tmp_path / "versions" / version
    table = read_key_table_file(vdir)
    keys = table.column("key").to_pylist()
    keys[1] = keys[0]
    write_key_table(vdir, table.set_column(1, "key", pa.array(keys)))
    assert repo.read_key_table(version) == (keys, [f"e{i}" for i in range(5)])


def test_the_key_table_is_mapped_not_read_into_memory(tmp_path):
    """Loading a version allocates next to nothing for its key table: the columns are the
    file's pages, shared between the processes serving the version."""
    repo = IndexRepository(tmp_path)
    n = 50_000
    keys = [f"photos/2024/album-{i % 97}/IMG_{i:08d}.jpg" for i in range(n)]
    version = _publish(repo, keys)
    size = (tmp_path / "versions" / version / "table.arrow").stat().st_size
    before = pa.total_allocated_bytes()
    view = repo.load()
    after = pa.total_allocated_bytes()
    assert size > 3_000_000 and after - before < size / 20, (size, after - before)
    assert view.keys[n - 1] == keys[-1] and view.info([keys[10]]) == [None]
    assert view.stored_vectors([keys[n // 2]]).shape == (1, 8)
    assert pa.total_allocated_bytes() - before < size / 20


SERVE = r"""
import sys
import numpy as np
from indexer.photo_filter import PhotoFilter
from indexer.repository import IndexRepository
view = IndexRepository(sys.argv[1]).load()
queries = np.eye(8, dtype=np.float32)[:2]
scores, keys = view.search(queries, 5)
view.info(keys[0]), view.stored_vectors(keys[0]), view.key_of(int(view.ids[3]))
for where in (PhotoFilter(folders=["a"]), PhotoFilter(min_width=120), PhotoFilter(camera="x")):
    view.search(queries, 3, where=where)
view.info_counts(), view.facets(3), keys[0][0] in view.keys
print(sorted(m for m in ("pandas", "pyarrow.dataset") if m in sys.modules))
"""


def test_serving_a_version_does_not_import_pandas(tmp_path):
    """pyarrow's conversions (pa.array, to_numpy, pq.read_table) import pandas when it is
    installed, ~27 MB in each serving process: loading and serving a version avoids them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from indexer.photo_table import PhotoTable

    pytest.importorskip("pandas")
    repo = IndexRepository(tmp_path)
    n = 40
    ids = np.arange(n, dtype=np.int64) * 3 + 1  # not rows: key_of searches the id order
    index = new_flat_index(8)
    index.add_with_ids(unit_vectors(n), ids)
    rows = [None if i % 5 == 0 else {"taken_at": 1.6e9 + i, "camera_make": "X", "lat": 48.0,
            "lon": None, "width": 100 + i, "folder": "a/b" if i % 2 else "c"} for i in range(n)]
    repo.commit_version(index, ids, [f"k/{i}.jpg" for i in range(n)], ["e"] * n, "m",
                        photos=PhotoTable.from_rows(rows))
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_arrow_numpy_conversions_match_pyarrows():
    from indexer.arrow_numpy import from_numpy, strings, to_numpy
    import pyarrow.compute as pc

    values = pa.array([5, None, -3, 7, None, 2**40], pa.int64())
    for part in (values, values.slice(2), values.slice(1, 3)):
        expected = np.asarray(part.to_numpy(zero_copy_only=False), dtype=float)
        got = to_numpy(pc.cast(part, pa.float64()), null=np.nan)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(to_numpy(part.is_valid()), part.is_valid().to_numpy(
            zero_copy_only=False))
    with pytest.raises(ValueError):
        to_numpy(values)
    assert to_numpy(values.slice(2, 2)).tolist() == [-3, 7]
    assert to_numpy(pa.chunked_array([[1], [2, 3]], pa.int64())).tolist() == [1, 2, 3]
    ints = np.arange(10, dtype=np.int64)[3:8]
    assert from_numpy(ints).equals(pa.array(ints)) and from_numpy(ints[::2]).to_pylist() == [3, 5, 7]
    texts = ["", "a", "été", "日本", "x" * 300]
    for kind in (pa.string(), pa.large_string()):
        made = strings(texts, kind)
        made.validate(full=True)
        assert made.equals(pa.array(texts, kind))
    assert strings([]).equals(pa.array([], pa.string()))
