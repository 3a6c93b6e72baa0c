"""Parquet pool files: row-group-aware range reads and Arrow embedding columns."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.pool.base import PoolError


class _ParquetReader:
    """Row ranges of one Parquet file, reading only the row groups that hold them.

    The row groups of the last read are kept, so consecutive blocks that share a row
    group (block and row-group sizes rarely line up) read it once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        local = storage.local_path(url)
        if local:  # Arrow's own memory-mapped reader: 4x faster than through a Python file object here
            self._file = None
            self._pf = pq.ParquetFile(local, memory_map=True)
        else:
            fs, path = storage.resolve(url)
            self._file = fs.open(path, "rb")
            self._pf = pq.ParquetFile(self._file)
        meta = self._pf.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self.group_starts[-1])
        self.schema = self._pf.schema_arrow
        self._cache: dict[int, pa.Table] = {}

    def _groups(self, rows: np.ndarray) -> list[int]:
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        return sorted(set(int(g) for g in groups))

    def _read_groups(self, groups: list[int], columns: list[str]) -> pa.Table:
        """The row groups' ``columns``, concatenated in ``groups`` order.

        Groups not cached yet are read in one call (a pool written a stage call at a time has
        a row group per call, a few hundred rows: one call per group scanned at half the rate),
        and the groups stay cached with every column read of them so far, so a block's ids read
        after its embeddings do not make the next block read its group again.
        """
        tables = {g: self._cache[g] for g in groups if g in self._cache}
        missing = [c for c in columns if any(c not in t.column_names for t in tables.values())]
        todo = [g for g in groups if g not in tables]
        if todo:
            new = self._pf.read_row_groups(todo, columns=columns)
            at = 0
            for g in todo:
                size = int(self.group_starts[g + 1] - self.group_starts[g])
                tables[g] = new.slice(at, size)
                at += size
        if missing:
            cached = [g for g in groups if g not in todo]
            new = self._pf.read_row_groups(cached, columns=missing)
            at = 0
            for g in cached:
                size = int(self.group_starts[g + 1] - self.group_starts[g])
                part = new.slice(at, size)
                for name in part.column_names:
                    if name not in tables[g].column_names:
                        tables[g] = tables[g].append_column(name, part.column(name))
                at += size
        self._cache = tables
        picked = [tables[g].select(columns) for g in groups]
        return pa.concat_tables(picked) if len(picked) > 1 else picked[0]

    def read_range(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows ``start:stop`` (clipped to the file) of ``columns``."""
        stop = min(stop, self.num_rows)
        if stop <= start or not columns:
            return self.schema.empty_table().select(columns) if columns else pa.table({})
        groups = list(range(self._groups(np.array([start]))[0], self._groups(np.array([stop - 1]))[0] + 1))
        table = self._read_groups(groups, columns)
        offset = int(self.group_starts[groups[0]])
        return table.slice(start - offset, stop - start).select(columns)

    def read_rows(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The given rows (any order, repeats allowed) of ``columns``."""
        if len(rows) == 0:
            return self.schema.empty_table().select(columns)
        groups = self._groups(rows)
        table = self._read_groups(groups, columns)
        offsets = np.zeros(len(self.group_starts), np.int64)
        pos = 0
        for g in groups:
            offsets[g] = pos - self.group_starts[g]
            pos += int(self.group_starts[g + 1] - self.group_starts[g])
        idx = rows + offsets[np.searchsorted(self.group_starts, rows, side="right") - 1]
        return table.take(pa.array(idx, pa.int64()))

    def close(self) -> None:
        self._pf.close()
        if self._file is not None:
            self._file.close()


def embedding_matrix(
    column: pa.ChunkedArray | pa.Array, where: str = "column", row_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Turn an Arrow embedding column into a ``(rows, dim)`` array.

    Values keep their stored float type (float64 becomes float32). Null rows become
    zero rows and are flagged in the returned mask, so a validation pass can reject them.
    A packed column (``fixed_size_binary``: each row's float16 values, little-endian, as
    ``pixelmill pool build`` writes them) is read without copying; list columns are
    decoded value by value by Parquet (about 25x slower to read: see :func:`embedding_array`).

    Args:
        column: ``fixed_size_binary`` (packed float16), ``list<float16|float32>``,
            ``large_list`` or ``fixed_size_list`` values.
        where: named in errors (file and column).
        row_offset: added to row numbers in errors (the block's first row).

    Returns:
        ``(matrix, null_mask)``.

    Raises:
        PoolError: the column is not a list of floats, or its rows differ in length.
    """
    if isinstance(column, pa.ChunkedArray):
        if pa.types.is_fixed_size_binary(column.type) and column.num_chunks > 1:
            parts = [_packed_matrix(c, where) for c in column.chunks]
            return np.concatenate([m for m, _ in parts]), np.concatenate([k for _, k in parts])
        # one chunk (a block within a row group) is used as it is: combining copies it (10-190 ms a block)
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        arr = column
    t = arr.type
    if pa.types.is_fixed_size_binary(t):
        return _packed_matrix(arr, where)
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise PoolError(f"{where} has type {t}; embeddings must be list<float16|float32> or packed "
                        "float16 (fixed_size_binary) columns")
    if not pa.types.is_floating(t.value_type):
        raise PoolError(f"{where} holds {t.value_type} values; embeddings must be float16 or float32")
    n = len(arr)
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, bool)
    valid = arr.filter(pa.array(~nulls)) if arr.null_count else arr
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
    else:
        lengths = pc.list_value_length(valid).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        bad = np.nonzero(lengths != dim)[0]
        if len(bad):
            rows = np.nonzero(~nulls)[0] + row_offset
            raise PoolError(f"{where}: row {int(rows[bad[0]])} has {int(lengths[bad[0]])} values but row "
                            f"{int(rows[0])} has {dim}; embeddings must all have one width")
    values = valid.flatten().to_numpy(zero_copy_only=False)
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    flat = values.reshape(len(valid), dim) if dim else np.zeros((len(valid), 0), values.dtype)
    if not arr.null_count:
        return flat, nulls
    out = np.zeros((n, dim), flat.dtype)
    out[~nulls] = flat
    return out, nulls


PACKED_DTYPE = np.dtype("<f2")
"""The values of a packed (``fixed_size_binary``) embedding column: float16, little-endian."""


def _packed_matrix(arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
    width = arr.type.byte_width
    if width % PACKED_DTYPE.itemsize:
        raise PoolError(f"{where} has type {arr.type}: a packed embedding column holds float16 values, "
                        f"2 bytes each, and {width} bytes is not a whole number of them")
    n, dim = len(arr), width // PACKED_DTYPE.itemsize
    data = arr.buffers()[1]
    flat = np.frombuffer(data, np.uint8, count=n * width, offset=arr.offset * width) if n else np.zeros(0, np.uint8)
    matrix = flat.view(PACKED_DTYPE).reshape(n, dim)
    if not PACKED_DTYPE.isnative:  # pragma: no cover - big-endian hosts
        matrix = matrix.astype(np.float16)
    if not arr.null_count:
        return matrix, np.zeros(n, bool)
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    out = np.array(matrix, np.float16)
    out[nulls] = 0  # a null slot's bytes are undefined
    return out, nulls


def embedding_array(emb: np.ndarray, dtype: Any = np.float16, fixed_size: bool = False,
                    packed: bool = False) -> pa.Array:
    """An Arrow embedding column from a ``(rows, dim)`` array.

    Args:
        emb: the vectors.
        dtype: stored float type (``np.float16`` halves storage; ``np.float32`` keeps all bits).
        fixed_size: write ``fixed_size_list<dtype, dim>`` instead of ``list<dtype>``.
        packed: write each row's float16 values as one ``fixed_size_binary(2 * dim)`` value
            (``dtype`` must be float16). Parquet reads such a column as one block of bytes:
            3.2 M rows/s of 512 values here against 0.1 M for a list column, which it decodes
            value by value; `pixelmill pool build` writes pools so.
    """
    if packed:
        if np.dtype(dtype) != np.float16:
            raise ValueError(f"a packed embedding column holds float16 values, not {np.dtype(dtype)}")
        emb = np.ascontiguousarray(emb, dtype=PACKED_DTYPE)
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(emb.shape[1] * 2), len(emb),
                                                    [None, pa.py_buffer(emb.tobytes())])
    emb = np.ascontiguousarray(emb, dtype=dtype)
    values = pa.array(emb.reshape(-1))
    if fixed_size:
        return pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)
