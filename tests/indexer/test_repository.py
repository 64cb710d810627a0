"""Index versions, atomic publish, corruption detection, and the rebuild/update/status cycle."""

import numpy as np
import pytest

from indexer.repository import IndexLoadError, IndexRepository
from indexer.index_policy import new_flat_index


PREFIX = "flickr8k/images/"


def _vectors(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _publish(repo, n=5, model_id="m-1"):
    idx = new_flat_index(8)
    ids = np.arange(n, dtype=np.int64)
    idx.add_with_ids(_vectors(n), ids)
    keys = [f"{PREFIX}{i}.jpg" for i in range(n)]
    return repo.publish(idx, ids, keys, [f"e{i}" for i in range(n)], model_id)


def test_publish_and_load_round_trip(tmp_path):
    repo = IndexRepository(tmp_path)
    assert repo.current_version() is None
    v = _publish(repo)
    assert repo.current_version() == v
    loaded = repo.load()
    assert loaded.count == 5 and loaded.model_id == "m-1"
    scores, keys = loaded.search(_vectors(5)[:1], 3)
    assert keys[0][0] == f"{PREFIX}0.jpg" and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    m = repo.read_manifest()
    assert m["dim"] == 8 and m["count"] == 5 and set(m["checksums"]) == {"index.faiss", "table.json"}


def test_top_k_larger_than_index(tmp_path):
    repo = IndexRepository(tmp_path)
    _publish(repo, n=3)
    scores, keys = repo.load().search(_vectors(2), 10)
    assert scores.shape == (2, 3) and len(keys[0]) == 3


def test_corrupt_or_missing_files_are_detected(tmp_path):
    repo = IndexRepository(tmp_path)
    v = _publish(repo)
    f = tmp_path / "versions" / v / "index.faiss"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IndexLoadError, match="corrupt"):
        repo.load()
    f.unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        repo.load()


def test_model_mismatch_is_refused(tmp_path):
    repo = IndexRepository(tmp_path)
    _publish(repo, model_id="model-a")
    with pytest.raises(IndexLoadError, match="built by model model-a"):
        repo.load(expect_model_id="model-b")


def test_failed_publish_leaves_no_partial_version(tmp_path, monkeypatch):
    repo = IndexRepository(tmp_path)
    good = _publish(repo)
    import faiss

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError):
        _publish(repo)
    assert repo.list_versions() == [good] and repo.current_version() == good
    assert not list((tmp_path / "versions").glob(".tmp-*"))


def test_prune_keeps_current(tmp_path):
    repo = IndexRepository(tmp_path)
    versions = [_publish(repo) for _ in range(4)]
    removed = repo.prune(keep=2)
    assert removed == versions[:2] and repo.list_versions() == versions[2:]
