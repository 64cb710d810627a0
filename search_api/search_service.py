"""The search service the routes call: query embeddings in, ranked hits out.

`SearchService` joins three small parts: the encoders (`QueryEncoders`: batched towers), the
served index (`IndexHolder`: any backend, hot-swapped) and the image side (`StoredImages`:
store, decode gate, thumbnails). `search()` turns query embeddings into the vectors the index
searches (`Scoring`), searches one version for the whole request, reads each hit's cosine back
where the score is not the plain cosine (hubness correction), gives each hit its 0-100 match
(the model's `MatchScale`, when its card has one) and pages the ranking; `rank_given()` ranks
embeddings a client sent instead (the original clients' mode). `search_terms()` searches a
query of several terms (search_api.query_terms): texts encoded in one batch, stored photos'
vectors read from the same version, combined by `Scoring.combine`, searched once, the positive
term photos left out of their own results unless asked.

Filters (`PhotoFilter`, one per query) are applied inside the index's search, so a filtered
query gets a full page whenever that many photos match; queries with the same filter share one
index call. Each hit carries its photo's metadata in brief (`hit_info`: date, place, camera,
size), read from the same index version in one call per request.

`dedupe=True` collapses near duplicates (search_api.dedupe: the duplicates report of the served
version, else the ranked photos' own vectors): offset and top_k then count the collapsed
results, and the index is searched deeper (at most MAX_OFFSET + MAX_TOP_K photos, `depth`) until
a page is full or nothing more matches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from fastapi.concurrency import run_in_threadpool

from core.settings import RequestLimits
from encoder.match_scale import MatchScale
from indexer.duplicates import DEFAULT_THRESHOLD
from indexer.photo_filter import PhotoFilter
from search_api.dedupe import Collapsed, Groups, collapse, groups_for
from search_api.encoders import QueryEncoders
from search_api.explain import Explainer
from search_api.index_holder import IndexHolder, filter_key
from search_api.query_terms import TermError, TermQuery
from search_api.stored_images import StoredImages


class BadEmbeddings(ValueError):
    """Given embeddings that cannot be ranked (a 422)."""


class NoMatchScale(ValueError):
    """A min_match asked of a model without a match scale (a 422)."""


# not frozen: a frozen dataclass's __init__ costs ~0.7 us, this ~0.13 (20 per query's page);
# a Hit is built once and never changed (with_info makes a new one)
@dataclass(slots=True)
class Hit:
    rank: int  # 1-based, in the full ranking (offset included)
    key: str
    score: float  # what the ranking is by
    similarity: float  # cosine of query and image
    match: float | None = None  # 0-100, monotonic with score (None: the model has no scale)
    info: dict | None = None  # hit_info of the photo's metadata (None: the index has none)
    duplicates: int | None = None  # photos collapsed into this one (None: not deduplicated)
    duplicate_keys: tuple[str, ...] | None = None  # the first MAX_COLLAPSED_KEYS of them

    def with_info(self, info: dict | None) -> "Hit":
        # dataclasses.replace costs ~6 us a hit, this ~1
        return Hit(self.rank, self.key, self.score, self.similarity, self.match, info,
                   self.duplicates, self.duplicate_keys)


@dataclass(frozen=True)
class Results:
    version: str | None  # the index version searched (None: given embeddings)
    total: int  # results available before offset/top_k
    hits: list[Hit]
    dedupe: str | None = None  # where collapsed groups came from (search_api.dedupe.MODES)


class StageTimes:
    """Where the service's parts report how long a stage took; the app connects `sink` to its
    metrics (a service built alone reports nowhere)."""

    def __init__(self):
        self.sink: Callable[[str, float], None] | None = None

    def __call__(self, stage: str, seconds: float) -> None:
        if self.sink is not None:
            self.sink(stage, seconds)


# a deduplicated search first looks this many times deeper than the page it fills
DEDUPE_DEPTH_FACTOR = 4
DEDUPE_FIRST_DEPTH = 64
# stored vectors read per index call (a Milvus query names its keys in one expression)
VECTORS_PER_CALL = 1024

MATCH_DECIMALS = 1  # finer than a person reads, coarse enough to compare as shown


def iso_time(seconds) -> str | None:
    """Unix seconds as ISO 8601 in UTC (None for a missing or unusable value)."""
    if seconds is None:  # the common missing value, without an exception's cost
        return None
    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _finite(value):
    """JSON has no NaN or Infinity: such a stored number reads as missing."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def photo_info(stored: dict) -> dict:
    """A photo's stored metadata as the API returns it: the stored fields, `taken_at` as ISO
    8601 (UTC), unusable numbers as null."""
    out = {k: _finite(v) for k, v in stored.items()}
    if "taken_at" in out:
        out["taken_at"] = iso_time(out["taken_at"])
    return out


