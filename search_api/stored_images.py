"""The image side of the service: the object store (reopened when it was down at start), its
state for /health, the one decode gate of uploads and thumbnails, and the thumbnail cache."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from cachetools import LRUCache
from fastapi.concurrency import run_in_threadpool

from core.settings import RequestLimits
from encoder.image_formats import is_raw_key
from objectstore import InvalidKey, ObjectNotFound, StoreError
from search_api.images import DecodeGate, decode_gated, decode_upload, make_thumbnail
from search_api.redaction import public_error

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The object store does not answer, or none is configured (a 503). retry_after_s: when
    the store is tried again (None: not configured, no use retrying)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImageNotFound(LookupError):
    """No stored image under that key (a 404)."""


class StoredImages:
    def __init__(self, limits: RequestLimits, store=None, store_factory: Callable | None = None,
                 store_retry_s: float = 10.0, thumbnail_cache_items: int = 1024,
                 observe: Callable[[str, float], None] | None = None):
        """store: an open store, or store_factory to (re)open one (at most every
        store_retry_s while it is down)."""
        self.limits = limits
        self.store = store
        self.store_factory = store_factory
        self.store_retry_s = store_retry_s
        self.store_ok: bool = store is not None
        self.store_error: str | None = None  # public (redacted)
        self._store_error_full: str | None = None
        self._store_lock = threading.Lock()
        self._store_tried = 0.0
        self.observe = observe or (lambda stage, seconds: None)
        # uploads and thumbnails share one admission gate: a few decodes, one memory budget
        self.decode_gate = DecodeGate(limits.max_concurrent_decodes,
                                      limits.decode_memory_mb * 1024 * 1024)
        # (key, size) -> JPEG bytes; cachetools caches are not thread-safe: one lock
        self._thumbnails = LRUCache(thumbnail_cache_items) if thumbnail_cache_items > 0 else None
        self._thumb_lock = threading.Lock()

    # --- the object store --------------------------------------------------------------------
    def get_store(self):
        """The store, reopening it (at most every store_retry_s) if it was down at start."""
        if self.store is not None or self.store_factory is None:
            return self.store
        with self._store_lock:
            now = time.monotonic()
            if self.store is None and now - self._store_tried >= self.store_retry_s:
                self._store_tried = now
                try:
                    self.store = self.store_factory()
                    self.mark_store(True)
                except Exception as exc:  # StoreError, or anything a client raises
                    self.mark_store(False, str(exc))
        return self.store

    def mark_store(self, ok: bool, error: str | None = None) -> None:
        """Record the store's state; `error` is logged in full and kept in public form."""
        if not ok and error != self._store_error_full:
            log.warning("object store unavailable: %s", error)
        self._store_error_full = None if ok else error
        self.store_ok = ok
        self.store_error = None if ok else public_error(error)

    def check_store(self) -> str:
        """For /health (blocking): "ok", "not configured" or "error: <public reason>"."""
        store = self.get_store()
        if store is None:
            return f"error: {self.store_error}" if self.store_error else "not configured"
        try:
            store.check()
        except StoreError as exc:
            self.mark_store(False, str(exc))  # logged in full; kept without server paths
            return f"error: {self.store_error}"
        self.mark_store(True)
        return "ok"

    def fetch(self, key: str) -> bytes:
        """The stored bytes (blocking). ImageNotFound, StoreUnavailable."""
        store = self.get_store()
        if store is None:
            raise StoreUnavailable("object store unavailable: "
                                   f"{self.store_error or 'not configured'}",
                                   self.store_retry_s if self.store_factory else None)
        t0 = time.perf_counter()
        try:
            data = store.get(key)
        except ObjectNotFound:
            self.mark_store(True)
            raise ImageNotFound(f"no image {key[:200]!r}") from None
        except InvalidKey:
            raise ImageNotFound("no such image (invalid image key)") from None
        except StoreError as exc:
            self.mark_store(False, str(exc))
            raise StoreUnavailable(f"object store unavailable: {self.store_error}",
                                   self.store_retry_s) from None
        finally:
            self.observe("image_fetch", time.perf_counter() - t0)
        self.mark_store(True)
        return data

    # --- decoding ----------------------------------------------------------------------------
    async def decode_upload(self, data: bytes):
        """An upload's bytes -> upright RGB image, through the decode gate (BadImage,
        ImageTooLarge)."""
        max_pixels = self.limits.max_image_pixels
        return await decode_gated(self.decode_gate, data, max_pixels,
                                  lambda: self._timed("image_decode", decode_upload, data,
                                                      max_pixels))

    async def thumbnail(self, key: str, size: int) -> bytes:
        """A JPEG thumbnail of the stored image `key`, at most `size` pixels wide and high
        (cached), whatever the original's format (camera RAW by its name: the embedded preview
        or a demosaic). fetch()'s errors; BadImage / ImageTooLarge for a stored object that is
        not a usable image."""
        cached = self._cached((key, size))
        if cached is not None:
            return cached
        data = await run_in_threadpool(self.fetch, key)
        max_pixels = self.limits.max_image_pixels
        raw = is_raw_key(key)
        thumb = await decode_gated(
            self.decode_gate, data, max_pixels,
            lambda: self._timed("thumbnail", make_thumbnail, data, size, max_pixels, raw),
            min_side=size, raw=raw)
        if self._thumbnails is not None:
            with self._thumb_lock:
                self._thumbnails[(key, size)] = thumb
        return thumb

    def _cached(self, key) -> bytes | None:
        if self._thumbnails is None:
            return None
        with self._thumb_lock:
            return self._thumbnails.get(key)

    def clear_thumbnails(self) -> None:
        """A new index version may come with changed objects."""
        if self._thumbnails is not None:
            with self._thumb_lock:
                self._thumbnails.clear()

    def _timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.observe(stage, time.perf_counter() - t0)
