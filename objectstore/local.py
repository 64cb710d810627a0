"""The embedded default backend: objects are files under `<root>/<bucket>/`."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.hashing import md5_hex
from objectstore.base import InvalidKey, ObjectInfo, ObjectNotFound, StoreUnavailable, validate_key


class LocalStore:
    """`<root>/<bucket>/<key>`; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike, bucket: str):
        self.bucket = bucket
        self.root = Path(root).resolve() / bucket
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise InvalidKey(f"invalid object key: {key!r}")
        return path

    def put(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return ObjectInfo(key, len(data), md5_hex(data))

    def get(self, key):
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None

    def stat(self, key):
        return ObjectInfo(key, *self._size_md5(self._path(key), key))

    def _size_md5(self, path: Path, key: str) -> tuple[int, str]:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
        return len(data), md5_hex(data)

    def exists(self, key):
        return self._path(key).is_file()

    def delete(self, key):
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None

    def list(self, prefix=""):
        base = self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield ObjectInfo(key, *self._size_md5(path, key))

    def check(self):
        if not self.root.is_dir():
            raise StoreUnavailable(f"store directory missing: {self.root}")
