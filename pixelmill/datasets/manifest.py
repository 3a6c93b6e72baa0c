"""The ``_manifest.json`` that makes a folder of Parquet shards a pixelmill dataset.

It lists the committed shards with their row counts, and records the config that
produced them with its hash, so a re-run can resume the same work or refuse to mix
outputs of different configs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from pixelmill.datasets import storage
from pixelmill.datasets.errors import InputError

MANIFEST_NAME = "_manifest.json"


def _now() -> datetime:
    return datetime.now(UTC)


def _pixelmill_version() -> str:
    try:
        return metadata.version("pixelmill")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ShardEntry(BaseModel):
    """One committed shard.

    Args:
        name: shard name (``00000``); its data file is ``part-<name>.parquet``.
        rows: output rows in the shard.
        rejects: rows written to ``__rejects/``.
        dropped: rows written to ``__dropped/`` (filtered by design, not failures).
        input_rows: input rows the shard was made from, when the stage knows it.
    """

    name: str
    rows: int
    rejects: int = 0
    dropped: int = 0
    input_rows: int | None = None


class Manifest(BaseModel):
    """The description of a dataset folder.

    Args:
        schema_name: what kind of rows the dataset holds (``images``, ``pairs``…).
        schema_version: bumped when that row layout changes incompatibly.
        shards: the committed shards, sorted by name.
        config: the config that produced the dataset.
        config_hash: :func:`config_hash` of ``config``.
        complete: true once the producer finished every shard and cleaned up.
    """

    schema_name: str
    schema_version: int
    shards: list[ShardEntry] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""
    complete: bool = False
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    pixelmill_version: str = Field(default_factory=_pixelmill_version)

    def shard_names(self) -> list[str]:
        """Names of the committed shards, sorted."""
        return sorted(s.name for s in self.shards)

    def get(self, name: str) -> ShardEntry | None:
        """The entry for shard ``name``, or None when it is not committed."""
        return next((s for s in self.shards if s.name == name), None)

    @property
    def num_rows(self) -> int:
        """Total output rows over the committed shards."""
        return sum(s.rows for s in self.shards)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict[str, Any]) -> str:
    """First 16 hex characters of the SHA-256 of the config's canonical JSON (sorted keys).

    Args:
        config: a JSON-like dict; values JSON cannot hold are hashed by their ``str``.
    """
    return hashlib.sha256(_canonical_json(config).encode("utf-8")).hexdigest()[:16]


def diff_config(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted paths of the keys that were added, removed or changed between two configs.

    Nested dicts are compared key by key; any other value (lists included) is compared
    as a whole.

    Args:
        old: the config recorded in the manifest.
        new: the config of the current run.
    """
    changed: list[str] = []

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> None:
        for key in sorted(set(a) | set(b), key=str):
            path = f"{prefix}{key}"
            if key not in a or key not in b:
                changed.append(path)
            elif isinstance(a[key], dict) and isinstance(b[key], dict):
                walk(a[key], b[key], f"{path}.")
            elif _canonical_json(a[key]) != _canonical_json(b[key]):
                changed.append(path)

    walk(old, new, "")
    return changed


def manifest_url(dataset_url: str) -> str:
    """The URL of the manifest file of a dataset folder."""
    return storage.join(dataset_url, MANIFEST_NAME)


def read_manifest(url: str) -> Manifest | None:
    """Read the manifest of the dataset folder ``url``; None when there is none.

    Args:
        url: the dataset folder.

    Raises:
        InputError: the file is not JSON, or not a manifest.
    """
    path = manifest_url(url)
    if not storage.exists(path):
        return None
    text = storage.read_text(path)
    try:
        json.loads(text)
    except ValueError as e:
        raise InputError(f"{path} is not JSON ({e}); a dataset's manifest must be the JSON pixelmill writes") from None
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
                             for err in e.errors()[:3])
        raise InputError(f"{path} is not a valid pixelmill manifest ({problems})") from None


def write_manifest(url: str, manifest: Manifest) -> None:
    """Atomically (re)write the manifest of the dataset folder ``url``.

    Args:
        url: the dataset folder.
        manifest: the content; written as is (callers set ``updated_at``).
    """
    storage.write_text_atomic(manifest_url(url), manifest.model_dump_json(indent=2) + "\n")
