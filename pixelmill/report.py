"""Self-contained HTML contact sheets of pixelmill datasets.

A report shows what a dataset actually holds: its manifest (schema, config, shard and
reject counts), summary statistics of its float metrics, the first rows with every image
column as a thumbnail side by side and the other columns as a compact list, and the
rejected rows with their reasons. Thumbnails are embedded as base64 data URIs and the CSS
is inline, so the single ``.html`` file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from pixelmill.datasets import Dataset, ImageError, normalize_image, storage

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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
    body = "".join(
        f'<tr><td class="mono">{_e(r.get("id"))}</td><td>{_e(r.get("stage") or "")}</td>'
        f'<td class="err">{_e(r.get("error") or "")}</td></tr>'
        for r in shown
    )
    more = f'<p class="muted">… and {total - len(shown)} more.</p>' if total > len(shown) else ""
    return (
        f'<h3>Rejects <span class="count">{total}</span></h3>'
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


_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa;
  --card: #fff; --accent: #0969da; --bad: #cf222e; --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 24px 0 8px; }
.mono, pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
  font-size: 12px; }
.muted { color: var(--muted); font-weight: normal; }
.generated { color: var(--muted); margin: 0 0 16px; font-size: 12px; }
nav.toc { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
nav.toc ol { margin: 4px 0 0; padding-left: 20px; }
nav.toc a { color: var(--accent); text-decoration: none; font-weight: 600; }
.summary { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.url { margin: 0 0 10px; word-break: break-all; color: var(--muted); }
.facts { display: flex; flex-wrap: wrap; gap: 8px; }
.fact { background: var(--bg); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.fact span { display: block; font-size: 11px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
.fact b { font-size: 15px; overflow-wrap: anywhere; }
.fact.warn b { color: var(--warn); }
details { margin-top: 12px; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
details pre { background: var(--bg); border-radius: 6px; padding: 10px; overflow: auto; max-height: 420px;
  margin: 8px 0 0; }
table { border-collapse: collapse; background: var(--card); font-size: 13px; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { color: var(--muted); font-weight: 600; font-size: 12px; }
table.stats td { text-align: right; font-variant-numeric: tabular-nums; }
table.rejects { width: 100%; border: 1px solid var(--line); border-radius: 8px; }
td.err { color: var(--bad); font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; word-break: break-word; }
.count { background: var(--bad); color: #fff; border-radius: 10px; padding: 0 8px; font-size: 12px; }
.legend { margin: 0 0 10px; font-weight: 600; color: var(--muted); }
.rows { display: grid; gap: 12px; }
.rows.compact { grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }
.row { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.row header { display: flex; justify-content: space-between; gap: 8px; margin-bottom: 8px; }
.rid { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 600;
  word-break: break-all; }
.idx { color: var(--muted); font-size: 12px; }
.body { display: grid; grid-template-columns: auto minmax(0, 1fr); gap: 16px; align-items: start; }
.body.noimages { grid-template-columns: minmax(0, 1fr); }
.images { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
.arrow { color: var(--muted); font-size: 18px; }
figure { margin: 0; }
.frame { width: 192px; height: 192px; display: flex; align-items: center; justify-content: center;
  border: 1px solid var(--line); border-radius: 4px; overflow: hidden;
  background: repeating-conic-gradient(#eef0f3 0% 25%, #fff 0% 50%) 50% / 16px 16px; }
.frame img { width: 100%; height: 100%; object-fit: contain; display: block; }
.noimg { color: var(--bad); font-weight: 600; font-size: 13px; padding: 8px; text-align: center; }
figcaption { font-size: 12px; margin-top: 2px; display: flex; justify-content: space-between; gap: 6px; }
figcaption span { color: var(--muted); }
.meta { min-width: 0; }
.text { margin: 0 0 6px; word-break: break-word; }
.k, dt { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.k { margin-right: 6px; }
dt { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
dl.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 4px 12px; margin: 0; }
dl.metrics div { min-width: 0; }
dd { margin: 0; font-variant-numeric: tabular-nums; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
@media (max-width: 760px) { .body { grid-template-columns: minmax(0, 1fr); } }
"""


def _page(title: str, body: str) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="generated">generated by pixelmill on {_e(generated)}</p>'
        f"{body}</main></body></html>\n"
    )


def _write(out_file: str, text: str) -> None:
    fs, path = storage.resolve(out_file)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(text.encode("utf-8"))


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


