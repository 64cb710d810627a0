"""The object-store interface every backend implements, its errors, and key validation."""
from __future__ import annotations

from dataclasses import dataclass
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
    # when the object was last written, epoch seconds by the store's clock (a file's mtime,
    # S3's LastModified: whole seconds on some servers); None where not known (a put's answer)
    last_modified: float | None = None


def validate_key(key: str) -> str:
    """Keys are relative POSIX paths without '..', empty parts or control characters."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidKey(f"invalid object key: {key!r}")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise InvalidKey(f"invalid object key: {key!r}")
    if any(p in ("..", ".", "") for p in key.split("/")):
        raise InvalidKey(f"invalid object key: {key!r}")
    return key




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
