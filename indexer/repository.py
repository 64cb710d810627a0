"""The FAISS backend's files: versioned, persisted FAISS indexes with an atomic CURRENT pointer
(indexer.faiss_index is the backend built on them).

Layout under the index directory:
    versions/<version>/index.faiss   FAISS index over inner product (vectors are L2-normalised):
                                     IndexIDMap2(IndexFlatIP) while exact search is fast enough
                                     (served as an IndexIDMap: no id -> position map per
                                     process), IndexIVFFlat above that (index_policy; ids stay
                                     stable)
    versions/<version>/table.arrow   ids, object keys and content etags, in the same order, and
                                     their sort orders (indexer.key_table: read memory-mapped);
                                     versions made before it have table.json (the three columns
                                     as JSON lists), still read
    versions/<version>/info.parquet  the photos' metadata, one row per vector in table order
                                     (indexer.photo_table); versions made before it have none
    versions/<version>/vectors.npy   a compressed (IVF-PQ) version only: the full vectors as
                                     fp16, one row per vector in table order, read memory-
                                     mapped: every hit of the index's top `rerank` (tuned) is scored
                                     again from them, and stored vectors are read from them
    versions/<version>/manifest.json model id, dim, count, created, index type, checksums (of
                                     every file above)
    CURRENT                          the name of the published version

A version is written under a temporary name and renamed into place, then CURRENT is replaced
atomically (both fsync'd, core.atomic): readers see the old version or the new one, never a
partial one. `IndexVersion` is a loaded, checked version: the FAISS backend's view.

Filtered search (`IndexVersion.search(..., where=PhotoFilter)`): the search runs over the ids
that pass, never top-k then filter. A filter's first search costs about what it touches, not
the table:
  - the narrowest condition (folders, a date range, a camera or place name) gives its rows from
    a per-column order (PhotoTable.candidate_rows); when few, the filter is evaluated over those
    rows only. Few ids pass (exact search over them costs no more than the IVF probe it
    replaces; at 1M vectors of dim 256 and k=10, up to ~5k ids, EXACT_MIN_ROWS at least):
    their stored vectors are gathered and scored exactly. More: an IDSelectorBitmap over them in
    FAISS's SearchParameters: flat, an exact scan that skips the rest; IVF, the lists probed are
    chosen for the filter: the lists nearest the query that hold passing vectors, as many as
    hold FILTER_CANDIDATES_PER_HIT * k of them and at least the index's own nprobe, then
    `search_preassigned` with the selector. Lists near the query without a passing photo are
    skipped instead of probed for nothing (when few lists hold any, only those are ranked): a
    filter of photos unlike the query (a folder of another trip) still finds its best ones.
  - IVF, a one-condition filter (whole folders, a region, a city, a date range) that is not
    few: how many of its photos each list holds is read from the version's per-column list
    counts (per value for folders and places; cumulative along the photos by date, plus two
    partial blocks), the lists are chosen from those counts, and the filter is evaluated over
    the chosen lists' photos only (`_search_counted`; its own rows in those lists, when its
    column's order gives few): no pass over its photos, nothing kept, and a folder unlike the
    query is found where it is. When few of the chosen lists' entries pass (a narrow date
    range), those photos are scored from their stored vectors instead of the lists scanned.
  - IVF, a filter of several conditions that many may pass, at its first search: evaluated
    over the photos of the lists nearest the query only (`_search_near`), the same choice of
    lists; when those hold too few, or the filter is searched again, counted as above (and
    kept).
  - IVF-Flat vectors gathered for an exact search are read in one gather from the mapped
    file's lists (`_ivf_mapped_lists`), not list by list.
What was counted is kept per filter (FILTER_CACHE_SIZE filters), for the next page or words.
`count_matching` (an answer's total) counts a one-condition filter from its column's order
(folders, dates, region, city), else it counts and keeps the passing ids.
Scores come from FAISS's own loops (one thread in the service), never numpy's BLAS, whose
threads wait for cores on a busy machine.
Either way a row holds k hits whenever k photos pass (the lists probed hold at least k of
them); never top-k then filter.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view
from cachetools import LRUCache
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from core.atomic import atomic_dir, write_atomic
from core.hashing import sha256_file
from core.memory import release_memory
from indexer import photo_columns
from indexer.index_policy import (
    RERANK_DEPTH,
    coarse_queries,
    index_spec_of,
    ivf_or_none,
    rerank,
)
from indexer.key_table import Column, KeyTable
from indexer.photo_filter import PhotoFilter, active
from indexer.photo_table import OneCondition, PhotoTable
from indexer.vector_index import IndexLoadError, check_readback, empty_result, new_version_name

__all__ = ["IndexLoadError", "IndexRepository", "IndexVersion", "VERSION_NAME"]

MANIFEST_FORMAT = "flickr-search-index/1"
# what a version name may look like (publish makes `20240101T000000000000Z-abc123`); anything
# else in CURRENT, or asked for, is refused without being echoed or used as a path
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_POINTER_MAX_BYTES = 256
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TABLE_FILE = "table.arrow"
LEGACY_TABLE_FILE = "table.json"  # the key table of versions made before table.arrow
# what a version is written with; a version loads with index.faiss and either key table (the
# manifest's checksums name which: table.arrow when both)
REQUIRED_FILES = ("index.faiss", TABLE_FILE)
INFO_FILE = "info.parquet"  # optional: versions made before metadata have none
VECTORS_FILE = "vectors.npy"  # a compressed version's full vectors (fp16, table order)
VECTORS_CHUNK = 1_000_000  # rows copied at a time when a version's vectors are written
RECENT_ROWS_MAX = 4096  # hits' key -> row a loaded version remembers (IndexVersion._rows_of)
FILTER_CACHE_SIZE = 16  # filters whose passing ids a loaded version keeps (<= ~130 KB each)
EXACT_MIN_ROWS = 2048  # this few passing ids are always searched exactly
FILTER_CANDIDATES_PER_HIT = 20  # IVF: passing vectors in the probed lists per hit wanted
_ID_BYTES = 8  # an IVF list's ids are int64
# scoring a gathered vector (a random read from the mapped lists, a TLB miss each) costs about
# this many scanned ones (1M IVF-Flat: exact over 5k ids 1.26 ms, over 10k 5.4 ms; the lists
# holding 200 of them ~1 ms)
GATHER_COST = 10.0
# a list entry FAISS's selector skips costs about this share of one it scores (1M IVF-Flat, a
# date filter: 88 lists holding 21k entries, 200 of them passing, ~0.2 ms)
SKIP_COST = 0.25


class Manifest(BaseModel):
    """The schema of manifest.json (further fields are kept as they are)."""
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: StrictStr
    model_id: StrictStr = Field(min_length=1, max_length=512)
    dim: StrictInt = Field(ge=1, le=1_000_000)
    count: StrictInt = Field(ge=0)
    checksums: dict[StrictStr, StrictStr]
    index_params: dict | None = None


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the document"
    return f"{where}: {err['msg']}"[:200]


def _index_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids an IndexIDMap(2) or IVF index holds (None for another index type)."""
    ivf = ivf_or_none(index)
    if ivf is None:
        if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is one too
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        return None
    parts = [faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst)).copy()
             for lst in range(ivf.nlist) if ivf.invlists.list_size(lst)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _positions_are_rows(index: faiss.Index, table: KeyTable) -> bool:
    """Whether a flat version's index holds the table's ids in table order (as every version
    is written): its positions are then the table's rows."""
    if not isinstance(index, faiss.IndexIDMap) or index.id_map.size() != table.num_rows:
        return False
    # a view of the index's ids, no copy
    in_order = faiss.rev_swig_ptr(index.id_map.data(), table.num_rows) \
        if table.num_rows else np.zeros(0, np.int64)
    return bool(np.array_equal(in_order, table.ids))


