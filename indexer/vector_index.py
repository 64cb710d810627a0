"""The vector-index interface: what the pipeline, the shards, the command line, the DAG tasks and
the search service call, whichever backend INDEX_BACKEND names. Nothing here knows a backend;
`BACKENDS` names each one's module, imported when it is opened (`open_index(settings)`).

Backends: `faiss` (indexer.faiss_index: versioned FAISS files under INDEX_DIR, the embedded
default) and `milvus` (indexer.milvus_index: collections on a Milvus server, the scale-out one).
Adding one: a module with a `VectorIndex` subclass, one line in `BACKENDS`, one entry in the
contract suite's parameters (tests/indexer/conftest.py).

Vectors go in exactly as `encoder.scoring.Scoring` makes them and come back with inner-product
scores, so every backend ranks and scores alike. Keys are object keys; every vector carries its
object's etag, so an update can tell what changed.

Reading (the search service, `status`):

    published(model_id) -> str | None          the version readers should search now (cheap)
    view(model_id, version=None)               a searchable view of it: .version .count .dim
                                               .model_id, .search(queries, k, readback=None,
                                               where=None)
                                               -> (scores [Q, k'] padded with -inf, keys)
                                               (+ per row, the hits' stored vector component
                                               number `readback`: what Scoring reads the
                                               cosine back from; no vectors over the wire)
                                               .info(keys) .info_counts() .facets(limit=20)
                                               .count_matching(where): the photos' metadata
                                               (below)
    indexed(model_id) -> Indexed | None        the published version's keys -> etags, count
    status(model_id) -> dict                   backend, version, model_id, count (+ alias,
                                               collection)
    keys_page(version, after=None, limit)      a version's (key, etag) rows in key order, the
                                               first `limit` after key `after`: reads any size
                                               page by page (`indexer.verify`); a key held
                                               twice comes twice, in one page (a FAISS key
                                               table could hold one twice; Milvus cannot:
                                               an upsert replaces the row of its key)

Near duplicates (what `python -m indexer duplicates` reads, indexer.duplicates):

    near_pairs(view, threshold, columns=None, batch=1024, progress=None)
                                               every pair of the version's photos whose
                                               vectors' inner product over the first `columns`
                                               components is above `threshold`, once each, in
                                               batches of (keys_a, keys_b, similarities).
                                               Default: keys_page + view.stored_vectors +
                                               view.search (the NEAR_NEIGHBOURS_MAX nearest);
                                               FAISS: its range_search; Milvus: its range
                                               search (radius)

Whole-model writes (what `python -m indexer rebuild|update|prune` does):

    rebuild(model_id, keys, vectors, etags, info=None)
                                               a new version with exactly these, published
    update(model_id, keys, vectors, etags, delete=(), info=None)
                                               upsert these, delete those, in the published
                                               version (FAISS: a new version; Milvus: in place)
    versions() / prune(keep)                   every version held / drop old ones, never a
                                               published one

A version written in parts (the DAGs' fanned-out embedding; each part may come from another
process or machine, and a part written twice is written once):

    version = begin(model_id, dim, base=None)  a draft nobody searches; base=<the published
                                               version>: an update of it (a backend that
                                               updates in place returns `base` itself)
    write(version, keys, vectors, etags, part, info=None)
                                               upsert into it (a part rewritten replaces its
                                               rows, their metadata with them)
    remove(version, keys, part)                delete keys its base holds (keys that no part
                                               writes)
    publish(version, parts=None)               complete -> switch readers to it atomically;
                                               parts: the part names it must hold
    discard(version)                           drop an unpublished draft
    close()                                    release clients and servers

The photos' metadata (`info=`: one dict of indexer.photo_info's PHOTO_INFO_FIELDS, or None,
per row; stored as indexer.photo_columns cleans it: known columns of their types, `folder`
from the key when missing) travels with the vectors: a row written, upserted or removed takes
its metadata with it (info=None writes rows without metadata). A view reads it back:

    view.search(queries, k, where=PhotoFilter) the filter applied INSIDE the nearest-neighbour
                                               search (never top-k then filter): a row is full
                                               whenever k photos match; fewer matches, fewer
                                               hits; none, an empty row; the same return shape.
                                               An empty filter (or None) restricts nothing; a
                                               version stored without metadata matches no
                                               non-empty filter (indexer.photo_filter)
    view.info(keys) -> [dict | None]           each key's stored metadata (its known values;
                                               None: not in the version, or none stored)
    view.info_counts() -> {"with_date", "with_position", "with_place"}
    view.stored_vectors(keys) -> [len(keys), dim] the vectors held for these keys (checks, and
                                               the default near_pairs)
    view.count_matching(where) -> int          how many photos the filter lets through (the
                                               `total` of a filtered page)
    view.facets(limit=20) -> {"folder" | "country" | "city" | "camera" | "year":
                               [[value, count], ...]}   most common first
                                               (indexer.photo_columns says what each counts)

Versions made before metadata existed still load and search; info() gives None, counts 0.

Errors: `IndexUnavailable` when the index service cannot be reached (Milvus down: retry later);
`IndexLoadError` when a version is unusable (missing, corrupt, another model's); `DraftGone`
when a draft cannot be published (discarded, overtaken by a newer version, a part missing);
`FilterTooBroad` (a ValueError: the client's to narrow) when a backend cannot apply a filter
exactly within its limits.
"""
from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

