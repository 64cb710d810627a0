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
        self.filters: list = []

    def search(self, queries, k, readback=None, where=None):
        self.calls.append((len(queries), k, readback))
        self.filters.append(where)
        scores = queries @ self.vectors.T
        if where is not None:  # a filter stand-in: only the rows whose number is even
            scores = np.where(np.arange(len(self.keys)) % 2 == 0, scores, -np.inf)
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
    jobs = [job + (None,) for job in jobs]  # no filter
    rows = remote_search_batch(jobs)
    assert sorted(a.calls, key=str) == sorted([(1, 1, None), (1, 10, 7), (2, 3, 7), (1, 3, 2)],
                                              key=str)
    assert b.calls == [(2, 7, 7)]
    for (view, vec, k, readback, _), got in zip(jobs, rows):
        alone = view.search(vec[None], k, readback=readback)
        assert len(got) == len(alone) and got[1] == alone[1][0]
        np.testing.assert_allclose(got[0], alone[0][0], atol=1e-5)  # BLAS order per batch size
        if readback is not None:
            np.testing.assert_array_equal(got[2], alone[2][0])


def test_only_queries_with_the_same_filter_share_a_call(views):
    """A filter is part of the search: queries with different filters never share one call,
    equal filters (however built) do, and an unfiltered query is searched without one."""
    from indexer.photo_filter import PhotoFilter

    a, _ = views
    q = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    norway = PhotoFilter(country="Norway")
    jobs = [(a, q[0], 5, None, norway), (a, q[1], 5, None, None),
            (a, q[2], 5, None, PhotoFilter.model_validate({"country": "Norway"})),
            (a, q[3], 5, None, PhotoFilter(folders=["2023"]))]
    rows = remote_search_batch(jobs)
    assert sorted(n for n, _, _ in a.calls) == [1, 1, 2]
    assert a.filters.count(None) == 1 and norway in a.filters
    for (view, vec, k, readback, where), got in zip(jobs, rows):
        assert got[1] == view.search(vec[None], k, where=where)[1][0]
        if where is not None:
            assert all(int(key.split("/")[1]) % 2 == 0 for key in got[1])


def test_rows_join_back_into_search_shape(views):
    a, _ = views
    q = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    scores, keys, tails = join_rows(remote_search_batch([(a, v, 4, 7, None) for v in q]))
    want = a.search(q, 4, readback=7)
    np.testing.assert_allclose(scores, want[0], atol=1e-5)
    assert keys == want[1] and all(np.array_equal(x, y) for x, y in zip(tails, want[2]))


def test_concurrent_requests_share_calls_and_a_failure_reaches_every_one(views):
    a, _ = views
    q = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    batcher = Batcher(remote_search_batch, "search", retry_alone=False)

    async def many():
        return await asyncio.gather(*(batcher([(a, v, 5, None, None)]) for v in q))

    answers = asyncio.run(many())
    assert sum(n for n, _, _ in a.calls) == 16 and len(a.calls) < 16
    for v, got in zip(q, answers):
        assert got[0][1] == a.search(v[None], 5)[1][0]

    class Down(ExactView):
        def search(self, queries, k, readback=None, where=None):
            self.calls.append((len(queries), k, readback))
            raise IndexUnavailable("the vector index (Milvus) does not answer")

    down = Down(a.vectors, "d")

    async def failing():
        return await asyncio.gather(*(batcher([(down, v, 5, None, None)]) for v in q),
                                    return_exceptions=True)

    errors = asyncio.run(failing())
    assert all(isinstance(e, IndexUnavailable) for e in errors)
    assert len(down.calls) < 16  # no retry of each request alone against a server that is down
    batcher.close()
