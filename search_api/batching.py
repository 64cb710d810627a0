"""Greedy micro-batching of model calls on one worker thread.

Concurrent requests each submit their inputs; the worker takes everything queued while the
previous forward pass ran and encodes it in one batched call. No waiting window is added (a lone
request runs at once), the model is never called from many threads at the same time (on a
2-core machine that oversubscribes torch's intra-op threads), and under load one forward pass
serves many queries. With `split_from` set, a queue that long is taken half at a time: clients
waiting on one batch all come back at once, and while the model encodes one half the event loop
answers the other and reads its next requests, instead of the two taking turns.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


class Batcher:
    def __init__(self, fn: Callable[[list], Sequence], name: str, max_batch: int = 32,
                 observe: Callable[[float, int], None] | None = None, retry_alone: bool = True,
                 split_from: int | None = None):
        """fn maps a list of items to one result per item. retry_alone: after a failed batch,
        run each request alone so one bad input fails only its own request (off where a failure
        is never the input's, e.g. an index that does not answer: retrying would only wait
        longer). split_from: from this many queued requests, a batch takes half of them (see
        the module doc; None: everything queued, up to max_batch)."""
        self.fn = fn
        self.name = name
        self.max_batch = max_batch
        self.split_from = split_from
        self.retry_alone = retry_alone
        self.observe = observe  # (seconds, items) after each batched call
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name=f"batch-{self.name}",
                                                    daemon=True)
                    self._thread.start()

    def submit(self, items: Sequence) -> Future:
        fut: Future = Future()
        self._ensure_worker()
        self._q.put((list(items), fut))
        return fut

    async def __call__(self, items: Sequence) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(items))

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout=5)
        self._thread = None

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            jobs = [first]
            n = len(first[0])
            stop = False
            most = self.max_batch
            queued = 1 + self._q.qsize()
            if self.split_from is not None and queued > self.split_from:
                most = min(most, max(self.split_from, -(-queued // 2)))
            while n < most:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                jobs.append(job)
                n += len(job[0])
            jobs = [(items, fut) for items, fut in jobs if fut.set_running_or_notify_cancel()]
            if jobs:
                self._process(jobs)
            if stop:
                return

    def _process(self, jobs: list[tuple[list, Future]]) -> None:
        flat = [x for items, _ in jobs for x in items]
        t0 = time.perf_counter()
        try:
            out = self.fn(flat)
        except BaseException as exc:
            if len(jobs) > 1 and self.retry_alone:  # one bad input must not fail its neighbours
                for job in jobs:
                    self._process_one(job)
                return
            for _, fut in jobs:  # hand the error to every waiting request
                fut.set_exception(exc)
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - t0, len(flat))
        start = 0
        for items, fut in jobs:
            fut.set_result(out[start:start + len(items)])
            start += len(items)

    def _process_one(self, job: tuple[list, Future]) -> None:
        items, fut = job
        t0 = time.perf_counter()
        try:
            out = self.fn(items)
        except BaseException as exc:
            fut.set_exception(exc)
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - t0, len(items))
        fut.set_result(out)
