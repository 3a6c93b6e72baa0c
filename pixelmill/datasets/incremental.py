"""Growing inputs: folders of raw image files, the processed table, and reading planned ids.

An output edited incrementally keeps, beside its shards, a **processed table**: one Parquet
file per committed shard, ``__processed/part-<shard>.parquet`` with ``id``, ``status``
(``ok`` / ``reject``), ``reason``, ``shard``, ``run`` and ``time``. A run edits only the
input ids that table does not hold (and, with ``--retry-rejects``, the ones it holds as
rejects). Shards written before the table existed count from their own ids and rejects.

A raw-file input (a folder or prefix of image files, local or ``s3://``, optionally
filtered by ``input_glob``) gets row ids from content: the SHA-256 of the file's bytes
(full hex). Known files are not read again: ``__sources/part-<run>.parquet`` caches each
file's id under its URL, size and version (ETag or mtime).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pixelmill.datasets import storage
from pixelmill.datasets.manifest import Manifest, read_manifest
from pixelmill.datasets.writer import PROCESSED_DIR, REJECTS_DIR, part_file

SOURCES_DIR = "__sources"
PROCESSED_SCHEMA = pa.schema([
    ("id", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("shard", pa.string()),
    ("run", pa.string()), ("time", pa.timestamp("us", tz="UTC")),
])
SOURCES_SCHEMA = pa.schema([("source", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                            ("id", pa.string())])
RAW_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("caption", pa.string()), ("source_path", pa.string())])


def processed_rows(ok_ids: list[str], rejects: list[tuple[str, str]], shard: str, run: str,
                   now: datetime | None = None) -> pa.Table:
    """The processed-table rows of one shard: its ok ids and its rejects with their reasons."""
    now = now or datetime.now(UTC)
    ids = list(ok_ids) + [r[0] for r in rejects]
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "status": pa.array(["ok"] * len(ok_ids) + ["reject"] * len(rejects), pa.string()),
        "reason": pa.array([None] * len(ok_ids) + [r[1] for r in rejects], pa.string()),
        "shard": pa.array([shard] * len(ids), pa.string()),
        "run": pa.array([run] * len(ids), pa.string()),
        "time": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC")),
    }, schema=PROCESSED_SCHEMA)


def _derived(url: str, name: str) -> pa.Table:
    """Processed rows of a shard committed without a processed file (its ids and rejects)."""
    from pixelmill.datasets.reader import read_parquet_file

    data = storage.join(url, part_file(name))
    ok = read_parquet_file(data, ["id"])["id"].to_pylist() if storage.exists(data) else []
    rej = storage.join(url, REJECTS_DIR, part_file(name))
    rejects = read_parquet_file(rej, ["id", "error"]) if storage.exists(rej) else None
    pairs = list(zip(rejects["id"].to_pylist(), rejects["error"].to_pylist())) if rejects is not None else []
    return processed_rows([str(i) for i in ok], pairs, name, "", now=datetime(1970, 1, 1, tzinfo=UTC))


def processed_table(url: str, manifest: Manifest | None = None) -> pa.Table:
    """Every processed id of the output's committed shards (empty when there is no output)."""
    from pixelmill.datasets.reader import read_parquet_file

    manifest = manifest if manifest is not None else read_manifest(url)
    if manifest is None:
        return PROCESSED_SCHEMA.empty_table()
    present = set(storage.listdir(storage.join(url, PROCESSED_DIR)))
    tables = []
    for name in manifest.shard_names():
        if part_file(name) in present:
            tables.append(read_parquet_file(storage.join(url, PROCESSED_DIR, part_file(name))).cast(PROCESSED_SCHEMA))
        else:
            tables.append(_derived(url, name))
    return pa.concat_tables(tables) if tables else PROCESSED_SCHEMA.empty_table()


def latest_status(table: pa.Table) -> dict[str, tuple[str, str]]:
    """id → (status, shard) of its latest record (a retried reject is superseded by its retry)."""
    out: dict[str, tuple[str, str]] = {}
    order = pc.sort_indices(table, [("time", "ascending")]) if table.num_rows else []
    ids, status, shard = table["id"].to_pylist(), table["status"].to_pylist(), table["shard"].to_pylist()
    for i in (order.to_pylist() if table.num_rows else []):
        out[ids[i]] = (status[i], shard[i])
    return out


def is_raw_input(url: str, glob: str | None) -> bool:
    """Whether ``url`` is a folder/prefix of image files rather than a dataset."""
    from pixelmill.datasets.importer import IMAGE_EXTENSIONS

    if glob:
        return True
    if read_manifest(url) is not None:
        return False
    names = storage.listdir(url)
    if any(n.endswith(".parquet") and not n.startswith(("_", ".")) for n in names):
        return False
    return any(posixpath.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names) or any(
        posixpath.splitext(f["name"])[1].lower() in IMAGE_EXTENSIONS for f in list_files(url, None))


