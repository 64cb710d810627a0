"""A version's key table: the id, object key and content etag of each vector, in row order
(the FAISS backend's `table.arrow`).

Stored as an uncompressed Arrow IPC file and read memory-mapped, zero-copy: the processes
serving one version share its pages in the page cache instead of each holding the keys as
Python strings (~120 MB a process at 1M). Two more columns make lookups binary searches over
the mapped columns, with no per-process dict: `key_order`, the rows in key order (bytewise, as
pyarrow compares strings), and `id_order`, the rows in id order.

`KeyTable.read` checks what a loader must trust before using the file: the columns and their
types, no nulls, well-formed buffers (`validate(full=True)`: offsets and UTF-8, so a damaged
file cannot make a lookup read outside it), both orders permutations that sort their column
strictly (so keys and ids are unique). Problems are ValueErrors; the loader reports them.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer.arrow_numpy import from_numpy, strings, to_numpy

SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("etag", pa.string()),
                    ("key_order", pa.int64()), ("id_order", pa.int64())])
_STRINGS = (pa.string(), pa.large_string())  # large_string: keys beyond 2 GiB in all
_CHECK_CHUNK = 1 << 16  # rows compared at a time (bounded temporaries at load)
_ITER_CHUNK = 1 << 14
_FENCE_EVERY = 256  # key_order positions between two keys of the fence (_fence)
_ONE_BY_ONE_MAX = 32  # up to this many keys: searched one by one (rows_of_keys)


class Column(Sequence):
    """A read-only sequence of str over an Arrow string column (a version's keys or etags):
    len, indexing (int or slice: a slice is a list), iteration, ==, `in`."""
    __slots__ = ("array",)

    def __init__(self, array: pa.Array):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, at):
        if isinstance(at, slice):
            return self.array[at].to_pylist()
        at = int(at)  # numpy integers too
        if at < 0:
            at += len(self.array)
        if not 0 <= at < len(self.array):
            raise IndexError("key table index out of range")
        return self.array[at].as_py()

    def __iter__(self):
        for start in range(0, len(self.array), _ITER_CHUNK):
            yield from self.array[start:start + _ITER_CHUNK].to_pylist()

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and _is_utf8(value) and \
            pc.index(self.array, strings([value], self.array.type)[0]).as_py() >= 0

    def __eq__(self, other):
        if isinstance(other, Column):
            return self.array.equals(other.array)
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        shown = self[:3]
        return f"Column({shown!r}{' ...' if len(self) > 3 else ''}, {len(self)} rows)"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strings(values) -> pa.Array:
    if isinstance(values, Column):
        return values.array
    array = pa.array(list(values), pa.string())
    if isinstance(array, pa.ChunkedArray):  # over 2 GiB of text
        array = pa.array(list(values), pa.large_string())
    return array


def _first_not_increasing(values: pa.Array, order: np.ndarray) -> int | None:
    """The first position p where values[order[p]] >= values[order[p + 1]] (None: strictly
    increasing), comparing a chunk at a time."""
    for start in range(0, max(0, len(order) - 1), _CHECK_CHUNK):
        part = values.take(from_numpy(order[start:start + _CHECK_CHUNK + 1]))
        increasing = to_numpy(pc.less(part[:-1], part[1:]))
        if not increasing.all():
            return start + int(np.argmin(increasing))
    return None


class KeyTable:
    """One version's ids, keys and etags in row order (see the module doc). Immutable."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.ids = self._numbers("id")  # int64, zero-copy when mapped (read-only)
        self.key_order = self._numbers("key_order")
        self.id_order = self._numbers("id_order")
        self._key_array = self._array("key")
        self.keys = Column(self._key_array)
        self.etags = Column(self._array("etag"))

    def _array(self, name: str) -> pa.Array:
        column = self.table.column(name)
        if column.num_chunks == 1:
            return column.chunk(0)
        return column.combine_chunks() if column.num_chunks else pa.nulls(0, column.type)

    def _numbers(self, name: str) -> np.ndarray:
        return to_numpy(self._array(name))

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    # --- making and storing ------------------------------------------------------------------
    @classmethod
    def from_columns(cls, ids, keys, etags) -> "KeyTable":
        """From the columns in row order (the sort orders are computed here)."""
        ids = np.asarray(ids, np.int64)
        keys, etags = _strings(keys), _strings(etags)
        if not len(ids) == len(keys) == len(etags):
            raise ValueError("ids, keys and etags must have the same length")
        schema = SCHEMA if keys.type == etags.type == pa.string() else pa.schema(
            [("id", pa.int64()), ("key", keys.type), ("etag", etags.type),
             ("key_order", pa.int64()), ("id_order", pa.int64())])
        return cls(pa.table([pa.array(ids), keys, etags,
                             pc.sort_indices(keys).cast(pa.int64()),
                             pa.array(np.argsort(ids, kind="stable").astype(np.int64))],
                            schema=schema))

    def write(self, path) -> None:
        with pa.OSFile(str(path), "wb") as sink, \
                pa.ipc.new_file(sink, self.table.schema) as writer:
            writer.write_table(self.table)

    @staticmethod
    def read_mapped(path) -> pa.Table:
        """The file's table, memory-mapped and zero-copy, its columns and buffers checked
        (ValueError), not its orders: `read` checks those too."""
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"not an Arrow IPC file, or truncated ({type(exc).__name__})") \
                from None
        for field in SCHEMA:
            if field.name not in table.column_names:
                raise ValueError(f"it has no column {field.name!r}")
            got = table.schema.field(field.name).type
            if got != field.type and not (field.type in _STRINGS and got in _STRINGS):
                raise ValueError(f"column {field.name} is {got}, not {field.type}")
            if table.column(field.name).null_count:
                raise ValueError(f"column {field.name} has nulls")
        try:
            table.validate(full=True)
        except pa.ArrowException:
            raise ValueError("its buffers are malformed") from None
        return table

    @classmethod
    def read(cls, path) -> "KeyTable":
        """A table file, memory-mapped and checked (see the module doc; ValueError)."""
        out = cls(cls.read_mapped(path))
        out.check()
        return out

    def check(self) -> None:
        """ValueError unless both orders are permutations that sort their column strictly."""
        n = self.num_rows
        for name, order, values, what in (
                ("key_order", self.key_order, self._key_array, "keys"),
                ("id_order", self.id_order, self._array("id"), "ids")):
            if n and not (0 <= int(order.min()) and int(order.max()) < n):
                raise ValueError(f"{name} holds rows out of range")
            at = _first_not_increasing(values, order)
            if at is None:
                continue  # strictly increasing over distinct rows in range: a permutation
            a, b = int(order[at]), int(order[at + 1])
            if a != b and values[a] == values[b]:
                raise ValueError(f"{what} are not unique")
            raise ValueError(f"{name} is not the {what}' sort order")

    # --- lookups -----------------------------------------------------------------------------
    def rows_of_keys(self, keys: list[str]) -> np.ndarray:
        """Each key's row (-1: not in the table), by binary search over key_order: a few keys
        one by one in Python (~10-20 us a key at 1M), more all at once: their stretches of the
        order from the fence, then log2(_FENCE_EVERY) steps of Arrow's take and compare."""
        if len(keys) <= _ONE_BY_ONE_MAX:
            return np.array([self._row_of_key(k) for k in keys], np.int64)
        n = self.num_rows
        if n == 0:
            return np.full(len(keys), -1, np.int64)
        # a key that is not UTF-8 (a lone surrogate) is in no table
        text = [k if isinstance(k, str) and _is_utf8(k) else "" for k in keys]
        held = np.array([t is k for t, k in zip(text, keys)], bool)
        wanted = strings(text, self._key_array.type)
        # each key's stretch of the order from the fence, then the steps within it
        at = np.array([bisect.bisect_right(self._fence, t) for t in text], np.int64)
        lo = np.maximum(at - 1, 0) * _FENCE_EVERY
        hi = np.minimum(at * _FENCE_EVERY, n)
        while (open_ := lo < hi).any():
            mid = (lo + hi) // 2
            probe = self._key_array.take(from_numpy(self.key_order[np.minimum(mid, n - 1)]))
            below = to_numpy(pc.less(probe, wanted))
            lo = np.where(open_ & below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)
        rows = self.key_order[np.minimum(lo, n - 1)]
        same = to_numpy(pc.equal(self._key_array.take(from_numpy(rows)), wanted))
        return np.where((lo < n) & same & held, rows, -1)

    @cached_property
    def _fence(self) -> list[str]:
        """Every _FENCE_EVERY-th key in key order (~4k strings at 1M): a key's stretch of the
        order is found in Python before the steps that read the mapped columns."""
        return self._key_array.take(from_numpy(self.key_order[::_FENCE_EVERY])).to_pylist()

    def _row_of_key(self, key: str) -> int:
        if not isinstance(key, str):
            return -1
        # Python orders str by code point, as Arrow orders their UTF-8 bytes
        at = bisect.bisect_right(self._fence, key)  # fence[at - 1] <= key < fence[at]
        if at == 0:
            return -1
        lo, hi = (at - 1) * _FENCE_EVERY, min(self.num_rows, at * _FENCE_EVERY)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._key_array[int(self.key_order[mid])].as_py() < key:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.num_rows:
            return -1
        row = int(self.key_order[lo])
        return row if self._key_array[row].as_py() == key else -1

    def row_of_id(self, vid: int) -> int:
        """The id's row (-1: no such id): binary search over id_order."""
        return int(self.rows_of_ids(np.array([vid], np.int64))[0])

    def rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Each id's row (-1: no such id), by binary search over id_order."""
        if not len(self.ids):
            return np.full(len(ids), -1, np.int64)
        at = np.minimum(np.searchsorted(self.ids, ids, sorter=self.id_order), len(self.ids) - 1)
        rows = self.id_order[at].astype(np.int64)
        return np.where(self.ids[rows] == ids, rows, -1)
