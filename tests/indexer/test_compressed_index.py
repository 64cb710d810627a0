"""The compressed FAISS index (IVF-PQ + an exact re-rank from fp16 vectors kept beside it):
chosen by size and memory budget, exact scores, updates without retraining, a version whose
vectors are damaged or missing refused, and the way back to IVF-Flat."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from core.settings import Settings
from indexer import index_policy
from indexer.faiss_index import FaissIndex
from indexer.index_policy import choose_index, index_bytes, index_spec_of, recall_at
from indexer.repository import VECTORS_FILE
from indexer.vector_index import IndexLoadError

from .helpers import _set_checksum

MODEL = "m-compressed"
N, DIM = 12_000, 33  # 33: padded to 36 for 9-byte codes (a corrected model's 257 -> 260)


def clustered(n=N, d=DIM, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((60, d)).astype(np.float32)
    x = centers[rng.integers(0, 60, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy(x, n, seed=1):
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + \
        0.08 * rng.standard_normal((n, x.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top(x, keys, queries, k=10):
    order = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]
    return [[keys[i] for i in row] for row in order]


@pytest.fixture
def compressed(tmp_path, monkeypatch):
    """A FAISS backend whose 1 MB budget the test collection exceeds (IVF-Flat: 1.7 MB)."""
    monkeypatch.setattr(index_policy, "FLAT_MAX_MADDS", 1000)
    x = clustered()
    keys = [f"p/{i:05d}.jpg" for i in range(N)]
    backend = FaissIndex(tmp_path, memory_mb=1)
    backend.rebuild(MODEL, keys, x, [f"e{i}" for i in range(N)])
    return backend, x, keys


def test_the_policy_compresses_what_exceeds_the_budget():
    # 257 dimensions (a corrected 256-d model): IVF-Flat holds 1,036 bytes a photo
    assert choose_index(1_000_000, 257).kind == "ivf"  # ~1 GB under the 2 GB default
    big = choose_index(10_000_000, 257)
    assert big.kind == "ivfpq" and big.code_bytes == 65 and big.nlist == 16384
    assert choose_index(10_000_000, 257, memory_mb=0).kind == "ivf"  # no budget
    assert choose_index(1_000_000, 257, memory_mb=512).kind == "ivfpq"
    assert choose_index(1000, 257, memory_mb=1).kind == "flat"  # flat is small anyway
    assert index_bytes("ivfpq", 10_000_000, 257) < 1.5e9 < index_bytes("ivf", 10_000_000, 257)
    settings = Settings(index_memory_mb=300, index_dir="/nonexistent")
    assert FaissIndex.from_settings(settings).memory_mb == 300


def test_a_compressed_version_serves_exact_scores(compressed):
    backend, x, keys = compressed
    view = backend.view(MODEL)
    params = view.manifest["index_params"]
    assert params["kind"] == "ivfpq" and params["code_bytes"] == 9
    assert params["factory"].startswith("Pad36,IVF") and params["factory"].endswith(",PQ9")
    assert params["trained_on"] == N and params["rerank"] in index_policy.RERANK_DEPTHS
    assert view.rerank_depth == params["rerank"] and params["tuned_recall_at_10"] >= 0.95
    assert view.manifest["index_type"] == "IndexIVFPQ"
    assert VECTORS_FILE in view.manifest["checksums"]
    assert view.vectors.dtype == np.float16 and view.vectors.shape == (N, DIM)
    # the index holds codes, not vectors: a fraction of IVF-Flat's bytes
    held = faiss.serialize_index(view.index).nbytes
    assert held < 0.35 * N * (DIM * 4 + 8)
    queries = noisy(x, 100)
    scores, found, tail = view.search(queries, 10, readback=DIM - 1)
    truth = exact_top(x, keys, queries)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.95
    # every score is the exact inner product with the stored (fp16) vector, best first
    stored = x.astype(np.float16).astype(np.float32)
    rows = np.array([[int(k[2:7]) for k in row] for row in found])
    want = np.einsum("qd,qkd->qk", queries, stored[rows])
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(np.stack(tail), stored[rows][:, :, DIM - 1], atol=0)
    np.testing.assert_allclose(view.stored_vectors([keys[5], keys[7]]), stored[[5, 7]])


def test_updates_add_and_remove_without_retraining(compressed):
    backend, x, keys = compressed
    before = backend.view(MODEL)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(before.index))
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    codebooks = faiss.vector_to_array(ivf.pq.centroids)
    new = clustered(50, seed=9)
    added = [f"q/{i:02d}.jpg" for i in range(50)]
    out = backend.update(MODEL, added, new, ["n"] * 50, delete=keys[:30])
    assert out["changed"] and out["count"] == N + 20 and out["removed"] == 30
    view = backend.view(MODEL)
    assert view.manifest["index_params"]["kind"] == "ivfpq"
    assert view.manifest["parent"] == before.version
    ivf = faiss.downcast_index(faiss.extract_index_ivf(view.index))
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids)
    np.testing.assert_array_equal(faiss.vector_to_array(ivf.pq.centroids), codebooks)
    # the full vectors follow the rows: the kept ones, then the added
    assert view.vectors.shape == (N + 20, DIM)
    np.testing.assert_allclose(view.stored_vectors(added[:3] + keys[30:32]),
                               np.concatenate([new[:3], x[30:32]]).astype(np.float16))
    _, found = view.search(new[:5], 1)
    assert [row[0] for row in found] == added[:5]
    _, found = view.search(x[:30], 10)
    assert not set(keys[:30]) & {k for row in found for k in row}
    # a second update, on ids that no longer equal rows
    backend.update(MODEL, [], np.zeros((0, DIM), np.float32), [], delete=added[:2])
    view = backend.view(MODEL)
    np.testing.assert_allclose(view.stored_vectors([added[2]]), new[2:3].astype(np.float16))
    assert view.search(new[2:3], 1)[1] == [[added[2]]]


def test_the_way_back_to_ivf_flat_when_the_budget_allows(compressed):
    backend, x, keys = compressed
    backend.memory_mb = 0  # no budget: the next update restructures
    backend.update(MODEL, ["z.jpg"], x[:1], ["z"])
    view = backend.view(MODEL)
    assert view.manifest["index_params"]["kind"] == "ivf" and view.vectors is None
    assert VECTORS_FILE not in view.manifest["checksums"]
    np.testing.assert_allclose(view.stored_vectors([keys[9]]), x[9:10].astype(np.float16))
    queries = noisy(x, 50)
    _, found = view.search(queries, 10)
    assert recall_at(np.array(found), np.array(exact_top(x, keys, queries))) >= 0.95


def test_ivf_flat_outgrowing_the_budget_is_compressed_at_its_update(tmp_path, monkeypatch):
    monkeypatch.setattr(index_policy, "FLAT_MAX_MADDS", 1000)
    x = clustered()
    keys = [f"p/{i:05d}.jpg" for i in range(N)]
    backend = FaissIndex(tmp_path, memory_mb=0)
    backend.rebuild(MODEL, keys[:-100], x[:-100], ["e"] * (N - 100))
    assert backend.view(MODEL).manifest["index_params"]["kind"] == "ivf"
    backend.memory_mb = 1
    backend.update(MODEL, keys[-100:], x[-100:], ["e"] * 100, delete=keys[:10])
    view = backend.view(MODEL)
    assert index_spec_of(view.index).compressed and view.vectors.shape == (N - 10, DIM)
    np.testing.assert_allclose(view.stored_vectors(keys[-2:] + keys[10:12]),
                               x[[-2, -1, 10, 11]].astype(np.float16), atol=1e-3)
    _, found = view.search(x[-3:], 1)
    assert [row[0] for row in found] == keys[-3:]


def test_a_broken_compressed_version_is_refused(compressed):
    backend, x, _ = compressed
    version = backend.published()
    vdir = backend.repo.versions_dir / version
    path = vdir / VECTORS_FILE
    good = path.read_bytes()

    def refused(match):
        with pytest.raises(IndexLoadError, match=match):
            backend.view(MODEL, version)

    path.write_bytes(good[:-64] + bytes(64))  # damaged
    refused("vectors.npy is corrupt")
    np.save(path, x[:100].astype(np.float16))  # another array under a fixed checksum
    _set_checksum(vdir, VECTORS_FILE)
    refused(r"holds float16 \[100, 33\], not float16 \[12000, 33\]")
    np.save(path, x.astype(np.float32))  # not fp16
    _set_checksum(vdir, VECTORS_FILE)
    refused("holds float32")
    path.write_bytes(b"not an array")
    _set_checksum(vdir, VECTORS_FILE)
    refused("vectors.npy is unusable")
    path.write_bytes(good)
    _set_checksum(vdir, VECTORS_FILE)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["index_params"]["rerank"] = 0
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    refused("index_params.rerank is not a positive integer")
    manifest["index_params"]["rerank"] = 200
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    assert backend.view(MODEL, version).rerank_depth == 200
    _set_checksum(vdir, VECTORS_FILE, drop=VECTORS_FILE)  # the manifest no longer names it
    refused("a compressed index without its vectors")
    path.unlink()
    refused("a compressed index without its vectors")


def test_near_pairs_of_a_compressed_version_are_exact(compressed):
    backend, x, keys = compressed
    twins = x[:40] + 0.004 * np.random.default_rng(3).standard_normal((40, DIM)).astype(
        np.float32)
    twin_keys = [f"t/{i:02d}.jpg" for i in range(40)]
    backend.update(MODEL, twin_keys, twins / np.linalg.norm(twins, axis=1, keepdims=True),
                   ["t"] * 40)
    view = backend.view(MODEL)
    pairs = set()
    for a, b, _ in backend.near_pairs(view, 0.995):
        pairs |= set(zip(a, b))
    assert {(keys[i], twin_keys[i]) for i in range(40)} <= pairs
    stored = view.stored_vectors([a for a, _ in pairs])
    others = view.stored_vectors([b for _, b in pairs])
    assert np.all(np.einsum("ij,ij->i", stored, others) >= 0.995 - 1e-6)


@pytest.mark.parametrize("budget", [0, 1])
def test_many_lists_are_found_by_an_hnsw_graph(tmp_path, monkeypatch, budget):
    """From HNSW_QUANTIZER_LISTS lists the coarse quantizer is an HNSW graph searched wide
    (its breadth written with the index): IVF-Flat and IVF-PQ alike, filters included."""
    from indexer.photo_filter import PhotoFilter

    monkeypatch.setattr(index_policy, "FLAT_MAX_MADDS", 1000)
    monkeypatch.setattr(index_policy, "HNSW_QUANTIZER_LISTS", 64)
    x = clustered()
    keys = [f"f{i % 7}/{i:05d}.jpg" for i in range(N)]
    backend = FaissIndex(tmp_path, memory_mb=budget)
    backend.rebuild(MODEL, keys, x, ["e"] * N, info=[{}] * N)
    view = backend.view(MODEL)
    params = view.manifest["index_params"]
    assert params["kind"] == ("ivfpq" if budget else "ivf")
    assert params["quantizer_ef_search"] == index_policy.HNSW_QUANTIZER_EF
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(view.index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSW)
    assert quantizer.hnsw.efSearch == index_policy.HNSW_QUANTIZER_EF
    if budget:
        assert "_HNSW32," in params["factory"]
    queries = noisy(x, 100)
    _, found = view.search(queries, 10)
    truth = exact_top(x, keys, queries)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.95
    where = PhotoFilter(folders=["f3"])
    rows = [i for i, k in enumerate(keys) if k.startswith("f3/")]
    _, found = view.search(queries, 10, where=where)
    truth = exact_top(x[rows], [keys[i] for i in rows], queries)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.95
    backend.update(MODEL, ["new.jpg"], x[:1], ["n"], delete=keys[:1], info=[{}])
    assert backend.view(MODEL).search(x[:1], 1)[1] == [["new.jpg"]]


def test_the_rerank_depth_is_tuned_with_nprobe(tmp_path, monkeypatch):
    """The PQ codes' own order alone (a depth of k) misses neighbours: the tuning takes the
    first depth that reaches the recall target, and the version searches that deep."""
    monkeypatch.setattr(index_policy, "FLAT_MAX_MADDS", 1000)
    monkeypatch.setattr(index_policy, "RERANK_DEPTHS", (10, 100, 1000))
    x = clustered()
    backend = FaissIndex(tmp_path, memory_mb=1)
    backend.rebuild(MODEL, [f"p/{i:05d}.jpg" for i in range(N)], x, ["e"] * N)
    view = backend.view(MODEL)
    params = view.manifest["index_params"]
    assert params["rerank"] in (100, 1000) and params["tuned_recall_at_10"] >= 0.95
    assert view.rerank_depth == params["rerank"]
