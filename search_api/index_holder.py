"""The served version of the vector index (any backend), swapped atomically, and its searches.

`IndexHolder` holds a `VectorIndex` and a view of the version it publishes for the model.
Hot reload: `reload()` asks the index which version is published (`published()`, cheap) and,
when that differs from the one served, opens a view of it (`view()`: FAISS loads and checks it,
Milvus names its collection) and swaps one reference; a request reads `current` once
(`require()`) and keeps that version to the end, so queries never see a half-loaded index and
never fail during a swap. A version that cannot be opened (corrupt, missing files, built by
another model, another dimension) is refused and the old one keeps serving.

An index that does not answer (`IndexUnavailable`: Milvus down) makes searches answer 503
(`IndexDown`) and /health say degraded; the next successful reload serves again, without a
restart. A watcher thread reloads every `watch_s` seconds.

Searches: on a remote index (searches are network calls) concurrent queries share one call
(`Batcher`; only queries with the same filter); on a local one a small index is searched on the
event loop, a large one in the thread pool. A filter (`PhotoFilter`) goes to the view's search,
which applies it inside the nearest-neighbour search; an empty one is no filter. The metadata
calls (`call`: info, info_counts, facets) run where searches of that view run.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
from fastapi.concurrency import run_in_threadpool

from indexer.vector_index import FilterTooBroad, IndexLoadError, IndexUnavailable, \
    VectorIndex
from search_api.batching import Batcher
from search_api.redaction import public_error

log = logging.getLogger(__name__)

# below this size a flat search costs well under a millisecond: run it on the event loop rather
# than paying a thread hop (BENCHMARKS.md §1); larger indexes search in the thread pool
INLINE_SEARCH_MAX = 20_000
# queries of concurrent requests joined into one remote search call at most
REMOTE_BATCH_MAX = 64


class NoIndex(LookupError):
    """No index version is served yet (a 503). retry_after_s: when the holder looks again."""

    def __init__(self, retry_after_s: float | None = None):
        super().__init__("no index is loaded yet; run `python -m indexer rebuild`")
        self.retry_after_s = retry_after_s


class IndexDown(NoIndex):
    """The index does not answer (Milvus down): a 503 that says so."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        LookupError.__init__(self, message)
        self.retry_after_s = retry_after_s


def filter_key(where) -> str | None:
    """A filter as a hashable key (None: no filter)."""
    return None if where is None else where.model_dump_json(exclude_none=True)


def search_view(view, vectors: np.ndarray, k: int, readback: int | None, where=None):
    """view.search, with `where` only when there is a filter (a view that predates filters
    still serves unfiltered searches)."""
    if where is None:
        return view.search(vectors, k, readback=readback)
    return view.search(vectors, k, readback=readback, where=where)


def remote_search_batch(jobs: list[tuple]) -> list[tuple]:
    """Batcher fn for remote searches: jobs (view, query vector, k, readback, where), one query
    each; one call per (view, k, readback, filter); a filter the index refuses
    (FilterTooBroad) is the answer of its own jobs only. Not one call at the largest k: a client
    asking for a deep page (k up to MAX_OFFSET + MAX_TOP_K) would make every neighbour's search
    that deep."""
    out: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, (view, _, k, readback, where) in enumerate(jobs):
        groups.setdefault((id(view), k, readback, filter_key(where)), []).append(i)
    for (_, k, readback, _), rows in groups.items():
        view, where = jobs[rows[0]][0], jobs[rows[0]][4]
        try:
            found = search_view(view, np.stack([jobs[i][1] for i in rows]), k, readback, where)
        except FilterTooBroad as exc:  # this filter's requests fail, not their neighbours
            for i in rows:
                out[i] = exc
            continue
        for r, i in enumerate(rows):
            out[i] = tuple(part[r] for part in found)
    return out


def join_rows(rows: list[tuple]) -> tuple:
    """Per-query (scores, keys[, values]) rows back into search's shape: scores [Q, k'] padded
    with -inf, keys and values as lists."""
    width = max((len(r[0]) for r in rows), default=0)
    scores = np.full((len(rows), width), -np.inf, np.float32)
    for i, r in enumerate(rows):
        scores[i, :len(r[0])] = r[0]
    return (scores,) + tuple([r[j] for r in rows] for j in range(1, len(rows[0]) if rows else 1))


