"""Object storage behind one interface: a local directory (the embedded default) or S3 / MinIO."""
from __future__ import annotations

from objectstore.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    validate_key,
)
from objectstore.local import LocalStore
from objectstore.s3 import S3Store

__all__ = [
    "InvalidKey", "LocalStore", "ObjectInfo", "ObjectNotFound", "ObjectStore", "S3Store",
    "StoreAuthError", "StoreError", "StoreUnavailable", "open_store", "validate_key",
]


def open_store(settings=None) -> ObjectStore:
    from core.settings import get_settings

    s = settings or get_settings()
    if s.store_backend == "local":
        return LocalStore(s.local_store_dir, s.minio_bucket)
    if s.store_backend == "s3":
        return S3Store(s.minio_endpoint, s.minio_access_key, s.minio_secret_key, s.minio_bucket,
                       secure=s.minio_secure)
    raise ValueError(f"STORE_BACKEND must be 'local' or 's3', not {s.store_backend!r}")
