"""The FAISS backend of `indexer.vector_index` (INDEX_BACKEND=faiss, the embedded default):
versioned FAISS files under INDEX_DIR with a CURRENT pointer (indexer.repository holds the
files; indexer.index_policy picks the index type).

Every write makes a new version (FAISS cannot search while adding); one pointer serves whichever
model built it, and a view of another model's version is refused.

A version written in parts is a draft beside the versions, invisible to readers:

    versions/.draft-<version>/draft.json          model id, dim, extra manifest fields, and
                                                  `base`: the version an update applies to
                                                  (none: a rebuild)
    versions/.draft-<version>/tuning.npy          the model's tuning queries (IVF nprobe)
    versions/.draft-<version>/part-<part>.npz     a part's keys, etags, vectors and their
                                                  metadata (a Parquet table as bytes; absent:
                                                  none given), replaced whole when the part is
                                                  written again
    versions/.draft-<version>/removed-<part>.json a part's deleted keys

`publish` merges the parts (a key in several: the last part by name wins), orders them by key
(the ids a single-process rebuild gives), builds the index and commits it under the draft's
name: a rebuild as it is, an update applied to its base (which must still be published).
A publish killed part-way leaves CURRENT on the old version or the new one: retried, it writes
again a version folder it had finished but not yet pointed CURRENT at, or finds its draft already
published. `prune` removes the drafts that can never publish (already committed, or updates of
a version no longer published) and, after DRAFT_ABANDONED_S, any other.

The photos' metadata follows its rows: each version's `info.parquet` (indexer.repository) is
assembled from the parts at publish, and an update keeps the rows it does not touch. A
version is written with a table whenever any row of it has metadata; one without (made before,
or by writers that gave none) stays without until an update brings some.
"""
from __future__ import annotations

import bisect
import json
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from core.atomic import atomic_dir, atomic_file, write_atomic
from indexer.photo_columns import check_infos, clean_info
from indexer.index_policy import index_spec_of
from indexer.photo_table import PhotoTable
from indexer.repository import VECTORS_CHUNK, VERSION_NAME, IndexRepository, IndexVersion
from indexer.vector_index import (
    DraftGone,
    Indexed,
    IndexLoadError,
    VectorIndex,
    check_rows,
    new_version_name,
    pairs_above,
    probe_vectors,
)

DRAFT_PREFIX = ".draft-"  # versions/.draft-<version>/ holds an unpublished version's parts
DRAFT_ABANDONED_S = 2 * 24 * 3600  # an untouched draft this old belongs to no live run
DRAFT_FILE = "draft.json"
LEGACY_STAGING = "staging"  # INDEX_DIR/staging/: update parts of runs planned by older code


