"""Sharded, resumable, crash-safe Parquet dataset writer.

Layout of a dataset folder::

    _manifest.json                 committed shards, config and its hash
    part-<name>.parquet            output rows of each committed shard
    __rejects/part-<name>.parquet  failed rows (``id``, ``error``, ``stage``, …)
    __dropped/part-<name>.parquet  rows filtered by design, with their scores
    __processed/part-<name>.parquet  ids the shard accounts for (runs with a claim; datasets/incremental.py)
    __staging/                     shards being written (never read as data; ``__staging/<run>/`` with a claim)

Hugging Face ``datasets`` skips folders starting with ``__``; pyarrow, DuckDB globs on
``part-*.parquet`` and Ray Data skip ``_``-prefixed ones. So only committed shards are
visible as data: a writer killed mid-shard leaves nothing that looks complete, and a commit
that fails (full disk, I/O error) takes back the files it moved. Only a kill inside a
commit can leave a whole shard file the manifest does not list; the next run replaces it.
"""

from __future__ import annotations

import posixpath
import threading
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.images import with_hf_schema
from pixelmill.datasets.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    config_hash,
    diff_config,
    read_manifest,
    write_manifest,
)

STAGING_DIR = "__staging"
REJECTS_DIR = "__rejects"
DROPPED_DIR = "__dropped"
PROCESSED_DIR = "__processed"
REJECT_COLUMNS = ("id", "error", "stage")
REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string()), ("stage", pa.string())])
COMPRESSION = "zstd"


def compression_of(schema: pa.Schema) -> dict[str, str]:
    """Each column's Parquet codec: zstd, except fixed-size binary columns (packed embeddings), stored plain.

    Embedding bytes barely compress (8% at 512 fp16 values a row) and zstd cuts their read rate
    3x (0.97 against 3.2 M rows/s here), which an exact scan of a pool pays on every row.
    """
    return {f.name: "none" if pa.types.is_fixed_size_binary(f.type) else COMPRESSION for f in schema}


class ConfigMismatch(Exception):
    """The output folder holds a dataset made by a different config.

    Args:
        url: the dataset folder.
        changed_keys: dotted config keys that differ.
    """

    def __init__(self, url: str, changed_keys: list[str]) -> None:
        self.url = url
        self.changed_keys = changed_keys
        keys = ", ".join(changed_keys) or "(none listed)"
        super().__init__(
            f"{url} was written by a different config (changed: {keys}); "
            "use overwrite to replace it or choose another output"
        )


class ClaimLost(RuntimeError):
    """A run's claim on its output was taken over (it had expired); it must not commit more."""


def part_file(name: str) -> str:
    """File name of the data file of shard ``name``."""
    return f"part-{name}.parquet"


def _validate_name(name: str) -> str:
    if not name or "/" in name or name.startswith((".", "_")) or name != name.strip():
        raise ValueError(f"invalid shard name {name!r}: use plain names such as '00000'")
    return name


class _ParquetStream:
    """A Parquet file written incrementally, opened on the first table."""

    def __init__(self, url: str, schema: pa.Schema | None) -> None:
        self.url = url
        self.schema = with_hf_schema(schema) if schema is not None else None
        self.rows = 0
        self.started = False
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = with_hf_schema(table.schema)
        table = _conform(table, self.schema, self.url)
        if self._writer is None:
            fs, path = storage.resolve(self.url)
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._file = fs.open(path, "wb")
            self._writer = pq.ParquetWriter(self._file, self.schema, compression=compression_of(self.schema))
            self.started = True
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = None
            self._file = None


def _conform(table: pa.Table, schema: pa.Schema, url: str) -> pa.Table:
    """Cast ``table`` to ``schema`` (same columns, any order), or explain the mismatch."""
    if table.schema.remove_metadata() == schema.remove_metadata():
        return table.replace_schema_metadata(schema.metadata)
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(f"{url}: table columns differ from the shard schema (missing {missing}, unexpected {extra})")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{url}: cannot cast table to the shard schema: {exc}") from exc


