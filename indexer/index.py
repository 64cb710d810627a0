"""Versioned, persisted FAISS indexes with an atomic CURRENT pointer.

Layout under the index directory:
    versions/<version>/index.faiss   FAISS index over inner product (vectors are L2-normalised):
                                     IndexIDMap2(IndexFlatIP) while exact search is fast enough,
                                     IndexIVFFlat above that (`choose_index`; ids stay stable)
    versions/<version>/table.json    ids, object keys and content etags, in the same order
    versions/<version>/manifest.json model id, dim, count, created, index type, checksums
    CURRENT                          the name of the published version

A version is written under a temporary name and renamed into place, then CURRENT is replaced
atomically: readers see the old version or the new one, never a partial one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from indexer.store import sha256_file

MANIFEST_FORMAT = "flickr-search-index/1"


class IndexLoadError(RuntimeError):
    """The index on disk is missing, corrupt or does not match the model."""


@dataclass
class IndexVersion:
    version: str
    manifest: dict
    index: faiss.Index
    ids: np.ndarray  # int64, aligned with keys
    keys: list[str]
    etags: list[str]
    _by_id: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_id = {int(i): n for n, i in enumerate(self.ids)}

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def key_of(self, vid: int) -> str:
        return self.keys[self._by_id[int(vid)]]

    def etag_by_key(self) -> dict[str, str]:
        return dict(zip(self.keys, self.etags))

    @cached_property
    def _id_of_key(self) -> dict[str, int]:
        return {k: int(i) for k, i in zip(self.keys, self.ids)}

    def id_by_key(self) -> dict[str, int]:
        return dict(self._id_of_key)

    def stored_vectors(self, keys: list[str]) -> np.ndarray:
        """The vectors the index holds for these keys (as published)."""
        return np.stack([self.index.reconstruct(self._id_of_key[k]) for k in keys]) if keys \
            else np.zeros((0, self.index.d), np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k per query: (scores [Q, k'], keys) with k' = min(k, count)."""
        k = min(k, self.count)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        keys = [[self.key_of(i) for i in row if i >= 0] for row in ids]
        return scores[:, : max((len(r) for r in keys), default=0)], keys


def new_flat_index(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


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
    ivf = _ivf_or_none(index)
    if ivf is None:
        return IndexSpec("flat")
    return IndexSpec("ivf", int(ivf.nlist), int(ivf.nprobe))


def _ivf_or_none(index: faiss.Index):
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
    ivf = _ivf_or_none(index)
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
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.cp.niter = 10  # enough for a coarse quantizer; build time matters at 1M
    ivf.cp.max_points_per_centroid = 64
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) and remove_ids
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


class IndexRepository:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # --- reading ---------------------------------------------------------------------------
    def current_version(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def list_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def read_manifest(self, version: str | None = None) -> dict | None:
        version = version or self.current_version()
        if version is None:
            return None
        try:
            return json.loads((self.versions_dir / version / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def load(self, version: str | None = None, expect_model_id: str | None = None) -> IndexVersion:
        version = version or self.current_version()
        if version is None:
            raise IndexLoadError(f"no published index under {self.root} (run `python -m indexer rebuild`)")
        vdir = self.versions_dir / version
        try:
            manifest = json.loads((vdir / "manifest.json").read_text())
        except FileNotFoundError:
            raise IndexLoadError(f"index version {version} is missing its manifest") from None
        except json.JSONDecodeError:
            raise IndexLoadError(f"index version {version}: manifest is corrupt") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise IndexLoadError(f"index version {version}: unknown format {manifest.get('format')!r}")
        if expect_model_id is not None and manifest["model_id"] != expect_model_id:
            raise IndexLoadError(
                f"index version {version} was built by model {manifest['model_id']}, "
                f"but the loaded model is {expect_model_id}; rebuild the index for this model")
        for name, digest in manifest["checksums"].items():
            path = vdir / name
            if not path.is_file():
                raise IndexLoadError(f"index version {version}: {name} is missing")
            if sha256_file(path) != digest:
                raise IndexLoadError(f"index version {version}: {name} is corrupt (checksum mismatch)")
        try:
            index = faiss.read_index(str(vdir / "index.faiss"))
        except RuntimeError as exc:
            raise IndexLoadError(f"index version {version}: cannot read index.faiss: {exc}") from None
        table = json.loads((vdir / "table.json").read_text())
        ids = np.asarray(table["ids"], dtype=np.int64)
        if index.ntotal != len(ids) or index.d != manifest["dim"]:
            raise IndexLoadError(f"index version {version}: index and table disagree")
        nprobe = (manifest.get("index_params") or {}).get("nprobe")
        ivf = _ivf_or_none(index)
        if ivf is not None and nprobe:
            ivf.nprobe = int(nprobe)
        return IndexVersion(version, manifest, index, ids, table["keys"], table["etags"])

    # --- writing ---------------------------------------------------------------------------
    def publish(self, index: faiss.Index, ids: np.ndarray, keys: list[str], etags: list[str],
                model_id: str, extra: dict | None = None) -> str:
        """Write a complete new version, then point CURRENT at it. Returns the version name."""
        if not (index.ntotal == len(ids) == len(keys) == len(etags)):
            raise ValueError("index, ids, keys and etags must have the same length")
        now = datetime.now(timezone.utc)
        version = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".tmp-"))
        try:
            faiss.write_index(index, str(tmp / "index.faiss"))
            (tmp / "table.json").write_text(json.dumps(
                {"ids": [int(i) for i in ids], "keys": list(keys), "etags": list(etags)}))
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": version,
                "model_id": model_id,
                "dim": int(index.d),
                "count": int(index.ntotal),
                "created": now.isoformat(),
                "index_type": type(faiss.downcast_index(index.index)).__name__
                if isinstance(index, faiss.IndexIDMap2) else type(index).__name__,
                "checksums": {n: sha256_file(tmp / n) for n in ("index.faiss", "table.json")},
                # what choose_index/build_index picked (kind, nlist, nprobe, tuned recall)
                "index_params": index_spec_of(index).to_dict(),
                **(extra or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            os.rename(tmp, self.versions_dir / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_current(version)
        return version

    def _point_current(self, version: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".CURRENT-")
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "CURRENT")

    def prune(self, keep: int = 3) -> list[str]:
        """Delete old versions beyond the newest `keep` (never the current one) and stale temps."""
        current = self.current_version()
        removed = []
        for name in self.list_versions()[:-keep] if keep else self.list_versions():
            if name != current:
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)
                removed.append(name)
        if self.versions_dir.is_dir():
            for p in self.versions_dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        return removed
