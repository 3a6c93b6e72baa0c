"""Pool vocabulary: layout and column names, reject reasons, parts, block ranges and blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from pixelmill.datasets.errors import InputError

POOL_INFO_NAME = "pool.json"
LAYOUT_LAION = "laion"
LAYOUT_PARQUET = "parquet"
KINDS = ("text", "image")
EMB_COLUMNS = {"text": "text_emb", "image": "img_emb"}
LAION_FOLDERS = {"text": "text_emb", "image": "img_emb"}
METADATA_FOLDER = "metadata"
# Stored row norms (``pixelmill pool norms``): norms/text_norms_0.npy, norms/img_norms_0.npy…
NORMS_FOLDER = "norms"
NORM_PREFIXES = {"text": "text_norms", "image": "img_norms"}
DEFAULT_BLOCK_ROWS = 65536
VALIDATE_STAGE = "pool_validate"
BAD_NONFINITE = "nan_or_inf"
BAD_ZERO = "zero_vector"
BAD_NULL = "null_embedding"

Kind = Literal["text", "image"]

REJECT_ROWS_SCHEMA = pa.schema([("id", pa.string()), ("part", pa.string()), ("row", pa.int64()),
                                ("error", pa.string()), ("stage", pa.string())])


class PoolError(InputError):
    """A pool that cannot be scanned as asked: wrong layout, width, alignment or values (exit 2)."""


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
        norm_urls: the stored row norms (``norms/text_norms_0.npy``…) of each kind that has
            them and whose row count matches its embeddings (LAION layout only).
    """

    name: str
    rows: int
    emb_rows: dict[str, int]
    emb_dims: dict[str, int]
    emb_dtypes: dict[str, str]
    metadata_url: str
    emb_urls: dict[str, str]
    norm_urls: dict[str, str] = field(default_factory=dict)


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
        norms: ``(rows,)`` fp32 stored row norms, when the pool has them (see ``pixelmill pool norms``).
    """

    def __init__(
        self,
        part: str,
        start: int,
        emb: np.ndarray,
        meta: pa.Table,
        ids: Sequence[str] | None = None,
        id_loader: Callable[[], list[str]] | None = None,
        norms: np.ndarray | None = None,
    ) -> None:
        self.part = part
        self.norms = norms
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
