"""Reading pixelmill datasets (or plain folders of Parquet files) and checking accounting."""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pixelmill.datasets import storage
from pixelmill.datasets.manifest import MANIFEST_NAME, Manifest, read_manifest
from pixelmill.datasets.writer import DROPPED_DIR, REJECTS_DIR, REJECTS_SCHEMA, part_file


class DatasetNotFound(FileNotFoundError):
    """No dataset at a URL: neither a manifest nor any Parquet file."""


def read_parquet_file(url: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file from any fsspec URL (only ``columns`` when given)."""
    fs, path = storage.resolve(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_parquet_rows(url: str, columns: list[str] | None, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of one Parquet file, reading only the row groups that hold them."""
    fs, path = storage.resolve(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, max(0, stop - start))


def parquet_num_rows(url: str) -> int:
    """Row count of one Parquet file, from its footer."""
    fs, path = storage.resolve(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows




def _concat(tables: list[pa.Table], empty: pa.Schema) -> pa.Table:
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return empty.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


class Dataset:
    """A dataset folder: committed shards, their rejects and dropped rows.

    A folder with a ``_manifest.json`` exposes exactly the shards the manifest lists.
    A plain folder of ``*.parquet`` files (no manifest) is read too, each file being a
    shard named by its file stem.

    Args:
        url: the dataset folder.
        manifest: its manifest, or None for a plain folder.
        files: shard name to data file name (relative to ``url``).
    """

    def __init__(self, url: str, manifest: Manifest | None, files: dict[str, str]) -> None:
        self.url = str(url)
        self._manifest = manifest
        self._files = files

    @classmethod
    def open(cls, url: str) -> Dataset:
        """Open the dataset folder at ``url``.

        Args:
            url: local path or fsspec URL.

        Raises:
            DatasetNotFound: there is no manifest and no Parquet file there.
        """
        url = str(url)
        manifest = read_manifest(url)
        if manifest is not None:
            return cls(url, manifest, {s.name: part_file(s.name) for s in manifest.shards})
        names = [
            n for n in storage.listdir(url)
            if n.endswith(".parquet") and not n.startswith(("_", "."))
        ]
        if not names:
            if storage.isdir(url):
                raise DatasetNotFound(f"{url} has no {MANIFEST_NAME} and no .parquet files: not a dataset")
            raise DatasetNotFound(f"dataset folder {url} does not exist")
        return cls(url, None, {posixpath.splitext(n)[0]: n for n in names})

    @property
    def manifest(self) -> Manifest | None:
        """The manifest, or None for a plain folder of Parquet files."""
        return self._manifest

    @property
    def complete(self) -> bool:
        """Whether the producer finished; a plain folder counts as complete."""
        return self._manifest.complete if self._manifest is not None else True

    def shard_names(self) -> list[str]:
        """Shard names, sorted."""
        return sorted(self._files)

    def shard_url(self, name: str) -> str:
        """URL of the data file of shard ``name``."""
        if name not in self._files:
            raise KeyError(f"{self.url} has no shard {name!r}")
        return storage.join(self.url, self._files[name])

    def _expected_rows(self, name: str) -> int | None:
        entry = self._manifest.get(name) if self._manifest is not None else None
        return entry.rows if entry is not None else None

    def read_shard(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read one shard.

        Args:
            name: the shard name.
            columns: only these columns (all when None).
        """
        url = self.shard_url(name)
        if self._expected_rows(name) == 0 and not storage.exists(url):
            # a shard of rejects only (e.g. timed out): no data file; the other shards' schema,
            # and a requested column no shard has (every shard rejects only) as an empty null column
            schema = self.schema
            if columns is not None:
                schema = pa.schema([schema.field(c) if c in schema.names else pa.field(c, pa.null())
                                    for c in columns])
            return schema.empty_table()
        return read_parquet_file(url, columns)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the data files (empty when no shard has a file)."""
        for name in self.shard_names():
            url = self.shard_url(name)
            if storage.exists(url):
                fs, path = storage.resolve(url)
                with fs.open(path, "rb") as f:
                    return pq.read_schema(f)
        return pa.schema([])

    def shard_rows(self, name: str) -> int:
        """Rows in shard ``name`` (from the manifest, else the Parquet footer)."""
        expected = self._expected_rows(name)
        return expected if expected is not None else parquet_num_rows(self.shard_url(name))

    @property
    def num_rows(self) -> int:
        """Total rows over all shards (from the manifest or the Parquet footers)."""
        if self._manifest is not None:
            return self._manifest.num_rows
        return sum(self.shard_rows(name) for name in self.shard_names())

    def to_table(self, columns: list[str] | None = None) -> pa.Table:
        """All shards concatenated in shard-name order.

        Args:
            columns: only these columns (all when None).
        """
        return _concat([self.read_shard(n, columns) for n in self.shard_names()], pa.schema([]))

    def _side_table(self, folder: str, empty: pa.Schema) -> pa.Table:
        base = storage.join(self.url, folder)
        if self._manifest is not None:
            names = [part_file(n) for n in self.shard_names()]
        else:
            names = [n for n in storage.listdir(base) if n.endswith(".parquet") and not n.startswith(".")]
        urls = [storage.join(base, n) for n in names]
        return _concat([read_parquet_file(u) for u in urls if storage.exists(u)], empty)

    def rejects(self) -> pa.Table:
        """Rejected rows of every committed shard (at least ``id``, ``error``, ``stage``)."""
        return self._side_table(REJECTS_DIR, REJECTS_SCHEMA)

    def dropped(self) -> pa.Table:
        """Rows dropped by design (filtered candidates) of every committed shard."""
        return self._side_table(DROPPED_DIR, pa.schema([("id", pa.string())]))

    def __repr__(self) -> str:
        return f"Dataset({self.url!r}, shards={len(self._files)}, complete={self.complete})"


@dataclass
class AccountingReport:
    """Where every input row went.

    Args:
        inputs: distinct input ids checked.
        outputs: output rows.
        rejected: reject rows.
        missing: input ids found neither as an output parent nor in the rejects.
        duplicated: input ids accounted for more than once (rejected twice, both output
            and rejected, or several output rows in a one-row-per-input dataset).
        unexpected: output parents or reject ids that are not inputs.
    """

    inputs: int
    outputs: int
    rejected: int
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every input is accounted for exactly once and nothing else appears."""
        return not (self.missing or self.duplicated or self.unexpected)

    def __str__(self) -> str:
        def sample(ids: list[str]) -> str:
            return ", ".join(ids[:5]) + (" …" if len(ids) > 5 else "")

        text = f"{self.inputs} inputs -> {self.outputs} output rows, {self.rejected} rejects"
        for label, ids in (("missing", self.missing), ("duplicated", self.duplicated), ("unexpected", self.unexpected)):
            if ids:
                text += f"; {len(ids)} {label} ({sample(ids)})"
        return text


def account(input_ids: Iterable[str], dataset: Dataset | str) -> AccountingReport:
    """Check that every input id ends up exactly once in the outputs or the rejects.

    An input counts as output when it is the ``parent_id`` of one or more output rows
    (or, without a ``parent_id`` column, the ``id`` of exactly one row).

    Args:
        input_ids: the ids of the stage's input rows.
        dataset: the stage's output dataset, or its URL.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    inputs = set(input_ids)
    column = "parent_id" if "parent_id" in ds.schema.names else "id"
    out_counts = Counter(ds.to_table(columns=[column]).column(column).to_pylist()) if ds.shard_names() else Counter()
    rej_counts = Counter(ds.rejects().column("id").to_pylist())

    duplicated = {i for i, n in rej_counts.items() if n > 1}
    duplicated |= set(out_counts) & set(rej_counts)
    if column == "id":
        duplicated |= {i for i, n in out_counts.items() if n > 1}
    seen = set(out_counts) | set(rej_counts)
    return AccountingReport(
        inputs=len(inputs),
        outputs=sum(out_counts.values()),
        rejected=sum(rej_counts.values()),
        missing=sorted(inputs - seen),
        duplicated=sorted(d for d in duplicated if d is not None),
        unexpected=sorted(str(i) for i in seen - inputs),
    )