import numpy as np

# name -> "module:Class"; the one list of valid INDEX_BACKEND values
BACKENDS: dict[str, str] = {
    "faiss": "indexer.faiss_index:FaissIndex",
    "milvus": "indexer.milvus_index:MilvusIndex",
}


class IndexUnavailable(RuntimeError):
    """The index service does not answer (network, server down). Messages are public: what is
    wrong, never credentials or server paths."""


class IndexLoadError(RuntimeError):
    """A version is missing, corrupt or does not match the model. Messages say what is wrong,
    never where on disk (they are shown by /health)."""


class FilterTooBroad(ValueError):
    """A filter this backend cannot apply exactly within its limits (e.g. `near` around a
    point with too many photos, on a Milvus server without arithmetic in expressions): the
    client's to narrow (a 422), not a server fault."""


class DraftGone(LookupError):
    """An unpublished version cannot be published: it was discarded, a newer version made it
    obsolete, or a part it must hold is missing. A retry cannot fix it."""


@dataclass
class Indexed:
    """What the published version of a model holds."""
    version: str
    model_id: str
    count: int
    etags: dict[str, str]  # object key -> etag


# the nearest photos the default near_pairs asks of a search per photo: a photo with more near
# copies than this still joins their group through them (groups are connected components)
NEAR_NEIGHBOURS_MAX = 64

NearPairs = Iterator[tuple[list[str], list[str], np.ndarray]]


def probe_vectors(vectors: np.ndarray, columns: int | None) -> np.ndarray:
    """Stored vectors as queries that score only their first `columns` components (None: all):
    the embedding, without a stored correction column, so a score is the embeddings' cosine."""
    queries = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if columns is not None:
        queries[:, columns:] = 0.0
    return queries


def pairs_above(keys_a: list[str], keys_b: list[list[str]], scores: np.ndarray,
                threshold: float) -> tuple[list[str], list[str], np.ndarray]:
    """Search hits (row i: keys_b[i], scores[i]) as pairs scoring above `threshold`, each pair
    once (the first key sorts before the second; a photo is no pair with itself)."""
    out_a, out_b, out_s = [], [], []
    for a, row, row_scores in zip(keys_a, keys_b, scores):
        for b, s in zip(row, row_scores):
            if s > threshold and a < b:
                out_a.append(a)
                out_b.append(b)
                out_s.append(float(s))
    return out_a, out_b, np.asarray(out_s, np.float32)


