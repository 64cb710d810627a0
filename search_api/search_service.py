"""The search service the routes call: query embeddings in, ranked hits out.

`SearchService` joins three small parts: the encoders (`QueryEncoders`: batched towers), the
served index (`IndexHolder`: any backend, hot-swapped) and the image side (`StoredImages`:
store, decode gate, thumbnails). `search()` turns query embeddings into the vectors the index
searches (`Scoring`), searches one version for the whole request, reads each hit's cosine back
where the score is not the plain cosine (hubness correction), gives each hit its 0-100 match
(the model's `MatchScale`, when its card has one) and pages the ranking; `rank_given()` ranks
embeddings a client sent instead (the original clients' mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from encoder.match_scale import MatchScale
from search_api.encoders import QueryEncoders
from search_api.index_holder import IndexHolder
from search_api.stored_images import StoredImages


class BadEmbeddings(ValueError):
    """Given embeddings that cannot be ranked (a 422)."""


class NoMatchScale(ValueError):
    """A min_match asked of a model without a match scale (a 422)."""


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based, in the full ranking (offset included)
    key: str
    score: float  # what the ranking is by
    similarity: float  # cosine of query and image
    match: float | None = None  # 0-100, monotonic with score (None: the model has no scale)


@dataclass(frozen=True)
class Results:
    version: str | None  # the index version searched (None: given embeddings)
    total: int  # results available before offset/top_k
    hits: list[Hit]


class StageTimes:
    """Where the service's parts report how long a stage took; the app connects `sink` to its
    metrics (a service built alone reports nowhere)."""

    def __init__(self):
        self.sink: Callable[[str, float], None] | None = None

    def __call__(self, stage: str, seconds: float) -> None:
        if self.sink is not None:
            self.sink(stage, seconds)


MATCH_DECIMALS = 1  # finer than a person reads, coarse enough to compare as shown


def page(scores, keys, similarities, offset: int, top_k: int, min_score: float | None,
         matches=None, min_match: float | None = None) -> list[Hit]:
    """The hits ranked offset+1 .. offset+top_k, stopping at the first below min_score or
    min_match (match falls along the ranking as the score does)."""
    hits = []
    matches = [None] * len(scores) if matches is None else matches
    for rank, (score, key, cos, match) in enumerate(zip(scores, keys, similarities, matches), 1):
        if rank <= offset:
            continue
        if min_score is not None and score < min_score:
            break
        match = None if match is None else round(float(match), MATCH_DECIMALS)
        if min_match is not None and match < min_match:  # on the number the client sees
            break
        hits.append(Hit(rank, key, float(score), float(cos), match))
        if len(hits) == top_k:
            break
    return hits


class SearchService:
    def __init__(self, encoders: QueryEncoders, index: IndexHolder, images: StoredImages,
                 stages: StageTimes | None = None):
        self.encoders = encoders
        self.index = index
        self.images = images
        self.stages = stages or StageTimes()

    @property
    def model_id(self) -> str:
        return self.encoders.model_id

    @property
    def match_scale(self) -> MatchScale | None:
        return self.encoders.match_scale

    def _matches(self, scores, of_cosine: bool, min_match: float | None):
        """Each ranking's 0-100 matches (None without a scale: then min_match is refused)."""
        scale = self.match_scale
        if scale is None:
            if min_match is not None:
                raise NoMatchScale("min_match needs a model with a match scale (this one has "
                                   "none: use min_score, or calibrate it with "
                                   "python -m training.calibrate)")
            return [None] * len(scores)
        to_match = scale.match_cosine if of_cosine else scale.match
        return [to_match(s) for s in scores]

    def ready(self):
        """The served index view, or NoIndex / IndexDown (a 503 before any work is done)."""
        return self.index.require()

    async def search(self, query_embeddings: np.ndarray, top_k: int, offset: int = 0,
                     min_score: float | None = None,
                     min_match: float | None = None) -> list[Results]:
        """One Results per query embedding [Q, dim], all from one index version."""
        self._matches([], False, min_match)  # refuse an unusable min_match before searching
        view = self.index.require()  # one reference for the whole request (a reload swaps it)
        scoring = self.encoders.scoring
        readback = scoring.readback_column
        scores, keys, values = await self.index.search(
            view, scoring.query_vectors(query_embeddings), offset + top_k, readback)
        if readback is None:
            similarities = scores
        else:  # the score is not the cosine: read it back from each hit's stored component
            similarities = [scoring.cosine_from_readback(v, s[:len(v)])
                            for s, v in zip(scores, values)]
        matches = self._matches(scores, False, min_match)
        return [Results(view.version, view.count,
                        page(s, k, c, offset, top_k, min_score, m, min_match))
                for s, k, c, m in zip(scores, keys, similarities, matches)]

    def rank_given(self, query_embedding: np.ndarray, names: list[str], embeddings: list,
                   top_k: int, offset: int = 0, min_score: float | None = None,
                   min_match: float | None = None) -> Results:
        """The original clients' mode: rank exactly the embeddings they sent (named `names`)
        by cosine (so their match is the cosine's). BadEmbeddings when they are not all finite
        vectors of the model's size."""
        self._matches([], True, min_match)
        dim = self.encoders.dim
        try:
            mat = np.asarray(embeddings, dtype=np.float64)
        except ValueError:
            raise BadEmbeddings("image_embeddings must all have the same length") from None
        if mat.size and mat.shape[1] != dim:
            raise BadEmbeddings(f"image_embeddings must have dimension {dim}")
        if mat.size and not np.isfinite(mat).all():
            raise BadEmbeddings("image_embeddings must be finite numbers")
        if mat.size:
            # scale first so huge values cannot overflow the norm
            mat = mat / np.maximum(np.abs(mat).max(axis=1, keepdims=True), 1e-300)
            norms = np.linalg.norm(mat, axis=1, keepdims=True)
            scores = np.nan_to_num((mat / np.maximum(norms, 1e-12)) @ query_embedding, nan=0.0)
        else:
            scores = np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        [matches] = self._matches([scores], True, min_match)
        return Results(None, len(names),
                       page(scores, [names[i] for i in order], scores, offset, top_k, min_score,
                            matches, min_match))

    def start(self) -> None:
        self.index.start_watcher()

    def stop(self) -> None:
        """Stop the watcher and the worker threads (they restart on the next use)."""
        self.index.stop()
        self.encoders.close()

    def close(self) -> None:
        """stop(), and release the index's clients."""
        self.stop()
        self.index.vector_index.close()
