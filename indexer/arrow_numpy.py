"""Arrow arrays to and from numpy and Python lists on the serving path, without pyarrow's
conversions: `pa.array(...)` and `Array.to_numpy()` import pandas when it is installed (the API
image has it, for pymilvus), ~27 MB more in every serving process for nothing it uses.
Fixed-width arrays convert zero-copy; the input must have no nulls (fill them first)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NUMPY = {pa.int64(): np.int64, pa.int32(): np.int32, pa.uint8(): np.uint8,
          pa.float64(): np.float64}
_ARROW = {np.dtype(v): k for k, v in _NUMPY.items()}


def to_numpy(array: pa.Array | pa.ChunkedArray, null=None) -> np.ndarray:
    """A numeric or boolean array as numpy: without nulls, numeric, a read-only view; with
    nulls, a copy with `null` in their place (ValueError when `null` is None)."""
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks != 1:
            array = array.combine_chunks() if array.num_chunks else pa.nulls(0, array.type)
        else:
            array = array.chunk(0)
    if pa.types.is_boolean(array.type):
        return to_numpy(pc.cast(array, pa.uint8()), null).view(np.bool_)
    dtype = np.dtype(_NUMPY[array.type])
    if not len(array):
        return np.zeros(0, dtype)
    values = np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)
    if not array.null_count:
        return values
    if null is None:
        raise ValueError("an array with nulls")
    return np.where(to_numpy(array.is_valid()), values, np.asarray(null, dtype))


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-d numeric numpy array as Arrow (zero-copy when contiguous)."""
    values = np.ascontiguousarray(values)
    if values.dtype not in _ARROW:
        values = values.astype(np.int64)
    return pa.Array.from_buffers(_ARROW[values.dtype], len(values),
                                 [None, pa.py_buffer(values)])


def strings(values: list[str], type: pa.DataType = pa.string()) -> pa.Array:
    """Python strings as an Arrow string (or large_string) array."""
    data = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64 if type == pa.large_string() else np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(type, len(data), [None, pa.py_buffer(offsets),
                                                   pa.py_buffer(b"".join(data))])
