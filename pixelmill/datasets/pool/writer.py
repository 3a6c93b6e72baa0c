"""Writing pools: LAION's layout (``.npy`` + metadata Parquet) and pixelmill Parquet pools."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.pool.base import (
    EMB_COLUMNS,
    LAION_FOLDERS,
    LAYOUT_LAION,
    LAYOUT_PARQUET,
    METADATA_FOLDER,
    POOL_INFO_NAME,
    PoolError,
)
from pixelmill.datasets.pool.parquet import embedding_matrix


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
