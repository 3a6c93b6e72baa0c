"""Parquet data contracts: storage, image cells, manifests, the sharded writer and reader.

This package is the only code in pixelmill that touches Parquet files or storage URLs.
"""

from pixelmill.datasets.images import (
    IMAGE_TYPE,
    ImageError,
    decode_image,
    encode_image,
    hf_features,
    normalize_image,
    with_hf_features,
    with_hf_schema,
)
from pixelmill.datasets.importer import IMAGES_SCHEMA, import_folder
from pixelmill.datasets.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    config_hash,
    diff_config,
    read_manifest,
    write_manifest,
)
from pixelmill.datasets.reader import AccountingReport, Dataset, DatasetNotFound, account
from pixelmill.datasets.sharding import shard_for_id, shard_name, stable_id
from pixelmill.datasets.writer import (
    REJECTS_SCHEMA,
    ConfigMismatch,
    DatasetWriter,
    ShardWriter,
)

__all__ = [
    "IMAGES_SCHEMA",
    "IMAGE_TYPE",
    "MANIFEST_NAME",
    "REJECTS_SCHEMA",
    "AccountingReport",
    "ConfigMismatch",
    "Dataset",
    "DatasetNotFound",
    "DatasetWriter",
    "ImageError",
    "Manifest",
    "ShardEntry",
    "ShardWriter",
    "account",
    "config_hash",
    "decode_image",
    "diff_config",
    "encode_image",
    "hf_features",
    "import_folder",
    "normalize_image",
    "read_manifest",
    "shard_for_id",
    "shard_name",
    "stable_id",
    "with_hf_features",
    "with_hf_schema",
    "write_manifest",
]
