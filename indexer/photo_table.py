"""The photos' metadata as a columnar table aligned with an index version's rows (the FAISS
backend's `info.parquet`), and filters evaluated over it as one numpy mask.

`PhotoTable` holds one row per vector, in the version's table order, with the columns of
indexer.photo_columns.INFO_COLUMNS (float64, int64, string; null: unknown). A row without
metadata is all null. Stored as Parquet (zstd; strings dictionary-encoded): about 30-40 bytes a
photo. Columns a file lacks read as null (a file of another writer); a column of the wrong type,
or a row count other than the version's, is refused (ValueError: the loader reports it).

`mask(where)` is PhotoFilter.matches, vectorized: numeric columns as float64 arrays (NaN:
unknown), string columns as dictionary codes, so a comparison ignoring case is made once per
distinct value, not once per row (about 2 ms for a filter of several fields at 1M rows).
"""
from __future__ import annotations

import io
import threading
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer.arrow_numpy import from_numpy, to_numpy
from indexer.photo_columns import DATE_NOT_READ, FACETS, INFO_COLUMNS, public_info
from indexer.photo_filter import PhotoFilter, orientation_of, unit_sphere

ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}
SCHEMA = pa.schema([(name, ARROW_TYPES[kind]) for name, kind in INFO_COLUMNS.items()])
FIRST_SECOND, LAST_SECOND = -62135596800.0, 253402300799.0  # years 1..9999 (datetime's range)


class PhotoTable:
    """One version's metadata (see the module doc). Immutable; caches are built on first use."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[np.ndarray, list]] = {}

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
        """The stored metadata of these rows, as view.info gives it."""
        return [public_info(r) for r in
                self.table.take(from_numpy(np.asarray(positions, np.int64))).to_pylist()]

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

    def _where_value(self, name: str, accept) -> np.ndarray:
        """Rows whose `name` is a value `accept(value)` holds for (one call per distinct value)."""
        codes, values = self.codes(name)
        # one more entry, False, for code -1 (unknown): a gather instead of np.isin's sort
        accepted = np.array([bool(accept(v)) for v in values] + [False], bool)
        return accepted[codes]

    def _same(self, wanted: str, *names: str) -> np.ndarray:
        wanted = wanted.casefold()
        out = np.zeros(self.num_rows, bool)
        for name in names:
            out |= self._where_value(name, lambda v: v.strip().casefold() == wanted)
        return out

    def mask(self, where: PhotoFilter) -> np.ndarray:
        """Rows that pass the filter (PhotoFilter.matches, row for row)."""
        out = self.present.copy()  # a row without metadata passes no filter
        if where.folders is not None and all(where.folders):  # "" is every folder
            wanted = set(where.folders)
            out &= self._where_value("folder", lambda v: v in wanted or any(
                a in wanted for a in _ancestors(v)))
        after, before = where.time_range()
        if after is not None or before is not None:
            taken = self.numbers("taken_at")
            with np.errstate(invalid="ignore"):
                if after is not None:
                    out &= taken >= after
                if before is not None:
                    out &= taken < before
        if where.camera is not None:
            out &= self._same(where.camera, "camera_make", "camera_model")
        if where.country is not None:
            out &= self._same(where.country, "country", "country_code")
        if where.region is not None:
            out &= self._same(where.region, "region")
        if where.city is not None:
            out &= self._same(where.city, "city")
        if where.has_position is not None:
            known = ~np.isnan(self.numbers("lat")) & ~np.isnan(self.numbers("lon"))
            out &= known if where.has_position else ~known
        if where.near is not None:
            x, y, z = self._unit_vectors
            a, b, c = where.near.unit_vector()
            with np.errstate(invalid="ignore"):
                out &= x * a + y * b + z * c >= where.near.min_cosine()
        width, height = self.numbers("width"), self.numbers("height")
        with np.errstate(invalid="ignore"):
            if where.min_width is not None:
                out &= width >= where.min_width
            if where.min_height is not None:
                out &= height >= where.min_height
            if where.orientation is not None:
                wanted = {orientation_of(2, 1): width > height,
                          orientation_of(1, 2): height > width,
                          orientation_of(1, 1): width == height}
                out &= wanted[where.orientation]
        return out

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


def _ancestors(folder: str):
    """"a/b/c" -> "a", "a/b" (the folders above it)."""
    at = folder.find("/")
    while at >= 0:
        yield folder[:at]
        at = folder.find("/", at + 1)