class FaissIndex(VectorIndex):
    """Versioned FAISS files (see the module doc)."""
    backend = "faiss"

    def __init__(self, repo: IndexRepository | str | Path, memory_mb: int | None = None):
        """memory_mb: the budget of the index type's choice (indexer.index_policy; None: its
        default, 0: none)."""
        self.repo = repo if isinstance(repo, IndexRepository) else IndexRepository(repo)
        self.memory_mb = memory_mb
        self._loaded: IndexVersion | None = None  # the last version indexed() loaded
        self._table: tuple[str, list[tuple[str, str]]] | None = None  # keys_page's version

    @classmethod
    def from_settings(cls, settings) -> "FaissIndex":
        return cls(IndexRepository(settings.index_dir), settings.index_memory_mb)

    def _load(self) -> IndexVersion | None:
        version = self.repo.current_version()
        if version is None:
            return None
        if self._loaded is None or self._loaded.version != version:
            self._loaded = self.repo.load(version)
        return self._loaded

    # --- reading -----------------------------------------------------------------------------
    def published(self, model_id: str | None = None) -> str | None:
        """The version CURRENT names, whichever model built it (`view` checks the model)."""
        return self.repo.current_version()

    def view(self, model_id: str | None, version: str | None = None) -> IndexVersion:
        """Loaded and checked (checksums, table, model id: IndexLoadError)."""
        return self.repo.load(version, expect_model_id=model_id)

    def indexed(self, model_id: str | None = None) -> Indexed | None:
        """The CURRENT version (whichever model built it: compare `model_id`)."""
        cur = self._load()
        if cur is None:
            return None
        return Indexed(cur.version, cur.model_id, cur.count, cur.etag_by_key())

    def status(self, model_id: str | None = None) -> dict:
        manifest = self.repo.read_manifest() or {}
        return {"backend": self.backend, "version": manifest.get("version"),
                "model_id": manifest.get("model_id"), "count": manifest.get("count", 0)}

    def versions(self) -> list[str]:
        return self.repo.list_versions()

    def keys_page(self, version, after=None, limit=10_000) -> list[tuple[str, str]]:
        """From the version's key table: one file, read and sorted once per version (kept
        while pages of that version are asked for)."""
        if self._table is None or self._table[0] != version:
            keys, etags = self.repo.read_key_table(version)
            self._table = (version, sorted(zip(keys, etags)))
        rows = self._table[1]
        start = 0 if after is None else bisect.bisect_right(rows, after, key=lambda r: r[0])
        stop = min(len(rows), start + max(1, int(limit)))
        if stop < len(rows):  # a key held twice stays in one page, where verify sees it
            stop = bisect.bisect_right(rows, rows[stop - 1][0], key=lambda r: r[0])
        return rows[start:stop]

    def prune(self, keep: int) -> dict:
        removed = self.repo.prune(keep)
        current = self.repo.current_version()
        committed = set(self.repo.list_versions())
        # drafts that can never publish: one already committed (a publish killed after it
        # moved CURRENT), an update of a version no longer published (a run killed, then
        # overtaken); and drafts of runs that died (a failed DAG run, a killed rebuild) older
        # than any run still writing one could be
        cutoff = time.time() - DRAFT_ABANDONED_S
        for draft in self.repo.versions_dir.glob(DRAFT_PREFIX + "*"):
            if draft.is_dir() and (draft.name[len(DRAFT_PREFIX):] in committed or
                                   self._draft_base(draft) not in (None, current) or
                                   draft.stat().st_mtime < cutoff):
                shutil.rmtree(draft, ignore_errors=True)
                removed.append(draft.name)
        shutil.rmtree(self.repo.root / LEGACY_STAGING, ignore_errors=True)
        return {"removed": removed, "versions": len(self.repo.list_versions()),
                "current": self.repo.current_version()}

    def near_pairs(self, view: IndexVersion, threshold, columns=None, batch=1024,
                   progress=None):
        """FAISS's own range search around each stored vector, `batch` at a time (on IVF over
        the lists the version's nprobe probes: a pair in lists that far apart is missed). A
        compressed version's codes score only approximately: its pairs come from searches
        re-scored exactly (the interface's way)."""
        if view.vectors is not None:
            yield from super().near_pairs(view, threshold, columns, batch, progress)
            return
        position = {int(i): n for n, i in enumerate(view.ids)}
        for start in range(0, view.count, batch):
            ids = view.ids[start:start + batch]
            queries = probe_vectors(view.vectors_of_ids(ids), columns)
            limits, scores, found = view.index.range_search(queries, float(threshold))
            keys_a = [view.keys[start + n] for n in range(len(ids))]
            keys_b = [[view.keys[position[int(i)]] for i in found[limits[n]:limits[n + 1]]]
                      for n in range(len(ids))]
            yield pairs_above(keys_a, keys_b, [scores[limits[n]:limits[n + 1]]
                                               for n in range(len(ids))], threshold)
            if progress is not None:
                progress(len(ids))

    # --- a version in parts ------------------------------------------------------------------
    def _draft(self, version: str) -> Path:
        if not VERSION_NAME.fullmatch(str(version)):
            raise ValueError("not a valid index version name")
        return self.repo.versions_dir / (DRAFT_PREFIX + version)

    def _draft_meta(self, version: str) -> tuple[Path, dict]:
        draft = self._draft(version)
        try:
            return draft, json.loads((draft / DRAFT_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise DraftGone(f"no unpublished index version {version} (discarded, or made "
                            "obsolete by a newer published version)") from None

    def begin(self, model_id, dim, extra=None, tuning_queries=None, base=None) -> str:
        if base is not None:
            if self.repo.current_version() != base:
                raise DraftGone(f"index version {base} is no longer published")
            self._drop_drafts_not_on(base)
        version = new_version_name()
        with atomic_dir(self._draft(version)) as tmp:  # a draft is whole or absent
            (tmp / DRAFT_FILE).write_text(json.dumps(
                {"model_id": model_id, "dim": int(dim), "extra": extra or {}, "base": base}))
            if tuning_queries is not None:
                np.save(tmp / "tuning.npy", np.asarray(tuning_queries, np.float32))
        return version

    @staticmethod
    def _draft_base(draft: Path) -> str | None:
        """The version a draft updates (None: a rebuild); "" when its draft.json is unreadable
        (a draft that can never publish)."""
        try:
            return json.loads((draft / DRAFT_FILE).read_text()).get("base")
        except (OSError, ValueError, AttributeError):
            return ""

    def _drop_drafts_not_on(self, base: str) -> None:
        """Update drafts of another base can never publish (that version was replaced)."""
        for draft in self.repo.versions_dir.glob(DRAFT_PREFIX + "*"):
            if self._draft_base(draft) not in (None, base):
                shutil.rmtree(draft, ignore_errors=True)

    def _part_name(self, part) -> str:
        if not VERSION_NAME.fullmatch(str(part)):
            raise ValueError("not a valid part name")
        return str(part)

    def write(self, version, keys, vectors, etags, part="0", info=None) -> int:
        vectors = check_rows(keys, vectors, etags)
        photos = _photo_table(keys, info)
        draft, meta = self._draft_meta(version)
        if len(keys) and vectors.shape[1] != meta["dim"]:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} for a version of "
                             f"dimension {meta['dim']}")
        extra = {} if photos is None else \
            {"info": np.frombuffer(photos.to_bytes(), dtype=np.uint8)}
        with atomic_file(draft / f"part-{self._part_name(part)}.npz") as f:
            np.savez(f, keys=np.asarray(keys, dtype=object).astype(str),
                     etags=np.asarray(etags, dtype=object).astype(str), vectors=vectors,
                     **extra)
        return len(keys)

    def remove(self, version, keys, part="0") -> int:
        """Recorded in the draft, applied to its base at publish."""
        keys = list(dict.fromkeys(keys))
        draft, _ = self._draft_meta(version)
        write_atomic(draft / f"removed-{self._part_name(part)}.json", json.dumps(keys))
        return len(keys)

    def publish(self, version, parts: Iterable[str] | None = None) -> dict:
        draft, meta = self._draft_meta(version)
        if parts is not None:
            parts = [self._part_name(p) for p in parts]
            missing = [p for p in parts if not (draft / f"part-{p}.npz").is_file()]
            if missing:
                raise DraftGone(f"part {missing[0]} of {len(parts)} is missing")
        keys, etags, vectors, photos = _merge_parts(sorted(draft.glob("part-*.npz")),
                                                    meta["dim"])
        removed = list(dict.fromkeys(k for path in sorted(draft.glob("removed-*.json"))
                                     for k in json.loads(path.read_text())))
        tuning = np.load(draft / "tuning.npy") if (draft / "tuning.npy").is_file() else None
        if meta.get("base") is None:
            out = self._build(meta["model_id"], keys, vectors, etags, meta["extra"], tuning,
                              version, photos)
        else:
            current = self._load()
            if current is None or current.version != meta["base"] or \
                    current.model_id != meta["model_id"]:
                raise DraftGone(f"index version {meta['base']}, which this draft updates, is "
                                "no longer published")
            if not keys and not removed:
                shutil.rmtree(draft, ignore_errors=True)
                return {"version": current.version, "count": current.count, "changed": False}
            out = self._apply(current, keys, vectors, etags, removed, meta["extra"], tuning,
                              version, photos)
        shutil.rmtree(draft, ignore_errors=True)
        return out

    def discard(self, version) -> None:
        shutil.rmtree(self._draft(version), ignore_errors=True)

    # --- built and published in one go (no parts on disk) --------------------------------------
    def rebuild(self, model_id, keys, vectors, etags, extra=None, tuning_queries=None,
                info=None) -> dict:
        """Ids follow the order given."""
        return self._build(model_id, keys, check_rows(keys, vectors, etags), etags, extra,
                           tuning_queries, photos=_photo_table(keys, info))

    def _build(self, model_id, keys, vectors, etags, extra, tuning_queries,
               version: str | None = None, photos: PhotoTable | None = None) -> dict:
        from indexer.index_policy import build_index

        vectors = check_rows(keys, vectors, etags)
        ids = np.arange(len(keys), dtype=np.int64)
        # flat while exact search is fast enough, IVF (nprobe tuned to a recall target) above,
        # IVF-PQ + exact re-rank when IVF's vectors exceed the memory budget
        index, params = build_index(vectors, ids, tuning_queries=tuning_queries,
                                    memory_mb=self.memory_mb)
        version = self.repo.commit_version(index, ids, list(keys), list(etags), model_id,
                                           extra={**(extra or {}), "index_params": params},
                                           version=version, photos=photos,
                                           vectors=_full_vectors(index, [vectors]))
        return {"version": version, "count": len(keys)}

    def update(self, model_id, keys, vectors, etags, delete=(), extra=None,
               tuning_queries=None, info=None) -> dict | None:
        """A new version: the current one minus `delete` and the keys given, plus the vectors
        given (new ids after the largest). None when there is no usable current version of
        this model (rebuild instead)."""
        try:
            current = self._load()
        except IndexLoadError:
            return None
        if current is None or current.model_id != model_id:
            return None
        vectors = check_rows(keys, vectors, etags)
        return self._apply(current, keys, vectors, etags, delete, extra, tuning_queries,
                           photos=_photo_table(keys, info))

    def _apply(self, current: IndexVersion, keys, vectors, etags, delete, extra,
               tuning_queries, version: str | None = None,
               photos: PhotoTable | None = None) -> dict:
        from indexer.index_policy import needs_restructure, rebuild_structure

        id_by_key = current.id_by_key()
        drop = [k for k in dict.fromkeys([*delete, *keys]) if k in id_by_key]
        removed = len([k for k in dict.fromkeys(delete) if k in id_by_key and k not in set(keys)])
        if not keys and not drop:
            return {"version": current.version, "count": current.count, "changed": False}
        index = self.repo.writable_index(current.version)
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
        if current.vectors is None:
            kept = None  # the index holds the vectors itself
        else:  # a compressed version's full vectors: the kept rows, then the new ones
            kept = [*(current.vectors[s:s + VECTORS_CHUNK][keep[s:s + VECTORS_CHUNK]]
                      for s in range(0, len(keep), VECTORS_CHUNK)), vectors]
        if needs_restructure(index, index.ntotal, memory_mb=self.memory_mb):
            # the collection outgrew its index type (or shrank below it): same vectors, new type
            contents = None if kept is None else \
                (ids, np.concatenate([np.asarray(v, np.float32) for v in kept]))
            old = index
            index, extra["index_params"] = rebuild_structure(
                old, tuning_queries, contents, memory_mb=self.memory_mb)
            if kept is None:  # compressed now: the full vectors from the index that held them
                kept = (old.reconstruct_batch(ids[s:s + VECTORS_CHUNK])
                        for s in range(0, len(ids), VECTORS_CHUNK))
        else:
            extra["index_params"] = {**current.manifest.get("index_params", {}),
                                     **index_spec_of(index).to_dict()}
        if photos is None and current.photos is None:
            all_photos = None  # a version without metadata, and none given: it stays so
        else:
            all_photos = PhotoTable.concat([
                current.photos.take(np.flatnonzero(keep)) if current.photos is not None
                else PhotoTable.empty(int(keep.sum())),
                photos if photos is not None else PhotoTable.empty(len(keys))])
        version = self.repo.commit_version(index, ids, all_keys, all_etags, current.model_id,
                                           extra=extra, version=version, photos=all_photos,
                                           vectors=_full_vectors(index, kept))
        return {"version": version, "count": len(ids), "changed": True, "removed": removed}


