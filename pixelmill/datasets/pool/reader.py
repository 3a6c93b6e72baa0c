"""The :class:`Pool` reader: layout detection, parts, block ranges, block and row reads."""

from __future__ import annotations

import json
import posixpath
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.pool.base import (
    DEFAULT_BLOCK_ROWS,
    EMB_COLUMNS,
    KINDS,
    LAION_FOLDERS,
    LAYOUT_LAION,
    LAYOUT_PARQUET,
    METADATA_FOLDER,
    NORM_PREFIXES,
    NORMS_FOLDER,
    POOL_INFO_NAME,
    BlockRange,
    Kind,
    PoolBlock,
    PoolError,
    PoolPart,
)
from pixelmill.datasets.pool.npy import _NpyReader, _read_npy_header
from pixelmill.datasets.pool.parquet import _ParquetReader, embedding_matrix

_PART_RE = re.compile(r"^(?P<prefix>img_emb|text_emb|metadata|img_norms|text_norms)_(?P<num>\d+)"
                      r"\.(?P<ext>npy|parquet)$")


def _laion_files(url: str, folder: str, prefix: str, ext: str) -> dict[str, str]:
    out = {}
    for name in storage.listdir(storage.join(url, folder)):
        m = _PART_RE.match(name)
        if m and m.group("prefix") == prefix and m.group("ext") == ext:
            out[str(int(m.group("num")))] = storage.join(url, folder, name)
    return out


def _norms_fit(url: str, rows: int) -> bool:
    """Whether a stored-norms file holds one float32 per embedding row; warns and returns False if not."""
    try:
        h = _read_npy_header(url, ndim=1)
        problem = None if h.dtype == np.float32 and h.shape[0] == rows else f"{h.dtype} {h.shape}"
    except PoolError as exc:
        problem = str(exc)
    if problem is None:
        return True
    warnings.warn(f"{url} ({problem}) does not fit its {rows} embedding rows: scanning without stored norms; "
                  "rerun `pixelmill pool norms`", RuntimeWarning, stacklevel=4)
    return False


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
        norm_files = {k: _laion_files(url, NORMS_FOLDER, prefix, "npy") for k, prefix in NORM_PREFIXES.items()}
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
            norms = {kind: files[name] for kind, files in norm_files.items()
                     if name in files and kind in emb_rows and _norms_fit(files[name], emb_rows[kind])}
            parts.append(PoolPart(name, rows, emb_rows, dims, dtypes, meta_files.get(name, ""), urls, norms))
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
            if pa.types.is_fixed_size_binary(t):  # packed float16 (see embedding_array)
                dtypes[kind], dims[kind] = "float16", t.byte_width // 2
                continue
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                    or not pa.types.is_floating(t.value_type):
                raise PoolError(f"{url}: column {EMB_COLUMNS[kind]} has type {t}; "
                                "embeddings must be list<float16|float32> or packed float16 "
                                "(fixed_size_binary) columns")
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

    def _npy_reader(self, url: str, ndim: int = 2) -> _NpyReader:
        reader = self._npy.get(url)
        if reader is None:
            reader = self._npy[url] = _NpyReader(url, _read_npy_header(url, ndim))
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
            table = reader.read_range(start, stop, [emb_col] + meta_cols)
            emb, _ = embedding_matrix(table.column(emb_col), f"{p.metadata_url} column {emb_col}", start)
            self._check_width(emb, p, kind)
            meta = self._meta_table(table, columns, p.name, start)
            if not self.has_ids:
                return PoolBlock(p.name, start, emb, meta)
            if "id" in meta_cols:
                return PoolBlock(p.name, start, emb, meta, ids=_as_str_list(table.column("id")))
            url = p.metadata_url

            def parquet_ids() -> list[str]:  # read only for a block with hits (decoding ids costs ~40% of a scan)
                return _as_str_list(self._parquet_reader(url).read_range(start, stop, ["id"]).column("id"))

            return PoolBlock(p.name, start, emb, meta, id_loader=parquet_ids)
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

        norms = self._npy_reader(p.norm_urls[kind], ndim=1).read(start, stop) if kind in p.norm_urls else None
        return PoolBlock(p.name, start, emb, meta, id_loader=loader, norms=norms)

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