def hit_info(stored: dict | None) -> dict | None:
    """What a result shows under its thumbnail: when (ISO 8601, UTC; `taken_at_source` says
    whether it is the camera's date or the file's), where (city or region, country), which
    camera, what size. None when the index holds no metadata for the photo."""
    if not stored:
        return None
    get = stored.get
    place = [p for p in (get("city") or get("region"), get("country")) if p]
    make, model = get("camera_make") or "", get("camera_model") or ""
    camera = None
    if make or model:
        # models often repeat the make ("Canon" / "Canon EOS R6", "NIKON CORPORATION" /
        # "NIKON D750")
        brand = make.split()[0].casefold() if make.split() else ""
        camera = model if brand and model.casefold().startswith(brand) else \
            " ".join(p for p in (make, model) if p)
    return {"taken_at": iso_time(get("taken_at")),
            "taken_at_source": get("taken_at_source"),
            "place": ", ".join(place) or None,
            "camera": camera or None,
            "width": get("width"), "height": get("height")}


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


def collapsed_page(collapsed: Collapsed, scores, keys, similarities, offset: int, top_k: int,
                   min_score: float | None, matches=None,
                   min_match: float | None = None) -> list[Hit]:
    """page() over the photos kept by `collapse`, each hit with what was collapsed into it."""
    kept = collapsed.kept
    hits = page([scores[i] for i in kept], [keys[i] for i in kept],
                [similarities[i] for i in kept], offset, top_k, min_score,
                None if matches is None else [matches[i] for i in kept], min_match)
    out = []
    for hit in hits:
        into = collapsed.into[kept[hit.rank - 1]]
        out.append(replace(hit, duplicates=len(into),
                           duplicate_keys=tuple(
            keys[j] for j in into[:RequestLimits.MAX_COLLAPSED_KEYS])))
    return out


