"""Which FAISS index a collection gets, and how it is built: exact flat search while a scan is
fast enough, IVF with nprobe tuned to a recall target above that (the way autofaiss chooses).
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


def new_flat_index(dim: int) -> faiss.Index:
    # not index_factory("IDMap2,Flat"): its IndexFlat would be named so in new manifests
    # (`index_type`), where every version so far says IndexFlatIP
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def new_ivf_index(dim: int, nlist: int) -> faiss.Index:
    """IVFFlat over inner product, with a direct map: reconstruct(id) and remove_ids work."""
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # enough for a coarse quantizer; build time matters at 1M
    index.cp.max_points_per_centroid = 64
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


# --- choosing the index type by collection size (the way autofaiss does) ----------------------
# Exact search costs n*dim multiply-adds per query; one core here does about 2e9/s on a memory-
# bound scan (bench/faiss_scale.py: 12.7 ms at 100k x 256), so flat stays under ~5 ms up to
# ~40k vectors of dim 256.
# Above that an IVF index with nprobe tuned to a recall target answers in a few ms. IVF keeps
# stable ids and supports remove_ids (HNSW cannot remove), so `update` works on both kinds.
FLAT_MAX_MADDS = 40_000 * 256
TARGET_RECALL = 0.95
NPROBE_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class IndexSpec:
    kind: str  # "flat" (exact) | "ivf" (IVFFlat, inner product)
    nlist: int = 0
    nprobe: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, **({"nlist": self.nlist, "nprobe": self.nprobe}
                                      if self.kind == "ivf" else {})}


def choose_index(n: int, dim: int, flat_max_madds: int | None = None) -> IndexSpec:
    """Flat while an exact scan is fast enough, else IVF with nlist ~ 4*sqrt(n) (power of 2);
    nprobe is tuned on the data when the index is built (`build_index`)."""
    if n * dim <= (FLAT_MAX_MADDS if flat_max_madds is None else flat_max_madds):
        return IndexSpec("flat")
    nlist = 2 ** int(round(np.log2(4 * np.sqrt(n))))
    return IndexSpec("ivf", int(min(max(nlist, 64), 65536)), 0)


def index_spec_of(index: faiss.Index) -> IndexSpec:
    ivf = ivf_or_none(index)
    if ivf is None:
        return IndexSpec("flat")
    return IndexSpec("ivf", int(ivf.nlist), int(ivf.nprobe))


def ivf_or_none(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def needs_restructure(index: faiss.Index, n: int, flat_max_madds: int | None = None) -> bool:
    """True when a collection of n vectors has outgrown (or shrunk below) its index type:
    flat <-> ivf, or an IVF whose nlist is 4x off what `choose_index` would pick now."""
    have, want = index_spec_of(index), choose_index(n, index.d, flat_max_madds)
    if have.kind != want.kind:
        return True
    return have.kind == "ivf" and not (want.nlist / 4 <= have.nlist <= want.nlist * 4)


def index_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, d]) stored in a flat (IndexIDMap2) or IVFFlat index."""
    ivf = ivf_or_none(index)
    if ivf is None:
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vecs = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else \
            np.zeros((0, index.d), np.float32)
        return ids, np.asarray(vecs, np.float32)
    invlists = ivf.invlists
    ids, vecs = [], []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if not size:
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size).copy()
        vecs.append(codes.view(np.float32).reshape(size, ivf.d))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(vecs)


def _tuning_queries(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Stand-ins for real queries: stored vectors moved away by noise of 1.2x their norm
    (cosine ~0.6 to the source, about what a matching caption scores against its image)."""
    rng = np.random.default_rng(seed)
    pick = vectors[rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)]
    noise = rng.standard_normal(pick.shape).astype(np.float32)
    noise *= 1.2 * np.linalg.norm(pick, axis=1, keepdims=True) / \
        np.linalg.norm(noise, axis=1, keepdims=True)
    return np.ascontiguousarray(pick + noise, dtype=np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def tune_nprobe(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
                queries: np.ndarray | None = None, target_recall: float = TARGET_RECALL,
                k: int = 10) -> tuple[int, float]:
    """Smallest nprobe whose recall@k against exact search reaches `target_recall`
    (on `queries`, default: noisy copies of stored vectors). Leaves it set on the index."""
    ivf = faiss.extract_index_ivf(index)
    if queries is None:
        queries = _tuning_queries(vectors, 256)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, rows = exact.search(queries, k)
    truth = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    best = (int(ivf.nlist), 0.0)
    for nprobe in NPROBE_CANDIDATES:
        nprobe = min(nprobe, int(ivf.nlist))
        ivf.nprobe = nprobe
        _, found = index.search(queries, k)
        rec = recall_at(found, truth, k)
        best = (nprobe, rec)
        if rec >= target_recall or nprobe >= ivf.nlist:
            break
    ivf.nprobe = best[0]
    return best


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec | None = None,
                tuning_queries: np.ndarray | None = None,
                target_recall: float = TARGET_RECALL) -> tuple[faiss.Index, dict]:
    """An index over `vectors` with stable `ids`, of the type `spec` (default: chosen by size).
    Returns (index, params) where params describe the choice for the manifest."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape
    spec = spec or choose_index(n, dim)
    if spec.kind == "flat":
        index = new_flat_index(dim)
        if n:
            index.add_with_ids(vectors, ids)
        return index, spec.to_dict()
    ivf = new_ivf_index(dim, spec.nlist)
    rng = np.random.default_rng(0)
    sample = vectors if n <= spec.nlist * 64 else \
        vectors[np.sort(rng.choice(n, spec.nlist * 64, replace=False))]
    ivf.train(sample)
    ivf.add_with_ids(vectors, ids)
    params = {"kind": "ivf", "nlist": spec.nlist}
    if spec.nprobe:
        ivf.nprobe = spec.nprobe
        params["nprobe"] = spec.nprobe
    else:
        nprobe, rec = tune_nprobe(ivf, vectors, ids, tuning_queries, target_recall)
        params.update(nprobe=nprobe, tuned_recall_at_10=round(rec, 4),
                      target_recall_at_10=target_recall,
                      tuning_queries="given" if tuning_queries is not None else "noisy stored")
    return ivf, params


def rebuild_structure(index: faiss.Index, tuning_queries: np.ndarray | None = None
                      ) -> tuple[faiss.Index, dict]:
    """The same ids and vectors in the index type their count calls for now (no re-embedding)."""
    ids, vecs = index_contents(index)
    return build_index(vecs, ids, tuning_queries=tuning_queries)