def list_files(url: str, glob: str | None) -> list[dict[str, Any]]:
    """The input's files, sorted by URL: ``name`` (relative), ``url``, ``size``, ``version``.

    Without ``glob`` only image extensions count; a ``glob`` matches the relative path when
    it holds a ``/``, else the base name. Hidden entries and ``_``-prefixed folders are skipped.
    """
    from pixelmill.datasets.importer import IMAGE_EXTENSIONS

    fs, root = storage.resolve(url)
    if not fs.exists(root):
        return []
    root = root.rstrip("/")
    out = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(path, root)
        if any(part.startswith((".", "_")) for part in rel.split("/")) or info.get("type") == "directory":
            continue
        if glob:
            if not fnmatch.fnmatch(rel if "/" in glob else posixpath.basename(rel), glob):
                continue
        elif posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        out.append({"name": rel, "url": storage.to_url(fs, path), "size": int(info.get("size") or 0),
                    "version": str(version)})
    return out


def content_id(url: str) -> str:
    """A raw file's row id: the SHA-256 of its bytes (hex)."""
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def file_ids(output: str, files: list[dict[str, Any]], run: str, threads: int = 8, write: bool = True) -> None:
    """Set ``files[i]["id"]``: from the output's ``__sources`` cache, else by hashing the file.

    Newly hashed files are added to the cache (one Parquet file per run) unless ``write`` is false.
    """
    from pixelmill.datasets.reader import read_parquet_file
    from pixelmill.datasets.writer import write_parquet_file

    folder = storage.join(output, SOURCES_DIR)
    known: dict[tuple[str, int, str], str] = {}
    for name in storage.listdir(folder):
        if name.endswith(".parquet") and not name.startswith("."):
            t = read_parquet_file(storage.join(folder, name))
            for s, z, v, i in zip(t["source"].to_pylist(), t["size"].to_pylist(), t["version"].to_pylist(),
                                  t["id"].to_pylist()):
                known[(s, z, v)] = i
    todo = []
    for f in files:
        f["id"] = known.get((f["url"], f["size"], f["version"]))
        if f["id"] is None:
            todo.append(f)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f, digest in zip(todo, pool.map(lambda f: _safe_hash(f["url"]), todo)):
            f["id"] = digest
    fresh = [f for f in todo if f["id"] is not None]
    if fresh and write:
        write_parquet_file(storage.join(folder, f"part-{run}.parquet"), pa.Table.from_pylist(
            [{"source": f["url"], "size": f["size"], "version": f["version"], "id": f["id"]} for f in fresh],
            schema=SOURCES_SCHEMA))


def _safe_hash(url: str) -> str | None:
    try:
        return content_id(url)
    except FileNotFoundError:  # removed since the listing: not part of this run
        return None


def read_planned(spec: dict, columns: list[str]) -> pa.Table:
    """The input rows of one planned stage call (``url``, ``shard``, ``rows``, optional ``select``,
    ``start``, ``stop``: see ``flows.common.split_specs``), tagged with their ``shard``."""
    stop = spec.get("stop")
    table = read_spec(str(spec["url"]), int(spec["rows"]), str(spec.get("select") or ""), columns,
                      start=int(spec.get("start") or 0), stop=None if stop is None else int(stop))
    return table.append_column("shard", pa.array([str(spec["shard"])] * table.num_rows, pa.string()))


def read_spec(url: str, rows: int, select: str, columns: list[str], start: int = 0,
              stop: int | None = None) -> pa.Table:
    """The input rows of one planned unit (or of its part ``[start, stop)``).

    Args:
        url: the input shard (a dataset input), or the input folder (raw files).
        rows: read the shard's first ``rows`` rows.
        select: empty, or JSON: ``{"ids": [...], "head": N}`` (these ids among the shard's
            first N rows) or
            ``{"files": [[url, id, name], ...]}`` (raw files; an unreadable one keeps a null image).
        columns: the columns the stage reads.
        start, stop: only these of the unit's rows (after selection); a part of a plain
            shard reads only the row groups that hold it.
    """
    from pixelmill.datasets.reader import read_parquet_file, read_parquet_rows

    chosen = json.loads(select) if select else {}
    if "files" in chosen:
        records = []
        for file_url, row_id, name in chosen["files"][start:stop]:
            try:
                data = storage.read_bytes(file_url)
            except OSError:
                data = None
            records.append({"id": row_id, "image": {"bytes": data, "path": name} if data is not None else None,
                            "caption": None, "source_path": file_url})
        table = pa.Table.from_pylist(records, schema=RAW_SCHEMA)
        for c in columns:
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        return table.select(columns)
    head = int(chosen.get("head", rows))
    if "ids" not in chosen:
        return read_parquet_rows(url, columns, start, head if stop is None else min(int(stop), head))
    table = read_parquet_file(url, columns=columns).slice(0, head)
    table = table.filter(pc.is_in(table["id"].cast(pa.string()), pa.array(chosen["ids"], pa.string())))
    return table.slice(start, None if stop is None else max(0, int(stop) - start))