class ShardWriter:
    """Writes one shard to ``__staging/`` and publishes it on :meth:`commit`.

    Tables can be written several times (each becomes row groups of the same file).
    Nothing is visible to dataset readers until ``commit``.

    Args:
        dataset: the owning writer.
        name: the shard name.
    """

    def __init__(self, dataset: DatasetWriter, name: str) -> None:
        self._dataset = dataset
        self.name = _validate_name(name)
        staging = dataset.staging
        self._ok_ids: list[str] = []
        self._rejected: list[tuple[str, str]] = []
        self._processed = _ParquetStream(storage.join(staging, f"__processed-{name}.parquet"), None)
        self._data = _ParquetStream(storage.join(staging, f"{name}.parquet"), dataset.schema)
        self._rejects = _ParquetStream(storage.join(staging, f"__rejects-{name}.parquet"), None)
        self._dropped = _ParquetStream(storage.join(staging, f"__dropped-{name}.parquet"), None)
        self._committed = False

    def write(self, table: pa.Table) -> None:
        """Append output rows.

        Args:
            table: rows with the shard's schema (the first table fixes it when the
                dataset writer was given none).
        """
        self._check_open()
        self._data.write(table)
        if self._dataset.run and table.num_rows:
            key = "parent_id" if "parent_id" in table.column_names else "id"
            self._ok_ids += [str(v) for v in dict.fromkeys(table[key].to_pylist()) if v is not None]

    def reject(self, table: pa.Table) -> None:
        """Append rows that failed; they must have ``id``, ``error`` and ``stage`` columns.

        Args:
            table: the failed rows, with any extra columns worth keeping.
        """
        self._check_open()
        missing = [c for c in REJECT_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"reject table for shard {self.name} lacks columns {missing}")
        self._rejects.write(table)
        if self._dataset.run:
            self._rejected += list(zip(map(str, table["id"].to_pylist()), table["error"].to_pylist()))

    def drop(self, table: pa.Table) -> None:
        """Append candidates removed by design (filtered samples, surplus downloads).

        Args:
            table: the dropped rows, typically with their scores.
        """
        self._check_open()
        self._dropped.write(table)

    @property
    def rows(self) -> int:
        """Output rows written so far."""
        return self._data.rows

    def commit(self, input_rows: int | None = None, record: bool = True) -> ShardEntry:
        """Publish the shard: move its files into place and record it in the manifest.

        Args:
            input_rows: how many input rows the shard was made from, for accounting.
            record: False moves the files only and leaves the manifest to the process that owns
                the output, which records the returned entry (:meth:`DatasetWriter.record`): how
                tasks in other processes add shards to one output without losing each other's
                manifest updates. Until it is recorded, the shard is not part of the dataset.
        """
        self._check_open()
        if not self._rejects.started:
            self._rejects.write(REJECTS_SCHEMA.empty_table())
        if not self._data.started and self._data.schema is not None:
            self._data.write(self._data.schema.empty_table())
        if self._dataset.run:
            from pixelmill.datasets.incremental import processed_rows

            self._processed.write(processed_rows(list(dict.fromkeys(self._ok_ids)), self._rejected, self.name,
                                                 self._dataset.run))
        for stream in (self._data, self._rejects, self._dropped, self._processed):
            stream.close()

        url = self._dataset.url
        targets = [
            (self._data, storage.join(url, part_file(self.name))),
            (self._rejects, storage.join(url, REJECTS_DIR, part_file(self.name))),
            (self._dropped, storage.join(url, DROPPED_DIR, part_file(self.name))),
            (self._processed, storage.join(url, PROCESSED_DIR, part_file(self.name))),
        ]
        entry = ShardEntry(
            name=self.name,
            rows=self._data.rows,
            rejects=self._rejects.rows,
            dropped=self._dropped.rows,
            input_rows=input_rows,
        )
        moved: list[str] = []
        try:
            for stream, target in targets:
                if stream.started:
                    storage.move(stream.url, target)
                    moved.append(target)
                else:
                    storage.remove(target)
            if record:
                self._dataset.record(entry)
        except BaseException:
            # A failed commit (full disk, I/O error) takes back the files it moved, so folder
            # readers never see a shard the manifest does not list. Only a kill inside this
            # window can leave one; the manifest stays the truth and finish() removes it.
            if not record or self.name not in self._dataset.committed:
                for target in moved:
                    try:
                        storage.remove(target)
                    except OSError:
                        pass
            raise
        self._committed = True
        return entry

    def _check_open(self) -> None:
        if self._committed:
            raise RuntimeError(f"shard {self.name} is already committed")