class SearchService:
    def __init__(self, encoders: QueryEncoders, index: IndexHolder, images: StoredImages,
                 stages: StageTimes | None = None, explain_cache_items: int = 64,
                 duplicates_report: str | None = None, dedupe_depth: int = 10_100):
        """duplicates_report: where indexer.duplicates writes its report (None: none);
        dedupe_depth: the deepest a deduplicated search looks (MAX_OFFSET + MAX_TOP_K)."""
        self.encoders = encoders
        self.index = index
        self.images = images
        self.stages = stages or StageTimes()
        self.duplicates_report = duplicates_report
        self.dedupe_depth = max(1, int(dedupe_depth))
        # why a photo matched (search_api.explain): maps over stored photos, cached
        self.explainer = Explainer(self, explain_cache_items)

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
                     min_score: float | None = None, min_match: float | None = None,
                     where: PhotoFilter | list[PhotoFilter | None] | None = None,
                     exclude: frozenset[str] = frozenset(), view=None,
                     dedupe: bool = False) -> list[Results]:
        """One Results per query embedding [Q, dim], all from one index version (`view`: the
        one the request already read from). where: one filter for every query, or one per
        query (None or empty: no filter). A filtered query's total is the number of photos its
        filter matches. exclude: indexed keys left out of every ranking (and its total).
        dedupe: near duplicates collapsed (module doc); the total then less the photos
        collapsed among those searched."""
        self._matches([], False, min_match)  # refuse an unusable min_match before searching
        # one reference for the whole request (a reload swaps it)
        view = view if view is not None else self.index.require()
        scoring = self.encoders.scoring
        readback = scoring.readback_column
        vectors = scoring.query_vectors(query_embeddings)
        n, want = len(vectors), offset + top_k
        wheres = list(where) if isinstance(where, list) else [where] * n
        wheres = [None if w is None or w.is_empty() else w for w in wheres]
        if not dedupe:
            k = want + len(exclude)
            scores, keys, values, found_counts, removed = await self._ranked(
                view, vectors, wheres, k, readback, exclude)
            collapsed, groups = None, None
        else:
            groups = await run_in_threadpool(groups_for, self.duplicates_report, view,
                                             self.model_id, hasattr(view, "stored_vectors"))
            depth = min(self.dedupe_depth, max(DEDUPE_DEPTH_FACTOR * want, DEDUPE_FIRST_DEPTH))
            held: dict[str, np.ndarray] = {}
            while True:  # deeper until every page is full, nothing more matches, or too deep
                k = depth + len(exclude)
                scores, keys, values, found_counts, removed = await self._ranked(
                    view, vectors, wheres, k, readback, exclude)
                groups = await self._hold_vectors(view, groups, keys, held)
                # O(depth^2) at worst: off the event loop, so other requests go on meanwhile
                collapsed = await run_in_threadpool(
                    lambda: [collapse(ks, groups, None if not groups.vectors else
                                      np.stack([held[key] for key in ks]) if ks else None)
                             for ks in keys])
                short = any(len(c.kept) < want and found >= k
                            for c, found in zip(collapsed, found_counts))
                if not short or depth >= self.dedupe_depth:
                    break
                depth = min(self.dedupe_depth, depth * DEDUPE_DEPTH_FACTOR)
        if readback is None:
            similarities = scores
        else:  # the score is not the cosine: read it back from each hit's stored component
            similarities = [scoring.cosine_from_readback(v, s[:len(v)])
                            for s, v in zip(scores, values)]
        matches = self._matches(scores, False, min_match)
        if collapsed is None:
            pages = [page(s, ks, c, offset, top_k, min_score, m, min_match)
                     for s, ks, c, m in zip(scores, keys, similarities, matches)]
        else:
            pages = [collapsed_page(cl, s, ks, c, offset, top_k, min_score, m, min_match)
                     for cl, s, ks, c, m in zip(collapsed, scores, keys, similarities, matches)]
        # the photos collapsed among those searched are no results of their own
        folded = [0] * n if collapsed is None else \
            [len(ks) - len(cl.kept) for ks, cl in zip(keys, collapsed)]
        totals = [(view.count - len(exclude) if w is None else
                   await self._matching(view, w, found, k) - gone) - less
                  for w, found, gone, less in zip(wheres, found_counts, removed, folded)]
        infos = await self._infos(view, [h.key for hits in pages for h in hits])
        return [Results(view.version, total,
                        [h.with_info(hit_info(infos.get(h.key))) for h in hits],
                        groups.mode if groups is not None else None)
                for total, hits in zip(totals, pages)]

    async def _hold_vectors(self, view, groups: Groups, keys: list[list[str]],
                            held: dict[str, np.ndarray]) -> Groups:
        """The embeddings of the ranked photos not yet in `held`, read from `view`, when the
        groups compare vectors; the groups without vectors when the view cannot give them (a
        photo deleted since the search: the report alone, or nothing, this time)."""
        if not groups.vectors:
            return groups
        missing = list(dict.fromkeys(key for ks in keys for key in ks if key not in held))
        if not missing:
            return groups
        scoring = self.encoders.scoring
        try:
            for start in range(0, len(missing), VECTORS_PER_CALL):
                part = missing[start:start + VECTORS_PER_CALL]
                stored = await self.index.call(view, "stored_vectors", part)
                held.update(zip(part, scoring.embeddings(np.asarray(stored, np.float32))))
        except (KeyError, AttributeError, NotImplementedError, ValueError, IndexError):
            return replace(groups, vectors=False,
                           mode="report" if groups.group_of is not None else "none")
        return groups

    async def _ranked(self, view, vectors: np.ndarray, wheres: list, k: int,
                      readback: int | None, exclude: frozenset[str]):
        """Each query's ranking to depth k, `exclude` left out -> scores, keys, readback
        values, how many the index found, how many were excluded (each per query)."""
        n = len(vectors)
        groups: dict[str | None, list[int]] = {}
        for i, w in enumerate(wheres):
            groups.setdefault(filter_key(w), []).append(i)
        scores, keys, values = [None] * n, [None] * n, [None] * n
        for rows in groups.values():  # one index call per distinct filter
            found = await self.index.search(view, vectors[rows], k, readback, wheres[rows[0]])
            for r, i in enumerate(rows):
                scores[i], keys[i] = found[0][r], found[1][r]
                values[i] = found[2][r] if readback is not None else None
        found_counts = [len(ks) for ks in keys]
        removed = [0] * n
        if exclude:
            for i in range(n):
                kept = [j for j, key in enumerate(keys[i]) if key not in exclude]
                removed[i] = len(keys[i]) - len(kept)
                scores[i] = np.asarray(scores[i][:len(keys[i])])[kept]
                keys[i] = [keys[i][j] for j in kept]
                if values[i] is not None:
                    values[i] = np.asarray(values[i])[kept]
        return scores, keys, values, found_counts, removed

    async def search_terms(self, query: TermQuery, top_k: int, offset: int = 0,
                           min_score: float | None = None, min_match: float | None = None,
                           where: PhotoFilter | None = None,
                           include_terms: bool = False, dedupe: bool = False) -> Results:
        """A query of several terms (search_api.query_terms): the texts encoded in one batched
        pass, the stored photos' vectors read from the served version (no upload), combined
        by `Scoring.combine` and searched once. The photos used as positive terms are left out
        of their own results unless include_terms. TermError (a 422) naming a key the version
        does not hold, or the terms when they cancel out."""
        self._matches([], False, min_match)
        view = self.index.require()
        combined = await self.term_embedding(query, view)
        exclude = frozenset() if include_terms else frozenset(query.positive_keys)
        [results] = await self.search(combined[None], top_k, offset, min_score, min_match,
                                      where, exclude=exclude, view=view, dedupe=dedupe)
        return results

    async def term_embedding(self, query: TermQuery, view=None) -> np.ndarray:
        """The query embedding [dim] of a query of several terms (see search_terms); view: the
        version whose stored photos the keys name (default: the served one)."""
        return self.combine(query, await self.term_embeddings(query, view))

    async def term_embeddings(self, query: TermQuery, view=None) -> np.ndarray:
        """Each term's own embedding [T, dim], in the query's order: texts encoded in one
        batch, stored photos' read from `view` (TermError naming a key it does not hold)."""
        view = view if view is not None else self.index.require()
        scoring = self.encoders.scoring
        texts = [t for t in query.terms if t.key is None]
        keyed = [t for t in query.terms if t.key is not None]
        by_term: dict[int, np.ndarray] = {}
        if keyed:  # first: a wrong key is refused before any encoding
            keys = list(dict.fromkeys(t.key for t in keyed))
            try:
                stored = await self.index.call(view, "stored_vectors", keys)
            except KeyError as exc:
                missing = exc.args[0] if exc.args else None
                term = next((t for t in keyed if t.key == missing), keyed[0])
                raise TermError(term.loc, term.typed(),
                                "no photo with this key is in the index") from None
            row = dict(zip(keys, scoring.embeddings(np.asarray(stored, np.float32))))
            by_term.update({id(t): row[t.key] for t in keyed})
        if texts:
            encoded = await self.encoders.encode_texts([t.encoded_text or t.text for t in texts])
            by_term.update({id(t): e for t, e in zip(texts, np.asarray(encoded))})
        return np.stack([by_term[id(t)] for t in query.terms])

    def combine(self, query: TermQuery, embeddings: np.ndarray) -> np.ndarray:
        """`Scoring.combine` of the terms' embeddings; TermError when they cancel out."""
        try:
            return self.encoders.scoring.combine(embeddings,
                                                 [t.signed_weight for t in query.terms])
        except ValueError as exc:
            raise TermError(query.terms[0].loc[:-2] or query.terms[0].loc, query.typed(),
                            str(exc)) from None

    async def _matching(self, view, where: PhotoFilter, found: int, k: int) -> int:
        """How many photos `where` matches: the hits found when fewer than asked (the search
        returned every match), else the view's count of matches."""
        if found < k:
            return found
        return int(await self.index.call(view, "count_matching", where))

    async def _infos(self, view, keys: list[str]) -> dict[str, dict | None]:
        """key -> the photo's stored metadata (None where the version holds none)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        return dict(zip(unique, await self.index.call(view, "info", unique)))

    async def photo_info(self, key: str) -> dict | None:
        """The stored metadata of one indexed photo (photo_info), None when it is not in the
        served version or the version holds no metadata for it."""
        view = self.index.require()
        [stored] = await self.index.call(view, "info", [key])
        return None if stored is None else photo_info(stored)

    async def info_counts(self) -> dict:
        """Photos of the served version with a date, a position, a place (zeros without one)."""
        view = self.index.current
        if view is None or self.index.down:
            return {"with_date": 0, "with_position": 0, "with_place": 0}
        return await self.index.call(view, "info_counts")

    async def facets(self, limit: int) -> dict:
        """The most common values (with counts) of folder, country, city, camera, year."""
        view = self.index.require()
        return await self.index.call(view, "facets", limit=limit)

    def rank_given(self, query_embedding: np.ndarray, names: list[str], embeddings: list,
                   top_k: int, offset: int = 0, min_score: float | None = None,
                   min_match: float | None = None, dedupe: bool = False) -> Results:
        """The original clients' mode: rank exactly the embeddings they sent (named `names`)
        by cosine (so their match is the cosine's). BadEmbeddings when they are not all finite
        vectors of the model's size. dedupe: near duplicates among them collapsed by their
        own vectors (no report describes them)."""
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
            mat = mat / np.maximum(norms, 1e-12)
            scores = np.nan_to_num(mat @ query_embedding, nan=0.0)
        else:
            scores = np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        ranked = [names[i] for i in order]
        [matches] = self._matches([scores], True, min_match)
        if not dedupe:
            return Results(None, len(names),
                           page(scores, ranked, scores, offset, top_k, min_score, matches,
                                min_match))
        # as deep as the page needs, as an index search is (collapsing a prefix of a ranking
        # is that prefix of its collapse); the sender's names need not be unique: positions
        groups = Groups("page", DEFAULT_THRESHOLD, vectors=True)
        want = offset + top_k
        depth = max(DEDUPE_DEPTH_FACTOR * want, DEDUPE_FIRST_DEPTH)
        while True:
            depth = min(depth, len(ranked))
            collapsed = collapse(list(range(depth)), groups, mat[order[:depth]])
            if len(collapsed.kept) >= want or depth == len(ranked):
                break
            depth *= DEDUPE_DEPTH_FACTOR
        return Results(None, len(ranked) - depth + len(collapsed.kept),
                       collapsed_page(collapsed, scores, ranked, scores, offset, top_k,
                                      min_score, matches, min_match), "page")

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