def _holds_ids(index: faiss.Index, table: KeyTable) -> bool:
    """Whether the index holds the table's ids (True for an index without ids of its own)."""
    if _positions_are_rows(index, table):
        return True
    held = _index_ids(index)
    return held is None or np.array_equal(np.sort(held), table.ids[table.id_order])


def _without_rev_map(index: faiss.Index, table: KeyTable) -> faiss.Index:
    """A flat version as served: its vectors and ids in an IndexIDMap. Reading an
    IndexIDMap2 builds an id -> position hash map for reconstruct(id) in every process (~11 MB
    at 1M, not shared between the processes serving a version); a served version reads its
    vectors by table row instead, which are the positions (checked here). The vectors stay
    mapped from the file."""
    if type(index) is not faiss.IndexIDMap2 or not _positions_are_rows(index, table):
        return index
    lean = faiss.IndexIDMap(faiss.IndexFlatIP(index.d))  # FAISS wants an empty index here
    lean.index = index.index  # then the version's own (mapped) flat index in its place
    lean.ntotal = index.ntotal
    lean.id_map.swap(index.id_map)
    index.own_fields, lean.own_fields = False, True  # lean frees the flat index now
    lean.referenced_objects = []  # the empty stand-in
    return lean


def _without_direct_map(index: faiss.Index) -> faiss.Index:
    """An IVF version as served: without its id -> (list, offset) hash map, which reading the
    file builds in every process (~31 MB at 1M, not shared). A served version finds its
    vectors by table row instead (`IndexVersion._ivf_position_of_row`, 4 bytes a row);
    `writable_index` reads the file again, map included, for updates."""
    ivf = ivf_or_none(index)
    if ivf is not None and ivf.direct_map.type != faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return index


@dataclass
class PassingIds:
    """The ids a filter lets through in one version: the ids when few (exact search), else a
    bitmap over ids for FAISS's IDSelectorBitmap (IVF: how many pass in each list, and the
    lists holding any, counted when first needed)."""
    count: int
    ids: np.ndarray | None
    bitmap: np.ndarray | None
    list_counts: np.ndarray | None = None
    # IVF, when few lists hold passing vectors: those lists and their centroids (ranked
    # instead of every list)
    held_lists: np.ndarray | None = None
    held_centroids: np.ndarray | None = None


