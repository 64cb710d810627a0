"""The micro-batcher (search_api.batching): what queued meanwhile goes in one call, each request
gets its own results, and with split_from a long queue is taken half at a time."""
from __future__ import annotations

import threading

import pytest

from search_api.batching import Batcher


def batches_for(queued: int, split_from: int | None) -> tuple[list[int], list]:
    """Batch sizes when `queued` single requests arrive while a first one is being encoded,
    and each request's result."""
    sizes: list[int] = []
    started, release = threading.Event(), threading.Event()

    def double(items):
        sizes.append(len(items))
        started.set()
        release.wait(10)
        return [2 * x for x in items]

    batcher = Batcher(double, "test", max_batch=64, split_from=split_from)
    try:
        first = batcher.submit([-1])
        assert started.wait(10)
        futures = [batcher.submit([i]) for i in range(queued)]
        release.set()
        results = [f.result(timeout=10) for f in [first, *futures]]
    finally:
        batcher.close()
    return sizes, results


@pytest.mark.parametrize("split_from, want", [
    (None, [1, 20]),         # everything queued in one call
    (8, [1, 10, 8, 2]),      # half of 20, then of 10 (at least 8), then the rest
    (32, [1, 20]),           # a queue below split_from: whole
])
def test_a_long_queue_is_taken_half_at_a_time(split_from, want):
    sizes, results = batches_for(20, split_from)
    assert sizes == want
    assert results == [[-2]] + [[2 * i] for i in range(20)]


def test_a_short_queue_is_one_batch():
    sizes, _ = batches_for(8, split_from=8)
    assert sizes == [1, 8]
