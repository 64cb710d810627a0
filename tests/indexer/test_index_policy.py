"""Fast runtimes (ONNX Runtime towers) and the index-type choice (flat vs IVF)."""
import numpy as np

from indexer import index_policy as index_mod
from indexer.repository import IndexRepository
from indexer.index_policy import (
    build_index,
    choose_index,
    index_contents,
    index_spec_of,
    needs_restructure,
)


def _clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choose_index_goes_from_flat_to_ivf_by_size():
    assert choose_index(1000, 256).kind == "flat"
    assert choose_index(40_000, 256).kind == "flat"
    assert choose_index(50_000, 256).kind == "ivf"
    big = choose_index(1_000_000, 256)
    assert big.kind == "ivf" and big.nlist == 4096
    assert choose_index(100_000, 256).nlist == 1024


def test_ivf_keeps_ids_removal_and_reaches_recall(tmp_path):
    x = _clustered(4000, 32)
    ids = np.arange(4000, dtype=np.int64) * 2 + 5
    spec = choose_index(len(x), 32, flat_max_madds=100)
    index, params = build_index(x, ids, spec)
    assert params["kind"] == "ivf" and params["tuned_recall_at_10"] >= 0.95
    index.remove_ids(np.array([5, 7], dtype=np.int64))
    index.add_with_ids(x[:1], np.array([99_999], dtype=np.int64))
    assert np.allclose(index.reconstruct(99_999), x[0])
    got_ids, got_vecs = index_contents(index)
    assert len(got_ids) == 3999 and 5 not in set(got_ids.tolist())
    # published and loaded back: same type, same nprobe, manifest records the choice
    repo = IndexRepository(tmp_path)
    keep = np.isin(ids, [5, 7], invert=True)
    all_ids = np.concatenate([ids[keep], [99_999]])
    repo.commit_version(index, all_ids, [f"k{i}" for i in all_ids], ["e"] * len(all_ids), "m",
                 extra={"index_params": params})
    cur = repo.load()
    assert cur.manifest["index_type"] == "IndexIVFFlat"
    assert cur.manifest["index_params"]["nprobe"] == params["nprobe"]
    assert index_spec_of(cur.index).nprobe == params["nprobe"]
    _, keys = cur.search(x[10:11], 1)
    assert keys[0] == [f"k{ids[10]}"]


def test_tuning_stops_where_more_lists_buy_no_recall():
    """A target out of reach (here above 1) does not send nprobe to every list: tuning stops at
    the first nprobe that twice as many lists improve by less than PLATEAU_GAIN."""
    x = _clustered(4000, 32)
    ids = np.arange(4000, dtype=np.int64)
    spec = choose_index(len(x), 32, flat_max_madds=100)
    index, _ = build_index(x, ids, spec)
    queries = x[:200] + 0.3 * np.random.default_rng(1).standard_normal((200, 32)).astype(
        np.float32)
    nprobe, recall, _ = index_mod.tune_nprobe(index, x, ids, queries, target_recall=1.01)
    ivf = index_mod.faiss.extract_index_ivf(index)
    assert ivf.nprobe == nprobe < ivf.nlist // 2
    ivf.nprobe = nprobe * 2
    _, found = index.search(queries, 10)
    _, truth = index_mod.faiss.knn(queries, x, 10, metric=index_mod.faiss.METRIC_INNER_PRODUCT)
    assert index_mod.recall_at(found, truth) - recall < index_mod.PLATEAU_GAIN
    assert recall >= 0.95  # where recall stops growing, not short of it


def test_update_restructures_when_the_collection_outgrows_flat(monkeypatch):
    x = _clustered(3000, 16)
    flat, _ = build_index(x, np.arange(3000))
    assert index_spec_of(flat).kind == "flat" and not needs_restructure(flat, 3000)
    monkeypatch.setattr(index_mod, "FLAT_MAX_MADDS", 1000)
    assert needs_restructure(flat, 3000)
    new, params = index_mod.rebuild_structure(flat)
    assert params["kind"] == "ivf" and new.ntotal == 3000
    assert np.allclose(new.reconstruct(1234), x[1234])