@dataclass
class IndexVersion:
    version: str
    manifest: dict
    index: faiss.Index
    table: KeyTable  # ids, keys and etags in row order (mapped from table.arrow)
    photos: PhotoTable | None = None  # metadata, aligned with keys; None: stored without
    # a compressed version's full vectors (fp16 [n, dim], table order, memory-mapped): the
    # index's candidates are re-scored from them; None: the index holds the vectors itself
    vectors: np.ndarray | None = None

    def __post_init__(self):
        # key -> row of the hits its searches returned lately: `info` of a search's hits (every
        # search answer asks) finds their rows here, not by a binary search per key (~10 us)
        self._recent_rows: dict[str, int] = {}
        self._passing = LRUCache(FILTER_CACHE_SIZE)
        self._seen = LRUCache(4 * FILTER_CACHE_SIZE)  # filters searched near the query once
        self._passing_lock = threading.Lock()
        self._lists_of_groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def ids(self) -> np.ndarray:
        """int64, aligned with keys (read-only)."""
        return self.table.ids

    @property
    def keys(self) -> Column:
        return self.table.keys

    @property
    def etags(self) -> Column:
        return self.table.etags

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def key_of(self, vid: int) -> str:
        if self._ids_are_rows:
            if not 0 <= vid < len(self.keys):
                raise KeyError(vid)
            return self.keys[int(vid)]
        row = self.table.row_of_id(vid)  # binary search over the mapped id order
        if row < 0:
            raise KeyError(vid)
        return self.keys[row]

    def etag_by_key(self) -> dict[str, str]:
        return dict(zip(self.keys, self.etags))

    def id_by_key(self) -> dict[str, int]:
        return dict(zip(self.keys, self.ids.tolist()))

    @property
    def rerank_depth(self) -> int:
        """How many of the index's candidates are re-scored exactly (0: none, scores are
        exact already)."""
        if self.vectors is None:
            return 0
        return int((self.manifest.get("index_params") or {}).get("rerank") or RERANK_DEPTH)

    def vectors_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), dim]: the full vectors of these ids (each must be held)."""
        ids = np.asarray(ids, np.int64)
        if self.vectors is None and self._flat_by_row is None and self._ivf is None:
            return self.index.reconstruct_batch(ids)  # an IndexIDMap2's own id -> position map
        rows = ids if self._ids_are_rows else self.table.rows_of_ids(ids)
        bad = (rows < 0) | (rows >= self.table.num_rows)
        if bad.any():
            raise KeyError(int(ids[np.flatnonzero(bad)[0]]))
        if self.vectors is not None:
            return self.vectors[rows].astype(np.float32)
        if self._flat_by_row is not None:
            return self._flat_by_row.reconstruct_batch(rows)
        return self._ivf_flat_vectors(rows)

    @cached_property
    def _ivf(self):
        return ivf_or_none(self.index)  # kept: looked up several times in each filtered search

    def _ivf_flat_vectors(self, rows: np.ndarray) -> np.ndarray:
        """IVF-Flat: these rows' vectors, read from their lists' codes (raw float32)."""
        ivf = self._ivf
        _, starts = self._ivf_list_starts
        at = self._ivf_position_of_row[rows].astype(np.int64)
        if self._ivf_mapped_lists is not None:  # one gather (a code is d float32, unaligned)
            lists = self._list_of_row[rows]
            offsets = at * ivf.code_size + _ID_BYTES * starts[lists]
            codes = sliding_window_view(self._ivf_mapped_lists, ivf.code_size)[offsets]
            return codes.view(np.float32).reshape(len(rows), ivf.d)
        lists = np.searchsorted(starts, at, side="right") - 1
        out = np.empty((len(rows), ivf.d), np.float32)
        for i, (lst, offset) in enumerate(zip(lists.tolist(), (at - starts[lists]).tolist())):
            ivf.reconstruct_from_offset(lst, offset, faiss.swig_ptr(out[i]))
        return out

    @cached_property
    def _ivf_mapped_lists(self) -> np.ndarray | None:
        """IVF read from its mapped file: the lists as one byte array, each list's codes then
        its ids, list after list, as the file lays them out (a view: no copy); None when they
        are not laid out so (an index built in memory: its lists are read one by one)."""
        ivf = self._ivf
        sizes, starts = self._ivf_list_starts
        held = np.flatnonzero(sizes)
        if not len(held):
            return None
        invlists = ivf.invlists
        codes = np.array([int(invlists.get_codes(int(lst))) for lst in held], np.int64)
        ids = np.array([int(invlists.get_ids(int(lst))) for lst in held], np.int64)
        if not ((codes - codes[0] == starts[held] * (ivf.code_size + _ID_BYTES)).all()
                and (ids - codes == sizes[held] * ivf.code_size).all()):
            return None
        end = int(ids[-1] - codes[0])  # the last list's codes end where its ids begin
        return faiss.rev_swig_ptr(invlists.get_codes(int(held[0])), end)

    @cached_property
    def _ivf_list_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """IVF: each list's size and where it starts in the lists laid end to end."""
        ivf = self._ivf
        sizes = np.array([ivf.invlists.list_size(lst) for lst in range(ivf.nlist)], np.int64)
        return sizes, np.concatenate([[0], np.cumsum(sizes)])

    @cached_property
    def _ivf_position_of_row(self) -> np.ndarray:
        """IVF: where each table row's vector is in the lists laid end to end (uint32 while
        they fit: 4 MB a process at 1M, against the direct map's ~31 MB)."""
        ivf = self._ivf
        sizes, starts = self._ivf_list_starts
        out = np.empty(len(self.ids), np.uint32 if len(self.ids) < 2**32 else np.int64)
        for lst in np.flatnonzero(sizes):
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(int(lst)), int(sizes[lst]))
            rows = ids if self._ids_are_rows else self.table.rows_of_ids(ids)
            out[rows] = np.arange(starts[lst], starts[lst + 1])
        return out

    @cached_property
    def _flat_by_row(self) -> faiss.Index | None:
        """A flat version's IndexFlat, whose positions are the table's rows (None otherwise:
        IVF, or a flat index still read with its id -> position map)."""
        if type(self.index) is faiss.IndexIDMap:
            return faiss.downcast_index(self.index.index)
        return None

    def _rows_of(self, keys: list[str]) -> np.ndarray:
        """Each key's row (-1: not held): a recent hit's from `_recent_rows`, others by binary
        search over the mapped key order (no dict of every key in each serving process)."""
        recent = self._recent_rows
        rows = [recent.get(k, -2) if isinstance(k, str) else -1 for k in keys]
        if -2 in rows:
            found = iter(self.table.rows_of_keys([k for k, r in zip(keys, rows) if r == -2]))
            rows = [next(found) if r == -2 else r for r in rows]
        return np.array(rows, np.int64)

    def _keys_of_hits(self, ids: np.ndarray) -> list[str]:
        """The keys of one query's hit ids (-1: none; KeyError for an id the table lacks),
        their rows remembered for `_rows_of`."""
        ids = ids[ids >= 0]
        rows = ids if self._ids_are_rows else self.table.rows_of_ids(ids)
        bad = (rows < 0) | (rows >= self.table.num_rows)
        if bad.any():
            raise KeyError(int(ids[np.flatnonzero(bad)[0]]))
        keys = [self.keys[r] for r in rows.tolist()]
        recent = self._recent_rows
        if len(recent) > RECENT_ROWS_MAX:
            recent.clear()
        recent.update(zip(keys, rows.tolist()))
        return keys

    def stored_vectors(self, keys: list[str]) -> np.ndarray:
        """The vectors the index holds for these keys (as published; KeyError(key) for a key
        it does not hold)."""
        if not keys:
            return np.zeros((0, self.index.d), np.float32)
        rows = self._rows_of(keys)
        if (rows < 0).any():
            raise KeyError(keys[int(np.flatnonzero(rows < 0)[0])])
        return self.vectors_of_ids(self.ids[rows])  # one call, not one per key

    # --- the photos' metadata ---------------------------------------------------------------
    def info(self, keys: list[str]) -> list[dict | None]:
        """Each key's stored metadata (None: not in this version, or none stored)."""
        if self.photos is None:
            return [None] * len(keys)
        rows = self._rows_of(keys)
        found = iter(self.photos.rows(rows[rows >= 0]))
        return [next(found) if r >= 0 else None for r in rows]

    def info_counts(self) -> dict[str, int]:
        if self.photos is None:
            return photo_columns.info_counts([])
        return self.photos.info_counts()

    def facets(self, limit: int = 20) -> dict[str, list[list]]:
        if self.photos is None:
            return photo_columns.facets([], limit)
        return self.photos.facets(limit)

    def count_matching(self, where: PhotoFilter) -> int:
        """How many photos of this version the filter lets through."""
        if active(where) is None:
            return self.count
        _, hit = self._cached_passing(where)
        if hit is None and self.photos is not None:
            counted = self.photos.exact_count(where)
            if counted is not None:
                return counted
        return (hit or self.passing(where)).count

    def forget_filters(self) -> None:
        """Drop what was kept of the filters seen (the next search of each is its first)."""
        with self._passing_lock:
            self._passing.clear()
            self._seen.clear()
        if self.photos is not None:
            self.photos.forget_filters()

    def _cached_passing(self, where: PhotoFilter) -> tuple[str, PassingIds | None]:
        key = where.model_dump_json()
        with self._passing_lock:
            return key, self._passing.get(key)

    def passing(self, where: PhotoFilter) -> PassingIds:
        """The ids this filter lets through (cached per filter)."""
        key, hit = self._cached_passing(where)
        if hit is not None:
            return hit
        out = self._count_passing(where, self._passing_rows(where, self._subset_most,
                                                            self._one_condition(where))[1])
        with self._passing_lock:
            self._passing[key] = out
        return out

    @property
    def _subset_most(self) -> int:
        """Up to how many candidate rows the filter is evaluated over them (gathered) rather
        than over every row (a contiguous pass)."""
        return self.count // 8

    def _one_condition(self, where: PhotoFilter) -> OneCondition | None:
        return None if self.photos is None else self.photos.one_condition(where)

    def _passing_rows(self, where: PhotoFilter, most: int,
                      one: OneCondition | None) -> tuple[int, np.ndarray | None]:
        """(at most how many pass, the table rows passing the filter): the rows found from its
        narrowest condition when that leaves `most` rows or fewer, else None (`one`: the
        filter as one condition, `_one_condition(where)`)."""
        if self.photos is None:
            return 0, np.zeros(0, np.int64)
        if one is not None:  # its column's order gives exactly the rows passing
            return one.count, (one.rows() if one.count <= most else None)
        count, candidates = self.photos.candidate_rows(where, most)
        if candidates is None:
            return self.count if count is None else count, None
        rows = candidates[self.photos.mask(where, candidates)]
        return len(rows), rows

    def _count_passing(self, where: PhotoFilter, rows: np.ndarray | None) -> PassingIds:
        """PassingIds from the passing rows, or (None) from a mask over every row."""
        mask = None
        if rows is None:
            mask = self.photos.mask(where)
            count = int(np.count_nonzero(mask))
        else:
            count = len(rows)
        if count <= self._exact_max_rows(count):
            rows = np.flatnonzero(mask) if rows is None else np.sort(rows)
            return PassingIds(count, self.ids[rows], None)
        if self._ids_are_rows and mask is not None:
            by_id = mask  # ids 0..n-1 in table order: the mask is the bitmap's bits
        else:
            by_id = np.zeros(self._id_bound, bool)
            if rows is None:
                by_id[self.ids[mask]] = True
            else:
                by_id[rows if self._ids_are_rows else self.ids[rows]] = True
        out = PassingIds(count, None, np.packbits(by_id, bitorder="little"))
        if rows is not None and self._ivf is not None:  # few: count them now
            self._held(out, np.bincount(self._list_of_row[rows], minlength=self._nlist))
        return out

    def _held(self, passing: PassingIds, counts: np.ndarray | None = None,
              share: float = 0.5) -> PassingIds:
        """IVF: the passing vectors of every list (`counts`, or counted from the bitmap), once
        per filter, and the lists holding any (ranked instead of every list) when they are at
        most this share of them (a filter kept: half; searched once: fewer, their centroids
        copied for one search)."""
        if passing.list_counts is None:
            ivf = self._ivf
            if counts is None:
                ids, starts = self._ids_by_list
                held = np.concatenate([[0], np.cumsum(_bits(passing.bitmap, ids),
                                                      dtype=np.int64)])
                counts = held[starts[1:]] - held[starts[:-1]]
            nonempty = np.flatnonzero(counts)
            if len(nonempty) <= ivf.nlist * share:
                passing.held_lists = nonempty.astype(np.int64)
                passing.held_centroids = np.ascontiguousarray(self._centroids[nonempty])
            passing.list_counts = counts
        return passing

    @cached_property
    def _ids_are_rows(self) -> bool:
        ids = self.ids  # 0..n-1 in order: increasing from 0 to n-1 (no arange of n beside it)
        return not len(ids) or bool(ids[0] == 0 and ids[-1] == len(ids) - 1 and
                                    (ids[1:] > ids[:-1]).all())

    @cached_property
    def _nlist(self) -> int:
        return int(self._ivf.nlist)

    @cached_property
    def _centroids(self) -> np.ndarray:
        ivf = self._ivf
        return ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)

    @cached_property
    def _ids_by_list(self) -> tuple[np.ndarray, np.ndarray]:
        """IVF: the ids of every list, list after list, and where each list starts (list l:
        ids[starts[l]:starts[l+1]])."""
        ivf = self._ivf
        sizes, starts = self._ivf_list_starts
        ids = np.empty(int(starts[-1]), np.int64)
        for lst in np.flatnonzero(sizes):
            ids[starts[lst]:starts[lst + 1]] = faiss.rev_swig_ptr(
                ivf.invlists.get_ids(int(lst)), int(sizes[lst]))
        return ids, starts

    @cached_property
    def _rows_by_list(self) -> np.ndarray:
        """IVF: `_ids_by_list`'s ids as table rows."""
        ids, _ = self._ids_by_list
        if self._ids_are_rows:
            return ids
        row_of_id = np.zeros(int(self.ids.max()) + 1, np.int64)
        row_of_id[self.ids] = np.arange(len(self.ids))
        return row_of_id[ids]

    @cached_property
    def _list_of_row(self) -> np.ndarray:
        """IVF: the list each table row's vector is in."""
        _, starts = self._ids_by_list
        out = np.empty(len(self.ids), np.int32)
        out[self._rows_by_list] = np.repeat(np.arange(self._nlist, dtype=np.int32),
                                            np.diff(starts))
        return out

    def _in_lists(self, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in `_ids_by_list` of these lists' entries (list after list; -1 lists
        hold none), and where each list's part ends."""
        _, starts = self._ids_by_list
        lists = lists.ravel()
        valid = lists >= 0
        begins = np.where(valid, starts[np.maximum(lists, 0)], 0)
        sizes = np.where(valid, starts[np.maximum(lists, 0) + 1], 0) - begins
        ends = np.cumsum(sizes)
        positions = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(begins - ends + sizes,
                                                                             sizes)
        return positions, ends

    @staticmethod
    def _per_list(passed: np.ndarray, ends: np.ndarray, shape) -> np.ndarray:
        """Passing entries per list (`_in_lists`' ends), in the shape of the lists asked."""
        held = np.concatenate([[0], np.cumsum(passed, dtype=np.int64)])
        return (held[ends] - held[np.concatenate([[0], ends[:-1]])]).reshape(shape)

    def _nprobe_for(self, passing: int, k: int) -> int:
        """About how many IVF lists hold FILTER_CANDIDATES_PER_HIT * k passing vectors, if
        they were spread evenly (never fewer than the version's own nprobe): the cost model
        of `_exact_max_rows`."""
        ivf = self._ivf
        wanted = math.ceil(FILTER_CANDIDATES_PER_HIT * k * ivf.nlist / max(1, passing))
        return int(min(ivf.nlist, max(ivf.nprobe, wanted)))

    def _lists_for(self, queries: np.ndarray, k: int, passing: PassingIds, depth: int):
        """IVF, per query: the lists to probe (nearest first, padded with -1) and their
        centroid scores: lists holding passing vectors, until they hold
        FILTER_CANDIDATES_PER_HIT * k of them (all, when fewer pass), and at least nprobe.
        The quantizer ranks the lists (FAISS's own threads, not numpy's BLAS: its threads
        wait for cores a busy machine does not give them)."""
        ivf = self._ivf
        queries = coarse_queries(self.index, queries)
        target = min(passing.count, max(FILTER_CANDIDATES_PER_HIT * k, depth))
        few = 4 * self._nprobe_for(passing.count, k) + 16
        if passing.list_counts is None:
            # the nearest few lists usually suffice (8x more if not): count in those only
            ids, _ = self._ids_by_list
            for nearest in (few, 8 * few):
                scores, lists = ivf.quantizer.search(queries, min(ivf.nlist, nearest))
                positions, ends = self._in_lists(lists)
                counts = self._per_list(_bits(passing.bitmap, ids[positions]), ends,
                                        lists.shape)
                if _enough(counts, target, ivf.nprobe):
                    return _chosen(lists, scores, counts, target, ivf.nprobe)
            self._held(passing)
        wanted = min(ivf.nprobe, int((passing.list_counts > 0).sum()))
        ranked = ivf.nlist if passing.held_lists is None else len(passing.held_lists)
        for nearest in (min(ranked, few), min(ranked, 8 * few), ranked):
            if passing.held_lists is None:
                scores, lists = ivf.quantizer.search(queries, nearest)
            else:  # only the lists holding passing vectors
                scores, lists = faiss.knn(queries, passing.held_centroids, nearest,
                                          metric=ivf.quantizer.metric_type)
                lists = passing.held_lists[lists]
            counts = passing.list_counts[lists]
            if nearest == ranked or _enough(counts, target, wanted):
                break
        return _chosen(lists, scores, counts, target, wanted)

    def _search_near(self, queries: np.ndarray, k: int, where: PhotoFilter, most: int,
                     depth: int):
        """IVF, a filter many photos pass (at most `most`), seen for the first time: evaluated
        over the photos of the lists nearest each query only, not the whole table (as
        `_lists_for` chooses the lists, without counting every photo first). None when those
        lists hold too few: the caller counts them all."""
        ivf = self._ivf
        queries = coarse_queries(self.index, queries)
        target = max(FILTER_CANDIDATES_PER_HIT * k, depth)
        few = 2 * self._nprobe_for(most, k) + 8
        ids, _ = self._ids_by_list
        # one round: when the lists nearest the query hold too few, the filter's photos are
        # elsewhere (a folder unlike the query), and counting them all finds them sooner
        for nearest in (few,):
            scores, lists = ivf.quantizer.search(queries, min(ivf.nlist, nearest))
            positions, ends = self._in_lists(lists)
            passed = self.photos.mask(where, np.take(self._rows_by_list, positions))
            counts = self._per_list(passed, ends, lists.shape)
            if _enough(counts, target, ivf.nprobe):
                lists, scores = _chosen(lists, scores, counts, target, ivf.nprobe)
                return self._search_lists(queries, depth, lists, scores,
                                          _bitmap(ids[positions[passed]], self._id_bound))
        return None

    def _list_counts(self, one: OneCondition) -> np.ndarray:
        """IVF, a one-condition filter: how many of its photos each list holds, from
        per-version list counts, not counted photo by photo: whole groups of one column
        (folders, a region, a city) sum their values' list counts (`_lists_of_group`); a date
        range, the cumulative counts along the photos by date (`_lists_by_time`) and the photos
        of its two partial blocks."""
        if one.column is not None:
            starts, lists, counts = self._lists_of_group(one.column)
            codes = one.codes
            begins, sizes = starts[codes], starts[codes + 1] - starts[codes]
            ends = np.cumsum(sizes)
            at = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(begins - ends + sizes,
                                                                          sizes)
            return np.bincount(lists[at], weights=counts[at],
                               minlength=self._nlist).astype(np.int64)
        lo, hi = one.span
        block, cumulative = self._lists_by_time
        order, lists = self.photos.by_time, self._list_of_row
        first, last = -(-lo // block), hi // block  # the whole blocks inside [lo, hi)
        if first >= last:
            return np.bincount(lists[order[lo:hi]], minlength=self._nlist)
        per_list = (cumulative[last] - cumulative[first]).astype(np.int64)
        per_list += np.bincount(lists[order[lo:first * block]], minlength=self._nlist)
        per_list += np.bincount(lists[order[last * block:hi]], minlength=self._nlist)
        return per_list

    @cached_property
    def _lists_by_time(self) -> tuple[int, np.ndarray]:
        """IVF: (block, cumulative): how many of the first j * block photos by date
        (PhotoTable.by_time) each list holds, per j; about 128 blocks (int32: 2 MB at 4,096
        lists), built once per version."""
        order, lists = self.photos.by_time, self._list_of_row
        block = max(4096, -(-len(order) // 128))
        cumulative = np.zeros((len(order) // block + 1, self._nlist), np.int32)
        for j in range(1, len(cumulative)):
            cumulative[j] = cumulative[j - 1] + np.bincount(
                lists[order[(j - 1) * block:j * block]], minlength=self._nlist)
        return block, cumulative

    def _lists_of_group(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """IVF: for each value of a grouped column, the lists holding its photos and how many
        (value c: lists[starts[c]:starts[c+1]], counts[...]), built once per version and column
        (one sort of its rows' (value, list) pairs; at most 8 bytes a row)."""
        with self._passing_lock:
            hit = self._lists_of_groups.get(name)
        if hit is None:
            order, starts = self.photos.groups(name)
            known = order[starts[0]:]  # code -1 (unknown) sorts first
            values = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))
            pairs, counts = np.unique(values * self._nlist + self._list_of_row[known],
                                      return_counts=True)
            hit = (np.searchsorted(pairs // self._nlist, np.arange(len(starts))),
                   (pairs % self._nlist).astype(np.int32), counts.astype(np.int32))
            with self._passing_lock:
                self._lists_of_groups[name] = hit
        return hit

    def _search_counted(self, queries: np.ndarray, k: int, one: OneCondition, depth: int,
                        rows: np.ndarray | None):
        """IVF, a one-condition filter: the lists chosen for it from its count per list
        (`_list_counts`, `_lists_for`), searched for its photos in them: its passing `rows`
        in those lists, when given and fewer than the lists' photos, else those photos
        tested (`OneCondition.passes`)."""
        k, depth = min(k, one.count), min(depth, one.count)
        if k <= 0:
            return _no_hits(len(queries))
        passing = self._held(PassingIds(one.count, None, None), self._list_counts(one),
                             share=1 / 16)
        lists, scores = self._lists_for(queries, k, passing, depth)
        ids, starts = self._ids_by_list
        probed = lists[lists >= 0]
        if len(lists) > 1:  # several queries: a list once
            probed = np.unique(probed)
        entries = int((starts[probed + 1] - starts[probed]).sum())
        if rows is not None and len(rows) < entries:
            is_probed = np.zeros(self._nlist, bool)
            is_probed[probed] = True
            rows = rows[is_probed[self._list_of_row[rows]]]
            found = rows if self._ids_are_rows else self.ids[rows]
        else:
            positions, _ = self._in_lists(probed)
            found = ids[positions[one.passes(np.take(self._rows_by_list, positions))]]
        if len(found) * GATHER_COST < entries * SKIP_COST + len(found):
            # few of the lists' photos pass: score those, not the lists (whose every entry
            # the selector would test)
            return self._search_exact(queries, min(depth, len(found)), found)
        return self._search_lists(queries, depth, lists, scores, _bitmap(found, self._id_bound))

    def _near_above(self, k: int) -> int:
        """IVF: from how many passing photos `_search_near` is tried first: when the lists it
        evaluates hold, spread evenly, twice the passing photos it needs."""
        ivf = self._ivf
        return int(2 * FILTER_CANDIDATES_PER_HIT * k * ivf.nlist / (4 * ivf.nprobe + 16))

    @cached_property
    def _id_bound(self) -> int:
        return int(self.ids.max()) + 1 if len(self.ids) else 0

    def _exact_max_rows(self, passing: int, k: int = 10) -> int:
        """Up to how many passing ids an exact search over them is chosen: while it costs no
        more than the search it replaces (a flat scan of every vector; IVF: the coarse
        quantizer plus the lists `_nprobe_for` probes)."""
        ivf = self._ivf
        if ivf is None:
            scanned = self.count
        else:
            scanned = ivf.nlist + self._nprobe_for(passing, k) / ivf.nlist * self.count
        return max(EXACT_MIN_ROWS, int(scanned / GATHER_COST))

    def _search_passing(self, queries: np.ndarray, k: int, passing: PassingIds, depth: int):
        """(scores, ids) of the top `depth` (>= k: a compressed index's candidates) among
        the passing ids, -1 ids where a row has fewer; the lists probed chosen for k."""
        if passing.ids is not None:
            return self._search_exact(queries, k, passing.ids)
        if self._ivf is None:  # flat: an exact scan that skips the ids not passing
            selector = faiss.IDSelectorBitmap(len(passing.bitmap), faiss.swig_ptr(passing.bitmap))
            return self.index.search(queries, k, params=faiss.SearchParameters(sel=selector))
        lists, centroid_scores = self._lists_for(queries, k, passing, depth)
        return self._search_lists(queries, depth, lists, centroid_scores, passing.bitmap)

    def _search_exact(self, queries: np.ndarray, k: int, ids: np.ndarray):
        """(scores, ids) of the top k among these ids, scored from their stored vectors
        (FAISS's threads)."""
        vectors = self.vectors_of_ids(ids)
        scores, rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)

    def _search_lists(self, queries: np.ndarray, k: int, lists: np.ndarray,
                      centroid_scores: np.ndarray, bitmap: np.ndarray):
        """IVF: (scores, ids) of the top k in these lists among the ids the bitmap holds."""
        ivf = self._ivf
        queries = coarse_queries(self.index, queries)
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=lists.shape[1])
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        # the C++ call: faiss's Python wrapper of search_preassigned takes no parameters
        ivf.search_preassigned_c(len(queries), faiss.swig_ptr(queries), k,
                                 faiss.swig_ptr(lists), faiss.swig_ptr(centroid_scores),
                                 faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
        return scores, ids

    def _search_filtered(self, queries: np.ndarray, k: int, where: PhotoFilter,
                         depth: int | None = None):
        """(scores, ids) of the top k photos passing the filter, k at most how many pass
        (`depth`: this many candidates of a compressed index, to re-score)."""
        depth = max(k, depth or k)
        key, passing = self._cached_passing(where)
        if passing is None:
            ivf = self._ivf
            near = ivf is not None and self.photos is not None
            one = self._one_condition(where)
            most, rows = self._passing_rows(where, min(self._near_above(k), self._subset_most)
                                            if near else self._subset_most, one)
            with self._passing_lock:
                first = self._seen.pop(key, None) is None
            exact = rows is not None and len(rows) <= self._exact_max_rows(len(rows), k)
            if near and one is not None and not exact:
                # one condition (folders, a place, a date range): its lists counted from the
                # version's per-column counts, no pass over its photos
                return self._search_counted(queries, k, one, depth, rows)
            if rows is None and near and first:
                # many may pass, seen for the first time: look near the query; a filter
                # searched again (a next page, other words) is counted once and kept
                found = self._search_near(queries, k, where, most, depth)
                if found is not None:
                    with self._passing_lock:
                        self._seen[key] = True
                    return found
            if rows is None:
                rows = self._passing_rows(where, self._subset_most, one)[1]
            passing = self._count_passing(where, rows)
            with self._passing_lock:
                self._passing[key] = passing
        k, depth = min(k, passing.count), min(depth, passing.count)
        if k <= 0:
            return _no_hits(len(queries))
        return self._search_passing(queries, k, passing, depth)

    def search(self, queries: np.ndarray, k: int, readback: int | None = None,
               where: PhotoFilter | None = None):
        """Top-k per query: (scores [Q, k'], keys) with k' = min(k, count) (a filter: the
        photos passing it, see the module doc; rows padded with -inf); readback: also
        component number `readback` of each hit's stored vector, per row (what Scoring reads
        the cosine back from; every backend returns the same)."""
        if readback is not None:
            readback = check_readback(readback, self.dim)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        where = active(where)
        k = min(k, self.count)
        if k <= 0:
            return empty_result(len(queries), readback)
        # a compressed index: its top `rerank_depth` re-scored from the full vectors
        depth = min(max(k, self.rerank_depth), self.count)
        if where is None:
            scores, ids = self.index.search(queries, depth)
        else:
            scores, ids = self._search_filtered(queries, k, where, depth)
            if ids.shape[1] == 0:
                return empty_result(len(queries), readback)
        if self.vectors is not None:
            scores, ids = rerank(queries, ids, self.vectors_of_ids, min(k, ids.shape[1]))
        keys = [self._keys_of_hits(row) for row in ids]
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        scores = scores[:, : max((len(r) for r in keys), default=0)]
        if readback is None:
            return scores, keys
        # one vectors_of_ids per row: 10-32 us for 10 hits (flat / IVF-Flat)
        return scores, keys, [self.vectors_of_ids(row[row >= 0])[:, readback] for row in ids]


def _no_hits(queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((queries, 0), np.float32), np.zeros((queries, 0), np.int64)


def _bitmap(ids: np.ndarray, bound: int) -> np.ndarray:
    """A little-endian bitmap (np.packbits' order) of ids below `bound` with these set: built
    from the ids themselves (a few thousand, not a bool per id packed)."""
    ids = np.asarray(ids, np.int64)
    bitmap = np.zeros((bound + 7) // 8, np.uint8)
    np.bitwise_or.at(bitmap, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
    return bitmap


def _bits(bitmap: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each id is set in a little-endian bitmap (np.packbits' order)."""
    return (bitmap[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1


def _enough(counts: np.ndarray, target: int, wanted: int) -> bool:
    """Whether, for every query, the lists ranked hold `target` passing vectors and `wanted`
    of them hold any."""
    return bool(((counts.sum(axis=1) >= target) & ((counts > 0).sum(axis=1) >= wanted)).all())


def _chosen(lists: np.ndarray, scores: np.ndarray, counts: np.ndarray, target: int,
            wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the nearest lists holding passing vectors (lists ranked nearest first),
    until they hold `target` of them and at least `wanted` lists; padded with -1, which FAISS
    skips, with their centroid scores."""
    if len(lists) == 1:  # one query (most searches): the same choice in a few calls
        nonempty = np.flatnonzero(counts[0])
        held = np.cumsum(counts[0, nonempty])
        width = min(len(nonempty), max(int(np.searchsorted(held, target)) + 1, wanted))
        return (np.ascontiguousarray(lists[:, nonempty[:width]], np.int64),
                np.ascontiguousarray(scores[:, nonempty[:width]], np.float32))
    held = np.cumsum(counts, axis=1)
    nonempty = counts > 0
    seen = np.cumsum(nonempty, axis=1)
    reach = np.maximum((held < target).sum(axis=1), (seen < wanted).sum(axis=1)) + 1
    chosen = nonempty & (np.arange(lists.shape[1])[None, :] < reach[:, None])
    first = np.argsort(~chosen, axis=1, kind="stable")  # the chosen first, in order
    width = int(chosen.sum(axis=1).max())
    lists = np.take_along_axis(lists, first, 1)[:, :width]
    scores = np.take_along_axis(scores, first, 1)[:, :width]
    lists[np.arange(width)[None, :] >= chosen.sum(axis=1)[:, None]] = -1
    return np.ascontiguousarray(lists, np.int64), np.ascontiguousarray(scores, np.float32)


def _index_type(index: faiss.Index) -> str:
    """The FAISS class that holds the vectors (inside an id map or a pre-transform)."""
    ivf = ivf_or_none(index)
    if ivf is not None:
        return type(faiss.downcast_index(ivf)).__name__
    if isinstance(index, faiss.IndexIDMap):
        return type(faiss.downcast_index(index.index)).__name__
    return type(index).__name__


def _write_vectors(path: Path, chunks: Iterable[np.ndarray], n: int, dim: int) -> None:
    """Vectors given in chunks (row order) into an fp16 .npy file of n rows, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    at = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != dim or at + len(chunk) > n:
            raise ValueError("the full vectors do not match the index")
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    if at != n:
        raise ValueError(f"the full vectors hold {at} rows, the index {n}")
    out.flush()
    del out


class IndexRepository:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # --- reading ---------------------------------------------------------------------------
    def current_version(self) -> str | None:
        """The version CURRENT names (None when there is no pointer, or it is empty).
        IndexLoadError when it is not a short, well-formed version name (its content is never
        echoed); OSError when it cannot be read."""
        try:
            with open(self.root / "CURRENT", "rb") as f:
                raw = f.read(_POINTER_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > _POINTER_MAX_BYTES:
            raise IndexLoadError("the CURRENT pointer is not a version name (too long)")
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise IndexLoadError("the CURRENT pointer is not a version name (not UTF-8 text)") \
                from None
        if not name:
            return None
        if not VERSION_NAME.fullmatch(name):
            raise IndexLoadError("the CURRENT pointer is not a version name (unexpected characters)")
        return name

    def list_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def read_manifest(self, version: str | None = None) -> dict | None:
        try:
            version = version or self.current_version()
        except IndexLoadError:
            return None
        if version is None or not VERSION_NAME.fullmatch(version):
            return None
        try:
            manifest = json.loads((self.versions_dir / version / "manifest.json").read_text())
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def read_key_table(self, version: str) -> tuple[list[str], list[str]]:
        """(keys, etags) of a version's table, checked against its manifest's checksum, without
        loading the index (IndexLoadError when missing or damaged). Keys are not checked for
        uniqueness here: `indexer verify` reports a key held twice."""
        if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
            raise IndexLoadError("not a valid index version name")
        manifest = self.read_manifest(version)
        if manifest is None:
            raise IndexLoadError(f"index version {version} does not exist or has no manifest")
        checksums = manifest.get("checksums") or {}
        name = TABLE_FILE if TABLE_FILE in checksums else LEGACY_TABLE_FILE
        path = self.versions_dir / version / name
        digest = checksums.get(name)
        try:
            if digest is None or sha256_file(path) != digest:
                raise IndexLoadError(f"index version {version}: {name} is corrupt "
                                     "(checksum mismatch)")
        except OSError as exc:
            raise IndexLoadError(f"index version {version}: cannot read {name} "
                                 f"({exc.strerror or type(exc).__name__})") from None
        if name == TABLE_FILE:
            try:
                table = KeyTable.read_mapped(path)
            except ValueError as exc:
                raise IndexLoadError(f"index version {version}: {TABLE_FILE} is unusable "
                                     f"({str(exc)[:200]})") from None
            return table.column("key").to_pylist(), table.column("etag").to_pylist()
        _, keys, etags = self._read_table(version, path)
        if len(keys) != len(etags):
            raise IndexLoadError(f"index version {version}: table has {len(keys)} keys and "
                                 f"{len(etags)} etags")
        return keys, etags

    def load(self, version: str | None = None, expect_model_id: str | None = None) -> IndexVersion:
        """Load and fully validate a version (default: the current one) before anyone can use
        it: manifest schema, checksums, the FAISS file, and a table aligned with the index
        (one unique id, key and etag per vector, the same ids as the index). Every problem is
        an IndexLoadError."""
        version = version or self.current_version()
        if version is None:
            raise IndexLoadError("no published index (run `python -m indexer rebuild`)")
        if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
            raise IndexLoadError("not a valid index version name")
        try:
            return self._load(version, expect_model_id)
        except IndexLoadError:
            raise
        except MemoryError:
            raise IndexLoadError(f"index version {version}: too large to load") from None
        except OSError as exc:
            raise IndexLoadError(f"index version {version}: cannot read it "
                                 f"({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # anything a damaged file can still provoke
            raise IndexLoadError(f"index version {version}: cannot load it "
                                 f"({type(exc).__name__})") from None

    def _load(self, version: str, expect_model_id: str | None) -> IndexVersion:
        vdir = self.versions_dir / version
        if not vdir.is_dir():
            raise IndexLoadError(f"index version {version} does not exist")
        try:
            raw = json.loads((vdir / "manifest.json").read_bytes())
        except FileNotFoundError:
            raise IndexLoadError(f"index version {version} is missing its manifest") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise IndexLoadError(f"index version {version}: manifest is corrupt (not JSON)") \
                from None
        if not isinstance(raw, dict):
            raise IndexLoadError(f"index version {version}: manifest is corrupt "
                                 f"(a JSON {type(raw).__name__}, not an object)")
        if raw.get("format") != MANIFEST_FORMAT:
            fmt = raw.get("format")
            shown = repr(fmt)[:60] if isinstance(fmt, str) else type(fmt).__name__
            raise IndexLoadError(f"index version {version}: unknown format {shown}")
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as exc:
            raise IndexLoadError(f"index version {version}: manifest is corrupt "
                                 f"({_first_problem(exc)})") from None
        if expect_model_id is not None and manifest.model_id != expect_model_id:
            raise IndexLoadError(
                f"index version {version} was built by model {manifest.model_id[:100]}, "
                f"but the loaded model is {expect_model_id}; rebuild the index for this model")
        table_file = TABLE_FILE if TABLE_FILE in manifest.checksums else LEGACY_TABLE_FILE
        for name in ("index.faiss", table_file):
            if name not in manifest.checksums:
                raise IndexLoadError(f"index version {version}: manifest has no checksum "
                                     f"for {name if name == 'index.faiss' else TABLE_FILE}")
        for name, digest in manifest.checksums.items():
            if not _FILE_NAME.fullmatch(name):
                raise IndexLoadError(f"index version {version}: manifest names an invalid "
                                     f"file in checksums")
            path = vdir / name
            if not path.is_file():
                raise IndexLoadError(f"index version {version}: {name} is missing")
            if sha256_file(path) != digest:
                raise IndexLoadError(f"index version {version}: {name} is corrupt (checksum mismatch)")
        try:
            # memory-mapped: the processes serving one version share its pages in the page
            # cache, and a swap's old version leaves memory when its last reader drops it. Such
            # an index is read-only: `writable_index` gives a copy to change.
            index = faiss.read_index(str(vdir / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:
            raise IndexLoadError(f"index version {version}: cannot read index.faiss "
                                 "(not a FAISS index, or damaged)") from None
        n = int(index.ntotal)
        if index.d != manifest.dim:
            raise IndexLoadError(f"index version {version}: index has dimension {index.d}, "
                                 f"the manifest says {manifest.dim}")
        if n != manifest.count:
            raise IndexLoadError(f"index version {version}: index holds {n} vectors, the "
                                 f"manifest says {manifest.count}")
        table = self._key_table(version, vdir / table_file, n)
        if not _holds_ids(index, table):
            raise IndexLoadError(f"index version {version}: table ids are not the ids the "
                                 "index holds")
        index = _without_direct_map(_without_rev_map(index, table))
        # the checks' temporaries (and a dropped map), kept by Arrow's allocator and by glibc
        # otherwise: each serving process would hold them for good
        pa.default_memory_pool().release_unused()
        release_memory()
        photos = None
        if INFO_FILE in manifest.checksums:
            try:
                photos = PhotoTable.read(vdir / INFO_FILE, rows=n)
            except ValueError as exc:
                raise IndexLoadError(f"index version {version}: {INFO_FILE} is unusable "
                                     f"({str(exc)[:200]})") from None
        params = manifest.index_params or {}
        ivf, compressed = ivf_or_none(index), index_spec_of(index).compressed
        # what the index type uses (a flat index has no nprobe to read)
        for name in ("nprobe",) * (ivf is not None) + ("rerank",) * compressed:
            value = params.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise IndexLoadError(f"index version {version}: index_params.{name} is not "
                                     "a positive integer")
        if ivf is not None and params.get("nprobe"):
            ivf.nprobe = min(int(params["nprobe"]), int(ivf.nlist))
        vectors = None
        if compressed or VECTORS_FILE in manifest.checksums:
            vectors = self._vectors(version, vdir, manifest, n)
        return IndexVersion(version, manifest.model_dump(), index, table, photos, vectors)

    @staticmethod
    def _vectors(version: str, vdir: Path, manifest: Manifest, n: int) -> np.ndarray:
        """A compressed version's full vectors, memory-mapped and checked (fp16 [n, dim])."""
        if VECTORS_FILE not in manifest.checksums:
            raise IndexLoadError(f"index version {version}: a compressed index without its "
                                 f"vectors ({VECTORS_FILE} is not in the manifest)")
        try:
            vectors = np.load(vdir / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise IndexLoadError(f"index version {version}: {VECTORS_FILE} is unusable "
                                 f"({str(exc)[:200]})") from None
        if vectors.dtype != np.float16 or vectors.shape != (n, manifest.dim):
            raise IndexLoadError(f"index version {version}: {VECTORS_FILE} holds "
                                 f"{vectors.dtype} {list(vectors.shape)}, not float16 "
                                 f"[{n}, {manifest.dim}]")
        mapped = getattr(vectors, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
            # a query reads `rerank` scattered rows: no read-ahead around them, which
            # would fill memory (and, cold, the disk queue) with rows nobody asked for
            mapped.madvise(mmap.MADV_RANDOM)
        return vectors

    def writable_index(self, version: str) -> faiss.Index:
        """The version's index read into memory of its own (a loaded version's is mapped from
        its file, read-only: adding to or removing from it would write into the file's pages)."""
        try:
            return faiss.read_index(str(self.versions_dir / version / "index.faiss"))
        except RuntimeError:
            raise IndexLoadError(f"index version {version}: cannot read index.faiss") from None

    def _key_table(self, version: str, path: Path, n: int) -> KeyTable:
        """The version's key table, checked: one row per vector, unique ids and keys (either
        file; table.json is read into memory, into the same form)."""
        try:
            if path.name == TABLE_FILE:
                table = KeyTable(KeyTable.read_mapped(path))
                if table.num_rows != n:
                    raise IndexLoadError(f"index version {version}: index and table disagree "
                                         f"({n} vectors; table has {table.num_rows} rows)")
            else:
                ids, keys, etags = self._read_table(version, path)
                if not (len(ids) == len(keys) == len(etags) == n):
                    raise IndexLoadError(
                        f"index version {version}: index and table disagree ({n} vectors; "
                        f"table has {len(ids)} ids, {len(keys)} keys, {len(etags)} etags)")
                table = KeyTable.from_columns(ids, keys, etags)
            table.check()
        except ValueError as exc:
            raise IndexLoadError(f"index version {version}: {path.name} is unusable "
                                 f"({str(exc)[:200]})") from None
        return table

    @staticmethod
    def _read_table(version: str, path: Path) -> tuple[np.ndarray, list[str], list[str]]:
        try:
            table = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise IndexLoadError(f"index version {version}: table.json is corrupt (not JSON)") \
                from None
        if not isinstance(table, dict):
            raise IndexLoadError(f"index version {version}: table.json is not an object")
        cols = {}
        for col in ("ids", "keys", "etags"):
            v = table.get(col)
            if not isinstance(v, list):
                raise IndexLoadError(f"index version {version}: table.json has no list {col!r}")
            cols[col] = v
        if not all(type(i) is int and -2**63 <= i < 2**63 for i in cols["ids"]):
            raise IndexLoadError(f"index version {version}: table ids must be 64-bit integers")
        for col in ("keys", "etags"):
            if not all(type(x) is str for x in cols[col]):
                raise IndexLoadError(f"index version {version}: table {col} must be strings")
        return np.asarray(cols["ids"], dtype=np.int64), cols["keys"], cols["etags"]

    # --- writing ---------------------------------------------------------------------------
    def commit_version(self, index: faiss.Index, ids: np.ndarray, keys: list[str],
                       etags: list[str], model_id: str, extra: dict | None = None,
                       version: str | None = None, photos: PhotoTable | None = None,
                       vectors: Iterable[np.ndarray] | None = None) -> str:
        """Write a complete new version (named `version`, default a new name; `photos`: its
        metadata, aligned with keys; `vectors`: the full vectors in table order, in chunks,
        which a compressed index needs), then point CURRENT at it. Returns the version name."""
        if not (index.ntotal == len(ids) == len(keys) == len(etags)):
            raise ValueError("index, ids, keys and etags must have the same length")
        if photos is not None and photos.num_rows != len(keys):
            raise ValueError("the metadata table must have one row per key")
        version = version or new_version_name()
        if not VERSION_NAME.fullmatch(version):
            raise ValueError("not a valid index version name")
        # a folder of this name that CURRENT does not name was left by a publish of the same
        # draft killed before it moved CURRENT: never served, so written again
        leftover = (self.versions_dir / version).exists()
        if leftover and self.current_version() == version:
            raise ValueError(f"index version {version} is already published")
        with atomic_dir(self.versions_dir / version, durable=True, replace=leftover) as tmp:
            faiss.write_index(index, str(tmp / "index.faiss"))
            KeyTable.from_columns(ids, keys, etags).write(tmp / TABLE_FILE)
            files = list(REQUIRED_FILES)
            if photos is not None:
                photos.write(tmp / INFO_FILE)
                files.append(INFO_FILE)
            if vectors is not None:
                _write_vectors(tmp / VECTORS_FILE, vectors, len(ids), int(index.d))
                files.append(VECTORS_FILE)
            elif index_spec_of(index).compressed:
                raise ValueError("a compressed index needs its full vectors")
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": version,
                "model_id": model_id,
                "dim": int(index.d),
                "count": int(index.ntotal),
                "created": datetime.now(timezone.utc).isoformat(),
                "index_type": _index_type(index),
                "checksums": {n: sha256_file(tmp / n) for n in files},
                # what choose_index/build_index picked (kind, nlist, nprobe, tuned recall)
                "index_params": index_spec_of(index).to_dict(),
                **(extra or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        self._point_current(version)
        return version

    def _point_current(self, version: str) -> None:
        write_atomic(self.root / "CURRENT", version + "\n", durable=True)

    def prune(self, keep: int = 3) -> list[str]:
        """Delete old versions beyond the newest `keep` (never the current one) and stale temps."""
        current = self.current_version()
        removed = []
        for name in self.list_versions()[:-keep] if keep else self.list_versions():
            if name != current:
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)
                removed.append(name)
        if self.versions_dir.is_dir():
            for p in self.versions_dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        return removed