def new_version_name() -> str:
    """Sortable by creation time: `20240101T000000000000Z-abc123` (Milvus uses `_` for `-`).
    Index versions and shard plans are named by it."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def check_rows(keys, vectors, etags) -> np.ndarray:
    """The vectors as contiguous float32 (none: an empty array); ValueError unless keys, vectors
    and etags have one entry per row."""
    vectors = np.ascontiguousarray(vectors if vectors is not None else np.zeros((0, 0)),
                                   dtype=np.float32)
    if not (len(keys) == len(etags) == len(vectors)):
        raise ValueError("keys, vectors and etags must have the same length")
    return vectors


def check_readback(readback: int, dim: int) -> int:
    """A stored-vector component number a view can read back (0 <= readback < dim)."""
    if isinstance(readback, bool) or not 0 <= int(readback) < dim:
        raise ValueError(f"readback column {readback} is outside the stored vectors (dim {dim})")
    return int(readback)


def ragged_result(scores: list, keys: list[list[str]], readback: list | None = None):
    """Rows of different lengths (a filter matched fewer than k) as one result: scores
    [Q, longest row] padded with -inf, keys (+ readback values) per row as they are."""
    width = max((len(r) for r in keys), default=0)
    out = np.full((len(keys), width), -np.inf, np.float32)
    for i, row in enumerate(scores):
        out[i, :len(row)] = row[:width]
    return (out, keys) if readback is None else (out, keys, readback)


def empty_result(n_queries: int, readback: int | None):
    """What a search of an empty version returns."""
    empty = [[] for _ in range(n_queries)]
    out = (np.zeros((n_queries, 0), np.float32), empty)
    return out if readback is None else out + ([np.zeros(0, np.float32)] * n_queries,)


class VectorIndex:
    """The interface (see the module doc). Subclasses live one per module, named in BACKENDS."""
    backend: str = ""
    remote: bool = False  # True: searches are network calls (the service batches them)

    @classmethod
    def from_settings(cls, settings) -> "VectorIndex": raise NotImplementedError

    # --- reading -----------------------------------------------------------------------------
    def published(self, model_id: str | None) -> str | None: raise NotImplementedError
    def view(self, model_id: str | None, version: str | None = None): raise NotImplementedError
    def indexed(self, model_id: str | None) -> Indexed | None: raise NotImplementedError
    def status(self, model_id: str | None = None) -> dict: raise NotImplementedError
    def versions(self) -> list[str]: raise NotImplementedError
    def keys_page(self, version: str, after: str | None = None,
                  limit: int = 10_000) -> list[tuple[str, str]]: raise NotImplementedError

    # --- writing -----------------------------------------------------------------------------
    def prune(self, keep: int) -> dict: raise NotImplementedError
    def begin(self, model_id: str, dim: int, extra: dict | None = None,
              tuning_queries: np.ndarray | None = None,
              base: str | None = None) -> str: raise NotImplementedError
    def write(self, version: str, keys: list[str], vectors: np.ndarray, etags: list[str],
              part: str = "0", info: list[dict | None] | None = None) -> int:
        raise NotImplementedError
    def remove(self, version: str, keys: Iterable[str], part: str = "0") -> int:
        raise NotImplementedError
    def publish(self, version: str, parts: Iterable[str] | None = None) -> dict:
        raise NotImplementedError
    def discard(self, version: str) -> None: raise NotImplementedError

    def close(self) -> None:
        """Release clients and servers (nothing to release by default)."""

    def near_pairs(self, view, threshold: float, columns: int | None = None, batch: int = 1024,
                   progress: Callable[[int], None] | None = None) -> NearPairs:
        """Pairs of the view's photos scoring above `threshold` (see the module doc), each once.
        Built on the interface: the version's keys page by page, their stored vectors read
        back and searched for their NEAR_NEIGHBOURS_MAX nearest. `progress(n)`: n more photos
        done."""
        k = min(NEAR_NEIGHBOURS_MAX + 1, view.count)  # +1: a photo finds itself first
        after = None
        while k > 0 and (rows := self.keys_page(view.version, after, batch)):
            keys = [key for key, _ in rows]
            queries = probe_vectors(view.stored_vectors(keys), columns)
            scores, found = view.search(queries, k)[:2]
            yield pairs_above(keys, found, scores, threshold)
            if progress is not None:
                progress(len(keys))
            after = keys[-1]

    # --- built on the above (a backend may do them faster) -----------------------------------
    def update(self, model_id: str, keys: list[str], vectors: np.ndarray, etags: list[str],
               delete: Iterable[str] = (), extra: dict | None = None,
               tuning_queries: np.ndarray | None = None,
               info: list[dict | None] | None = None) -> dict | None:
        """Upsert these, delete those, in the published version of `model_id` ->
        {"version", "count", "changed"}; None when this model has none (rebuild instead)."""
        try:
            current = self.indexed(model_id)
        except IndexLoadError:
            return None
        if current is None or current.model_id != model_id:
            return None
        vectors = check_rows(keys, vectors, etags)
        gone = [k for k in dict.fromkeys(delete) if k in current.etags and k not in set(keys)]
        if not len(keys) and not gone:
            return {"version": current.version, "count": current.count, "changed": False}
        dim = vectors.shape[1] if len(keys) else self.view(model_id, current.version).dim
        version = self.begin(model_id, dim, extra, tuning_queries, base=current.version)
        try:
            self.write(version, keys, vectors, etags, info=info)
            self.remove(version, gone)
            out = self.publish(version)
        except BaseException:
            if version != current.version:
                self.discard(version)
            raise
        return {**out, "changed": True}

    def rebuild(self, model_id: str, keys: list[str], vectors: np.ndarray, etags: list[str],
                extra: dict | None = None, tuning_queries: np.ndarray | None = None,
                info: list[dict | None] | None = None) -> dict:
        """A new version holding exactly these vectors, published. -> {"version", "count"}"""
        vectors = np.asarray(vectors, np.float32)
        version = self.begin(model_id, vectors.shape[1], extra, tuning_queries)
        try:
            self.write(version, keys, vectors, etags, info=info)
            return self.publish(version)
        except BaseException:
            self.discard(version)
            raise


def backend_class(name: str) -> type[VectorIndex]:
    """The VectorIndex subclass registered as `name` (its module imported now)."""
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"INDEX_BACKEND must be one of {', '.join(BACKENDS)}, not "
                         f"{str(name)[:40]!r}") from None
    return getattr(importlib.import_module(module), cls)


def open_index(settings) -> VectorIndex:
    """The backend INDEX_BACKEND names, configured from the settings (faiss: INDEX_DIR; milvus:
    MILVUS_URI, MILVUS_TOKEN, collections named after MILVUS_COLLECTION_PREFIX)."""
    return backend_class(settings.index_backend).from_settings(settings)
