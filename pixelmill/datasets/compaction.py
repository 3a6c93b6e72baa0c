"""Merging the many small shards that nightly incremental runs leave into fewer, larger ones.

``compact`` takes the output's lock (``datasets/claims.py``) and refuses while another run
holds a live claim. It writes the merged shards (data, rejects, dropped rows, processed
records) under their final names, then switches the manifest in one atomic write, then
removes the old files: a kill before the switch leaves unlisted files the next run removes,
a kill after it leaves old files nothing lists. Ids and rows are unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.datasets.claims import OutputLock, expired, list_claims, new_run_id
from pixelmill.datasets.errors import InputError
from pixelmill.datasets.manifest import ShardEntry, read_manifest, write_manifest
from pixelmill.datasets.reader import read_parquet_file
from pixelmill.datasets.writer import DROPPED_DIR, PROCESSED_DIR, REJECTS_DIR, _ParquetStream, part_file


class OutputBusy(InputError):
    """Another run holds a live claim on the dataset."""


def _groups(entries: list[ShardEntry], target_rows: int) -> list[list[ShardEntry]]:
    groups: list[list[ShardEntry]] = [[]]
    rows = 0
    for e in entries:
        if groups[-1] and rows + e.rows > target_rows:
            groups.append([])
            rows = 0
        groups[-1].append(e)
        rows += e.rows
    return [g for g in groups if g]


def _merge(url: str, sub: str, group: list[ShardEntry], target: str, name: str | None) -> int:
    """Stream the ``sub`` files of ``group`` into ``target``; the rows written (``name``: the new shard column)."""
    stream = None
    for e in group:
        src = storage.join(url, sub, part_file(e.name))
        if storage.exists(src):
            table = read_parquet_file(src)
        elif sub == PROCESSED_DIR:  # a shard from before the processed table: its ids and rejects
            from pixelmill.datasets.incremental import _derived

            table = _derived(url, e.name)
        else:
            continue
        if name is not None and "shard" in table.column_names:
            table = table.set_column(table.column_names.index("shard"), "shard",
                                     pa.array([name] * table.num_rows, pa.string()))
        if stream is None:
            stream = _ParquetStream(target, table.schema)
        stream.write(table)
    if stream is None:
        return -1
    stream.close()
    return stream.rows


def compact(url: str, target_rows: int = 10_000) -> dict:
    """Merge the committed shards of the dataset at ``url`` into shards of about ``target_rows`` rows.

    Shards already at least ``target_rows`` rows are kept as they are. Returns ``before``,
    ``after`` (shard counts) and ``rows``.

    Raises:
        InputError: no dataset there, or it is incomplete (finish or rerun it first).
        OutputBusy: another run holds a live claim on it.
    """
    with OutputLock(url):
        manifest = read_manifest(url)
        if manifest is None:
            raise InputError(f"{url} has no manifest: not a pixelmill dataset")
        live = [c.run for c in list_claims(url) if not expired(c.record)]
        if live:
            raise OutputBusy(f"{url}: run(s) {', '.join(live)} are writing it; compact it when they are done")
        small = [e for e in manifest.shards if e.rows < target_rows]
        keep = [e for e in manifest.shards if e.rows >= target_rows]
        merged = _groups(small, target_rows)
        if sum(len(g) > 1 for g in merged) == 0:
            return {"before": len(manifest.shards), "after": len(manifest.shards), "rows": manifest.num_rows}
        tag = new_run_id()
        new_entries = list(keep)
        replaced: list[str] = []
        for k, group in enumerate(merged):
            if len(group) == 1:
                new_entries.append(group[0])
                continue
            name = f"c{tag}-{k:05d}"
            rows = _merge(url, "", group, storage.join(url, part_file(name)), None)
            for sub in (REJECTS_DIR, DROPPED_DIR, PROCESSED_DIR):
                _merge(url, sub, group, storage.join(url, sub, part_file(name)), name if sub == PROCESSED_DIR else None)
            inputs = [e.input_rows for e in group]
            new_entries.append(ShardEntry(
                name=name, rows=max(rows, 0), rejects=sum(e.rejects for e in group),
                dropped=sum(e.dropped for e in group), input_rows=None if None in inputs else sum(inputs)))
            replaced += [e.name for e in group]
        before = len(manifest.shards)
        manifest.shards = sorted(new_entries, key=lambda e: e.name)
        manifest.updated_at = datetime.now(UTC)
        write_manifest(url, manifest)
        for name in replaced:
            for sub in ("", REJECTS_DIR, DROPPED_DIR, PROCESSED_DIR):
                storage.remove(storage.join(url, sub, part_file(name)))
        _merge_sources(url, tag)
        return {"before": before, "after": len(manifest.shards), "rows": manifest.num_rows}


def _merge_sources(url: str, tag: str) -> None:
    """One file for the raw-file id cache (``__sources/``), which gains a file per run that hashed files."""
    from pixelmill.datasets.incremental import SOURCES_DIR
    from pixelmill.datasets.writer import write_parquet_file

    folder = storage.join(url, SOURCES_DIR)
    names = [n for n in storage.listdir(folder) if n.startswith("part-") and n.endswith(".parquet")]
    if len(names) < 2:
        return
    table = pa.concat_tables([read_parquet_file(storage.join(folder, n)) for n in names])
    write_parquet_file(storage.join(folder, f"part-c{tag}.parquet"), table)  # before the old ones go
    for n in names:
        storage.remove(storage.join(folder, n))
