"""Importing a folder of image files (with optional captions) as an ``images`` dataset."""

from __future__ import annotations

import csv
import io
import posixpath
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.datasets.images import IMAGE_TYPE
from pixelmill.datasets.sharding import shard_for_id, shard_name, stable_id
from pixelmill.datasets.writer import DatasetWriter

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_TABLES = ("metadata.csv", "captions.csv")
FILE_COLUMNS = ("file_name", "file", "image")
CAPTION_COLUMNS = ("caption", "text")
IMAGES_SCHEMA_NAME = "images"
IMAGES_SCHEMA_VERSION = 1
IMAGES_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", IMAGE_TYPE), ("caption", pa.string()), ("source_path", pa.string())]
)
_BATCH_ROWS = 64


def _read_caption_table(url: str, folder: str) -> dict[str, str]:
    """Map image path (relative to the import root) to caption, from one CSV file."""
    reader = csv.DictReader(io.StringIO(storage.read_text(url).lstrip("\ufeff")))
    columns = reader.fieldnames or []
    file_col = next((c for c in FILE_COLUMNS if c in columns), None)
    text_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if file_col is None or text_col is None:
        raise ValueError(
            f"{url}: needs a file column ({' / '.join(FILE_COLUMNS)}) and a caption column "
            f"({' / '.join(CAPTION_COLUMNS)}); found {columns}"
        )
    captions: dict[str, str] = {}
    for row in reader:
        name = (row.get(file_col) or "").strip()
        if name:
            captions[posixpath.normpath(posixpath.join(folder, name))] = row.get(text_col) or ""
    return captions


def import_folder(
    src_dir: str,
    out_url: str,
    num_buckets: int = 16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Import every image file under ``src_dir`` into an ``images`` dataset at ``out_url``.

    Files are selected by extension only and stored byte for byte (the ``image`` cell
    keeps the original encoding and the relative path); undecodable files are imported
    too and become rejects of the first stage that decodes them. Each row's ``id`` is a
    stable hash of its relative path, and rows go to ``shard_for_id(id, num_buckets)``,
    so the plan stays the same when the folder grows; empty buckets are not written.

    Captions come from a same-named ``.txt`` file next to the image, else from a
    ``metadata.csv`` / ``captions.csv`` in the image's folder or any folder above it
    (columns ``file_name``/``file``/``image`` relative to that CSV's folder, and
    ``caption``/``text``), else null.

    Args:
        src_dir: the folder to import (local path or fsspec URL).
        out_url: the dataset folder to write.
        num_buckets: number of hash buckets (the maximum number of shards).
        overwrite: replace an existing dataset imported with other settings.

    Returns:
        A summary: ``url``, ``images``, ``captioned``, ``shards``, ``num_buckets``.
    """
    fs, root = storage.resolve(src_dir)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder {src_dir} does not exist")
    root = root.rstrip("/") or "/"
    files = sorted(posixpath.relpath(p, root) for p in fs.find(root))
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]
    images = [f for f in files if posixpath.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise ValueError(f"no image files ({kinds}) found under {src_dir}")

    source = storage.to_url(fs, root)
    file_set = set(files)
    table_captions: dict[str, str] = {}
    csvs = sorted(
        (f for f in files if posixpath.basename(f).lower() in CAPTION_TABLES),
        key=lambda f: (f.count("/"), f),
    )
    for rel in csvs:
        folder = posixpath.dirname(rel)
        table_captions.update(_read_caption_table(storage.join(source, rel), folder))

    buckets: dict[int, list[str]] = defaultdict(list)
    for rel in images:
        buckets[shard_for_id(stable_id(rel), num_buckets)].append(rel)

    config = {"source": source, "num_buckets": num_buckets}
    writer = DatasetWriter(out_url, IMAGES_SCHEMA_NAME, IMAGES_SCHEMA_VERSION, config, schema=IMAGES_SCHEMA)
    writer.open(overwrite=overwrite)
    for name in writer.committed - {shard_name(b) for b in buckets}:
        writer.discard(name)
    captioned = 0
    for bucket in sorted(buckets):
        shard = writer.shard(shard_name(bucket))
        rels = buckets[bucket]
        for start in range(0, len(rels), _BATCH_ROWS):
            rows = []
            for rel in rels[start : start + _BATCH_ROWS]:
                txt = posixpath.splitext(rel)[0] + ".txt"
                if txt in file_set:
                    caption: str | None = storage.read_text(storage.join(source, txt)).strip()
                else:
                    caption = table_captions.get(rel)
                captioned += caption is not None
                rows.append(
                    {
                        "id": stable_id(rel),
                        "image": {"bytes": storage.read_bytes(storage.join(source, rel)), "path": rel},
                        "caption": caption,
                        "source_path": storage.join(source, rel),
                    }
                )
            shard.write(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
        shard.commit(input_rows=len(rels))
    writer.finish()
    return {
        "url": str(out_url),
        "images": len(images),
        "captioned": captioned,
        "shards": len(buckets),
        "num_buckets": num_buckets,
    }
