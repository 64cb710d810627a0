"""The photos' metadata as a columnar table aligned with an index version's rows (the FAISS
backend's `info.parquet`), and filters evaluated over it as one numpy mask.

`PhotoTable` holds one row per vector, in the version's table order, with the columns of
indexer.photo_columns.INFO_COLUMNS (float64, int64, string; null: unknown). A row without
metadata is all null. Stored as Parquet (zstd; strings dictionary-encoded): about 30-40 bytes a
photo. Columns a file lacks read as null (a file of another writer); a column of the wrong type,
or a row count other than the version's, is refused (ValueError: the loader reports it).

`mask(where)` is PhotoFilter.matches, vectorized: numeric columns as float64 arrays (NaN:
unknown), string columns as dictionary codes, so a comparison ignoring case is made once per
distinct value, not once per row (about 2 ms for a filter of several fields at 1M rows);
`mask(where, rows)` evaluates it over those rows only. `candidate_rows(where)` answers the
narrowest condition from a per-column order (rows sorted by date; rows grouped by folder,
camera, place), built once per table on first use, so a filter matching few photos costs
about the photos it matches, not the table.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cachetools import LRUCache

from indexer.arrow_numpy import strings, to_numpy
from indexer.photo_columns import DATE_NOT_READ, FACETS, INFO_COLUMNS
from indexer.photo_filter import PhotoFilter, orientation_of, unit_sphere

ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}
# the filter fields that name a value, and the columns each is looked up in
NAME_FIELDS = {"camera": ("camera_make", "camera_model"), "country": ("country", "country_code"),
               "region": ("region",), "city": ("city",)}
SCHEMA = pa.schema([(name, ARROW_TYPES[kind]) for name, kind in INFO_COLUMNS.items()])
_SET_TEST_MAX = 4096  # folders (with those above them) tested in Python below, Arrow above
FIRST_SECOND, LAST_SECOND = -62135596800.0, 253402300799.0  # years 1..9999 (datetime's range)


class PhotoTable:
    """One version's metadata (see the module doc). Immutable; caches are built on first use."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[np.ndarray, list]] = {}
        self._groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._accepts = LRUCache(256)  # (column, value test) -> accepted codes
        self._prefixes: dict[str, tuple[list[str] | pa.Array, np.ndarray]] = {}

    # --- making and storing ------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: list[dict | None]) -> "PhotoTable":
        """From cleaned rows (photo_columns.clean_info; None: no metadata)."""
        columns = {name: pa.array([None if r is None else r.get(name) for r in rows],
                                  ARROW_TYPES[kind]) for name, kind in INFO_COLUMNS.items()}
        return cls(pa.table(columns, schema=SCHEMA))

    @classmethod
    def empty(cls, n: int) -> "PhotoTable":
        """n rows without metadata."""
        return cls(pa.table({f.name: pa.nulls(n, f.type) for f in SCHEMA}, schema=SCHEMA))

    @classmethod
    def concat(cls, tables: list["PhotoTable"]) -> "PhotoTable":
        return cls(pa.concat_tables([t.table for t in tables]).combine_chunks()) if tables \
            else cls.empty(0)

    def take(self, rows: np.ndarray) -> "PhotoTable":
        """These rows (positions), in this order."""
        return PhotoTable(self.table.take(pa.array(np.asarray(rows, np.int64))))

    def to_bytes(self) -> bytes:
        sink = io.BytesIO()
        pq.write_table(self.table, sink, compression="zstd")
        return sink.getvalue()

    def write(self, path) -> None:
        pq.write_table(self.table, str(path), compression="zstd")

    @classmethod
    def read(cls, source, rows: int | None = None) -> "PhotoTable":
        """From a Parquet file (a path or bytes); ValueError when it is not one of ours or has
        another number of rows than `rows`."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = pa.BufferReader(bytes(source))
        try:
            # not pq.read_table: it imports pandas (~27 MB in each serving process)
            with pq.ParquetFile(source if isinstance(source, pa.NativeFile) else str(source)) as f:
                table = f.read()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"not a readable Parquet table ({type(exc).__name__})") from None
        if rows is not None and table.num_rows != rows:
            raise ValueError(f"it has {table.num_rows} rows for {rows} vectors")
        columns = {}
        for field in SCHEMA:
            if field.name not in table.column_names:
                columns[field.name] = pa.nulls(table.num_rows, field.type)
                continue
            column = table.column(field.name)
            if column.type != field.type:
                if not (pa.types.is_large_string(column.type) and field.type == pa.string()
                        or pa.types.is_dictionary(column.type)):
                    raise ValueError(f"column {field.name} is {column.type}, not {field.type}")
                column = column.cast(field.type)
            columns[field.name] = column
        return cls(pa.table(columns, schema=SCHEMA).combine_chunks())

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    # --- reading -----------------------------------------------------------------------------
    def rows(self, positions) -> list[dict | None]:
        """The stored metadata of these rows, as view.info gives it (photo_columns.public_info:
        the known values), read from the per-column arrays filters and facets use (numbers
        as float64, strings as dictionary codes): a quarter of an Arrow take of every column
        and its to_pylist, for a page of hits. Columns without a value in any row are not
        read (a library without GPS or camera data: half of them)."""
        positions = np.asarray(positions, np.int64)
        names, columns = [], []
        for name, kind in self._filled_columns:
            if kind == "str":
                codes, values = self.codes(name)
                column = [values[c] if c >= 0 else None for c in codes[positions].tolist()]
            else:
                column = self.numbers(name)[positions].tolist()  # NaN: unknown
                column = [None if v != v else int(v) if kind == "int" else v for v in column]
            names.append(name)
            columns.append(column)
        if not columns:
            return [None] * len(positions)
        return [{name: v for name, v in zip(names, row) if v is not None} or None
                for row in zip(*columns)]

    @cached_property
    def _filled_columns(self) -> list[tuple[str, str]]:
        """(name, kind) of the INFO_COLUMNS with a value in some row."""
        return [(name, kind) for name, kind in INFO_COLUMNS.items()
                if self.table.column(name).null_count < self.num_rows]

    def numbers(self, name: str) -> np.ndarray:
        """A numeric column as float64, NaN where unknown."""
        return self._numbers[name]

    @cached_property
    def _numbers(self) -> dict[str, np.ndarray]:
        return {name: to_numpy(pc.cast(self.table.column(name), pa.float64()), null=np.nan)
                if self.num_rows else np.zeros(0)
                for name, kind in INFO_COLUMNS.items() if kind != "str"}

    def codes(self, name: str) -> tuple[np.ndarray, list[str]]:
        """A string column as (codes int32, -1 where unknown; the distinct values)."""
        with self._lock:
            if name not in self._codes:
                encoded = self.table.column(name).combine_chunks().dictionary_encode()
                self._codes[name] = (to_numpy(encoded.indices, null=-1).astype(np.int32),
                                     encoded.dictionary.to_pylist())
            return self._codes[name]

    @cached_property
    def present(self) -> np.ndarray:
        """Rows with any metadata."""
        out = np.zeros(self.num_rows, bool)
        for column in self.table.columns:
            out |= to_numpy(column.is_valid())
        return out

    @cached_property
    def _unit_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return unit_sphere(self.numbers("lat"), self.numbers("lon"))

    def _accepted(self, name: str, accept) -> np.ndarray:
        """Per code of column `name`, whether `accept(value)` holds (one call per distinct
        value; a filter's own tests, _SameAs and _InFolders, kept for its next searches), and
        one more entry, False, for code -1 (unknown): a gather instead of np.isin's sort."""
        key = (name, accept) if isinstance(accept, (_SameAs, _InFolders)) else None
        with self._lock:
            hit = None if key is None else self._accepts.get(key)
        if hit is None:
            values = self.codes(name)[1]
            if isinstance(accept, _InFolders):  # each value's own folders looked up at once
                prefixes, owner = self._folders_of(name)
                if isinstance(prefixes, list):  # few: a set test costs less than Arrow's call
                    found = np.fromiter((p in accept.folders for p in prefixes), bool,
                                        len(prefixes))
                else:
                    found = to_numpy(pc.is_in(prefixes,
                                              value_set=strings(sorted(accept.folders))))
                hit = np.bincount(owner, weights=found, minlength=len(values) + 1) > 0
            else:
                hit = np.array([bool(accept(v)) for v in values] + [False], bool)
            if key is not None:
                with self._lock:
                    self._accepts[key] = hit
        return hit

    def _folders_of(self, name: str) -> tuple[list[str] | pa.Array, np.ndarray]:
        """Each distinct value of a folder column with the folders above it (flattened; a list
        up to _SET_TEST_MAX of them, else an Arrow array), and the code each belongs to: a
        folder filter matches a value when it names any of them."""
        values = self.codes(name)[1]
        with self._lock:
            if name not in self._prefixes:
                pairs = [(p, code) for code, v in enumerate(values) for p in (v, *_ancestors(v))]
                prefixes = [p for p, _ in pairs]
                self._prefixes[name] = (prefixes if len(prefixes) <= _SET_TEST_MAX
                                        else strings(prefixes),
                                        np.array([c for _, c in pairs], np.int64))
            return self._prefixes[name]

    def forget_filters(self) -> None:
        """Drop the filters' kept value tests (the per-column orders stay: they serve any)."""
        with self._lock:
            self._accepts.clear()

    def _where_value(self, name: str, accept, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows (all, or these) whose `name` is a value `accept(value)` holds for."""
        codes, _ = self.codes(name)  # np.take: twice as fast as indexing here
        return np.take(self._accepted(name, accept), codes if rows is None
                       else np.take(codes, rows))

    def _same(self, wanted: str, *names: str, rows: np.ndarray | None = None) -> np.ndarray:
        out = np.zeros(self.num_rows if rows is None else len(rows), bool)
        for name in names:
            out |= self._where_value(name, _same_as(wanted), rows)
        return out

    def mask(self, where: PhotoFilter, rows: np.ndarray | None = None) -> np.ndarray:
        """Whether each row (all rows in order, or these) passes the filter
        (PhotoFilter.matches, row for row)."""
        def numbers(name):
            return self.numbers(name) if rows is None else np.take(self.numbers(name), rows)

        # a row without metadata passes no filter
        out = self.present.copy() if rows is None else np.take(self.present, rows)
        if where.folders is not None and all(where.folders):  # "" is every folder
            out &= self._where_value("folder", _in_folders(where.folders), rows)
        after, before = where.time_range()
        if after is not None or before is not None:
            taken = numbers("taken_at")
            with np.errstate(invalid="ignore"):
                if after is not None:
                    out &= taken >= after
                if before is not None:
                    out &= taken < before
        for field, names in NAME_FIELDS.items():
            if getattr(where, field) is not None:
                out &= self._same(getattr(where, field), *names, rows=rows)
        if where.has_position is not None:
            known = ~np.isnan(numbers("lat")) & ~np.isnan(numbers("lon"))
            out &= known if where.has_position else ~known
        if where.near is not None:
            x, y, z = (v if rows is None else v[rows] for v in self._unit_vectors)
            a, b, c = where.near.unit_vector()
            with np.errstate(invalid="ignore"):
                out &= x * a + y * b + z * c >= where.near.min_cosine()
        with np.errstate(invalid="ignore"):
            if where.min_width is not None:
                out &= numbers("width") >= where.min_width
            if where.min_height is not None:
                out &= numbers("height") >= where.min_height
            if where.orientation is not None:
                width, height = numbers("width"), numbers("height")
                wanted = {orientation_of(2, 1): width > height,
                          orientation_of(1, 2): height > width,
                          orientation_of(1, 1): width == height}
                out &= wanted[where.orientation]
        return out

    # --- the narrowest condition, from per-column orders ---------------------------------------
    def candidate_rows(self, where: PhotoFilter, most: int) -> tuple[int | None, np.ndarray | None]:
        """(how many, which) rows may pass (every row that passes is among them), from the one
        condition that leaves the fewest: folders, the date range, a camera or place name.
        Which: None when more than `most` (then a mask over all rows costs less); how many:
        None when no condition narrows."""
        options = []  # (how many, how to get them)
        if where.folders is not None and all(where.folders):
            options.append(self._rows_with(("folder",), _in_folders(where.folders)))
        span = self.time_span(where)
        if span is not None:
            lo, hi = span
            options.append((hi - lo, lambda: self.by_time[lo:hi]))
        for field, names in NAME_FIELDS.items():
            if getattr(where, field) is not None:
                options.append(self._rows_with(names, _same_as(getattr(where, field))))
        if not options:
            return None, None
        count, rows = min(options, key=lambda o: o[0])
        return count, (rows() if count <= most else None)

    def exact_count(self, where: PhotoFilter) -> int | None:
        """How many rows pass, when one condition makes the filter and its per-column order
        counts it exactly (folders, a date range, a region, a city; a row with any of these
        has metadata): no pass over the table. None otherwise."""
        one = self.one_condition(where)
        return None if one is None else one.count

    def one_condition(self, where: PhotoFilter) -> OneCondition | None:
        """The filter as one condition whose per-column order gives exactly the rows passing
        it (whole folders, a region, a city: codes of a grouped column; a date range: a span
        of the rows by date), or None (several conditions, or others)."""
        asked = {name for name, value in where if value is not None}
        if asked == {"folders"} and all(where.folders):
            name, accept = "folder", _in_folders(where.folders)
        elif asked in ({"region"}, {"city"}):
            field = asked.pop()
            (name,) = NAME_FIELDS[field]
            accept = _same_as(getattr(where, field))
        elif asked and asked <= {"taken_after", "taken_before"}:
            after, before = where.time_range()
            lo, hi = self._span(after, before)
            return OneCondition(self, hi - lo, span=(lo, hi), bounds=(after, before))
        else:
            return None
        order, starts = self.groups(name)
        accepted = self._accepted(name, accept)
        codes = np.flatnonzero(accepted[:-1])
        return OneCondition(self, int((starts[codes + 1] - starts[codes]).sum()),
                            column=name, codes=codes, accepted=accepted)

    def _rows_with(self, names: tuple[str, ...], accept):
        """(how many, a function giving them) of the rows whose value in any of these columns
        `accept` holds for: the rows of each accepted code, from the column's grouping."""
        parts = []
        for name in names:
            order, starts = self.groups(name)
            codes = np.flatnonzero(self._accepted(name, accept)[:-1])
            parts.append((order, starts[codes], starts[codes + 1]))
        count = sum(int((e - b).sum()) for _, b, e in parts)

        def rows():
            out = [order[b:e] for order, begins, ends in parts for b, e in zip(begins, ends)]
            out = np.concatenate(out) if out else np.zeros(0, np.int64)
            return np.unique(out) if len(parts) > 1 else out  # a row may match two columns
        return count, rows

    def time_span(self, where: PhotoFilter) -> tuple[int, int] | None:
        """The filter's date range as positions in `by_time` (its rows: by_time[lo:hi]); None
        when it has none."""
        after, before = where.time_range()
        return None if after is None and before is None else self._span(after, before)

    def _span(self, after: float | None, before: float | None) -> tuple[int, int]:
        _, taken = self._by_time
        lo = 0 if after is None else int(np.searchsorted(taken, after, "left"))
        hi = len(taken) if before is None else int(np.searchsorted(taken, before, "left"))
        return lo, max(lo, hi)

    @property
    def by_time(self) -> np.ndarray:
        """The rows with a date, by date (NaN, unknown, left out)."""
        return self._by_time[0]

    @cached_property
    def _by_time(self) -> tuple[np.ndarray, np.ndarray]:
        """`by_time` and those dates."""
        taken = self.numbers("taken_at")
        known = np.flatnonzero(~np.isnan(taken))
        order = known[np.argsort(taken[known], kind="stable")].astype(_row_type(len(taken)))
        return order, taken[order]

    def groups(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A string column's rows grouped by code (code c's rows: order[starts[c]:starts[c+1]])."""
        codes, values = self.codes(name)
        with self._lock:
            if name not in self._groups:
                order = np.argsort(codes, kind="stable").astype(_row_type(len(codes)))
                counts = np.bincount(codes[codes >= 0], minlength=len(values))
                unknown = int((codes < 0).sum())  # code -1 sorts first
                starts = np.concatenate([[0], np.cumsum(counts)]) + unknown
                self._groups[name] = (order, starts)
            return self._groups[name]

    # --- counting ----------------------------------------------------------------------------
    def _non_empty(self, name: str) -> np.ndarray:
        return self._where_value(name, lambda v: v != "")

    def info_counts(self) -> dict[str, int]:
        """As photo_columns.info_counts counts the rows."""
        dated = ~np.isnan(self.numbers("taken_at")) & ~self._where_value(
            "taken_at_source", lambda v: v == DATE_NOT_READ)
        placed = np.zeros(self.num_rows, bool)
        for name in ("city", "region", "country", "country_code"):
            placed |= self._non_empty(name)
        positioned = ~np.isnan(self.numbers("lat")) & ~np.isnan(self.numbers("lon"))
        return {"with_date": int(dated.sum()), "with_position": int(positioned.sum()),
                "with_place": int(placed.sum())}

    def _counts(self, name: str, rows: np.ndarray | None = None) -> dict:
        codes, values = self.codes(name)
        if rows is not None:
            codes = np.where(rows, codes, -1)
        counts = np.bincount(codes[codes >= 0], minlength=len(values))
        return {values[i]: int(c) for i, c in enumerate(counts) if c and values[i] != ""}

    def facets(self, limit: int = 20) -> dict[str, list[list]]:
        """As photo_columns.facets counts the rows."""
        from collections import Counter

        from indexer.photo_columns import top

        out = {"folder": Counter(self._counts("folder")), "city": Counter(self._counts("city"))}
        has_country = self._non_empty("country")
        out["country"] = Counter(self._counts("country")) + Counter(
            self._counts("country_code", ~has_country))
        has_model = self._non_empty("camera_model")
        out["camera"] = Counter(self._counts("camera_model")) + Counter(
            self._counts("camera_make", ~has_model))
        taken = self.numbers("taken_at")
        with np.errstate(invalid="ignore"):
            taken = taken[(taken >= FIRST_SECOND) & (taken <= LAST_SECOND)]
        years = np.floor(taken).astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
        out["year"] = Counter({int(y): int(c) for y, c in zip(*np.unique(years,
                                                                         return_counts=True))})
        return {name: top(out[name], limit) for name in FACETS}


@dataclass(frozen=True)
class OneCondition:
    """A filter of one condition (PhotoTable.one_condition): `count` rows pass; either the
    accepted `codes` of a grouped `column` (`accepted`: per code, and last for unknown, whether
    it passes) or a `span` of the rows by date (PhotoTable.by_time) with its `bounds`."""
    table: PhotoTable
    count: int
    column: str | None = None
    codes: np.ndarray | None = None
    accepted: np.ndarray | None = None
    span: tuple[int, int] | None = None
    bounds: tuple[float | None, float | None] | None = None

    def rows(self) -> np.ndarray:
        """The rows passing, from the column's order (by value, or by date)."""
        if self.column is None:
            lo, hi = self.span
            return self.table.by_time[lo:hi]
        order, starts = self.table.groups(self.column)
        parts = [order[b:e] for b, e in zip(starts[self.codes], starts[self.codes + 1])]
        return np.concatenate(parts) if parts else np.zeros(0, order.dtype)

    def passes(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of these rows passes (PhotoTable.mask over them, in one or two numpy
        calls: no other condition to test)."""
        if self.column is not None:
            return np.take(self.accepted, np.take(self.table.codes(self.column)[0], rows))
        taken = np.take(self.table.numbers("taken_at"), rows)  # NaN compares False
        after, before = self.bounds
        if after is None:
            return taken < before
        return taken >= after if before is None else (taken >= after) & (taken < before)


@dataclass(frozen=True)
class _SameAs:
    """A name filter's test of a value: equal ignoring case and surrounding spaces."""
    wanted: str

    def __call__(self, value: str) -> bool:
        return value.strip().casefold() == self.wanted


@dataclass(frozen=True)
class _InFolders:
    """A folder filter's test: the folder itself or a folder above it is one of these."""
    folders: frozenset

    def __call__(self, value: str) -> bool:
        return value in self.folders or any(a in self.folders for a in _ancestors(value))


def _same_as(wanted: str) -> _SameAs:
    return _SameAs(wanted.casefold())


def _in_folders(folders: list[str]) -> _InFolders:
    return _InFolders(frozenset(folders))


def _row_type(rows: int):
    """Row positions as int32 while they fit (half the memory of numpy's int64 orders)."""
    return np.int32 if rows < 2**31 else np.int64


def _ancestors(folder: str):
    """"a/b/c" -> "a", "a/b" (the folders above it)."""
    at = folder.find("/")
    while at >= 0:
        yield folder[:at]
        at = folder.find("/", at + 1)
