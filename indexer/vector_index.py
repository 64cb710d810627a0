"""One vector-index interface, two backends: FAISS files (the embedded default) and Milvus
(the scale-out one). `open_index(settings)` picks by INDEX_BACKEND; the pipeline, the command
line, the DAGs and the API go through this interface and nothing else.

Vectors go in exactly as `encoder.scoring.Scoring` makes them and come back with inner-product
scores, so both backends rank and score alike. Keys are object keys; every vector carries its
object's etag, so an update can tell what changed.

Whole-model operations (what `python -m indexer rebuild|update|status|prune` does):

    indexed(model_id) -> Indexed | None        the published version: keys -> etags, count
    view(model_id)                             a searchable view of the published version:
                                               .version .count .model_id
                                               .search(queries, k, with_tail=False)
                                               (with_tail: + each hit's stored last
                                               component, what Scoring reads the cosine
                                               back from; no vectors over the wire)
    search(model_id, queries, k)               -> (scores [Q, k'], keys [[...]])
    rebuild(model_id, keys, vectors, etags)    a new version with exactly these, published
    update(model_id, keys, vectors, etags, delete=())
                                               upsert these, delete those, in the published
                                               version (FAISS: a new version; Milvus: in place)
    upsert(...) / delete(model_id, keys)       update with one side only
    status(model_id) -> dict                   backend, version, count (+ alias, collection)
    versions() -> list[str]                    every version held, oldest first
    prune(keep) -> dict                        drop old versions, never a published one

A version written in parts (the DAGs' fanned-out embedding; each part may come from another
process or machine, and a part written twice is written once):

    version = begin(model_id, dim)             new and unpublished; nobody searches it
    write(version, keys, vectors, etags, part) upsert into it (Milvus: by object key; FAISS:
                                               one part file per `part` name, replaced whole)
    remove(version, keys)                      delete keys from it (Milvus only: the FAISS
                                               fan-out stages deletions in its plan)
    publish(version) -> {"version", "count"}   complete -> switch readers to it atomically
    discard(version)                           drop an unpublished version

Errors: `IndexUnavailable` when the index service cannot be reached (Milvus down: retry later);
`IndexLoadError` when the published version is unusable.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from indexer.repository import VERSION_NAME, IndexLoadError, IndexRepository, IndexVersion

BACKENDS = ("faiss", "milvus")
DRAFT_PREFIX = ".draft-"  # FAISS: versions/.draft-<version>/ holds an unpublished version's parts
DRAFT_ABANDONED_S = 2 * 24 * 3600  # an untouched draft this old belongs to no live run


class IndexUnavailable(RuntimeError):
    """The index service does not answer (network, server down). Messages are public: what is
    wrong, never credentials or server paths."""


@dataclass
class Indexed:
    """What the published version of a model holds."""
    version: str
    model_id: str
    count: int
    etags: dict[str, str]  # object key -> etag


def new_version_name() -> str:
    """Sortable by creation time: `20240101T000000000000Z-abc123` (Milvus uses `_` for `-`)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


class VectorIndex:
    """The interface (see the module doc). Subclasses: FaissIndex, milvus_index.MilvusIndex."""
    backend: str = ""
    remote: bool = False  # True: searches are network calls (the API runs them off the loop)

    def indexed(self, model_id: str | None) -> Indexed | None: raise NotImplementedError
    def published(self, model_id: str) -> str | None: raise NotImplementedError
    def view(self, model_id: str, version: str | None = None): raise NotImplementedError
    def close(self) -> None: pass
    def status(self, model_id: str | None = None) -> dict: raise NotImplementedError
    def versions(self) -> list[str]: raise NotImplementedError
    def prune(self, keep: int) -> dict: raise NotImplementedError
    def begin(self, model_id: str, dim: int, extra: dict | None = None,
              tuning_queries: np.ndarray | None = None) -> str: raise NotImplementedError
    def write(self, version: str, keys: list[str], vectors: np.ndarray, etags: list[str],
              part: str = "0") -> int: raise NotImplementedError
    def publish(self, version: str) -> dict: raise NotImplementedError
    def discard(self, version: str) -> None: raise NotImplementedError
    def update(self, model_id: str, keys: list[str], vectors: np.ndarray, etags: list[str],
               delete: Iterable[str] = (), extra: dict | None = None,
               tuning_queries: np.ndarray | None = None) -> dict | None:
        raise NotImplementedError

    # --- built on the above ----------------------------------------------------------------
    def rebuild(self, model_id: str, keys: list[str], vectors: np.ndarray, etags: list[str],
                extra: dict | None = None, tuning_queries: np.ndarray | None = None) -> dict:
        """A new version holding exactly these vectors, published. -> {"version", "count"}"""
        vectors = np.asarray(vectors, np.float32)
        version = self.begin(model_id, vectors.shape[1], extra, tuning_queries)
        try:
            self.write(version, keys, vectors, etags)
            return self.publish(version)
        except BaseException:
            self.discard(version)
            raise

    def upsert(self, model_id: str, keys: list[str], vectors: np.ndarray,
               etags: list[str]) -> dict | None:
        return self.update(model_id, keys, vectors, etags)

    def delete(self, model_id: str, keys: Iterable[str]) -> dict | None:
        return self.update(model_id, [], None, [], delete=keys)

    def search(self, model_id: str, queries: np.ndarray, k: int):
        return self.view(model_id).search(queries, k)


