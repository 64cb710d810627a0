"""What the service holds: the text/image encoder and the current index, swapped atomically.

Hot reload: `reload()` loads the version CURRENT points at (checksums and model id verified) and
swaps one reference; a request reads `state.index` once and keeps that version to the end, so
queries never see a half-loaded index and never fail during a swap. A version that cannot be
loaded (corrupt, missing files, built by another model) is refused and the old one keeps serving.

On the Milvus backend (INDEX_BACKEND=milvus) the service holds no index: `index` is a view of
the collection the model's alias points at (searched by name, so an answer comes from one
version), re-resolved every MILVUS_REFRESH_S by a small thread (no files are watched). Milvus not
answering -> searches answer 503 (IndexDown) and /health says degraded; the next successful
resolution serves again, without a restart.

Errors kept here for /health (`last_reload_error`, `store_error`) are public: they say what is
wrong, not where on disk (absolute paths are masked, length is bounded); the full message goes
to the log.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable

import faiss
import numpy as np

from encoder import Encoder
from indexer.repository import IndexLoadError, IndexRepository, IndexVersion
from indexer.vector_index import IndexUnavailable
from search_api.batching import Batcher
from search_api.images import DecodeGate, LRUBytes

log = logging.getLogger(__name__)

PUBLIC_ERROR_MAX_CHARS = 300
# an absolute path (POSIX or Windows) at the start of the text or after a separator
_ABS_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s'"(=:,\[]))(?:/|[A-Za-z]:\\)[^\s'",)\]]*""")


def public_error(message: str | None) -> str | None:
    """A message fit for a public endpoint: absolute paths masked, bounded length."""
    if message is None:
        return None
    text = _ABS_PATH.sub("<path>", str(message))
    text = "".join(c if c.isprintable() else " " for c in text)
    if len(text) > PUBLIC_ERROR_MAX_CHARS:
        text = text[:PUBLIC_ERROR_MAX_CHARS - 3] + "..."
    return text


class NoIndex(LookupError):
    """No index version is loaded yet."""

    def __init__(self):
        super().__init__("no index is loaded yet; run `python -m indexer rebuild`")


class IndexDown(NoIndex):
    """The remote index (Milvus) does not answer: a 503 that says so."""

    def __init__(self, message: str):
        LookupError.__init__(self, message)


def _remote_search_batch(jobs: list[tuple]) -> list[tuple]:
    """Batcher fn for remote searches: jobs (view, query vector, k, with_tail), one query each;
    one call per (view, k, with_tail). Not one call at the largest k: a client asking for a deep
    page (k up to MAX_OFFSET + MAX_TOP_K) would make every neighbour's search that deep."""
    out: list = [None] * len(jobs)
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for i, (view, _, k, with_tail) in enumerate(jobs):
        groups.setdefault((id(view), k, with_tail), []).append(i)
    for (_, k, with_tail), rows in groups.items():
        view = jobs[rows[0]][0]
        found = view.search(np.stack([jobs[i][1] for i in rows]), k, with_tail=with_tail)
        for r, i in enumerate(rows):
            out[i] = tuple(part[r] for part in found)
    return out


def join_rows(rows: list[tuple]) -> tuple:
    """Per-query (scores, keys[, tails]) rows back into search's shape: scores [Q, k'] padded
    with -inf, keys and tails as lists."""
    width = max((len(r[0]) for r in rows), default=0)
    scores = np.full((len(rows), width), -np.inf, np.float32)
    for i, r in enumerate(rows):
        scores[i, :len(r[0])] = r[0]
    return (scores,) + tuple([r[j] for r in rows] for j in range(1, len(rows[0]) if rows else 1))


