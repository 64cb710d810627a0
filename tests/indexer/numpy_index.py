"""A third `VectorIndex` backend, for tests only: exact inner-product search in NumPy.

It checks the seam: registered with one line (tests/indexer/conftest.py), it passes the same
contract suite as FAISS and Milvus. Published versions are files (INDEX_DIR/numpy/<version>.npz,
one `published.json` of model id -> version), so another process opening the same INDEX_DIR
serves them; drafts live in the writing process.

Metadata: one JSON text per row in the .npz (a version without it loads, with no metadata);
filters are `PhotoFilter.matches` row by row, then exact search over the rows that pass: the
plain definition the other backends' fast forms must agree with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_file, write_atomic
from indexer import photo_columns
from indexer.photo_filter import PhotoFilter, active
from indexer.vector_index import (
    DraftGone,
    Indexed,
    IndexLoadError,
    VectorIndex,
    check_readback,
    check_rows,
    empty_result,
    new_version_name,
    ragged_result,
)


@dataclass
class NumpyView:
    version: str
    model_id: str
    keys: list[str]
    etags: list[str]
    vectors: np.ndarray
    infos: list[dict | None] | None = None  # per row; None: a version stored without metadata

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries, k, readback=None, where: PhotoFilter | None = None):
        if readback is not None:
            readback = check_readback(readback, self.dim)
        rows = np.arange(self.count)
        if active(where) is not None:
            infos = self.infos or [None] * self.count
            rows = np.asarray([i for i, info in enumerate(infos) if where.matches(info)], int)
        k = min(k, len(rows))
        if k <= 0:
            return empty_result(len(queries), readback)
        scores = np.asarray(queries, np.float32) @ self.vectors[rows].T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        found = rows[top]
        out = ragged_result(np.take_along_axis(scores, top, 1),
                            [[self.keys[j] for j in row] for row in found])
        return out if readback is None else out + ([self.vectors[row, readback] for row in found],)

    def count_matching(self, where):
        if active(where) is None:
            return self.count
        return sum(where.matches(info) for info in (self.infos or []))

    def info(self, keys):
        if self.infos is None:
            return [None] * len(keys)
        row = {k: i for i, k in enumerate(self.keys)}
        return [photo_columns.public_info(self.infos[row[k]]) if k in row else None
                for k in keys]

    def info_counts(self):
        return photo_columns.info_counts(self.infos or [])

    def facets(self, limit=20):
        return photo_columns.facets(self.infos or [], limit)

    def stored_vectors(self, keys):
        row = {k: i for i, k in enumerate(self.keys)}
        return self.vectors[[row[k] for k in keys]] if keys else np.zeros((0, self.dim))


class NumpyIndex(VectorIndex):
    backend = "numpy"

    def __init__(self, root):
        self.root = Path(root)
        self._drafts: dict[str, dict] = {}

    @classmethod
    def from_settings(cls, settings) -> "NumpyIndex":
        return cls(Path(settings.index_dir) / "numpy")

    def _pointers(self) -> dict[str, str]:
        path = self.root / "published.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _load(self, version: str) -> NumpyView:
        path = self.root / f"{version}.npz"
        if not path.is_file():
            raise IndexLoadError(f"index version {version} does not exist")
        with np.load(path, allow_pickle=False) as z:
            infos = [json.loads(t) for t in z["info"].tolist()] if "info" in z else None
            return NumpyView(version, str(z["model_id"]), z["keys"].tolist(), z["etags"].tolist(),
                             z["vectors"], infos)

    def published(self, model_id):
        return self._pointers().get(model_id)

    def view(self, model_id, version=None):
        version = version or self.published(model_id)
        if version is None:
            raise IndexLoadError(f"no index published for model {model_id}")
        view = self._load(version)
        if view.model_id != model_id:
            raise IndexLoadError(f"index version {version} was built by model {view.model_id}")
        return view

    def indexed(self, model_id):
        version = self.published(model_id)
        if version is None:
            return None
        view = self._load(version)
        return Indexed(version, view.model_id, view.count, dict(zip(view.keys, view.etags)))

    def status(self, model_id=None):
        version = self.published(model_id)
        return {"backend": self.backend, "version": version, "model_id": model_id if version else
                None, "count": self._load(version).count if version else 0}

    def versions(self):
        return sorted(p.stem for p in self.root.glob("*.npz"))

    def keys_page(self, version, after=None, limit=10_000):
        view = self._load(version)  # keys are stored sorted
        rows = [(k, e) for k, e in zip(view.keys, view.etags) if after is None or k > after]
        return rows[:max(1, limit)]

    def prune(self, keep):
        published = set(self._pointers().values())
        names = self.versions()
        removed = [v for v in (names[:-keep] if keep else names) if v not in published]
        for v in removed:
            (self.root / f"{v}.npz").unlink()
        return {"removed": removed, "versions": len(names) - len(removed),
                "current": sorted(published)}

    def begin(self, model_id, dim, extra=None, tuning_queries=None, base=None):
        if base is not None and self.published(model_id) != base:
            raise DraftGone(f"index version {base} is no longer published")
        version = new_version_name()
        self._drafts[version] = {"model_id": model_id, "dim": int(dim), "base": base,
                                 "parts": {}, "removed": {}}
        return version

    def _draft(self, version):
        if version not in self._drafts:
            raise DraftGone(f"no unpublished index version {version}")
        return self._drafts[version]

    def write(self, version, keys, vectors, etags, part="0", info=None):
        vectors = check_rows(keys, vectors, etags)
        infos = photo_columns.check_infos(info, len(keys)) or [None] * len(keys)
        infos = [photo_columns.clean_info(i, k) for i, k in zip(infos, keys)]
        self._draft(version)["parts"][part] = (list(keys), list(etags), vectors.copy(), infos)
        return len(keys)

    def remove(self, version, keys, part="0"):
        self._draft(version)["removed"][part] = list(keys)
        return len(self._draft(version)["removed"][part])

    def publish(self, version, parts=None):
        draft = self._draft(version)
        missing = [p for p in (parts or ()) if p not in draft["parts"]]
        if missing:
            raise DraftGone(f"part {missing[0]} of {len(parts)} is missing")
        rows: dict[str, tuple[str, np.ndarray, dict | None]] = {}
        if draft["base"] is not None:
            if self.published(draft["model_id"]) != draft["base"]:
                raise DraftGone(f"index version {draft['base']} is no longer published")
            base = self._load(draft["base"])
            rows = {k: (e, v, i) for k, e, v, i in zip(base.keys, base.etags, base.vectors,
                                                       base.infos or [None] * base.count)}
        for part in sorted(draft["removed"]):
            for k in draft["removed"][part]:
                rows.pop(k, None)
        for part in sorted(draft["parts"]):
            rows.update({k: r for k, *r in zip(*draft["parts"][part])})
        keys = sorted(rows)
        vectors = np.stack([rows[k][1] for k in keys]) if keys else \
            np.zeros((0, draft["dim"]), np.float32)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.root / f"{version}.npz") as f:
            np.savez(f, keys=np.asarray(keys, str), etags=np.asarray([rows[k][0] for k in keys], str),
                     vectors=vectors.astype(np.float32), model_id=np.asarray(draft["model_id"]),
                     info=np.asarray([json.dumps(rows[k][2]) for k in keys], str))
        write_atomic(self.root / "published.json",
                     json.dumps({**self._pointers(), draft["model_id"]: version}))
        del self._drafts[version]
        return {"version": version, "count": len(keys)}

    def discard(self, version):
        self._drafts.pop(version, None)
