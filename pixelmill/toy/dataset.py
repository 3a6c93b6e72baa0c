"""Writing toy-world rows as a pixelmill dataset (``pixelmill dataset toy``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pixelmill.datasets.images import IMAGE_TYPE, encode_image
from pixelmill.datasets.sharding import shard_name, stable_id
from pixelmill.datasets.writer import DatasetWriter
from pixelmill.toy import world

TOY_SCHEMA_NAME = "toy-images"
TOY_SCHEMA_VERSION = 1
TOY_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", IMAGE_TYPE),
    ("caption", pa.string()),
    ("shape", pa.string()),
    ("color", pa.string()),
    ("size", pa.string()),
    ("extent", pa.int32()),
    ("cx", pa.float32()),
    ("cy", pa.float32()),
    ("position", pa.string()),
    ("background", pa.string()),
    ("background2", pa.string()),
    ("split", pa.string()),
    ("row_index", pa.int64()),
])
ROWS_PER_SHARD = 1000
_BATCH_ROWS = 250


def toy_row_id(seed: int, index: int) -> str:
    """The stable id of row ``index`` of world ``seed``."""
    return stable_id("toy-world", seed, index)


def toy_row(seed: int, index: int, shapes: Sequence[str] = world.SHAPES) -> dict:
    """Row ``index`` of world ``seed`` as a ``TOY_SCHEMA`` dict (id, PNG image, caption, labels)."""
    image, caption, obj = world.make_row(seed, index, shapes)
    return {"id": toy_row_id(seed, index), "image": encode_image(image), "caption": caption,
            **obj.labels(), "row_index": index}


def toy_rows(seed: int, start: int, stop: int, shapes: Sequence[str] = world.SHAPES) -> pa.Table:
    """Rows ``start .. stop - 1`` of world ``seed`` as a table of ``TOY_SCHEMA``."""
    return pa.Table.from_pylist([toy_row(seed, i, shapes) for i in range(start, stop)], schema=TOY_SCHEMA)


def write_toy_dataset(
    out_url: str,
    rows: int,
    seed: int = 0,
    exclude_shapes: Sequence[str] = (),
    overwrite: bool = False,
    rows_per_shard: int = ROWS_PER_SHARD,
) -> dict[str, Any]:
    """Write ``rows`` toy-world rows (PNG images, captions, attribute labels) to ``out_url``.

    Row ``i`` depends only on ``(seed, i)`` and the allowed shapes, and shard ``k`` holds
    rows ``k * rows_per_shard ..``; a rerun with the same arguments resumes (committed
    shards are kept), other arguments need ``overwrite``.

    Args:
        out_url: the dataset folder (local path or fsspec URL).
        rows: number of rows (at least 1).
        seed: world seed.
        exclude_shapes: shapes never drawn (e.g. ``world.HELD_OUT_SHAPE`` for SD training data).
        overwrite: replace a dataset made with other arguments.
        rows_per_shard: rows per ``part-*.parquet`` shard.

    Returns:
        A summary: ``url``, ``rows``, ``shards``, ``shapes``, ``seed``.

    Raises:
        ValueError: ``rows`` < 1, unknown shapes, or every shape excluded.
        ConfigMismatch: ``out_url`` holds a dataset made with other arguments.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    world.check_shapes(exclude_shapes)
    shapes = [s for s in world.SHAPES if s not in set(exclude_shapes)]
    if not shapes:
        raise ValueError("every shape is excluded; keep at least one")
    config = {"generator": "pixelmill.toy.world", "world_version": 1, "seed": seed, "rows": rows,
              "shapes": shapes, "image_size": world.IMAGE_SIZE, "rows_per_shard": rows_per_shard}
    writer = DatasetWriter(out_url, TOY_SCHEMA_NAME, TOY_SCHEMA_VERSION, config, schema=TOY_SCHEMA)
    writer.open(overwrite=overwrite)
    num_shards = (rows + rows_per_shard - 1) // rows_per_shard
    for k in range(num_shards):
        name = shard_name(k)
        if name in writer.committed:
            continue
        shard = writer.shard(name)
        stop = min(rows, (k + 1) * rows_per_shard)
        for start in range(k * rows_per_shard, stop, _BATCH_ROWS):
            shard.write(toy_rows(seed, start, min(stop, start + _BATCH_ROWS), shapes))
        shard.commit(input_rows=stop - k * rows_per_shard)
    writer.finish()
    return {"url": str(out_url), "rows": rows, "shards": num_shards, "shapes": shapes, "seed": seed}
