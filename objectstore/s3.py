"""S3 / MinIO backend through the `minio` client."""
from __future__ import annotations

import heapq
import io
from datetime import timezone

from core.hashing import md5_hex
from objectstore.base import (
    ObjectInfo,
    ObjectNotFound,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    validate_key,
)

LIST_BUFFER = 10_000  # objects of one folder level held while listing it in key order


def _info(obj) -> ObjectInfo:
    """A listed or stat'ed `minio.datatypes.Object` (last_modified: a datetime in UTC)."""
    when = obj.last_modified
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return ObjectInfo(obj.object_name, obj.size, (obj.etag or "").strip('"'),
                      when.timestamp() if when is not None else None)


def _request_retries(retries: int):
    """urllib3's per-request retries: a refused connection, a 5xx answer, and a connection
    dropped before the answer (a server restarting, a proxy resetting) are asked again at once,
    `retries` times with a short back-off, for idempotent requests (GET, PUT, HEAD, DELETE;
    never POST); a read that timed out is not (a hung server fails the call after one
    timeout). Outages longer than that are the caller's to wait out (`indexer.jobs`)."""
    from urllib3.exceptions import ReadTimeoutError
    from urllib3.util.retry import Retry

    class RequestRetry(Retry):
        def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                      _stacktrace=None):
            if isinstance(error, ReadTimeoutError):
                raise error
            return super().increment(method, url, response, error, _pool, _stacktrace)

    return RequestRetry(total=retries, connect=retries, read=retries, backoff_factor=0.2,
                        status_forcelist=(500, 502, 503, 504))


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
            retries=_request_retries(retries),
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
            from urllib3.exceptions import MaxRetryError, ResponseError

            if isinstance(exc, MaxRetryError) and isinstance(exc.reason, ResponseError):
                # it answered, every time with a 5xx: a server-side fault (e.g. out of space)
                raise StoreUnavailable(
                    f"S3 server at {self.endpoint} answers with server errors ({exc.reason}); "
                    "see the server's log") from None
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
        return _info(st)

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
        """Objects under `prefix` in key order, one folder level at a time: a listing by
        folder gives a page's objects first and its subfolders after them, and some servers
        (SeaweedFS) list a subfolder `a/` where `a` sorts, before `a-b.jpg`. So a level's
        subfolder names are gathered first (and its objects too, up to LIST_BUFFER; a larger
        level is listed a second time rather than held), then objects and subfolders are
        merged by key."""
        folders: list[str] = []
        objects: list[ObjectInfo] | None = []
        for obj in self._level(prefix):
            if obj.is_dir:
                folders.append(obj.object_name)
            elif objects is not None:
                objects.append(_info(obj))
                if len(objects) > LIST_BUFFER:
                    objects = None  # listed again below
        if objects is not None:
            objects.sort(key=lambda o: o.key)
            again = iter(objects)
        else:
            again = (_info(o) for o in self._level(prefix) if not o.is_dir)
        heapq.heapify(folders)
        for info in again:
            while folders and folders[0] < info.key:
                yield from self.list(heapq.heappop(folders))
            yield info
        while folders:
            yield from self.list(heapq.heappop(folders))

    def _level(self, prefix: str):
        """One folder level as the server lists it: objects and subfolders (`is_dir`)."""
        it = self._call(self.client.list_objects, self.bucket, prefix=prefix, recursive=False)
        while (obj := self._call(next, it, None)) is not None:
            yield obj

    def check(self):
        self._call(self.client.bucket_exists, self.bucket)
