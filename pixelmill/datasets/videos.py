"""Video inputs: a dataset with a video column (paths or file bytes), or a folder of video files.

The video flow plans from :func:`list_videos` (ids and where each video is, never the
bytes) and each job reads its own video with :func:`read_video`, so video bytes travel
from storage to the worker that decodes them and nowhere else.

A dataset's ``video`` column holds either the file bytes (binary) or a path (string):
a local path (a relative one is relative to the dataset folder) or an fsspec URL. A plain
folder of video files works as an input too (each file is a row, its id the path
relative to the folder), and so does a single video file (its id: the file name).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pixelmill.datasets import storage
from pixelmill.datasets.reader import Dataset, DatasetNotFound, read_parquet_file
from pixelmill.datasets.writer import DatasetWriter

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"})
VIDEOS_SCHEMA_NAME = "videos"
VIDEOS_SCHEMA_VERSION = 1


@dataclass
class VideoRow:
    """Where one input video is.

    Attributes:
        id: the row id.
        kind: ``path`` (a file to open), ``bytes`` (a binary cell of ``shard_url``) or
            ``missing`` (a null or empty path: the reason is in ``problem``).
        path: the resolved local path or URL (``path`` rows).
        shard_url: the Parquet file holding the cell (``bytes`` rows).
        column: the video column.
        fingerprint: what identifies the content without reading it: path, size and
            modification time for files (None when the file is missing), the id for cells.
        problem: why the row cannot be used, when that is known without reading it.
    """

    id: str
    kind: str
    path: str | None = None
    shard_url: str | None = None
    column: str | None = None
    fingerprint: dict[str, Any] | None = None
    problem: str | None = None

    def source(self) -> dict[str, Any]:
        """The plain-dict form a job spec carries (see :func:`read_video`)."""
        return {"kind": self.kind, "id": self.id, "path": self.path, "shard_url": self.shard_url,
                "column": self.column}

    def describe(self) -> str:
        if self.kind == "path":
            return self.path or ""
        return f"bytes in column {self.column!r} of {posixpath.basename(self.shard_url or '')}"


def _file_fingerprint(url: str) -> dict[str, Any] | None:
    fs, path = storage.resolve(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    return {"path": url, "size": info.get("size"), "mtime": str(mtime)}


def _path_row(row_id: str, value: Any, base: str | None, column: str) -> VideoRow:
    if value is None or not str(value).strip():
        return VideoRow(row_id, "missing", column=column, problem=f"no video path in column {column!r}")
    value = str(value).strip()
    if "://" not in value and not os.path.isabs(value) and base is not None:
        value = storage.join(base, value) if "://" in base else os.path.normpath(os.path.join(base, value))
    fp = _file_fingerprint(value)
    row = VideoRow(row_id, "path", path=value, column=column, fingerprint=fp)
    if fp is None:
        row.problem = f"{value}: no such file"
    return row


def _folder_rows(url: str) -> list[VideoRow]:
    fs, root = storage.resolve(url)
    if fs.isfile(root) and posixpath.splitext(root)[1].lower() in VIDEO_EXTENSIONS:
        return [_path_row(posixpath.basename(root), storage.to_url(fs, root), None, "file")]
    if not fs.isdir(root):
        return []
    root = root.rstrip("/") or "/"
    rels = sorted(posixpath.relpath(p, root) for p in fs.find(root))
    rels = [r for r in rels if not any(part.startswith((".", "_")) for part in r.split("/"))
            and posixpath.splitext(r)[1].lower() in VIDEO_EXTENSIONS]
    base = storage.to_url(fs, root)
    return [_path_row(rel, storage.join(base, rel), None, "file") for rel in rels]


def list_videos(url: str, column: str = "video", limit: int | None = None) -> list[VideoRow]:
    """The input's videos in order (shard order, then row order), without reading video bytes.

    Args:
        url: a dataset with ``id`` and ``column``, a folder of video files, or one video file
            (its id: the file name).
        column: the video column (string paths or binary file bytes).
        limit: only the first N rows.

    Raises:
        DatasetNotFound: neither a dataset nor a folder with video files at ``url``.
        ValueError: the column is missing or of another type, or ids repeat (naming them).
    """
    try:
        ds = Dataset.open(url)
    except DatasetNotFound:
        rows = _folder_rows(url)
        if not rows:
            kinds = " ".join(sorted(VIDEO_EXTENSIONS))
            raise DatasetNotFound(f"{url}: no dataset (no _manifest.json or Parquet files) "
                                  f"and no video files ({kinds})") from None
        return rows[:limit] if limit else rows
    names = ds.schema.names if ds.shard_names() else []
    for needed in ("id", column):
        if ds.shard_names() and needed not in names:
            raise ValueError(f"{url} has no column {needed!r} (columns: {', '.join(names)})")
    rows: list[VideoRow] = []
    if ds.shard_names():
        typ = ds.schema.field(column).type
        is_path = pa.types.is_string(typ) or pa.types.is_large_string(typ)
        if not (is_path or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise ValueError(f"column {column!r} is {typ}; it must hold paths (string) or file bytes (binary)")
        local = storage.local_path(url)
        base = local if local is not None else str(url)
        for name in ds.shard_names():
            if limit is not None and len(rows) >= limit:
                break
            table = ds.read_shard(name, columns=["id", column] if is_path else ["id"])
            if not is_path:
                shard = ds.shard_url(name)
                rows += [VideoRow(str(i), "bytes", shard_url=shard, column=column, fingerprint={"id": str(i)})
                         for i in table.column("id").to_pylist()]
            else:
                rows += [_path_row(str(i), v, base, column)
                         for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist())]
    rows = rows[:limit] if limit else rows
    from pixelmill.datasets.checks import check_ids

    check_ids([r.id for r in rows], str(url))  # unique, and safe: ids name the output folders
    return rows


def read_video(source: dict[str, Any]) -> str | bytes:
    """What ``decode_video`` opens for a job's source: a local path, or the file's bytes.

    Args:
        source: :meth:`VideoRow.source` of the row.

    Returns:
        A local path for local files; bytes for cells and for files at other URLs. A null
        cell comes back as ``b""`` (decoding it says "empty input").
    """
    if source["kind"] == "path":
        local = storage.local_path(source["path"])
        return local if local is not None else storage.read_bytes(source["path"])
    if source["kind"] == "bytes":
        table = read_parquet_file(source["shard_url"], columns=["id", source["column"]])
        hit = table.filter(pc.equal(table.column("id").cast(pa.string()), source["id"]))
        if hit.num_rows == 0:
            raise KeyError(f"id {source['id']!r} is no longer in {source['shard_url']}")
        return hit.column(source["column"])[0].as_py() or b""
    return b""


def write_video_dataset(url: str, videos: list[tuple[str, bytes | str]], config: dict[str, Any] | None = None,
                        column: str = "video") -> str:
    """Write ``(id, bytes or path)`` pairs as a complete one-shard video dataset (replacing ``url``).

    All values must be of one kind: bytes make a binary column, strings a path column.
    """
    if not videos:
        raise ValueError("no videos to write")
    as_bytes = isinstance(videos[0][1], (bytes, bytearray))
    if any(isinstance(v, (bytes, bytearray)) != as_bytes for _, v in videos):
        raise ValueError("videos must be all bytes or all paths")
    schema = pa.schema([("id", pa.string()), (column, pa.binary() if as_bytes else pa.string())])
    table = pa.Table.from_pylist([{"id": i, column: bytes(v) if as_bytes else v} for i, v in videos], schema=schema)
    writer = DatasetWriter(url, VIDEOS_SCHEMA_NAME, VIDEOS_SCHEMA_VERSION, config or {"source": "pixelmill"},
                           schema=schema).open(overwrite=True)
    shard = writer.shard("00000")
    shard.write(table)
    shard.commit(input_rows=table.num_rows)
    writer.finish()
    return url
