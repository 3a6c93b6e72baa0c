"""Retrieval pools: captions, URLs and CLIP embeddings, read block by block from any fsspec URL.

Two layouts are read, detected by :meth:`Pool.open`:

- ``laion``: LAION's released layout, also what ``clip-retrieval inference`` writes::

      img_emb/img_emb_{i}.npy   text_emb/text_emb_{i}.npy   metadata/metadata_{i}.parquet

  rows aligned per part ``i`` (the metadata has ``url``, ``caption`` and optionally
  ``punsafe``, ``pwatermark``, ``width``, ``height``, …). A small ``pool.json`` at the root
  (``{"clip_model", "dim", "layout"}``) names the CLIP model when pixelmill wrote it.
- ``parquet``: a pixelmill dataset (``part-*.parquet`` + ``_manifest.json``) whose rows
  carry ``id``, ``caption``, ``url`` and ``text_emb`` / ``img_emb`` as ``list<float16|float32>``
  or fixed-size-list columns. Its manifest config records ``clip_model`` and ``embed_dim``.
  No ``pool.json`` is written there: a JSON file beside a single Parquet shard makes
  ``datasets.load_dataset(folder)`` pick the JSON builder and fail (checked with datasets
  5.2), so the manifest config holds that information. A hand-written ``pool.json`` is
  still read when present.

Embeddings are returned as stored (fp16 or fp32), never upcast here: the scanner upcasts
in cache-sized sub-blocks. Local ``.npy`` files are memory-mapped; remote ones are read
with ranged reads from the offset given by their header, so a block costs one request.
Rows whose metadata has no ``id`` column get the stable id ``"{part}:{row}"``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixelmill.datasets import storage

POOL_INFO_NAME = "pool.json"
LAYOUT_LAION = "laion"
LAYOUT_PARQUET = "parquet"
KINDS = ("text", "image")
EMB_COLUMNS = {"text": "text_emb", "image": "img_emb"}
LAION_FOLDERS = {"text": "text_emb", "image": "img_emb"}
METADATA_FOLDER = "metadata"
DEFAULT_BLOCK_ROWS = 65536
VALIDATE_STAGE = "pool_validate"
BAD_NONFINITE = "nan_or_inf"
BAD_ZERO = "zero_vector"
BAD_NULL = "null_embedding"

Kind = Literal["text", "image"]


class PoolError(ValueError):
    """A pool that cannot be scanned as asked: wrong layout, width, alignment or values."""


@dataclass(frozen=True)
class PoolPart:
    """One part of a pool: rows aligned between its embeddings and its metadata.

    Args:
        name: ``"0"``, ``"1"``… for the LAION layout (the ``i`` of the file names), the
            shard name (``"00000"``) for the Parquet layout.
        rows: metadata rows.
        emb_rows: rows of each embedding kind present (``{"text": 1000, "image": 1000}``).
        emb_dims: width of each embedding kind present.
        emb_dtypes: stored dtype name (``float16``/``float32``) of each kind.
        metadata_url: the metadata Parquet file (the shard itself for the Parquet layout).
        emb_urls: the ``.npy`` file of each kind (the shard file for the Parquet layout).
    """

    name: str
    rows: int
    emb_rows: dict[str, int]
    emb_dims: dict[str, int]
    emb_dtypes: dict[str, str]
    metadata_url: str
    emb_urls: dict[str, str]


@dataclass(frozen=True)
class BlockRange:
    """Rows ``start:stop`` of one part (what a scan task is given instead of data)."""

    part: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """Number of rows in the range."""
        return self.stop - self.start


class PoolBlock:
    """A run of consecutive rows of one part: embeddings as stored plus metadata.

    Ids are produced on first use, so a scan that finds nothing in a block never pays
    for them.

    Args:
        part: the part name.
        start: offset of the first row within the part.
        emb: ``(rows, dim)`` embeddings as stored (fp16 or fp32).
        meta: the requested metadata columns for those rows (no columns when none asked).
        ids: the ids of the rows, when already read.
        id_loader: called once to produce the ids when ``ids`` is None.
    """

    def __init__(
        self,
        part: str,
        start: int,
        emb: np.ndarray,
        meta: pa.Table,
        ids: Sequence[str] | None = None,
        id_loader: Callable[[], list[str]] | None = None,
    ) -> None:
        self.part = part
        self.start = start
        self.emb = emb
        self.meta = meta
        self._ids = list(ids) if ids is not None else None
        self._id_loader = id_loader

    @property
    def stop(self) -> int:
        """Offset one past the last row within the part."""
        return self.start + len(self.emb)

    @property
    def ids(self) -> list[str]:
        """Stable ids of the block's rows."""
        if self._ids is None:
            if self._id_loader is not None:
                self._ids = self._id_loader()
            else:
                self._ids = [f"{self.part}:{r}" for r in range(self.start, self.stop)]
        return self._ids

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Ids of some rows, given by their index within the block."""
        if self._ids is None and self._id_loader is None:
            return [f"{self.part}:{self.start + int(r)}" for r in rows]
        ids = self.ids
        return [ids[int(r)] for r in rows]

    def __len__(self) -> int:
        return len(self.emb)

    def __repr__(self) -> str:
        return f"PoolBlock(part={self.part!r}, rows={self.start}:{self.stop}, dtype={self.emb.dtype})"


# ---------------------------------------------------------------------------- npy files


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int


def _read_npy_header(url: str) -> _NpyHeader:
    fs, path = storage.resolve(url)
    with fs.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise PoolError(f"{url} is not a readable .npy file: {exc}") from exc
        offset = f.tell()
    if dtype.hasobject or dtype.kind != "f":
        raise PoolError(f"{url} holds {dtype} values; embeddings must be float16 or float32")
    if len(shape) != 2:
        raise PoolError(f"{url} has shape {shape}; embeddings must be a 2-D (rows, dim) array")
    return _NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran), offset)


def _is_local(url: str) -> bool:
    fs, _ = storage.resolve(url)
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


class _NpyReader:
    """Row ranges of one .npy file: a memory map for local files, ranged reads otherwise."""

    def __init__(self, url: str, header: _NpyHeader) -> None:
        self.url = url
        self.header = header
        self._array: np.ndarray | None = None
        fs, path = storage.resolve(url)
        if _is_local(url):
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif header.fortran:
            with fs.open(path, "rb") as f:
                self._array = np.load(f, allow_pickle=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return self._array[start:stop]
        rows, dim = self.header.shape
        stop = min(stop, rows)
        if stop <= start:
            return np.empty((0, dim), self.header.dtype)
        row_bytes = dim * self.header.dtype.itemsize
        fs, path = storage.resolve(self.url)
        with fs.open(path, "rb") as f:
            f.seek(self.header.offset + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        if len(data) != (stop - start) * row_bytes:
            raise PoolError(f"{self.url} is truncated: rows {start}:{stop} are not all there")
        return np.frombuffer(data, dtype=self.header.dtype).reshape(stop - start, dim)


# ------------------------------------------------------------------------ parquet files


class _ParquetReader:
    """Row ranges of one Parquet file, reading only the row groups that hold them.

    The row groups of the last read are kept, so consecutive blocks that share a row
    group (block and row-group sizes rarely line up) read it once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
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
        tables = {}
        for g in groups:
            cached = self._cache.get(g)
            if cached is not None and set(columns) <= set(cached.column_names):
                tables[g] = cached.select(columns)
            else:
                tables[g] = self._pf.read_row_group(g, columns=columns)
        self._cache = tables
        return pa.concat_tables([tables[g] for g in groups]) if len(groups) > 1 else tables[groups[0]]

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
        self._file.close()


