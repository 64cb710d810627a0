"""Concurrent searches on a remote index share one call per version (IndexHolder.search):
each request still gets exactly the answer it would get alone."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from indexer.vector_index import IndexUnavailable
from search_api.batching import Batcher
from search_api.index_holder import join_rows, remote_search_batch


class ExactView:
    """A remote view stand-in: exact inner-product search over a matrix, recording its calls."""

    def __init__(self, vectors: np.ndarray, name: str):
        self.vectors, self.keys = vectors, [f"{name}/{i}" for i in range(len(vectors))]
        self.calls: list[tuple[int, int, int | None]] = []

    def search(self, queries, k, readback=None):
        self.calls.append((len(queries), k, readback))
        scores = queries @ self.vectors.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out = (np.take_along_axis(scores, top, 1), [[self.keys[i] for i in row] for row in top])
        return out if readback is None else out + ([self.vectors[row, readback] for row in top],)


@pytest.fixture
def views():
    rng = np.random.default_rng(0)
    return ExactView(rng.standard_normal((50, 8)).astype(np.float32), "a"), \
        ExactView(rng.standard_normal((30, 8)).astype(np.float32), "b")


def test_one_call_per_view_and_k_each_answer_its_own(views):
    """Same view and k share a call; another k gets its own (a deep page asked by one client
    never makes its neighbours' searches deeper)."""
    a, b = views
    q = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    jobs = [(a, q[0], 3, 7), (b, q[1], 7, 7), (a, q[2], 10, 7), (a, q[3], 1, None),
            (b, q[4], 7, 7), (a, q[5], 3, 7), (a, q[0], 3, 2)]
    rows = remote_search_batch(jobs)
    assert sorted(a.calls, key=str) == sorted([(1, 1, None), (1, 10, 7), (2, 3, 7), (1, 3, 2)],
                                              key=str)
    assert b.calls == [(2, 7, 7)]
    for (view, vec, k, readback), got in zip(jobs, rows):
        alone = view.search(vec[None], k, readback=readback)
        assert len(got) == len(alone) and got[1] == alone[1][0]
        np.testing.assert_allclose(got[0], alone[0][0], atol=1e-5)  # BLAS order per batch size
        if readback is not None:
            np.testing.assert_array_equal(got[2], alone[2][0])


def test_rows_join_back_into_search_shape(views):
    a, _ = views
    q = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    scores, keys, tails = join_rows(remote_search_batch([(a, v, 4, 7) for v in q]))
    want = a.search(q, 4, readback=7)
    np.testing.assert_allclose(scores, want[0], atol=1e-5)
    assert keys == want[1] and all(np.array_equal(x, y) for x, y in zip(tails, want[2]))


def test_concurrent_requests_share_calls_and_a_failure_reaches_every_one(views):
    a, _ = views
    q = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    batcher = Batcher(remote_search_batch, "search", retry_alone=False)

    async def many():
        return await asyncio.gather(*(batcher([(a, v, 5, None)]) for v in q))

    answers = asyncio.run(many())
    assert sum(n for n, _, _ in a.calls) == 16 and len(a.calls) < 16
    for v, got in zip(q, answers):
        assert got[0][1] == a.search(v[None], 5)[1][0]

    class Down(ExactView):
        def search(self, queries, k, readback=None):
            self.calls.append((len(queries), k, readback))
            raise IndexUnavailable("the vector index (Milvus) does not answer")

    down = Down(a.vectors, "d")

    async def failing():
        return await asyncio.gather(*(batcher([(down, v, 5, None)]) for v in q),
                                    return_exceptions=True)

    errors = asyncio.run(failing())
    assert all(isinstance(e, IndexUnavailable) for e in errors)
    assert len(down.calls) < 16  # no retry of each request alone against a server that is down
    batcher.close()
