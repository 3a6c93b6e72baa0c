"""Retrieval pools: captions, URLs and CLIP embeddings, read block by block from any fsspec URL.

Two layouts are read, detected by :meth:`Pool.open`:

- ``laion``: LAION's released layout, also what ``clip-retrieval inference`` writes::

      img_emb/img_emb_{i}.npy   text_emb/text_emb_{i}.npy   metadata/metadata_{i}.parquet

  rows aligned per part ``i`` (the metadata has ``url``, ``caption`` and optionally
  ``punsafe``, ``pwatermark``, ``width``, ``height``, …). A small ``pool.json`` at the root
  (``{"clip_model", "dim", "layout"}``) names the CLIP model when pixelmill wrote it.
- ``parquet``: a pixelmill dataset (``part-*.parquet`` + ``_manifest.json``) whose rows
  carry ``id``, ``caption``, ``url`` and ``text_emb`` / ``img_emb``: packed float16
  (``fixed_size_binary(2 × dim)``, little-endian, stored uncompressed; what ``pixelmill pool
  build`` writes, read without copying) or ``list<float16|float32>`` / fixed-size-list columns
  (read too; Parquet decodes them value by value, about 25x slower to scan). Its manifest
  config records ``clip_model`` and ``embed_dim``. A LAION-layout pool may also hold
  ``norms/text_norms_{i}.npy`` / ``norms/img_norms_{i}.npy`` (``pixelmill pool norms``).
  No ``pool.json`` is written there: a JSON file beside a single Parquet shard makes
  ``datasets.load_dataset(folder)`` pick the JSON builder and fail (checked with datasets
  5.2), so the manifest config holds that information. A hand-written ``pool.json`` is
  still read when present.

Embeddings are returned as stored (fp16 or fp32), never upcast here: the scanner upcasts
in cache-sized sub-blocks. Local ``.npy`` files are memory-mapped; remote ones are read
with ranged reads from the offset given by their header, so a block costs one request.
Rows whose metadata has no ``id`` column get the stable id ``"{part}:{row}"``.
"""

from pixelmill.datasets.pool.base import (
    BAD_NONFINITE,
    BAD_NULL,
    BAD_ZERO,
    DEFAULT_BLOCK_ROWS,
    EMB_COLUMNS,
    KINDS,
    LAION_FOLDERS,
    LAYOUT_LAION,
    LAYOUT_PARQUET,
    METADATA_FOLDER,
    POOL_INFO_NAME,
    REJECT_ROWS_SCHEMA,
    VALIDATE_STAGE,
    BlockRange,
    Kind,
    PoolBlock,
    PoolError,
    PoolPart,
)
from pixelmill.datasets.pool.parquet import embedding_array, embedding_matrix
from pixelmill.datasets.pool.reader import Pool
from pixelmill.datasets.pool.writer import pool_manifest_config, write_laion_layout, write_pool_parquet

__all__ = [
    "BAD_NONFINITE",
    "BAD_NULL",
    "BAD_ZERO",
    "DEFAULT_BLOCK_ROWS",
    "EMB_COLUMNS",
    "KINDS",
    "LAION_FOLDERS",
    "LAYOUT_LAION",
    "LAYOUT_PARQUET",
    "METADATA_FOLDER",
    "POOL_INFO_NAME",
    "REJECT_ROWS_SCHEMA",
    "VALIDATE_STAGE",
    "BlockRange",
    "Kind",
    "Pool",
    "PoolBlock",
    "PoolError",
    "PoolPart",
    "embedding_array",
    "embedding_matrix",
    "pool_manifest_config",
    "write_laion_layout",
    "write_pool_parquet",
]
