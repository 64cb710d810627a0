"""Versioned, persisted FAISS indexes with an atomic CURRENT pointer.

Layout under the index directory:
    versions/<version>/index.faiss   FAISS index over inner product (vectors are L2-normalised):
                                     IndexIDMap2(IndexFlatIP) while exact search is fast enough,
                                     IndexIVFFlat above that (index_policy; ids stay stable)
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

from core.hashing import sha256_file
from indexer.index_policy import ivf_or_none, index_spec_of

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
        if not keys:
            return np.zeros((0, self.index.d), np.float32)
        ids = np.fromiter((self._id_of_key[k] for k in keys), np.int64, len(keys))
        return self.index.reconstruct_batch(ids)  # one call, not one per key

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k per query: (scores [Q, k'], keys) with k' = min(k, count)."""
        k = min(k, self.count)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        keys = [[self.key_of(i) for i in row if i >= 0] for row in ids]
        return scores[:, : max((len(r) for r in keys), default=0)], keys


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
        ivf = ivf_or_none(index)
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
