"""Helpers of the indexer and DAG tests: the image prefix, small published index versions (no
model involved)."""
import numpy as np

from core.settings import Settings
from indexer.index_policy import new_flat_index

PREFIX = Settings.model_fields["images_prefix"].default  # where the tests' images live


def unit_vectors(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish_random(repo, n=5, model_id="m-1"):
    """Publish a flat version of n random vectors keyed `<PREFIX><i>.jpg`; returns the version."""
    idx = new_flat_index(8)
    ids = np.arange(n, dtype=np.int64)
    idx.add_with_ids(unit_vectors(n), ids)
    keys = [f"{PREFIX}{i}.jpg" for i in range(n)]
    return repo.commit_version(idx, ids, keys, [f"e{i}" for i in range(n)], model_id)
