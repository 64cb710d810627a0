"""Object storage behind one interface: a local directory (embedded default) or S3 via `minio`."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol


class StoreError(RuntimeError):
    """Base class: every store failure is one of these, with a message a person can act on."""


class ObjectNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class InvalidKey(StoreError, ValueError):
    pass


class StoreAuthError(StoreError):
    pass


class StoreUnavailable(StoreError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # content hash (md5 hex) for single-part objects


def validate_key(key: str) -> str:
    """Keys are relative POSIX paths without '..', empty parts or control characters."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidKey(f"invalid object key: {key!r}")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise InvalidKey(f"invalid object key: {key!r}")
    if any(p in ("..", ".", "") for p in key.split("/")):
        raise InvalidKey(f"invalid object key: {key!r}")
    return key


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ObjectStore(Protocol):
    bucket: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo: ...
    def get(self, key: str) -> bytes: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def check(self) -> None: ...
    def describe(self) -> str: ...


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


class S3Store:
    """S3 / MinIO through the `minio` client. Network errors fail fast with a clear message."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, create_bucket: bool = True, timeout: float = 10.0,
                 retries: int = 2):
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.endpoint = endpoint
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 3.0), read=timeout),
            retries=urllib3.Retry(total=retries, connect=retries, read=0, backoff_factor=0.2,
                                  status_forcelist=(500, 502, 503, 504)),
            maxsize=16,
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, http_client=http)
        if create_bucket:
            self._call(self._ensure_bucket)

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def _ensure_bucket(self):
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def _call(self, fn, *args, key: str | None = None, **kwargs):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound") and key is not None:
                raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
            if exc.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise StoreAuthError(
                    f"{self.describe()}: credentials refused ({exc.code}); check "
                    "MINIO_ACCESS_KEY / MINIO_SECRET_KEY") from None
            if exc.code == "NoSuchBucket":
                raise StoreError(f"{self.describe()}: bucket does not exist") from None
            raise StoreError(f"{self.describe()}: {exc.code}: {exc.message}") from None
        except HTTPError as exc:
            raise StoreUnavailable(
                f"S3 server at {self.endpoint} not reachable ({type(exc).__name__}); check "
                "MINIO_ENDPOINT and that the server is running") from None
        except ValueError as exc:  # minio maps some HTTP statuses to ValueError-like errors
            raise StoreError(f"{self.describe()}: {exc}") from None

    def put(self, key, data, content_type="application/octet-stream"):
        validate_key(key)
        self._call(self.client.put_object, self.bucket, key, io.BytesIO(data), len(data),
                   content_type=content_type, key=key)
        return ObjectInfo(key, len(data), md5_hex(data))

    def get(self, key):
        validate_key(key)

        def _get():
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(_get, key=key)

    def stat(self, key):
        validate_key(key)
        st = self._call(self.client.stat_object, self.bucket, key, key=key)
        return ObjectInfo(key, st.size, (st.etag or "").strip('"'))

    def exists(self, key):
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def delete(self, key):
        self.stat(key)  # S3 deletes are silent on missing keys; the interface is not
        self._call(self.client.remove_object, self.bucket, key, key=key)

    def list(self, prefix=""):
        it = self._call(self.client.list_objects, self.bucket, prefix=prefix, recursive=True)
        while True:
            obj = self._call(next, it, None)
            if obj is None:
                return
            if not obj.is_dir:
                yield ObjectInfo(obj.object_name, obj.size, (obj.etag or "").strip('"'))

    def check(self):
        self._call(self.client.bucket_exists, self.bucket)


def open_store(settings=None) -> ObjectStore:
    from indexer.settings import get_settings

    s = settings or get_settings()
    if s.store_backend == "local":
        return LocalStore(s.local_store_dir, s.minio_bucket)
    if s.store_backend == "s3":
        return S3Store(s.minio_endpoint, s.minio_access_key, s.minio_secret_key, s.minio_bucket,
                       secure=s.minio_secure)
    raise ValueError(f"STORE_BACKEND must be 'local' or 's3', not {s.store_backend!r}")
