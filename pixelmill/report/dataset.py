"""Self-contained HTML contact sheets of pixelmill datasets.

A report shows what a dataset actually holds: its manifest (schema, config, shard and
reject counts), summary statistics of its float metrics, the first rows with every image
column as a thumbnail side by side and the other columns as a compact list, and the
rejected rows with their reasons. Thumbnails are embedded as base64 data URIs and the CSS
is inline, so the single ``.html`` file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from pixelmill.datasets import Dataset, ImageError, normalize_image, storage
from pixelmill.report.html import _e, _page, _write

THUMB_SIDE = 256
MAX_SOURCE_PIXELS = 50_000_000
MAX_TEXT_CHARS = 300
MAX_VALUE_CHARS = 120
SHORT_TEXT_CHARS = 14
HASH_CHARS = 12
MAX_REJECTS_SHOWN = 1000
REPORT_NAME = "report.html"
_EXIF_ORIENTATION = 0x0112


@dataclass
class _DatasetView:
    """What a report section shows of one dataset (the rows are the first ``limit``)."""

    url: str
    num_rows: int
    num_shards: int
    rows: pa.Table
    image_columns: list[str]
    stats: list[tuple[str, int, float, float, float]]
    rejects: pa.Table
    schema_name: str | None = None
    schema_version: int | None = None
    complete: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    updated_at: datetime | None = None


def is_image_type(pa_type: pa.DataType) -> bool:
    """Whether an Arrow type is an image cell: a struct of ``bytes`` and ``path`` only.

    Besides :data:`pixelmill.datasets.IMAGE_TYPE` this accepts the large variants and a
    ``null``-typed ``path`` (what pyarrow infers when every path is None).

    Args:
        pa_type: a column type.
    """
    if not pa.types.is_struct(pa_type):
        return False
    names = {pa_type.field(i).name: pa_type.field(i).type for i in range(pa_type.num_fields)}
    if set(names) != {"bytes", "path"}:
        return False
    data, path = names["bytes"], names["path"]
    return (pa.types.is_binary(data) or pa.types.is_large_binary(data)) and (
        pa.types.is_string(path) or pa.types.is_large_string(path) or pa.types.is_null(path)
    )


def _is_local(url: str) -> bool:
    fs, _ = storage.resolve(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def _head(ds: Dataset, limit: int) -> pa.Table:
    """The first ``limit`` rows, reading shards in order only until there are enough."""
    tables: list[pa.Table] = []
    remaining = limit
    for name in ds.shard_names():
        if remaining <= 0:
            break
        table = ds.read_shard(name)
        tables.append(table.slice(0, remaining))
        remaining -= min(remaining, table.num_rows)
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return ds.schema.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _float_stats(table: pa.Table) -> list[tuple[str, int, float, float, float]]:
    """``(column, count, mean, min, max)`` of each float column, ignoring nulls and NaN."""
    stats = []
    for name in table.column_names:
        if not pa.types.is_floating(table.schema.field(name).type):
            continue
        column = table.column(name).cast(pa.float64()).drop_null()
        values = column.filter(pc.invert(pc.is_nan(column)))
        if len(values):
            bounds = pc.min_max(values)
            stats.append((name, len(values), pc.mean(values).as_py(), bounds["min"].as_py(), bounds["max"].as_py()))
    return stats


def _load(url: str, limit: int) -> _DatasetView:
    """Read everything a report section needs from the dataset at ``url``."""
    ds = Dataset.open(url)
    rows = _head(ds, max(0, limit))
    schema = rows.schema if rows.num_columns else ds.schema
    float_columns = [f.name for f in ds.schema if pa.types.is_floating(f.type)]
    try:
        metrics = ds.to_table(columns=float_columns) if float_columns else pa.table({})
    except (pa.ArrowInvalid, KeyError):
        metrics = rows
    view = _DatasetView(
        url=ds.url,
        num_rows=ds.num_rows,
        num_shards=len(ds.shard_names()),
        rows=rows,
        image_columns=[f.name for f in schema if is_image_type(f.type)],
        stats=_float_stats(metrics),
        rejects=ds.rejects(),
        complete=ds.complete,
    )
    manifest = ds.manifest
    if manifest is not None:
        view.schema_name = manifest.schema_name
        view.schema_version = manifest.schema_version
        view.config = manifest.config
        view.config_hash = manifest.config_hash
        view.updated_at = manifest.updated_at
    return view


def _cell_bytes(cell: dict[str, Any]) -> bytes:
    data = cell.get("bytes")
    if data is None:
        path = cell.get("path")
        if not path:
            raise ImageError("empty", "image cell has neither bytes nor path")
        data = storage.read_bytes(path)
    if not data:
        raise ImageError("empty", "no image bytes")
    return bytes(data)


def _thumbnail(cell: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    """A data URI of the image at most :data:`THUMB_SIDE` px long, and the source size.

    Transparent images become PNG (so the page's checkerboard shows through), all
    others JPEG; EXIF orientation is applied and high-bit-depth grey is rescaled.

    Raises:
        ImageError: the cell is empty, undecodable or too large.
    """
    data = _cell_bytes(cell)
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        if size[0] * size[1] > MAX_SOURCE_PIXELS:
            raise ImageError("too_large", f"{size[0]}x{size[1]}")
        if img.format == "JPEG":
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
        img.load()
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            size = (size[1], size[0])
        img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = normalize_image(data, resolution=min(THUMB_SIDE, max(img.size)), multiple=1)
    alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    img = img.convert("RGBA" if alpha else "RGB")
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if alpha:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=82)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", size


def _format_value(value: Any) -> str | None:
    """Display text of a non-image cell; None when it is binary or too long to be useful."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, str):
        if len(value) >= 32 and all(c in "0123456789abcdefABCDEF" for c in value):
            return value[:HASH_CHARS] + "…"
        return value if len(value) <= MAX_TEXT_CHARS else value[: MAX_TEXT_CHARS - 1] + "…"
    if isinstance(value, dict) and any(isinstance(v, (bytes, bytearray)) for v in value.values()):
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else None


def _row_html(row: dict[str, Any], index: int, view: _DatasetView, anchor: str) -> str:
    figures = []
    for column in view.image_columns:
        cell = row.get(column)
        label = _e(column)
        try:
            if cell is None:
                raise ImageError("empty", "null")
            uri, (width, height) = _thumbnail(cell)
            frame = f'<img src="{uri}" alt="{label} of {_e(row.get("id", index))}">'
            note = f"{width}×{height}"
        except (ImageError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ImageError) else "unreadable"
            frame = f'<div class="noimg" title="{_e(exc)}">{_e(reason)}</div>'
            note = "no image"
        figures.append(f'<figure><div class="frame">{frame}</div>'
                       f'<figcaption><b>{label}</b> <span>{_e(note)}</span></figcaption></figure>')
    texts, chips = [], []
    for column, value in row.items():
        if column == "id" or column in view.image_columns:
            continue
        shown = _format_value(value)
        if shown is None:
            continue
        if len(shown) > SHORT_TEXT_CHARS:
            texts.append(f'<p class="text"><span class="k">{_e(column)}</span> {_e(shown)}</p>')
        else:
            chips.append(f'<div><dt title="{_e(column)}">{_e(column)}</dt><dd>{_e(shown)}</dd></div>')
    row_id = row.get("id")
    images = '<span class="arrow">→</span>'.join(figures)
    return (
        f'<article class="row" id="{anchor}-row-{index}">'
        f'<header><span class="rid">{_e(row_id if row_id is not None else "(no id)")}</span>'
        f'<span class="idx">#{index + 1}</span></header>'
        f'<div class="body{"" if figures else " noimages"}">'
        + (f'<div class="images">{images}</div>' if figures else "")
        + f'<div class="meta">{"".join(texts)}<dl class="metrics">{"".join(chips)}</dl></div>'
        "</div></article>"
    )


def _stats_html(view: _DatasetView) -> str:
    if not view.stats:
        return ""
    body = "".join(
        f"<tr><th>{_e(name)}</th><td>{count}</td><td>{mean:.3f}</td><td>{lo:.3f}</td><td>{hi:.3f}</td></tr>"
        for name, count, mean, lo, hi in view.stats
    )
    return (
        '<h3>Metrics</h3><table class="stats"><thead><tr><th>column</th><th>n</th><th>mean</th>'
        f"<th>min</th><th>max</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _rejects_html(view: _DatasetView) -> str:
    total = view.rejects.num_rows
    if not total:
        return '<h3>Rejects</h3><p class="muted">No rejected rows.</p>'
    shown = view.rejects.slice(0, MAX_REJECTS_SHOWN).to_pylist()
    by_stage: dict[str, int] = {}
    for stage in view.rejects.column("stage").to_pylist() if "stage" in view.rejects.column_names else []:
        by_stage[str(stage)] = by_stage.get(str(stage), 0) + 1
    stages = ", ".join(f"{_e(s)}: {n}" for s, n in sorted(by_stage.items()))
    from pixelmill.flows.summary import reason_counts

    counts = reason_counts(view.rejects.column("error").to_pylist()) if "error" in view.rejects.column_names else {}
    reasons = ", ".join(f"{_e(r)}: {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    body = "".join(
        f'<tr><td class="mono">{_e(r.get("id"))}</td><td>{_e(r.get("stage") or "")}</td>'
        f'<td class="err">{_e(r.get("error") or "")}</td></tr>'
        for r in shown
    )
    more = f'<p class="muted">… and {total - len(shown)} more.</p>' if total > len(shown) else ""
    return (
        f'<h3>Rejects <span class="count">{total}</span></h3>'
        + (f'<p class="muted reasons">By reason: {reasons}</p>' if reasons else "")
        + (f'<p class="muted">By stage: {stages}</p>' if stages else "")
        + f'<table class="rejects"><thead><tr><th>id</th><th>stage</th><th>error</th></tr></thead>'
        f"<tbody>{body}</tbody></table>{more}"
    )


def _section_html(view: _DatasetView, anchor: str, heading: str | None) -> str:
    """One dataset: summary card, rows, rejects."""
    facts = [
        ("schema", f"{view.schema_name} v{view.schema_version}" if view.schema_name else "— (no manifest)"),
        ("rows", f"{view.num_rows:,}"),
        ("shards", f"{view.num_shards:,}"),
        ("rejects", f"{view.rejects.num_rows:,}"),
        ("status", "complete" if view.complete else "incomplete"),
    ]
    if view.config_hash:
        facts.append(("config hash", view.config_hash))
    if view.updated_at is not None:
        facts.append(("updated", view.updated_at.strftime("%Y-%m-%d %H:%M UTC")))
    fact_html = "".join(
        f'<div class="fact{" warn" if value == "incomplete" else ""}"><span>{_e(name)}</span><b>{_e(value)}</b></div>'
        for name, value in facts
    )
    config = ""
    if view.config:
        text = json.dumps(view.config, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        config = f"<details><summary>Config</summary><pre>{_e(text)}</pre></details>"
    rows = view.rows.to_pylist()
    legend = " → ".join(view.image_columns)
    rows_html = "".join(_row_html(row, i, view, anchor) for i, row in enumerate(rows))
    compact = " compact" if len(view.image_columns) <= 1 else ""
    shown = f"first {len(rows):,} of {view.num_rows:,}" if len(rows) < view.num_rows else f"all {len(rows):,}"
    return (
        f'<section class="dataset" id="{_e(anchor)}">'
        + (f"<h2>{_e(heading)}</h2>" if heading else "")
        + f'<div class="summary"><p class="url mono">{_e(view.url)}</p>'
        f'<div class="facts">{fact_html}</div>{config}{_stats_html(view)}</div>'
        f'<h3>Rows <span class="muted">({_e(shown)})</span></h3>'
        + (f'<p class="legend">{_e(legend)}</p>' if legend else "")
        + (f'<div class="rows{compact}">{rows_html}</div>' if rows else '<p class="muted">No rows.</p>')
        + _rejects_html(view)
        + "</section>"
    )


def render_report(
    dataset_url: str,
    out_file: str | None = None,
    limit: int = 200,
    title: str | None = None,
) -> str:
    """Write a self-contained HTML contact sheet of a pixelmill dataset.

    Works on any dataset (or plain folder of Parquet files): image columns are found by
    their ``struct<bytes, path>`` type and shown side by side as embedded thumbnails; all
    other columns are listed per row. The page also shows the manifest facts and config,
    float metric statistics over the whole dataset, and the rejected rows.

    Args:
        dataset_url: the dataset folder (local path or fsspec URL).
        out_file: where to write the HTML; defaults to ``<dataset>/report.html`` for a
            local dataset and is required for any other URL.
        limit: at most this many rows are shown (rejects: up to :data:`MAX_REJECTS_SHOWN`).
        title: the page title; defaults to one naming the dataset folder.

    Returns:
        The path or URL written.

    Raises:
        ValueError: ``out_file`` is missing for a non-local dataset.
        pixelmill.datasets.DatasetNotFound: there is no dataset at ``dataset_url``.
    """
    if out_file is None:
        if not _is_local(dataset_url):
            raise ValueError(f"out_file is required for a non-local dataset ({dataset_url})")
        out_file = storage.join(dataset_url, REPORT_NAME)
    view = _load(dataset_url, limit)
    name = posixpath.basename(str(dataset_url).rstrip("/")) or str(dataset_url)
    page_title = title or f"pixelmill report: {name}"
    _write(out_file, _page(page_title, _section_html(view, "dataset", None)))
    return out_file


def render_multi_report(
    sections: list[tuple[str, str]],
    out_file: str,
    title: str = "pixelmill report",
    limit: int = 200,
) -> str:
    """Write several datasets into one HTML page with a table of contents.

    Useful to compare runs side by side, e.g. SDEdit and InstructPix2Pix outputs of the
    same inputs; each dataset gets the same section :func:`render_report` would draw.

    Args:
        sections: ``(title, dataset_url)`` pairs, in page order.
        out_file: where to write the HTML (local path or fsspec URL).
        title: the page title.
        limit: at most this many rows per dataset.

    Returns:
        The path or URL written.
    """
    views = [(heading, _load(url, limit)) for heading, url in sections]
    toc = "".join(
        f'<li><a href="#ds-{i}">{_e(heading)}</a> <span class="muted">— {view.num_rows:,} rows, '
        f"{view.rejects.num_rows:,} rejects</span></li>"
        for i, (heading, view) in enumerate(views, 1)
    )
    body = f"<nav class=\"toc\"><b>Contents</b><ol>{toc}</ol></nav>" + "".join(
        _section_html(view, f"ds-{i}", heading) for i, (heading, view) in enumerate(views, 1)
    )
    _write(out_file, _page(title, body))
    return out_file