def _check_rows(keys, vectors, etags) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors if vectors is not None else np.zeros((0, 0)),
                                   dtype=np.float32)
    if not (len(keys) == len(etags) == len(vectors)):
        raise ValueError("keys, vectors and etags must have the same length")
    return vectors


class FaissIndex(VectorIndex):
    """Versioned FAISS files under INDEX_DIR with a CURRENT pointer (indexer.repository). Every
    write makes a new version (FAISS cannot search while adding); one pointer serves whichever
    model built it, and the API refuses a version of another model."""
    backend = "faiss"

    def __init__(self, repo: IndexRepository):
        self.repo = repo
        self._loaded: IndexVersion | None = None  # the last version indexed() loaded

    def _load(self) -> IndexVersion | None:
        version = self.repo.current_version()
        if version is None:
            return None
        if self._loaded is None or self._loaded.version != version:
            self._loaded = self.repo.load(version)
        return self._loaded

    def indexed(self, model_id: str | None = None) -> Indexed | None:
        """The CURRENT version (whichever model built it: compare `model_id`)."""
        cur = self._load()
        if cur is None:
            return None
        return Indexed(cur.version, cur.model_id, cur.count, cur.etag_by_key())

    def published(self, model_id: str | None = None) -> str | None:
        return self.repo.current_version()

    def view(self, model_id: str | None = None, version: str | None = None) -> IndexVersion:
        return self.repo.load(version, expect_model_id=model_id)

    def status(self, model_id: str | None = None) -> dict:
        manifest = self.repo.read_manifest() or {}
        return {"backend": self.backend, "version": manifest.get("version"),
                "model_id": manifest.get("model_id"), "count": manifest.get("count", 0)}

    def versions(self) -> list[str]:
        return self.repo.list_versions()

    def prune(self, keep: int) -> dict:
        removed = self.repo.prune(keep)
        # drafts of runs that died (a failed DAG run, a killed rebuild): older than any run
        # still writing one could be
        cutoff = time.time() - DRAFT_ABANDONED_S
        for draft in self.repo.versions_dir.glob(DRAFT_PREFIX + "*"):
            if draft.is_dir() and draft.stat().st_mtime < cutoff:
                shutil.rmtree(draft, ignore_errors=True)
                removed.append(draft.name)
        return {"removed": removed, "versions": len(self.repo.list_versions()),
                "current": self.repo.current_version()}

    # --- a version in parts: versions/.draft-<version>/{draft.json, part-<name>.npz} --------
    def _draft(self, version: str) -> Path:
        if not VERSION_NAME.fullmatch(version):
            raise ValueError("not a valid index version name")
        return self.repo.versions_dir / (DRAFT_PREFIX + version)

    def begin(self, model_id, dim, extra=None, tuning_queries=None) -> str:
        version = new_version_name()
        draft = self._draft(version)
        draft.mkdir(parents=True)
        meta = {"model_id": model_id, "dim": int(dim), "extra": extra or {}}
        (draft / "draft.json").write_text(json.dumps(meta))
        if tuning_queries is not None:
            np.save(draft / "tuning.npy", np.asarray(tuning_queries, np.float32))
        return version

    def write(self, version, keys, vectors, etags, part="0") -> int:
        vectors = _check_rows(keys, vectors, etags)
        draft = self._draft(version)
        if not (draft / "draft.json").is_file():
            raise LookupError(f"no unpublished index version {version}")
        if not VERSION_NAME.fullmatch(str(part)):
            raise ValueError("not a valid part name")
        fd, tmp = tempfile.mkstemp(dir=draft, prefix=".part-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:  # written whole, then renamed: a rewrite replaces it
            np.savez(f, keys=np.asarray(keys, dtype=object).astype(str),
                     etags=np.asarray(etags, dtype=object).astype(str), vectors=vectors)
        os.replace(tmp, draft / f"part-{part}.npz")
        return len(keys)

    def publish(self, version) -> dict:
        """Merge the parts (a key in several parts: the last part by name wins), order by key
        (ids as a single-process rebuild gives them), build, publish."""
        draft = self._draft(version)
        meta = json.loads((draft / "draft.json").read_text())
        rows: dict[str, tuple[str, np.ndarray]] = {}
        for path in sorted(draft.glob("part-*.npz")):
            with np.load(path, allow_pickle=False) as z:
                for k, e, v in zip(z["keys"].tolist(), z["etags"].tolist(), z["vectors"]):
                    rows[k] = (e, v)
        keys = sorted(rows)
        vectors = np.stack([rows[k][1] for k in keys]).astype(np.float32) if keys else \
            np.zeros((0, meta["dim"]), np.float32)
        tuning = np.load(draft / "tuning.npy") if (draft / "tuning.npy").is_file() else None
        out = self.rebuild(meta["model_id"], keys, vectors, [rows[k][0] for k in keys],
                           meta["extra"], tuning)
        shutil.rmtree(draft, ignore_errors=True)
        return out

    def rebuild(self, model_id, keys, vectors, etags, extra=None, tuning_queries=None) -> dict:
        """Built and published in one go (no parts on disk). Ids follow the order given."""
        from indexer.index_policy import build_index

        vectors = _check_rows(keys, vectors, etags)
        ids = np.arange(len(keys), dtype=np.int64)
        # flat while exact search is fast enough, IVF (nprobe tuned to a recall target) above
        index, params = build_index(vectors, ids, tuning_queries=tuning_queries)
        version = self.repo.publish(index, ids, list(keys), list(etags), model_id,
                                    extra={**(extra or {}), "index_params": params})
        return {"version": version, "count": len(keys)}

    def discard(self, version) -> None:
        shutil.rmtree(self._draft(version), ignore_errors=True)

    def update(self, model_id, keys, vectors, etags, delete=(), extra=None,
               tuning_queries=None) -> dict | None:
        """A new version: the current one minus `delete` and the keys given, plus the vectors
        given (new ids after the largest). None when there is no usable current version of
        this model (rebuild instead)."""
        import faiss

        from indexer.index_policy import index_spec_of, needs_restructure, rebuild_structure

        try:
            current = self._load()
        except IndexLoadError:
            return None
        if current is None or current.model_id != model_id:
            return None
        vectors = _check_rows(keys, vectors, etags)
        id_by_key = current.id_by_key()
        drop = [k for k in dict.fromkeys([*delete, *keys]) if k in id_by_key]
        removed = len([k for k in dict.fromkeys(delete) if k in id_by_key and k not in set(keys)])
        if not keys and not drop:
            return {"version": current.version, "count": current.count, "changed": False}
        index = faiss.clone_index(current.index)
        keep = np.ones(len(current.ids), bool)
        if drop:
            drop_ids = np.array([id_by_key[k] for k in drop], dtype=np.int64)
            index.remove_ids(drop_ids)
            keep &= ~np.isin(current.ids, drop_ids)
        next_id = int(current.ids.max()) + 1 if len(current.ids) else 0
        new_ids = np.arange(next_id, next_id + len(keys), dtype=np.int64)
        if len(new_ids):
            index.add_with_ids(vectors, new_ids)
        ids = np.concatenate([current.ids[keep], new_ids])
        all_keys = [k for k, m in zip(current.keys, keep) if m] + list(keys)
        all_etags = [e for e, m in zip(current.etags, keep) if m] + list(etags)
        extra = {**(extra or {}), "parent": current.version}
        if needs_restructure(index, index.ntotal):
            # the collection outgrew its index type (or shrank below it): same vectors, new type
            index, extra["index_params"] = rebuild_structure(index, tuning_queries)
        else:
            extra["index_params"] = {**current.manifest.get("index_params", {}),
                                     **index_spec_of(index).to_dict()}
        version = self.repo.publish(index, ids, all_keys, all_etags, model_id, extra=extra)
        return {"version": version, "count": len(ids), "changed": True, "removed": removed}


def as_index(index_or_repo) -> VectorIndex:
    """A VectorIndex as is; an IndexRepository (the FAISS layout) wrapped in FaissIndex."""
    if isinstance(index_or_repo, VectorIndex):
        return index_or_repo
    if isinstance(index_or_repo, IndexRepository):
        return FaissIndex(index_or_repo)
    raise TypeError(f"not an index: {type(index_or_repo).__name__}")


def open_index(settings) -> VectorIndex:
    """The backend INDEX_BACKEND names: `faiss` (files under INDEX_DIR) or `milvus`
    (MILVUS_URI, MILVUS_TOKEN; collections named after MILVUS_COLLECTION_PREFIX)."""
    backend = settings.index_backend
    if backend == "faiss":
        return FaissIndex(IndexRepository(settings.index_dir))
    if backend == "milvus":
        from indexer.milvus_index import MilvusIndex

        return MilvusIndex.from_settings(settings)
    raise ValueError(f"INDEX_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}")