class DatasetWriter:
    """Writes a dataset folder shard by shard, resumably and atomically.

    Open it, skip the shards in :attr:`committed`, write each remaining shard through
    :meth:`shard` and commit it, then call :meth:`finish`. Every commit rewrites the
    manifest, so a re-run with the same config resumes where the last one stopped. One
    process owns a dataset writer at a time; it is safe to commit shards from several
    threads of that process.

    Args:
        url: the dataset folder (local path or fsspec URL).
        schema_name: row layout name recorded in the manifest.
        schema_version: row layout version recorded in the manifest.
        config: the config producing the dataset; its hash decides resume or mismatch.
        schema: optional Arrow schema every output table is cast to; with it, shards
            with no output rows still get a (empty) data file.
        run: the id of a run holding a claim on the output (``datasets/claims.py``). Then
            several processes may write the dataset at once: shards are staged under
            ``__staging/<run>/``, each commit also writes the shard's processed table and
            re-reads and rewrites the manifest under the output's lock (refused once the
            run's claim was taken over), and nothing of another live run is removed.
    """

    def __init__(
        self,
        url: str,
        schema_name: str,
        schema_version: int,
        config: dict[str, Any],
        schema: pa.Schema | None = None,
        run: str | None = None,
    ) -> None:
        self.url = str(url)
        self.schema_name = schema_name
        self.schema_version = schema_version
        self.config = config
        self.config_hash = config_hash(config)
        self.schema = schema
        self.run = run
        self._manifest: Manifest | None = None
        self._lock = threading.Lock()

    def open(self, overwrite: bool = False, owner: bool = True) -> DatasetWriter:
        """Create the folder, or resume / replace the dataset already in it.

        A dataset with the same config hash and schema is resumed (even with
        ``overwrite``); stale ``__staging/`` files from a killed run are removed.

        Args:
            overwrite: delete an existing dataset made by another config (or Parquet
                files without a manifest) instead of raising.
            owner: this writer owns the output: it checks for foreign files and removes
                ``__staging/`` (stale files of a killed run). False for a writer in a task that
                adds a shard to an output its flow opened (as the owner) and records
                (``ShardWriter.commit(record=False)``): the flow's other tasks may be staging
                their shards there, or have published ones not recorded yet.

        Raises:
            ConfigMismatch: the existing manifest has another config hash or schema.
            FileExistsError: the folder has ``part-*.parquet`` files but no manifest.
        """
        storage.makedirs(self.url)
        existing = read_manifest(self.url)
        if existing is not None and not overwrite:
            changed = self._changes_from(existing)
            if changed:
                raise ConfigMismatch(self.url, changed)
        elif existing is None and not overwrite and owner and self._part_files(self.url):
            raise FileExistsError(
                f"{self.url} holds part-*.parquet files but no {MANIFEST_NAME}; "
                "use overwrite to replace them or choose another output"
            )
        if overwrite and (existing is None or self._changes_from(existing)):
            self._clear()
            existing = None
        if self.run is None and owner:  # with claims, the run's flow removes only dead runs' staging (tidy)
            storage.remove(storage.join(self.url, STAGING_DIR))
        self._manifest = existing or Manifest(
            schema_name=self.schema_name,
            schema_version=self.schema_version,
            config=self.config,
            config_hash=self.config_hash,
        )
        return self

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written (or about to be written)."""
        if self._manifest is None:
            raise RuntimeError("call DatasetWriter.open() first")
        return self._manifest

    @property
    def staging(self) -> str:
        """This run's staging folder (``__staging/``, or ``__staging/<run>/`` with a claim)."""
        return storage.join(self.url, STAGING_DIR, *([self.run] if self.run else []))

    @property
    def committed(self) -> set[str]:
        """Names of the shards already committed (by this run or a previous one)."""
        return set(self.manifest.shard_names())

    def shard(self, name: str) -> ShardWriter:
        """Start writing shard ``name``; committing it replaces any earlier version.

        Args:
            name: the shard name, e.g. ``00000``.
        """
        if self._manifest is None:
            raise RuntimeError("call DatasetWriter.open() first")
        return ShardWriter(self, name)

    def discard(self, name: str) -> None:
        """Remove a committed shard from the manifest and delete its files.

        Use it when a re-run's plan no longer has that shard (its input went away).

        Args:
            name: the shard name.
        """
        with self._lock:
            manifest = self.manifest
            manifest.shards = [s for s in manifest.shards if s.name != name]
            manifest.complete = False
            manifest.updated_at = datetime.now(UTC)
            write_manifest(self.url, manifest)
            for folder in ("", REJECTS_DIR, DROPPED_DIR):
                storage.remove(storage.join(self.url, folder, part_file(name)))

    def finish(self) -> Manifest:
        """Mark the dataset complete and remove everything the manifest does not list.

        Deletes unlisted ``part-*.parquet`` files (top level, ``__rejects/``,
        ``__dropped/``) and the ``__staging/`` folder, then writes the manifest with
        ``complete=True``. With a ``run``, under the output's lock, and only when no other
        run holds a live claim (else that run finishes the dataset).
        """
        if self.run is not None:
            from pixelmill.datasets.claims import OutputLock

            with self._lock, OutputLock(self.url):
                manifest = read_manifest(self.url) or self.manifest
                storage.remove(storage.join(self.url, STAGING_DIR, self.run))
                others = self.tidy()
                if not storage.listdir(storage.join(self.url, STAGING_DIR)):
                    storage.remove(storage.join(self.url, STAGING_DIR))
                manifest.complete = not others
                manifest.updated_at = datetime.now(UTC)
                write_manifest(self.url, manifest)
                self._manifest = manifest
                return manifest
        with self._lock:
            manifest = self.manifest
            self._remove_unlisted(manifest)
            storage.remove(storage.join(self.url, STAGING_DIR))
            manifest.complete = True
            manifest.updated_at = datetime.now(UTC)
            write_manifest(self.url, manifest)
            return manifest

    def _remove_unlisted(self, manifest: Manifest) -> None:
        listed = {part_file(n) for n in manifest.shard_names()}
        for sub in ("", REJECTS_DIR, DROPPED_DIR, PROCESSED_DIR):
            folder = storage.join(self.url, sub)
            for name in self._part_files(folder):
                if name not in listed:
                    storage.remove(storage.join(folder, name))

    def tidy(self) -> list[str]:
        """Remove what killed runs left (call under the output's lock); the other live runs' ids.

        Expired claims are deleted (their runs' ids become free), ``__staging/`` folders of
        runs without a live claim are removed, and, when no other run is live, shard files
        the manifest does not list.
        """
        from pixelmill.datasets.claims import expired, list_claims

        live = []
        for claim in list_claims(self.url):
            if claim.run == self.run:
                continue
            if expired(claim.record):
                claim.remove()
            else:
                live.append(claim.run)
        staging = storage.join(self.url, STAGING_DIR)
        for name in storage.listdir(staging):
            if name not in live and name != self.run:
                storage.remove(storage.join(staging, name))
        if not live:
            self._remove_unlisted(read_manifest(self.url) or self.manifest)
        return live

    def supersede(self, stale: dict[str, set[str]]) -> None:
        """Drop retried ids from the rejects and processed records of older shards (under the lock).

        Args:
            stale: shard name → ids whose record there a newer shard replaces (only
                rejects are ever retried, so no data file changes).
        """
        from pixelmill.datasets.reader import read_parquet_file

        manifest = read_manifest(self.url) or self.manifest
        for name, ids in stale.items():
            entry = manifest.get(name)
            if entry is None or not ids:
                continue
            for sub in (REJECTS_DIR, PROCESSED_DIR):
                url = storage.join(self.url, sub, part_file(name))
                if storage.exists(url):
                    table = read_parquet_file(url)
                    keep = table.filter(pc.invert(pc.is_in(table["id"].cast(pa.string()),
                                                           pa.array(sorted(ids), pa.string()))))
                    write_parquet_file(url, keep)
                    if sub == REJECTS_DIR:
                        entry.rejects = keep.num_rows
        manifest.updated_at = datetime.now(UTC)
        write_manifest(self.url, manifest)
        self._manifest = manifest

    def record(self, entry: ShardEntry) -> None:
        """List a committed shard in the manifest: this writer's own (``ShardWriter.commit``), or one whose
        files another process moved into place (``commit(record=False)``)."""
        if self.run is not None:
            from pixelmill.datasets.claims import OutputLock, RunClaim

            with self._lock, OutputLock(self.url):
                if not RunClaim(self.url, self.run).held():
                    raise ClaimLost(f"run {self.run} lost its claim on {self.url} (it expired and another run "
                                    f"took the work over); shard {entry.name} is not committed")
                current = read_manifest(self.url) or self.manifest
                shards = [s for s in current.shards if s.name != entry.name] + [entry]
                updated = current.model_copy(update={
                    "shards": sorted(shards, key=lambda s: s.name), "complete": False,
                    "updated_at": datetime.now(UTC)})
                write_manifest(self.url, updated)
                self._manifest = updated
            return
        with self._lock:
            shards = [s for s in self.manifest.shards if s.name != entry.name] + [entry]
            updated = self.manifest.model_copy(update={
                "shards": sorted(shards, key=lambda s: s.name), "complete": False, "updated_at": datetime.now(UTC)})
            write_manifest(self.url, updated)  # the in-memory manifest changes only once this is written
            self._manifest = updated

    def _changes_from(self, existing: Manifest) -> list[str]:
        changed: list[str] = []
        if existing.schema_name != self.schema_name:
            changed.append("schema_name")
        if existing.schema_version != self.schema_version:
            changed.append("schema_version")
        if existing.config_hash != self.config_hash:
            changed.extend(diff_config(existing.config, self.config) or ["config"])
        return changed

    def _clear(self) -> None:
        for name in self._part_files(self.url):
            storage.remove(storage.join(self.url, name))
        for sub in (REJECTS_DIR, DROPPED_DIR, PROCESSED_DIR, STAGING_DIR, MANIFEST_NAME):
            storage.remove(storage.join(self.url, sub))

    @staticmethod
    def _part_files(folder: str) -> list[str]:
        return [n for n in storage.listdir(folder) if n.startswith("part-") and n.endswith(".parquet")]


def write_parquet_file(url: str, table: pa.Table) -> None:
    """Write one Parquet file atomically (a temporary name, then a rename)."""
    import uuid

    fs, path = storage.resolve(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def write_table_dataset(url: str, table, schema_name: str, config: dict, rows_per_shard: int | None = None) -> str:
    """Write an Arrow table as a complete pixelmill dataset (replacing what is there)."""
    writer = DatasetWriter(url, schema_name, 1, config).open(overwrite=True)
    step = rows_per_shard or max(1, table.num_rows)
    for k, start in enumerate(range(0, max(1, table.num_rows), step)):
        sw = writer.shard(f"{k:05d}")
        sw.write(table.slice(start, step))
        sw.commit()
    writer.finish()
    return url