def _merge_parts(paths: list[Path], dim: int) -> tuple[list[str], list[str], np.ndarray,
                                                      PhotoTable | None]:
    """The rows of a draft's parts, one per key (a key in several: the last part wins), ordered
    by key: (keys, etags, vectors float32 [n, dim], metadata or None when no part has any).
    Parts are read one at a time into the one array of vectors the index is built from: at
    10M photos a second copy would be 10 GB."""
    part_keys = []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            part_keys.append(z["keys"])
    if not part_keys or not sum(map(len, part_keys)):
        return [], [], np.zeros((0, dim), np.float32), None
    every = np.concatenate(part_keys)
    # np.unique keeps a key's first occurrence: over the rows reversed, that is its last
    keys, first_reversed = np.unique(every[::-1], return_index=True)
    source = len(every) - 1 - first_reversed  # the row (over all parts) each key comes from
    del every
    by_source = np.argsort(source, kind="stable")
    sorted_source = source[by_source]
    vectors = np.empty((len(keys), dim), np.float32)
    etags = np.empty(len(keys), dtype=object)
    tables, with_info, start = [], False, 0
    for path, names in zip(paths, part_keys):
        end = start + len(names)
        lo, hi = np.searchsorted(sorted_source, [start, end])
        into, rows = by_source[lo:hi], sorted_source[lo:hi] - start
        with np.load(path, allow_pickle=False) as z:
            if len(rows):
                vectors[into] = z["vectors"][rows]
                etags[into] = z["etags"][rows].tolist()
            if "info" in z:
                tables.append(PhotoTable.read(z["info"].tobytes(), rows=len(names)))
                with_info = True
            else:
                tables.append(PhotoTable.empty(len(names)))
        start = end
    photos = PhotoTable.concat(tables).take(source) if with_info else None
    return keys.tolist(), etags.tolist(), vectors, photos


def _full_vectors(index, chunks: Iterable[np.ndarray] | None) -> Iterable[np.ndarray] | None:
    """What a version keeps beside its index: the full vectors when the index is compressed."""
    return chunks if index_spec_of(index).compressed else None


def _photo_table(keys: list[str], info: list | None) -> PhotoTable | None:
    """The metadata given with these rows as a table (None: none given)."""
    info = check_infos(info, len(keys))
    if info is None:
        return None
    return PhotoTable.from_rows([clean_info(i, k) for i, k in zip(info, keys)])