class IndexHolder:
    def __init__(self, index: VectorIndex, model_id: str, dim: int, watch_s: float = 0.0,
                 observe: Callable[[str, float], None] | None = None,
                 on_swap: Callable[[], None] | None = None):
        """index: any backend; the views served must be built by `model_id` and hold vectors of
        `dim` components. watch_s: seconds between reloads by the watcher (0: only reload()).
        on_swap: called after a new version is swapped in."""
        self.vector_index = index
        self.model_id = model_id
        self.dim = dim
        self.watch_s = watch_s
        self.observe = observe or (lambda stage, seconds: None)
        self.on_swap = on_swap
        self.current = None  # the served view: read it once per request (require())
        self.down = False  # the index did not answer the last call
        self.loaded_at: float | None = None
        self.last_error: str | None = None  # public (redacted)
        self.reload_counts = {"ok": 0, "error": 0}
        self._failed_version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a remote search is a network round trip (~4 ms of Milvus's own path here): concurrent
        # queries share one call, which costs little more than one query (BENCHMARKS.md §7)
        self._remote_searches = Batcher(
            remote_search_batch, "search", max_batch=REMOTE_BATCH_MAX, retry_alone=False,
            observe=lambda s, n: self.observe("index_search", s)) if index.remote else None

    @property
    def backend(self) -> str:
        return self.vector_index.backend

    # --- serving -----------------------------------------------------------------------------
    def require(self):
        """The served view (one reference for the whole request: a reload swaps it), or
        NoIndex (IndexDown while the index does not answer). Never a call to the index."""
        current = self.current
        if self.down:
            raise IndexDown(self.last_error or "the vector index does not answer",
                            self.retry_after_s)
        if current is None:
            raise NoIndex(self.retry_after_s)
        return current

    @property
    def retry_after_s(self) -> float | None:
        """When a client's retry may find the index (the watcher's next look; None: no
        watcher)."""
        return self.watch_s or None

    def failed(self, exc: IndexUnavailable) -> None:
        """A search found the index down: answer 503 at once until a reload finds it back."""
        self.down = True
        self.last_error = public_error(str(exc))

    async def search(self, view, vectors: np.ndarray, k: int, readback: int | None = None,
                     where=None):
        """(scores [Q, k'] padded with -inf, keys, values per row or None) of `view`; values:
        each hit's stored component `readback` (None: not asked); where: a PhotoFilter applied
        inside the search (None or empty: none)."""
        if where is not None and where.is_empty():
            where = None
        try:
            if self._remote_searches is not None:
                rows = await self._remote_searches(
                    [(view, v, k, readback, where) for v in vectors])
                for row in rows:
                    if isinstance(row, FilterTooBroad):
                        raise row
                found = join_rows(rows)
            elif view.count > INLINE_SEARCH_MAX:
                found = await run_in_threadpool(self._search_now, view, vectors, k, readback,
                                                where)
            else:
                found = self._search_now(view, vectors, k, readback, where)
        except IndexUnavailable as exc:  # 503 now, and for the next requests
            self.failed(exc)
            raise IndexDown(str(exc), self.retry_after_s) from None
        return found[0], found[1], (found[2] if readback is not None else None)

    def _search_now(self, view, vectors: np.ndarray, k: int, readback: int | None, where=None):
        t0 = time.perf_counter()
        try:
            return search_view(view, vectors, k, readback, where)
        finally:
            self.observe("index_search", time.perf_counter() - t0)

    async def call(self, view, method: str, *args, **kwargs):
        """view.<method>(...) for the metadata (info, info_counts, facets): in the thread pool
        where it may be a network call or a large table's read; IndexDown when the index does
        not answer."""
        fn = getattr(view, method)
        try:
            if self.vector_index.remote or view.count > INLINE_SEARCH_MAX:
                return await run_in_threadpool(fn, *args, **kwargs)
            return fn(*args, **kwargs)
        except IndexUnavailable as exc:
            self.failed(exc)
            raise IndexDown(str(exc), self.retry_after_s) from None

    # --- reloading ---------------------------------------------------------------------------
    def _unavailable(self, exc: IndexUnavailable, served: str | None) -> dict:
        if not self.down:
            log.error("vector index unavailable: %s", exc)
        self.down = True
        self.last_error = public_error(str(exc))
        return {"changed": False, "version": served, "error": self.last_error}

    def _answering(self) -> None:
        if self.down:
            log.info("vector index answers again")
            self.down = False
            self.last_error = None

    def _refuse(self, version: str, served: str | None, public: str, full: str) -> dict:
        self.last_error, self._failed_version = public, version
        self.reload_counts["error"] += 1
        log.error("index reload refused, still serving %s: %s", served, full)
        return {"changed": False, "version": served, "error": public}

    def reload(self, force: bool = False, retry_failed: bool = True) -> dict:
        """Serve the published version if it differs from the one served; keep the old on error.

        force: open even the version already served. retry_failed=False (the watcher) skips a
        version that failed before, so a broken publish is reported once, not every interval.
        """
        with self._lock:
            served = self.current.version if self.current is not None else None
            try:
                version = self.vector_index.published(self.model_id)
            except IndexUnavailable as exc:
                return self._unavailable(exc, served)
            except (OSError, IndexLoadError) as exc:  # unreadable volume, or a garbage pointer
                reason = (f"cannot read which index version is published "
                          f"({exc.strerror or type(exc).__name__})"
                          if isinstance(exc, OSError) else str(exc))
                log.error("index reload: %s: %s", reason, exc)
                self.last_error = public_error(reason)
                return {"changed": False, "version": served, "error": self.last_error}
            self._answering()
            if version is None:
                return {"changed": False, "version": served,
                        **({"error": self.last_error} if self.last_error else {})}
            if version == served and not force:
                # the pointer is back on the served version: an earlier error is over
                self.last_error = None
                self._failed_version = None
                if not self.vector_index.remote:
                    return {"changed": False, "version": served}
                # a remote view is a name, not a load: take it again for a fresh count (the
                # published version takes in-place updates)
                try:
                    self.current = self.vector_index.view(self.model_id, version)
                except IndexUnavailable as exc:
                    return self._unavailable(exc, served)
                except IndexLoadError:
                    pass  # replaced meanwhile: the next reload sees the new one
                return {"changed": False, "version": served,
                        "vector_count": self.current.count}
            if version == self._failed_version and not retry_failed:
                return {"changed": False, "version": served, "error": self.last_error}
            t0 = time.perf_counter()
            try:
                new = self.vector_index.view(self.model_id, version)
            except IndexUnavailable as exc:
                return self._unavailable(exc, served)
            except Exception as exc:  # IndexLoadError, or anything a damaged version provokes
                if isinstance(exc, IndexLoadError):
                    return self._refuse(version, served, public_error(str(exc)), str(exc))
                return self._refuse(
                    version, served,
                    public_error(f"index version {version}: cannot load ({type(exc).__name__})"),
                    f"index version {version}: cannot load: {type(exc).__name__}: {exc}")
            if new.dim != self.dim:
                msg = (f"index version {version} has dimension {new.dim}, the model "
                       f"searches with {self.dim}")
                return self._refuse(version, served, msg, msg)
            self.current = new  # a single reference swap: in-flight requests keep the old one
            if self.on_swap is not None:
                self.on_swap()
            self.loaded_at = time.time()
            self.last_error = None
            self._failed_version = None
            self.reload_counts["ok"] += 1
            seconds = time.perf_counter() - t0
            self.observe("index_load", seconds)
            log.info("serving index version %s (%d vectors, opened in %.2f s)", new.version,
                     new.count, seconds)
            return {"changed": True, "version": new.version, "previous": served,
                    "vector_count": new.count}

    def check_now(self) -> None:
        """For /health: where asking the index is a call, not a load (remote), ask now."""
        if self.vector_index.remote:
            self.reload(retry_failed=False)

    def describe(self) -> dict:
        """What the index says of the model's published version (status(); empty when it
        cannot say): on Milvus the alias and the collection it points at."""
        try:
            return self.vector_index.status(self.model_id)
        except (IndexUnavailable, IndexLoadError, OSError):
            return {}

    def start_watcher(self) -> None:
        """Reload every watch_s seconds in a small thread (no-op when watch_s is 0)."""
        if self.watch_s <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(self.watch_s):
                try:
                    self.reload(retry_failed=False)
                except Exception:  # never let the watcher die
                    log.exception("index watcher")

        self._thread = threading.Thread(target=loop, name="index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher and the search worker (they restart on the next use)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._remote_searches is not None:
            self._remote_searches.close()
