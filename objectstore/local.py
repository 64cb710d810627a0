"""The embedded default backend: objects are files under `<root>/<bucket>/`."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from core.atomic import write_atomic
from core.hashing import md5_hex
from objectstore.base import InvalidKey, ObjectInfo, ObjectNotFound, StoreUnavailable, validate_key


NAME_MAX = 255  # bytes in one file name (Linux and most file systems)
# a path the file system cannot even look up holds no object
_UNRESOLVABLE = (errno.ENAMETOOLONG, errno.ELOOP)


def _partial_write(name: str) -> bool:
    """A put in progress (core.atomic's `.<name>.<random>.tmp`) or one a crash left behind
    (also the older `.tmp-<random>`): not an object."""
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


class LocalStore:
    """`<root>/<bucket>/<key>`; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike, bucket: str):
        self.bucket = bucket
        self.root = Path(root).resolve() / bucket
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str, must_exist: bool = False) -> Path:
        """The file of `key`; a key with a path part the file system cannot hold is
        ObjectNotFound when reading (`must_exist`), InvalidKey when writing."""
        validate_key(key)
        if any(len(p.encode("utf-8", "surrogatepass")) > NAME_MAX for p in key.split("/")):
            if must_exist:
                raise ObjectNotFound(f"no object {key[:200]!r} (a path part is too long)")
            raise InvalidKey(f"invalid object key (a path part is over {NAME_MAX} bytes)")
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise InvalidKey(f"invalid object key: {key!r}")
        return path

    def put(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        write_atomic(path, data)  # not fsync'd: an object store write promises no durability
        return ObjectInfo(key, len(data), md5_hex(data))

    def _read(self, path: Path, key: str) -> bytes:
        return self._read_dated(path, key)[0]

    def _read_dated(self, path: Path, key: str) -> tuple[bytes, float]:
        """The file's bytes and its mtime, both from one open file: a put replaces the file
        (rename), so the two always belong to the same content."""
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
        except OSError as exc:
            if exc.errno in _UNRESOLVABLE:
                raise ObjectNotFound(f"no object {key[:200]!r} ({exc.strerror})") from None
            raise

    def get(self, key):
        return self._read(self._path(key, must_exist=True), key)

    def stat(self, key):
        return self._info(self._path(key, must_exist=True), key)

    def _info(self, path: Path, key: str) -> ObjectInfo:
        data, mtime = self._read_dated(path, key)
        return ObjectInfo(key, len(data), md5_hex(data), mtime)

    def exists(self, key):
        try:
            return self._path(key, must_exist=True).is_file()
        except ObjectNotFound:
            return False
        except OSError as exc:
            if exc.errno in _UNRESOLVABLE:
                return False
            raise

    def delete(self, key):
        path = self._path(key, must_exist=True)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None

    def list(self, prefix=""):
        """Objects under `prefix` in key order (as S3 lists them), one directory at a time:
        nothing is collected first, so a listing of a million keys streams."""
        top = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / top if top else self.root
        if top and (start.is_symlink() or self.root not in start.resolve().parents):
            return
        for path, key in self._walk_in_key_order(start, top + "/" if top else ""):
            if key.startswith(prefix):
                yield self._info(path, key)

    def _walk_in_key_order(self, directory: Path, key_prefix: str):
        """(path, key) of every object below `directory`, in key order: a folder's keys all
        begin with `<name>/`, so it sorts among the files as that string."""
        try:
            with os.scandir(directory) as it:
                entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                           for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, entry in sorted(entries, key=lambda ne: ne[0]):
            if name.endswith("/"):
                yield from self._walk_in_key_order(Path(entry.path), key_prefix + name)
            elif entry.is_file() and not _partial_write(name):
                yield Path(entry.path), key_prefix + name

    def check(self):
        if not self.root.is_dir():
            raise StoreUnavailable(f"store directory missing: {self.root}")