class ServiceState:
    def __init__(self, encoder: Encoder, repo: IndexRepository | None, store=None,
                 store_factory: Callable | None = None, store_retry_s: float = 10.0,
                 thumbnail_cache_items: int = 1024, text_batch_max: int = 64,
                 remote_index=None, refresh_s: float = 1.0):
        """repo: the FAISS versions; or remote_index (a MilvusIndex) and repo None."""
        self.encoder = encoder
        self.repo = repo
        self.remote_index = remote_index
        self.remote = remote_index is not None
        self.backend = remote_index.backend if self.remote else "faiss"
        self.refresh_s = refresh_s
        self.index_down = False  # the remote index did not answer the last call
        self.store = store
        self.store_factory = store_factory  # reopens a store that was down at start
        self.store_retry_s = store_retry_s
        self.store_ok: bool = store is not None
        self.store_error: str | None = None
        self.index: IndexVersion | None = None
        self.loaded_at: float | None = None
        self.last_reload_error: str | None = None
        self.reload_counts = {"ok": 0, "error": 0}
        self.thumbnails = LRUBytes(thumbnail_cache_items)
        self.observe_stage: Callable[[str, float], None] | None = None  # set by the app (metrics)
        self._decode_gate: DecodeGate | None = None
        self._gate_lock = threading.Lock()
        self._failed_version: str | None = None
        self._reload_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._store_tried = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # concurrent queries share one forward pass (see batching.py)
        self.encode_texts = Batcher(encoder.encode_texts, "text", max_batch=text_batch_max,
                                    observe=lambda s, n: self._observe("text_encode", s))
        self.encode_images = Batcher(encoder.encode_images, "image", max_batch=16,
                                     observe=lambda s, n: self._observe("image_encode", s))
        # a remote search is a network round trip (~4 ms of Milvus's own path here): concurrent
        # queries share one call, which costs little more than one query (BENCHMARKS.md §7)
        self.remote_searches = Batcher(
            _remote_search_batch, "search", max_batch=64, retry_alone=False,
            observe=lambda s, n: self._observe("faiss_search", s)) if self.remote else None
        faiss.omp_set_num_threads(1)  # single small queries: one thread beats two (bench/faiss_scale.py)

    def _observe(self, stage: str, seconds: float) -> None:
        if self.observe_stage is not None:
            self.observe_stage(stage, seconds)

    def decode_gate(self, max_concurrent: int = 2, budget_mb: int = 192) -> DecodeGate:
        """The one admission gate of this service's image decodes (made on first use)."""
        if self._decode_gate is None:
            with self._gate_lock:
                if self._decode_gate is None:
                    self._decode_gate = DecodeGate(max_concurrent, budget_mb * 1024 * 1024)
        return self._decode_gate

    # --- index -------------------------------------------------------------------------------
    def require_index(self) -> IndexVersion:
        """The served version (read once per request: a reload swaps it), or NoIndex (IndexDown
        while Milvus does not answer). Never a network call: the refresher resolves."""
        index = self.index
        if self.remote and self.index_down:
            raise IndexDown(self.last_reload_error or "the vector index (Milvus) does not answer")
        if index is None:
            if self.remote and self.last_reload_error:
                raise IndexDown(self.last_reload_error)
            raise NoIndex()
        return index

    def index_failed(self, exc: IndexUnavailable) -> None:
        """A search found the remote index down: answer 503 at once until it is back."""
        self.index_down = True
        self.last_reload_error = public_error(str(exc))

    def _resolve_remote(self) -> dict:
        """Milvus: which collection the model's alias points at now, and its count."""
        with self._reload_lock:
            served = self.index.version if self.index else None
            try:
                view = self.remote_index.view(self.encoder.model_id)
            except (IndexUnavailable, IndexLoadError) as exc:
                if isinstance(exc, IndexUnavailable) and not self.index_down:
                    log.error("vector index unavailable: %s", exc)
                self.index_down = isinstance(exc, IndexUnavailable)
                self.last_reload_error = public_error(str(exc))
                return {"changed": False, "version": served, "error": self.last_reload_error}
            if view.dim != self.encoder.scoring.index_dim:
                self.last_reload_error = (f"index version {view.version} has dimension "
                                          f"{view.dim}, the model searches with "
                                          f"{self.encoder.scoring.index_dim}")
                return {"changed": False, "version": served, "error": self.last_reload_error}
            if self.index_down:
                log.info("vector index answers again")
            self.index_down = False
            self.last_reload_error = None
            self.index = view
            if view.version == served:
                return {"changed": False, "version": served, "vector_count": view.count}
            self.loaded_at = time.time()
            self.reload_counts["ok"] += 1
            log.info("serving collection %s through alias %s (%d vectors)", view.version,
                     view.alias, view.count)
            return {"changed": True, "version": view.version, "previous": served,
                    "vector_count": view.count}

    def reload(self, force: bool = False, retry_failed: bool = True) -> dict:
        """Load the published version if it differs from the one served; keep the old on error.

        force: reload even the version already served. retry_failed=False (the watcher) skips a
        version that failed before, so a broken publish is reported once, not every interval.
        On Milvus: resolve the alias now.
        """
        if self.remote:
            return self._resolve_remote()
        with self._reload_lock:
            served = self.index.version if self.index else None
            try:
                current = self.repo.current_version()
            except (OSError, IndexLoadError) as exc:  # unreadable volume, or a garbage pointer
                reason = f"cannot read the CURRENT pointer ({exc.strerror or type(exc).__name__})" \
                    if isinstance(exc, OSError) else str(exc)
                log.error("index reload: %s: %s", reason, exc)
                self.last_reload_error = public_error(reason)
                return {"changed": False, "version": served, "error": self.last_reload_error}
            if current is None:
                return {"changed": False, "version": served,
                        **({"error": self.last_reload_error} if self.last_reload_error else {})}
            if current == served and not force:
                # the pointer is back on the served version: an earlier error is over
                self.last_reload_error = None
                self._failed_version = None
                return {"changed": False, "version": served}
            if current == self._failed_version and not retry_failed:
                return {"changed": False, "version": served, "error": self.last_reload_error}
            t0 = time.perf_counter()
            try:
                new = self.repo.load(current, expect_model_id=self.encoder.model_id)
            except Exception as exc:  # IndexLoadError, or anything a damaged version provokes
                full = str(exc) if isinstance(exc, IndexLoadError) else \
                    f"index version {current}: cannot load: {type(exc).__name__}: {exc}"
                msg = public_error(full if isinstance(exc, IndexLoadError) else
                                   f"index version {current}: cannot load ({type(exc).__name__})")
                self.last_reload_error = msg
                self._failed_version = current
                self.reload_counts["error"] += 1
                log.error("index reload refused, still serving %s: %s", served, full)
                return {"changed": False, "version": served, "error": msg}
            if new.index.d != self.encoder.scoring.index_dim:
                msg = (f"index version {current} has dimension {new.index.d}, the model "
                       f"searches with {self.encoder.scoring.index_dim}")
                self.last_reload_error, self._failed_version = msg, current
                self.reload_counts["error"] += 1
                log.error("index reload refused, still serving %s: %s", served, msg)
                return {"changed": False, "version": served, "error": msg}
            self.index = new  # a single reference swap: in-flight requests keep the old one
            self.thumbnails.clear()  # a new version may come with changed objects
            self.loaded_at = time.time()
            self.last_reload_error = None
            self._failed_version = None
            self.reload_counts["ok"] += 1
            seconds = time.perf_counter() - t0
            self._observe("index_load", seconds)
            log.info("serving index version %s (%d vectors, loaded in %.2f s)", new.version,
                     new.count, seconds)
            return {"changed": True, "version": new.version, "previous": served,
                    "vector_count": new.count}

    def start_watcher(self, interval_s: float) -> None:
        """FAISS: watch CURRENT every interval_s. Milvus: resolve the alias every refresh_s."""
        if self.remote:
            interval_s = self.refresh_s
        if interval_s <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.reload(retry_failed=False)
                except Exception:  # never let the watcher die
                    log.exception("index watcher")

        self._thread = threading.Thread(target=loop, name="index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher and the model worker threads (they restart on the next use)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.encode_texts.close()
        self.encode_images.close()
        if self.remote_searches is not None:
            self.remote_searches.close()

    # --- object store ------------------------------------------------------------------------
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
        if not ok and error != getattr(self, "_store_error_full", None):
            log.warning("object store unavailable: %s", error)
        self._store_error_full = None if ok else error
        self.store_ok = ok
        self.store_error = None if ok else public_error(error)
