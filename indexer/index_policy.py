"""Which FAISS index a collection gets, and how it is built: exact flat search while a scan is
fast enough, IVF with nprobe tuned to a recall target above that (the way autofaiss chooses),
and IVF-PQ with an exact re-rank when the IVF's float32 vectors would not fit a memory budget.

A compressed ("ivfpq") index holds 8-bit PQ codes, one byte per COMPRESSED_DIMS_PER_BYTE
dimensions (65 bytes for the 257-dimension vectors of a hubness-corrected 256-d model), padded
with zero dimensions to a multiple of that (`Pad` in the factory string: inner products are
unchanged). Its top candidates (RERANK_DEPTHS, tuned) are scored again exactly from the full vectors
(indexer.repository keeps them as fp16 beside the index), so the scores served are exact.
bench/compressed_index.py measured the choice: at 1M, IVF-PQ with 4 dims per byte reaches
recall@10 0.98 after a re-rank of 100, 8 dims per byte never 0.95; OPQ bought nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np


def new_flat_index(dim: int) -> faiss.Index:
    # not index_factory("IDMap2,Flat"): its IndexFlat would be named so in new manifests
    # (`index_type`), where every version so far says IndexFlatIP
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def coarse(nlist: int) -> str:
    """The factory string of an IVF's coarse quantizer: flat (exact) up to
    HNSW_QUANTIZER_LISTS lists, an HNSW graph over the centroids above (assigning 10M vectors
    to 16k centroids by exact scan would take hours on a few cores)."""
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"


def _prepared(index: faiss.Index) -> faiss.Index:
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10  # enough for a coarse quantizer; build time matters at 1M
    ivf.cp.max_points_per_centroid = 64
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        # HNSW's default breadth (16) files a vector under a list that is not its nearest
        # often enough to cap recall at 0.87 (bench/compressed_index.py at 10M); written with
        # the index, so a loaded version searches as wide
        quantizer.hnsw.efSearch = HNSW_QUANTIZER_EF
    return index


def new_ivf_index(dim: int, nlist: int) -> faiss.Index:
    """IVFFlat over inner product, with a direct map: reconstruct(id) and remove_ids work."""
    index = _prepared(faiss.index_factory(dim, f"{coarse(nlist)},Flat",
                                          faiss.METRIC_INNER_PRODUCT))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def new_ivfpq_index(dim: int, nlist: int, code_bytes: int) -> faiss.Index:
    """IVF-PQ over inner product with 8-bit codes, the vectors padded to code_bytes * dims per
    byte (zeros). Adds and removes need no retraining; vectors are not reconstructible (the
    exact ones are kept beside it)."""
    padded = code_bytes * COMPRESSED_DIMS_PER_BYTE
    pad = f"Pad{padded}," if padded != dim else ""
    index = _prepared(faiss.index_factory(dim, f"{pad}{coarse(nlist)},PQ{code_bytes}",
                                          faiss.METRIC_INNER_PRODUCT))
    ivf = faiss.extract_index_ivf(index)
    # polysemous codes serve Hamming-distance filtering, which this search does not use;
    # training them costs ~17x the rest at small sizes
    faiss.downcast_index(ivf).do_polysemous_training = False
    return index


# --- choosing the index type by collection size (the way autofaiss does) ----------------------
# Exact search costs n*dim multiply-adds per query; one core here does about 2e9/s on a memory-
# bound scan (bench/faiss_scale.py: 12.7 ms at 100k x 256), so flat stays under ~5 ms up to
# ~40k vectors of dim 256.
# Above that an IVF index with nprobe tuned to a recall target answers in a few ms. IVF keeps
# stable ids and supports remove_ids (HNSW cannot remove), so `update` works on both kinds.
FLAT_MAX_MADDS = 40_000 * 256
TARGET_RECALL = 0.95
# Above this, IVF-Flat's float32 vectors (dim*4 + 8 bytes a photo: ~1 GB at 1M, 10 GB at 10M)
# give way to IVF-PQ + re-rank (~73 bytes a photo); INDEX_MEMORY_MB sets it (0: no budget)
INDEX_MEMORY_MB = 2048
COMPRESSED_DIMS_PER_BYTE = 4
HNSW_QUANTIZER_LISTS = 8192  # from this many IVF lists (~2M vectors) the lists are found by HNSW
HNSW_QUANTIZER_EF = 128
# candidates re-scored exactly: the first of these reaching the recall target, tuned with
# nprobe (at 10M near-copies of 1,000 photos, 200 left recall at 0.94 whatever nprobe)
RERANK_DEPTHS = (200, 500, 1000)
RERANK_DEPTH = RERANK_DEPTHS[0]  # a version whose manifest names none
PQ_MIN_TRAIN = 39 * 256  # vectors FAISS asks for to train 8-bit codebooks (39 per centroid)
ADD_CHUNK = 100_000
NPROBE_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# when the recall target is out of reach, tuning stops where twice the lists gain less than this
# (recall then depends on the re-rank depth, not on nprobe: at 10M near-copies the tuning
# queries reached 0.933 / 0.943 / 0.944 / 0.944 at nprobe 64 / 128 / 256 / 512)
PLATEAU_GAIN = 0.005


@dataclass(frozen=True)
class IndexSpec:
    kind: str  # "flat" (exact) | "ivf" (IVFFlat) | "ivfpq" (IVF-PQ + exact re-rank)
    nlist: int = 0
    nprobe: int = 0
    code_bytes: int = 0  # ivfpq: PQ code size (8-bit sub-quantizers)

    @property
    def compressed(self) -> bool:
        return self.kind == "ivfpq"

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        if self.kind != "flat":
            out.update(nlist=self.nlist, nprobe=self.nprobe)
        if self.compressed:
            out["code_bytes"] = self.code_bytes
        return out


def index_bytes(kind: str, n: int, dim: int) -> int:
    """About what an index of n vectors holds in memory (ids included; quantizers aside)."""
    if kind == "ivfpq":
        return n * (compressed_code_bytes(dim) + 8)
    return n * (dim * 4 + 8)


def compressed_code_bytes(dim: int) -> int:
    return -(-dim // COMPRESSED_DIMS_PER_BYTE)


def choose_index(n: int, dim: int, flat_max_madds: int | None = None,
                 memory_mb: int | None = None) -> IndexSpec:
    """Flat while an exact scan is fast enough, else IVF with nlist ~ 4*sqrt(n) (power of 2):
    IVF-Flat while its vectors fit `memory_mb` (None: INDEX_MEMORY_MB; 0: no budget), IVF-PQ
    with an exact re-rank above. nprobe is tuned on the data when the index is built."""
    if n * dim <= (FLAT_MAX_MADDS if flat_max_madds is None else flat_max_madds):
        return IndexSpec("flat")
    nlist = int(min(max(2 ** int(round(np.log2(4 * np.sqrt(n)))), 64), 65536))
    budget = INDEX_MEMORY_MB if memory_mb is None else memory_mb
    if budget and index_bytes("ivf", n, dim) > budget * 2 ** 20:
        return IndexSpec("ivfpq", nlist, 0, compressed_code_bytes(dim))
    return IndexSpec("ivf", nlist, 0)


def index_spec_of(index: faiss.Index) -> IndexSpec:
    ivf = ivf_or_none(index)
    if ivf is None:
        return IndexSpec("flat")
    pq = faiss.downcast_index(ivf)
    if isinstance(pq, faiss.IndexIVFPQ):
        return IndexSpec("ivfpq", int(ivf.nlist), int(ivf.nprobe), int(pq.pq.M))
    return IndexSpec("ivf", int(ivf.nlist), int(ivf.nprobe))


def coarse_queries(index: faiss.Index, queries: np.ndarray) -> np.ndarray:
    """Queries in the IVF's own dimension (a padded index's zeros appended): for calls made on
    the IVF inside an index rather than through it."""
    ivf = ivf_or_none(index)
    extra = int(ivf.d) - queries.shape[1]
    if extra <= 0:
        return queries
    return np.ascontiguousarray(np.pad(queries, ((0, 0), (0, extra))), dtype=np.float32)


def ivf_or_none(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def needs_restructure(index: faiss.Index, n: int, flat_max_madds: int | None = None,
                      memory_mb: int | None = None) -> bool:
    """True when a collection of n vectors has outgrown (or shrunk below) its index type:
    flat, ivf and ivfpq as `choose_index` picks them now, or an IVF whose nlist is 4x off (the
    collection grew or shrank 16x since its quantizers were trained: the point where their
    lists grow uneven; PQ codebooks stay valid for new photos of the same model)."""
    have, want = index_spec_of(index), choose_index(n, index.d, flat_max_madds, memory_mb)
    if have.kind != want.kind:
        return True
    return have.kind != "flat" and not (want.nlist / 4 <= have.nlist <= want.nlist * 4)


def index_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, d]) stored in a flat (IndexIDMap2) or IVFFlat index
    (a compressed index holds codes only: its vectors are kept beside it)."""
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