def _loss_svg(log: list[dict[str, Any]], width: int = 360, height: int = 120) -> str:
    """An inline SVG of the loss per step (raw, faint) and its running mean (bold)."""
    pts = [(r["step"], r["loss"]) for r in log if r.get("loss") is not None]
    if len(pts) < 2:
        return '<p class="muted">no loss curve yet</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_y = (y1 - y0) or 1.0
    pad = 28

    def xy(x: float, y: float) -> str:
        return (f"{pad + (x - x0) / max(1, x1 - x0) * (width - pad - 6):.1f},"
                f"{6 + (1 - (y - y0) / span_y) * (height - 24):.1f}")

    k = max(1, len(ys) // 10)
    smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    raw = " ".join(xy(x, y) for x, y in pts)
    avg = " ".join(xy(x, y) for x, y in zip(xs, smooth))
    return (f'<svg class="loss" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="training loss"><rect x="0" y="0" width="{width}" height="{height}" '
            f'fill="#fff"/><polyline points="{raw}" fill="none" stroke="#9ec5fe" stroke-width="1"/>'
            f'<polyline points="{avg}" fill="none" stroke="#0969da" stroke-width="2"/>'
            f'<text x="2" y="12" font-size="10" fill="#656d76">{y1:.3g}</text>'
            f'<text x="2" y="{height - 12}" font-size="10" fill="#656d76">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 2}" font-size="10" fill="#656d76">step {x0}</text>'
            f'<text x="{width - 60}" y="{height - 2}" font-size="10" fill="#656d76">step {x1}</text></svg>')


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _concepts_html(concepts: dict[str, list[dict[str, Any]]]) -> str:
    """One row of instance-image thumbnails per concept: what the samples should look like."""
    rows = []
    for name, cells in concepts.items():
        figs = []
        for cell in cells:
            try:
                uri, _ = _thumbnail(cell)
            except Exception:  # noqa: BLE001 - an unreadable reference image is just not shown
                continue
            figs.append(f'<figure><div class="frame"><img src="{uri}" alt="{_e(name)}"></div></figure>')
        rows.append(f'<h3>{_e(name)} <span class="muted">({len(figs)} of its instance images)</span></h3>'
                    f'<div class="images">{"".join(figs) or "<p class=muted>no readable images</p>"}</div>')
    return "<h2>Concepts</h2>" + "".join(rows) if rows else ""


def render_campaign_report(out_file: str, jobs: list[dict[str, Any]],
                           concepts: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """Write a fine-tuning campaign's report: the results table, then per job its loss curve and samples.

    Args:
        out_file: where the HTML goes (the campaign output root, so sample links are relative).
        jobs: per job ``row`` (a results-table row), ``log`` (loss entries), ``samples``
            (index entries with ``file``, ``prompt``, CLIP scores) and ``rel_dir``.
        concepts: a few instance images (image cells) per concept, shown as the reference.
    """
    head = ("<tr><th>job</th><th>method</th><th>concepts</th><th>varies</th><th>status</th><th>steps</th>"
            "<th>time (s)</th><th>peak MB</th><th>CLIP text</th><th>CLIP image</th><th>final loss</th></tr>")
    settings = [json.loads(j["row"]["settings"]) for j in jobs]
    keys = sorted(k for k in (settings[0] if settings else {})
                  if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)
    body_rows = []
    for j, st in zip(jobs, settings):
        r = j["row"]
        varies = ", ".join(f"{k}={st.get(k)}" for k in keys) or "—"
        status = r["status"] if not r.get("error") else f'{r["status"]}: {r["error"]}'
        body_rows.append(
            f'<tr><td><a href="#job-{_e(r["job"])}">{_e(r["name"])}</a><br><span class="mono muted">{_e(r["job"])}'
            f'</span></td><td>{_e(r["method"])}</td><td>{_e(", ".join(r["concepts"]))}</td>'
            f'<td class="mono">{_e(varies)}</td><td>{_e(status)}</td><td>{r["step"]}/{r["max_steps"]}</td><td>{_fmt(r["seconds"], 1)}</td>'
            f'<td>{_fmt(r["peak_memory_mb"], 0)}</td><td>{_fmt(r["clip_text_alignment"])}</td>'
            f'<td>{_fmt(r["clip_image_alignment"])}</td><td>{_fmt(r["final_loss"], 4)}</td></tr>')
    sections = []
    for j in jobs:
        r = j["row"]
        figs = []
        for s in j["samples"]:
            caption = f'{s.get("prompt", "")}'
            score = s.get("clip_text_alignment")
            figs.append(
                f'<figure><div class="frame"><img src="{_e(j["rel_dir"] + "/" + s["file"])}" alt="{_e(caption)}">'
                f'</div><figcaption>{_e(caption)}<span>{_fmt(score, 2) if score is not None else ""}</span>'
                f'</figcaption></figure>')
        samples = (f'<div class="images">{"".join(figs)}</div>' if figs
                   else '<p class="muted">no samples yet (the job has not finished)</p>')
        arts = "".join(f"<li class=\"mono\">{_e(a)}</li>" for a in r["artifacts"]) or "<li class='muted'>none</li>"
        sections.append(
            f'<section class="dataset" id="job-{_e(r["job"])}"><h2>{_e(r["name"])} '
            f'<span class="muted">{_e(r["method"])} · {_e(r["job"])}</span></h2>'
            f'<div class="summary"><div class="body"><div>{_loss_svg(j["log"])}</div>'
            f'<div class="meta"><span class="k">artifacts</span><ul>{arts}</ul>'
            f'<details><summary>settings</summary><pre>{_e(json.dumps(json.loads(r["settings"]), indent=2))}'
            f'</pre></details></div></div></div><h3>Samples</h3>{samples}</section>')
    body = (f'<h2>Results <span class="muted">({len(jobs)} jobs)</span></h2>'
            f'<table class="results"><thead>{head}</thead><tbody>{"".join(body_rows)}</tbody></table>'
            + _concepts_html(concepts or {}) + "".join(sections))
    _write(out_file, _page("pixelmill fine-tuning campaign", body))
    return out_file


_VIDEO_CSS = """
table.videos { width: 100%; border: 1px solid var(--line); }
table.videos td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.status { border-radius: 10px; padding: 1px 8px; font-size: 12px; font-weight: 600; white-space: nowrap; }
.status.finished { background: #dafbe1; color: #1a7f37; }
.status.rejected, .status.failed { background: #ffebe9; color: var(--bad); }
.status.other { background: var(--bg); color: var(--muted); }
.strip { display: grid; gap: 6px; align-items: center; margin: 8px 0 4px; }
.strip .lab { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
  text-align: right; padding-right: 4px; }
.strip .col { font-size: 11px; color: var(--muted); text-align: center; }
.strip img { width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 3px; }
.strip img.px, .atlases img.px { image-rendering: pixelated; }
.atlases { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0; align-items: flex-start; }
.atlases figure { width: 260px; }
.atlases .frame { width: 260px; height: 200px; }
.atlases .frame img { width: 100%; height: 100%; object-fit: contain; }
.videometa dl.metrics { grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); }
video { display: block; margin: 8px 0; background: #000; border-radius: 4px; }
"""


def _video_section(v: dict[str, Any]) -> str:
    row, rec, rel = v["row"], v["record"], v["rel_dir"].rstrip("/")
    files = rec.get("files") or {}
    m = rec.get("metrics") or {}
    anchor = f"video-{_e(row['id'])}"
    facts = (f'{_e(row["atlas_method"])} atlas · {row["frames"]} frames · {row["width"]}×{row["height"]} '
             f'@ {_fmt(row["fps"], 2)} fps' if row["frames"] else _e(row["status"]))
    head = f'<section class="dataset" id="{anchor}"><h2>{_e(row["id"])} <span class="muted">{facts}</span></h2>'
    if row["status"] != "finished":
        return (head + f'<div class="summary"><p class="err">{_e(row["status"])}: {_e(row["error"] or "")}</p>'
                f'<p class="url mono">{_e(row["source"])}</p></div></section>')
    small = " px" if (row["width"] or 0) < 200 else ""
    frames = files.get("frames") or []
    cols = len(frames)
    cells = ['<div></div>'] + [f'<div class="col">frame {f["index"]}</div>' for f in frames]
    for kind, label in (("original", "original"), ("atlas", "atlas (unedited)"), ("edited", "edited")):
        cells.append(f'<div class="lab">{label}</div>')
        cells += [f'<img class="{small.strip()}" src="{_e(rel + "/" + f[kind])}" alt="{label} frame {f["index"]}">'
                  for f in frames]
    side = max(160, min(280, 4 * (row["width"] or 64)))
    strip = (f'<div class="strip" style="grid-template-columns: 110px repeat({cols}, minmax(0, {side}px))">'
             + "".join(cells) + "</div>")
    figs = []
    names = m.get("atlas_layers") or []
    for i, path in enumerate(files.get("atlas_layers") or []):
        name = names[i] if i < len(names) else f"layer {i}"
        figs.append((f"atlas: {name}", path, ""))
    figs += [("edit layer (RGBA)", files.get("edit_layer"), ""), (f"edited {m.get('edit_layer', '')} atlas",
                                                                  files.get("edited_atlas"), "")]
    atlas_html = "".join(
        f'<figure><div class="frame"><img class="{small.strip()}" src="{_e(rel + "/" + p)}" alt="{_e(c)}"></div>'
        f'<figcaption><b>{_e(c)}</b></figcaption></figure>' for c, p, _ in figs if p)
    edit = m.get("edit") or {}
    chips = [("atlas PSNR", f'{_fmt(row["atlas_psnr"], 2)} dB'),
             ("temporal consistency (orig.)", _fmt(row["temporal_consistency_original"], 4)),
             ("temporal consistency (edited)", _fmt(row["temporal_consistency_edited"], 4)),
             ("edit PSNR vs original", f'{_fmt(row["edit_psnr"], 2)} dB' if row["edit_psnr"] is not None else "∞"),
             ("edit", f'{row["edit_method"]} on {row["edit_layer"]}'),
             ("atlas", "reused" if row["atlas_reused"] else f'built in {_fmt(row["atlas_seconds"], 1)} s'),
             ("job time", f'{_fmt(row["seconds"], 1)} s'), ("codec", m.get("codec"))]
    for key in ("strength", "l2", "clip_image_text", "alpha_mean"):
        if edit.get(key) is not None:
            chips.append((f"edit {key}", _fmt(edit[key])))
    chip_html = "".join(f'<div><dt title="{_e(k)}">{_e(k)}</dt><dd>{_e(val)}</dd></div>' for k, val in chips)
    video = files.get("edited_video")
    player = ""
    if video:
        if m.get("codec") == "libx264":
            player = (f'<video src="{_e(rel + "/" + video)}" controls loop muted playsinline '
                      f'width="{min(480, max(240, (row["width"] or 0) * 3))}"></video>')
        player += f'<p><a href="{_e(rel + "/" + video)}">{_e(rel + "/" + video)}</a></p>'
    return (head + f'<div class="summary videometa"><p class="url mono">{_e(row["source"])}</p>'
            f'<dl class="metrics">{chip_html}</dl></div>'
            f'<h3>Frames <span class="muted">(original · re-rendered from the unedited atlas · edited)</span></h3>'
            f'{strip}<h3>Atlas and edit</h3><div class="atlases">{atlas_html}</div>{player}</section>')


def render_video_report(out_file: str, videos: list[dict[str, Any]], title: str = "pixelmill video edits") -> str:
    """Write the video run's report: the metrics table, then per video its frames and atlases.

    Images are relative links into each video's folder (``frames/``, ``atlas/``,
    ``edit_layer.png``, ``edited_atlas.png``), so the page stays small and opens next to
    the outputs; a video encoded with H.264 gets an inline player.

    Args:
        out_file: where the HTML goes (the run's output root, so the links are relative).
        videos: per video ``row`` (a metrics-table row), ``record`` (its ``job.json``) and
            ``rel_dir`` (its folder relative to ``out_file``'s folder).
    """
    head = ("<tr><th>video</th><th>status</th><th>frames</th><th>fps</th><th>size</th><th>atlas</th>"
            "<th>atlas PSNR</th><th>temporal consistency<br>original → edited</th><th>edit PSNR</th>"
            "<th>time (s)</th><th>reason</th></tr>")
    body_rows = []
    for v in videos:
        r = v["row"]
        kind = r["status"] if r["status"] in ("finished", "rejected", "failed") else "other"
        tc = (f'{_fmt(r["temporal_consistency_original"], 4)} → {_fmt(r["temporal_consistency_edited"], 4)}'
              if r["temporal_consistency_original"] is not None else "—")
        size = f'{r["width"]}×{r["height"]}' if r["width"] else "—"
        body_rows.append(
            f'<tr><td><a href="#video-{_e(r["id"])}">{_e(r["id"])}</a></td>'
            f'<td><span class="status {kind}">{_e(r["status"])}</span></td>'
            f'<td class="num">{_fmt(r["frames"])}</td><td class="num">{_fmt(r["fps"], 2)}</td>'
            f'<td class="num">{size}</td><td>{_e(r["atlas_method"])}</td>'
            f'<td class="num">{_fmt(r["atlas_psnr"], 2)}</td><td class="num">{tc}</td>'
            f'<td class="num">{_fmt(r["edit_psnr"], 2)}</td><td class="num">{_fmt(r["seconds"], 1)}</td>'
            f'<td class="err">{_e(r["error"] or "")}</td></tr>')
    counts = {s: sum(v["row"]["status"] == s for v in videos) for s in ("finished", "rejected", "failed")}
    summary = (f'<p class="muted">{len(videos)} video(s): {counts["finished"]} edited, {counts["rejected"]} '
               f'rejected, {counts["failed"]} failed. Temporal consistency: mean absolute difference between '
               "consecutive frames warped by the original's optical flow (lower is steadier). Atlas PSNR: the "
               "unedited atlas re-rendered vs the decoded frames.</p>")
    body = (f"<style>{_VIDEO_CSS}</style>"
            f'<h2>Videos <span class="muted">({len(videos)})</span></h2>{summary}'
            f'<table class="videos"><thead>{head}</thead><tbody>{"".join(body_rows)}</tbody></table>'
            + "".join(_video_section(v) for v in videos))
    _write(out_file, _page(title, body))
    return out_file
