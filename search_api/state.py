"""What the service holds: the text/image encoder and the current index, swapped atomically."""
from __future__ import annotations

import logging
import threading
import time

import faiss

from encoder import Encoder
from indexer.index import IndexLoadError, IndexRepository, IndexVersion

log = logging.getLogger(__name__)


class ServiceState:
    def __init__(self, encoder: Encoder, repo: IndexRepository, store=None):
        self.encoder = encoder
        self.repo = repo
        self.store = store
        self.index: IndexVersion | None = None
        self.last_reload_error: str | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        faiss.omp_set_num_threads(1)  # single queries: one thread beats two (DESIGN.md)

    def reload(self, force: bool = False) -> dict:
        """Load the published version if it differs from the one served; keep the old on error."""
        with self._reload_lock:
            current = self.repo.current_version()
            served = self.index.version if self.index else None
            if current is None or (current == served and not force):
                return {"changed": False, "version": served}
            try:
                new = self.repo.load(current, expect_model_id=self.encoder.model_id)
            except (IndexLoadError, OSError, ValueError, KeyError) as exc:
                self.last_reload_error = str(exc)
                log.error("index reload failed, still serving %s: %s", served, exc)
                return {"changed": False, "version": served, "error": str(exc)}
            self.index = new  # a single reference swap: in-flight requests keep the old one
            self.last_reload_error = None
            log.info("serving index version %s (%d vectors)", new.version, new.count)
            return {"changed": True, "version": new.version, "previous": served}

    def start_watcher(self, interval_s: float) -> None:
        if interval_s <= 0:
            return

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.reload()
                except Exception:  # never let the watcher die
                    log.exception("index watcher")

        self._thread = threading.Thread(target=loop, name="index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