def rerank(queries: np.ndarray, ids: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [Q, k]: the candidate ids of each query (-1: none) scored exactly against
    their full vectors (`vectors_of(ids)`, float32), best first; padded with -inf / -1."""
    out_scores = np.full((len(queries), k), -np.inf, np.float32)
    out_ids = np.full((len(queries), k), -1, np.int64)
    held = ids >= 0
    unique, at = np.unique(ids[held], return_inverse=True)
    if not len(unique):
        return out_scores, out_ids
    vectors = vectors_of(unique)  # one gather for every query's candidates
    rows = np.nonzero(held)[0]
    scores = np.full(ids.shape, -np.inf, np.float32)
    scores[held] = np.einsum("ij,ij->i", vectors[at], queries[rows])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    found = np.take_along_axis(ids, order, 1)
    width = order.shape[1]
    out_scores[:, :width] = top
    out_ids[:, :width] = np.where(np.isfinite(top), found, -1)
    return out_scores, out_ids


def tune_nprobe(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
                queries: np.ndarray | None = None, target_recall: float = TARGET_RECALL,
                k: int = 10, rerank_depths: tuple[int, ...] = ()) -> tuple[int, float, int]:
    """Smallest nprobe whose recall@k against exact search reaches `target_recall`
    (on `queries`, default: noisy copies of stored vectors) -> (nprobe, recall, depth); where
    the target is out of reach, the smallest nprobe whose recall half as many lists come
    within PLATEAU_GAIN of (more lists buy nothing). A compressed index's top `depth` are
    re-scored exactly: the smallest of `rerank_depths` that reaches the target at that nprobe
    (one search per nprobe, its deepest). Leaves nprobe set on the index."""
    ivf = faiss.extract_index_ivf(index)
    if queries is None:
        queries = _tuning_queries(vectors, 256)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    # over the vectors where they are (an IndexFlatIP would copy them: 10 GB at 10M)
    _, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), k,
                        metric=faiss.METRIC_INNER_PRODUCT)
    truth = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    row_of = np.argsort(ids, kind="stable")
    sorted_ids = ids[row_of]
    tried: dict[int, tuple[int, float, int]] = {}
    best = (int(ivf.nlist), 0.0, 0)
    for nprobe in NPROBE_CANDIDATES:
        nprobe = min(nprobe, int(ivf.nlist))
        ivf.nprobe = nprobe
        if rerank_depths:
            _, deepest = index.search(queries, max(k, *rerank_depths))
            for depth in sorted(rerank_depths):
                _, found = rerank(queries, deepest[:, :max(k, depth)], lambda i: vectors[
                    row_of[np.searchsorted(sorted_ids, i)]], k)
                best = (nprobe, recall_at(found, truth, k), depth)
                if best[1] >= target_recall:
                    break
        else:
            _, found = index.search(queries, k)
            best = (nprobe, recall_at(found, truth, k), 0)
        tried[nprobe] = best
        half = tried.get(nprobe // 2) if nprobe % 2 == 0 else None
        if best[1] < target_recall and half is not None and best[1] - half[1] < PLATEAU_GAIN:
            best = half
            break
        if best[1] >= target_recall or nprobe >= ivf.nlist:
            break
    ivf.nprobe = best[0]
    return best


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec | None = None,
                tuning_queries: np.ndarray | None = None,
                target_recall: float = TARGET_RECALL,
                memory_mb: int | None = None) -> tuple[faiss.Index, dict]:
    """An index over `vectors` with stable `ids`, of the type `spec` (default: chosen by size
    and `memory_mb`). Returns (index, params) where params describe the choice for the
    manifest (a compressed index's: its factory string, training sample and re-rank depth;
    the caller keeps the full vectors beside it)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape
    spec = spec or choose_index(n, dim, memory_mb=memory_mb)
    if spec.compressed and n < PQ_MIN_TRAIN:
        spec = IndexSpec("ivf", spec.nlist, spec.nprobe)  # too few to train 8-bit codebooks
    if spec.kind == "flat":
        index = new_flat_index(dim)
        if n:
            index.add_with_ids(vectors, ids)
        return index, spec.to_dict()
    if spec.compressed:
        index = new_ivfpq_index(dim, spec.nlist, spec.code_bytes)
    else:
        index = new_ivf_index(dim, spec.nlist)
    rng = np.random.default_rng(0)
    sample = vectors if n <= spec.nlist * 64 else \
        vectors[np.sort(rng.choice(n, spec.nlist * 64, replace=False))]
    index.train(sample)
    for start in range(0, n, ADD_CHUNK):  # a padded index copies what it adds: in chunks
        index.add_with_ids(vectors[start:start + ADD_CHUNK], ids[start:start + ADD_CHUNK])
    params = spec.to_dict()
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        params["quantizer_ef_search"] = int(quantizer.hnsw.efSearch)
    if spec.compressed:
        params.update(factory=_factory_of(index), trained_on=len(sample),
                      rerank=RERANK_DEPTH, vectors="fp16")
    ivf = faiss.extract_index_ivf(index)
    if spec.nprobe:
        ivf.nprobe = spec.nprobe
    else:
        nprobe, rec, depth = tune_nprobe(index, vectors, ids, tuning_queries, target_recall,
                                         rerank_depths=RERANK_DEPTHS if spec.compressed else ())
        if spec.compressed:
            params["rerank"] = depth
        params.update(nprobe=nprobe, tuned_recall_at_10=round(rec, 4),
                      target_recall_at_10=target_recall,
                      tuning_queries="given" if tuning_queries is not None else "noisy stored")
    return index, params


def _factory_of(index: faiss.Index) -> str:
    ivf = faiss.extract_index_ivf(index)
    pad = f"Pad{ivf.d}," if ivf.d != index.d else ""
    return f"{pad}{coarse(ivf.nlist)},PQ{faiss.downcast_index(ivf).pq.M}"


def rebuild_structure(index: faiss.Index, tuning_queries: np.ndarray | None = None,
                      contents: tuple[np.ndarray, np.ndarray] | None = None,
                      memory_mb: int | None = None) -> tuple[faiss.Index, dict]:
    """The same ids and vectors in the index type their count calls for now (no re-embedding);
    `contents`: (ids, vectors) when the index holds codes only."""
    ids, vecs = contents if contents is not None else index_contents(index)
    return build_index(vecs, ids, tuning_queries=tuning_queries, memory_mb=memory_mb)