def embedding_matrix(
    column: pa.ChunkedArray | pa.Array, where: str = "column", row_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Turn an Arrow list (or fixed-size-list) embedding column into a ``(rows, dim)`` array.

    Values keep their stored float type (float64 becomes float32). Null rows become
    zero rows and are flagged in the returned mask, so a validation pass can reject them.

    Args:
        column: ``list<float16|float32>``, ``large_list`` or ``fixed_size_list`` values.
        where: named in errors (file and column).
        row_offset: added to row numbers in errors (the block's first row).

    Returns:
        ``(matrix, null_mask)``.

    Raises:
        PoolError: the column is not a list of floats, or its rows differ in length.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise PoolError(f"{where} has type {t}; embeddings must be list<float16|float32> columns")
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


def embedding_array(emb: np.ndarray, dtype: Any = np.float16, fixed_size: bool = False) -> pa.Array:
    """An Arrow embedding column from a ``(rows, dim)`` array.

    Args:
        emb: the vectors.
        dtype: stored float type (``np.float16`` halves storage; ``np.float32`` keeps all bits).
        fixed_size: write ``fixed_size_list<dtype, dim>`` instead of ``list<dtype>``.
    """
    emb = np.ascontiguousarray(emb, dtype=dtype)
    values = pa.array(emb.reshape(-1))
    if fixed_size:
        return pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


# ------------------------------------------------------------------------------- pools


_PART_RE = re.compile(r"^(?P<prefix>img_emb|text_emb|metadata)_(?P<num>\d+)\.(?P<ext>npy|parquet)$")


def _laion_files(url: str, folder: str, prefix: str, ext: str) -> dict[str, str]:
    out = {}
    for name in storage.listdir(storage.join(url, folder)):
        m = _PART_RE.match(name)
        if m and m.group("prefix") == prefix and m.group("ext") == ext:
            out[str(int(m.group("num")))] = storage.join(url, folder, name)
    return out


def _first_list_width(ds: Any, column: str) -> int:
    """Width of a variable-length list column: the length of its first stored row."""
    for name in ds.shard_names():
        if ds.shard_rows(name):
            reader = _ParquetReader(ds.shard_url(name))
            try:
                first = reader.read_range(0, 1, [column]).column(0)[0].as_py()
            finally:
                reader.close()
            return len(first or [])
    return 0


def _read_info(url: str) -> dict[str, Any]:
    path = storage.join(url, POOL_INFO_NAME)
    if not storage.exists(path):
        return {}
    try:
        info = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise PoolError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise PoolError(f"{path} must hold a JSON object")
    return info


class Pool:
    """A retrieval pool (LAION or Parquet layout), read block by block.

    Open it with :meth:`Pool.open`. It holds open file handles for the parts it has
    read; :meth:`close` (or a ``with`` block) releases them.

    Args:
        url: the pool root.
        layout: ``laion`` or ``parquet``.
        parts: its parts, in scan order.
        info: what is known about the pool (``clip_model``, ``dim``) from ``pool.json``
            or the manifest config.
        metadata_columns: metadata column names (embedding columns excluded).
    """

    def __init__(
        self,
        url: str,
        layout: str,
        parts: list[PoolPart],
        info: dict[str, Any],
        metadata_columns: list[str],
    ) -> None:
        self.url = str(url)
        self.layout = layout
        self.parts = parts
        self.info = info
        self.metadata_columns = metadata_columns
        self._by_name = {p.name: p for p in parts}
        self._npy: dict[str, _NpyReader] = {}
        self._parquet: dict[str, _ParquetReader] = {}

    # ---- opening

    @classmethod
    def open(cls, url: str, parts: Sequence[str] | None = None) -> Pool:
        """Open the pool at ``url``, detecting its layout.

        Args:
            url: local path or fsspec URL of the pool root.
            parts: only these parts (a scan task opens just the parts it reads).

        Raises:
            PoolError: nothing at ``url`` looks like a pool.
        """
        url = str(url)
        folders = set(storage.listdir(url))
        if METADATA_FOLDER in folders and folders & set(LAION_FOLDERS.values()):
            return cls._open_laion(url, parts)
        if any(n.endswith(".parquet") for n in folders) or "_manifest.json" in folders:
            return cls._open_parquet(url, parts)
        raise PoolError(
            f"no pool at {url}: expected img_emb/, text_emb/ and metadata/ folders (LAION layout) "
            "or a pixelmill dataset with text_emb/img_emb columns"
        )

    @classmethod
    def _open_laion(cls, url: str, only: Sequence[str] | None) -> Pool:
        meta_files = _laion_files(url, METADATA_FOLDER, "metadata", "parquet")
        emb_files = {k: _laion_files(url, folder, folder, "npy") for k, folder in LAION_FOLDERS.items()}
        names = set(meta_files)
        for files in emb_files.values():
            names |= set(files)
        if only is not None:
            names &= {str(p) for p in only}
        if not names:
            raise PoolError(f"LAION-layout pool {url} has no parts (metadata/metadata_0.parquet, …)")
        parts = []
        columns: list[str] | None = None
        for name in sorted(names, key=int):
            rows = -1
            if name in meta_files:
                reader_schema = None
                fs, path = storage.resolve(meta_files[name])
                with fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    rows = pf.metadata.num_rows
                    reader_schema = pf.schema_arrow
                if columns is None:
                    columns = list(reader_schema.names)
            emb_rows, dims, dtypes, urls = {}, {}, {}, {}
            for kind, files in emb_files.items():
                if name in files:
                    h = _read_npy_header(files[name])
                    emb_rows[kind], dims[kind], dtypes[kind] = h.shape[0], h.shape[1], h.dtype.name
                    urls[kind] = files[name]
            parts.append(PoolPart(name, rows, emb_rows, dims, dtypes, meta_files.get(name, ""), urls))
        return cls(url, LAYOUT_LAION, parts, _read_info(url), columns or [])

    @classmethod
    def _open_parquet(cls, url: str, only: Sequence[str] | None) -> Pool:
        from pixelmill.datasets.reader import Dataset

        ds = Dataset.open(url)
        schema = ds.schema
        kinds = [k for k, col in EMB_COLUMNS.items() if col in schema.names]
        if not kinds:
            raise PoolError(
                f"dataset {url} has no embedding column (text_emb or img_emb); "
                f"its columns are {', '.join(schema.names)}"
            )
        info = dict(ds.manifest.config) if ds.manifest is not None else {}
        info = {k: info[k] for k in ("clip_model", "embed_dim", "layout") if k in info}
        if "embed_dim" in info:
            info["dim"] = info.pop("embed_dim")
        info.update(_read_info(url))
        info["complete"] = ds.complete
        dims, dtypes = {}, {}
        for kind in kinds:
            t = schema.field(EMB_COLUMNS[kind]).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                    or not pa.types.is_floating(t.value_type):
                raise PoolError(f"{url}: column {EMB_COLUMNS[kind]} has type {t}; "
                                "embeddings must be list<float16|float32> columns")
            dtypes[kind] = "float16" if t.value_type == pa.float16() else "float32"
            if pa.types.is_fixed_size_list(t):
                dims[kind] = t.list_size
            elif info.get("dim") is not None:
                dims[kind] = int(info["dim"])
            else:
                dims[kind] = _first_list_width(ds, EMB_COLUMNS[kind])
        names = ds.shard_names() if only is None else [n for n in ds.shard_names() if n in set(only)]
        parts = []
        for name in names:
            rows = ds.shard_rows(name)
            shard_url = ds.shard_url(name)
            parts.append(PoolPart(name, rows, {k: rows for k in kinds}, dict(dims), dict(dtypes),
                                  shard_url, {k: shard_url for k in kinds}))
        return cls(url, LAYOUT_PARQUET, parts, info, [n for n in schema.names if n not in EMB_COLUMNS.values()])

    # ---- description

    @property
    def kinds(self) -> list[str]:
        """Embedding kinds present in every part (``text``, ``image``)."""
        found = [k for k in KINDS if self.parts and all(k in p.emb_rows for p in self.parts)]
        return found or [k for k in KINDS if any(k in p.emb_rows for p in self.parts)]

    @property
    def num_rows(self) -> int:
        """Metadata rows over all parts."""
        return sum(max(p.rows, 0) for p in self.parts)

    def dim_of(self, kind: Kind = "text") -> int:
        """Embedding width of ``kind`` (of its first part)."""
        self._require_kind(kind)
        return next(p.emb_dims[kind] for p in self.parts if kind in p.emb_dims)

    @property
    def dim(self) -> int:
        """Embedding width: text embeddings when present, else image embeddings."""
        return self.dim_of(self.kinds[0]) if self.kinds else int(self.info.get("dim", 0))

    @property
    def clip_model(self) -> str | None:
        """The CLIP model the embeddings came from, when ``pool.json`` or the manifest says."""
        return self.info.get("clip_model")

    @property
    def has_ids(self) -> bool:
        """Whether rows carry an ``id`` column (else ids are ``"{part}:{row}"``)."""
        return "id" in self.metadata_columns

    def part(self, name: str) -> PoolPart:
        """The part called ``name``."""
        try:
            return self._by_name[str(name)]
        except KeyError:
            raise PoolError(f"pool {self.url} has no part {name!r}") from None

    def _require_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise PoolError(f"unknown embedding kind {kind!r}; use 'text' or 'image'")
        if not any(kind in p.emb_rows for p in self.parts):
            have = ", ".join(self.kinds) or "none"
            raise PoolError(f"pool {self.url} has no {kind} embeddings (it has: {have})")

    def alignment_error(self, part: PoolPart, kind: str) -> str | None:
        """Why ``part`` cannot be scanned for ``kind`` (missing file, row counts differ), or None."""
        folder = LAION_FOLDERS[kind]
        if kind not in part.emb_rows:
            return f"part {part.name} has no {kind} embeddings ({folder}/{folder}_{part.name}.npy is missing)"
        if part.rows < 0:
            return (f"part {part.name} has {kind} embeddings but no metadata "
                    f"(metadata/metadata_{part.name}.parquet is missing)")
        if part.emb_rows[kind] != part.rows:
            return (f"part {part.name} is misaligned: {posixpath.basename(part.emb_urls[kind])} has "
                    f"{part.emb_rows[kind]} rows but {posixpath.basename(part.metadata_url)} has {part.rows}")
        return None

    def block_ranges(self, kind: Kind = "text", block_rows: int = DEFAULT_BLOCK_ROWS,
                     parts: Sequence[str] | None = None) -> list[BlockRange]:
        """Split the parts into row ranges of at most ``block_rows`` (never across parts).

        Args:
            kind: which embeddings will be read.
            block_rows: rows per range.
            parts: only these parts (all when None).
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}")
        self._require_kind(kind)
        wanted = None if parts is None else {str(p) for p in parts}
        out = []
        for part in self.parts:
            if wanted is not None and part.name not in wanted:
                continue
            error = self.alignment_error(part, kind)
            if error:
                raise PoolError(error)
            for start in range(0, part.rows, block_rows):
                out.append(BlockRange(part.name, start, min(start + block_rows, part.rows)))
        return out

    # ---- reading

    def _parquet_reader(self, url: str) -> _ParquetReader:
        reader = self._parquet.get(url)
        if reader is None:
            reader = self._parquet[url] = _ParquetReader(url)
        return reader

    def _npy_reader(self, url: str) -> _NpyReader:
        reader = self._npy.get(url)
        if reader is None:
            reader = self._npy[url] = _NpyReader(url, _read_npy_header(url))
        return reader

    def _check_columns(self, columns: Sequence[str]) -> list[str]:
        missing = [c for c in columns if c not in self.metadata_columns and c != "id"]
        if missing:
            raise PoolError(f"pool {self.url} has no metadata column(s) {', '.join(missing)}; "
                            f"it has: {', '.join(self.metadata_columns)}")
        return list(dict.fromkeys(columns))

    def read_block(self, kind: Kind, part: str, start: int, stop: int,
                   columns: Sequence[str] = ()) -> PoolBlock:
        """Read rows ``start:stop`` of one part.

        Args:
            kind: ``text`` or ``image`` embeddings.
            part: the part name.
            start: first row (within the part).
            stop: one past the last row.
            columns: metadata columns wanted in ``PoolBlock.meta``.
        """
        self._require_kind(kind)
        p = self.part(part)
        error = self.alignment_error(p, kind)
        if error:
            raise PoolError(error)
        columns = self._check_columns(columns)
        stop = min(stop, p.rows)
        meta_cols = [c for c in columns if c in self.metadata_columns]
        if self.layout == LAYOUT_PARQUET:
            reader = self._parquet_reader(p.metadata_url)
            emb_col = EMB_COLUMNS[kind]
            want = [emb_col] + meta_cols + (["id"] if self.has_ids and "id" not in meta_cols else [])
            table = reader.read_range(start, stop, want)
            emb, _ = embedding_matrix(table.column(emb_col), f"{p.metadata_url} column {emb_col}", start)
            self._check_width(emb, p, kind)
            ids = _as_str_list(table.column("id")) if self.has_ids else None
            meta = self._meta_table(table, columns, p.name, start)
            return PoolBlock(p.name, start, emb, meta, ids=ids)
        emb = self._npy_reader(p.emb_urls[kind]).read(start, stop)
        meta = pa.table({})
        if columns:
            table = self._parquet_reader(p.metadata_url).read_range(start, stop, meta_cols) if meta_cols else None
            meta = self._meta_table(table, columns, p.name, start, rows=stop - start)
        loader = None
        if self.has_ids:
            url = p.metadata_url

            def loader() -> list[str]:
                return _as_str_list(self._parquet_reader(url).read_range(start, stop, ["id"]).column("id"))

        return PoolBlock(p.name, start, emb, meta, id_loader=loader)

    def _check_width(self, emb: np.ndarray, part: PoolPart, kind: str) -> None:
        expected = part.emb_dims.get(kind)
        if len(emb) and expected and emb.shape[1] != expected:
            raise PoolError(f"part {part.name}: {EMB_COLUMNS[kind]} rows have {emb.shape[1]} values, "
                            f"other parts have {expected}")

    def _meta_table(self, table: pa.Table | None, columns: list[str], part: str, start: int,
                    rows: int | None = None) -> pa.Table:
        if not columns:
            return pa.table({})
        n = table.num_rows if table is not None else int(rows or 0)
        arrays, names = [], []
        for c in columns:
            if c in self.metadata_columns:
                arrays.append(table.column(c))
            else:
                arrays.append(pa.array([f"{part}:{r}" for r in range(start, start + n)], pa.string()))
            names.append(c)
        return pa.table(arrays, names=names)

    def iter_blocks(
        self,
        kind: Kind = "text",
        block_rows: int = DEFAULT_BLOCK_ROWS,
        columns: Sequence[str] = (),
        ranges: Sequence[BlockRange] | None = None,
    ) -> Iterator[PoolBlock]:
        """Yield the pool's rows block by block, part after part.

        Args:
            kind: ``text`` or ``image`` embeddings.
            block_rows: rows per block (blocks never cross parts).
            columns: metadata columns to return with each block (``id`` is always
                available, synthesised when the pool has no id column).
            ranges: read these ranges instead of the whole pool.
        """
        for r in ranges if ranges is not None else self.block_ranges(kind, block_rows):
            yield self.read_block(kind, r.part, r.start, r.stop, columns)

    def read_rows(self, part: str, rows: Sequence[int] | np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Metadata of selected rows of one part (e.g. the candidates of a scan).

        Args:
            part: the part name.
            rows: row offsets within the part, any order (the result follows it).
            columns: metadata columns; ``id`` is synthesised when the pool has none.
        """
        p = self.part(part)
        columns = self._check_columns(columns)
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= p.rows):
            bad = int(idx.max() if idx.max() >= p.rows else idx.min())
            raise PoolError(f"part {p.name} has {p.rows} rows; asked for row {bad}")
        meta_cols = [c for c in columns if c in self.metadata_columns]
        table = self._parquet_reader(p.metadata_url).read_rows(idx, meta_cols) if meta_cols else None
        arrays = []
        for c in columns:
            if c in self.metadata_columns:
                arrays.append(table.column(c))
            else:
                arrays.append(pa.array([f"{p.name}:{int(r)}" for r in idx], pa.string()))
        return pa.table(arrays, names=columns) if columns else pa.table({})

    def close(self) -> None:
        """Release open files and memory maps."""
        for reader in self._parquet.values():
            reader.close()
        self._parquet.clear()
        self._npy.clear()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Pool({self.url!r}, layout={self.layout}, parts={len(self.parts)}, rows={self.num_rows}, "
                f"kinds={self.kinds}, clip_model={self.clip_model!r})")


def _as_str_list(column: pa.ChunkedArray | pa.Array) -> list[str]:
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


# -------------------------------------------------------------------------- validation


_TORCH: Any = None


def torch_module() -> Any:
    """torch when importable (its fp16→fp32 copy is vectorised; numpy's is ~20× slower), else False."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch

            _TORCH = torch
        except ImportError:  # pragma: no cover - torch is a core dependency
            _TORCH = False
    return _TORCH


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch's CPU kernels on the calling thread only, restoring the setting after.

    torch's OpenMP workers spin at barriers: beside another thread pool (numpy's
    OpenBLAS, faiss) or another busy process they stall (measured on 2 cores: 0.3 M
    instead of 11 M vectors/s for upcast + BLAS product; 1.4 M instead of 14 M beside
    one busy process). Single-threaded torch degrades gracefully instead.
    """
    torch = torch_module()
    previous = torch.get_num_threads() if torch else 1
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def upcast_into(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy fp16 (or fp32) rows into a preallocated fp32 buffer; returns ``out[:len(src)]``.

    numpy's float16 cast is scalar code (about 0.7 G values/s); torch's copy is
    vectorised (F16C/AVX-512), so it is used when available.

    Args:
        src: ``(rows, dim)`` vectors, any float dtype and byte order.
        out: ``(>= rows, dim)`` C-contiguous float32 buffer.
    """
    dst = out[: len(src)]
    torch = torch_module()
    if torch and src.dtype.isnative and src.dtype in (np.float16, np.float32):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memory maps: we never write to them
            torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src, casting="unsafe")
    return dst


def norms_of(x32: np.ndarray) -> np.ndarray:
    """Row L2 norms of a C-contiguous float32 block (torch's reduction when available)."""
    torch = torch_module()
    if torch:
        return torch.linalg.vector_norm(torch.from_numpy(x32), dim=1).numpy()
    return np.sqrt(np.einsum("ij,ij->i", x32, x32))


def row_norms(emb: np.ndarray, sub_rows: int = 4096) -> np.ndarray:
    """L2 norms of the rows of an embedding block, computed in fp32.

    Args:
        emb: ``(rows, dim)`` fp16 or fp32 vectors.
        sub_rows: rows upcast at a time (bounds the temporary fp32 copy).
    """
    out = np.empty(len(emb), np.float32)
    buf = np.empty((min(sub_rows, len(emb)), emb.shape[1] if emb.ndim == 2 else 0), np.float32)
    with torch_single_thread():
        for s in range(0, len(emb), sub_rows):
            x = upcast_into(emb[s:s + sub_rows], buf)
            out[s:s + len(x)] = norms_of(x)
    return out


def bad_rows(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that can never be scored: non-finite values, and all-zero vectors.

    Returns:
        ``(nonfinite_rows, zero_rows)`` as sorted row indices.
    """
    norms = row_norms(emb)
    return np.nonzero(~np.isfinite(norms))[0], np.nonzero(norms == 0)[0]


@dataclass
class ValidationReport:
    """What :func:`validate` found.

    Args:
        url: the pool.
        kind: the embeddings checked.
        dim: their width.
        num_rows: rows checked.
        parts: number of parts.
        values_checked: whether every vector was read (NaN/Inf, zero and null rows).
        bad: rows that cannot be scored, as a table ``id, part, row, error, stage``.
        warnings: problems that do not stop a scan (e.g. a different CLIP model name).
    """

    url: str
    kind: str
    dim: int
    num_rows: int
    parts: int
    values_checked: bool
    bad: pa.Table = field(default_factory=lambda: REJECT_ROWS_SCHEMA.empty_table())
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no row was found bad."""
        return self.bad.num_rows == 0

    @property
    def bad_ids(self) -> list[str]:
        """Ids of the bad rows, in pool order."""
        return self.bad.column("id").to_pylist()

    def skip(self) -> dict[str, dict[int, str]]:
        """The bad rows by part: ``{part: {row: reason}}``, the form a scan's ``skip`` takes."""
        out: dict[str, dict[int, str]] = {}
        for part, row, err in zip(self.bad.column("part").to_pylist(), self.bad.column("row").to_pylist(),
                                  self.bad.column("error").to_pylist()):
            out.setdefault(part, {})[int(row)] = err
        return out

    def __str__(self) -> str:
        text = f"{self.url}: {self.num_rows} {self.kind} vectors of width {self.dim} in {self.parts} part(s)"
        if self.values_checked:
            text += f", {self.bad.num_rows} bad row(s)"
        return text


REJECT_ROWS_SCHEMA = pa.schema([("id", pa.string()), ("part", pa.string()), ("row", pa.int64()),
                                ("error", pa.string()), ("stage", pa.string())])


def _sample(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (", …" if len(ids) > n else "")


def validate(
    pool: Pool | str,
    expected_dim: int | None,
    kind: Kind = "text",
    on_bad: Literal["error", "reject"] = "error",
    check_values: bool = True,
    clip_model: str | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> ValidationReport:
    """Check a pool before scanning it.

    Structural checks always run and always raise: the embedding width must equal the
    CLIP model's (``expected_dim``) in every part, every part must have its embeddings
    and metadata with equal row counts, and a Parquet-layout pool must be complete.
    With ``check_values``, every vector is read once and rows with NaN/Inf values, all
    zeros or null embeddings are found: ``on_bad="error"`` raises naming how many and
    the first ids; ``on_bad="reject"`` returns them in the report, for the scan to
    skip and record as rejects. (The scanner never scores such rows either, and
    reports any it meets, so ``check_values=False`` is a valid way to save a pass.)

    Args:
        pool: the pool or its URL.
        expected_dim: the CLIP model's embedding width (None: only require one width).
        kind: ``text`` or ``image`` embeddings.
        on_bad: ``error`` or ``reject`` for bad vectors.
        check_values: read every vector (one pass, as costly as a one-prompt scan).
        clip_model: the CLIP model the queries use; a different name recorded in the
            pool is reported as a warning (names can differ for the same weights).
        block_rows: rows read at a time.

    Raises:
        PoolError: a structural problem, or bad vectors with ``on_bad="error"``.
    """
    if on_bad not in ("error", "reject"):
        raise ValueError(f"on_bad must be 'error' or 'reject', got {on_bad!r}")
    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    pool._require_kind(kind)
    if pool.layout == LAYOUT_PARQUET and not pool.info.get("complete", True):
        raise PoolError(f"pool dataset {pool.url} is incomplete: its producer has not finished "
                        "(its manifest is not marked complete)")
    column = EMB_COLUMNS[kind]
    widths = {p.name: p.emb_dims[kind] for p in pool.parts if kind in p.emb_dims}
    reference = expected_dim if expected_dim is not None else next(iter(widths.values()), 0)
    wrong = {name: w for name, w in widths.items() if w != reference}
    if wrong:
        name, width = next(iter(wrong.items()))
        where = f"part {name}" if len(widths) > 1 else "the pool"
        if expected_dim is not None:
            model = f" ({clip_model})" if clip_model else ""
            raise PoolError(
                f"{column} width {width} in {where} of {pool.url} differs from the CLIP model's "
                f"embedding width {expected_dim}{model}"
                + (f"; {len(wrong)} of {len(widths)} parts differ" if len(wrong) > 1 else "")
            )
        raise PoolError(f"{column} widths differ between parts of {pool.url}: part {name} has {width}, "
                        f"others have {reference}")
    for part in pool.parts:
        error = pool.alignment_error(part, kind)
        if error:
            raise PoolError(f"{pool.url}: {error}")
    warnings = []
    if clip_model and pool.clip_model and clip_model != pool.clip_model:
        warnings.append(f"pool {pool.url} records CLIP model {pool.clip_model!r}, queries use {clip_model!r}")
    report = ValidationReport(pool.url, kind, reference, sum(p.rows for p in pool.parts), len(pool.parts),
                              check_values, warnings=warnings)
    if not check_values:
        return report

    cols: dict[str, list] = {"id": [], "part": [], "row": [], "error": []}
    counts = {BAD_NONFINITE: 0, BAD_ZERO: 0}
    for block in pool.iter_blocks(kind, block_rows):
        nonfinite, zero = bad_rows(block.emb)
        for rows, reason in ((nonfinite, BAD_NONFINITE), (zero, BAD_ZERO)):
            if len(rows):
                counts[reason] += len(rows)
                cols["id"] += block.ids_at(rows)
                cols["part"] += [block.part] * len(rows)
                cols["row"] += (rows + block.start).tolist()
                cols["error"] += [reason] * len(rows)
    n = len(cols["id"])
    bad = pa.table({**cols, "stage": [VALIDATE_STAGE] * n}, schema=REJECT_ROWS_SCHEMA)
    report.bad = bad.sort_by([("part", "ascending"), ("row", "ascending")]) if n else bad
    if n and on_bad == "error":
        pieces = []
        for reason, label in ((BAD_NONFINITE, "with NaN/Inf values"), (BAD_ZERO, "all-zero or null")):
            if counts[reason]:
                ids = [i for i, e in zip(cols["id"], cols["error"]) if e == reason]
                pieces.append(f"{counts[reason]} {label} (first ids: {_sample(ids)})")
        raise PoolError(f"{pool.url}: {column} has bad vectors: {'; '.join(pieces)}; "
                        "use on_bad='reject' to skip them and record them as rejects")
    return report


# ----------------------------------------------------------------------------- writing


def _write_info(url: str, clip_model: str | None, dim: int, layout: str) -> None:
    info = {"clip_model": clip_model, "dim": int(dim), "layout": layout}
    storage.write_text_atomic(storage.join(url, POOL_INFO_NAME), json.dumps(info, indent=2) + "\n")


def _write_npy(url: str, array: np.ndarray) -> None:
    fs, path = storage.resolve(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def write_laion_layout(
    url: str,
    parts: Sequence[tuple[np.ndarray | None, np.ndarray | None, pa.Table]],
    clip_model: str | None = None,
) -> str:
    """Write a pool in LAION's released layout (small pools for tests, demos, benchmarks).

    Args:
        url: the pool root.
        parts: one ``(img_emb, text_emb, metadata)`` per part; either array may be None
            to leave that kind out. Arrays keep their dtype (fp16 as LAION ships).
        clip_model: recorded in ``pool.json``.

    Returns:
        ``url``.
    """
    dim = 0
    for i, (img, txt, meta) in enumerate(parts):
        for kind, arr in (("image", img), ("text", txt)):
            if arr is not None:
                folder = LAION_FOLDERS[kind]
                _write_npy(storage.join(url, folder, f"{folder}_{i}.npy"), arr)
                dim = dim or int(arr.shape[1])
        fs, path = storage.resolve(storage.join(url, METADATA_FOLDER, f"metadata_{i}.parquet"))
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(meta, f)
    _write_info(url, clip_model, dim, LAYOUT_LAION)
    return url


def pool_manifest_config(clip_model: str | None, dim: int, **extra: Any) -> dict[str, Any]:
    """The manifest config keys that describe a Parquet-layout pool (``clip_model``, ``embed_dim``)."""
    return {"clip_model": clip_model, "embed_dim": int(dim), "layout": LAYOUT_PARQUET, **extra}


def write_pool_parquet(
    url: str,
    table: pa.Table,
    clip_model: str | None = None,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write a pool as a pixelmill dataset (Parquet layout).

    Args:
        url: the dataset folder.
        table: rows with ``id`` and ``text_emb`` and/or ``img_emb`` list columns (see
            :func:`embedding_array`) plus any metadata columns.
        clip_model: recorded in the manifest config with the embedding width.
        rows_per_shard: rows per ``part-*.parquet`` (one shard when None).
        overwrite: replace an existing dataset made by another config.

    Returns:
        ``url``.
    """
    from pixelmill.datasets.sharding import shard_name
    from pixelmill.datasets.writer import DatasetWriter

    if "id" not in table.column_names:
        raise PoolError("a Parquet-layout pool needs an 'id' column")
    kinds = [k for k, c in EMB_COLUMNS.items() if c in table.column_names]
    if not kinds:
        raise PoolError("a Parquet-layout pool needs a text_emb or img_emb column")
    dim = embedding_matrix(table.column(EMB_COLUMNS[kinds[0]]).slice(0, 1))[0].shape[1] if table.num_rows else 0
    writer = DatasetWriter(url, "pool", 1, pool_manifest_config(clip_model, dim)).open(overwrite=overwrite)
    step = rows_per_shard or max(table.num_rows, 1)
    for i, start in enumerate(range(0, max(table.num_rows, 1), step)):
        shard = writer.shard(shard_name(i))
        shard.write(table.slice(start, step))
        shard.commit(input_rows=min(step, table.num_rows - start))
    writer.finish()
    return url


def as_skip(skip: ValidationReport | Mapping[str, Any] | None) -> dict[str, dict[int, str]]:
    """Normalise a scan's ``skip`` argument to ``{part: {row: reason}}``.

    Args:
        skip: a :class:`ValidationReport`, ``{part: rows}``, ``{part: {row: reason}}``, or None.
    """
    if skip is None:
        return {}
    if isinstance(skip, ValidationReport):
        return skip.skip()
    out: dict[str, dict[int, str]] = {}
    for part, rows in skip.items():
        if isinstance(rows, Mapping):
            out[str(part)] = {int(r): str(e) for r, e in rows.items()}
        else:
            out[str(part)] = {int(r): "skipped" for r in np.asarray(rows).reshape(-1)}
    return out

