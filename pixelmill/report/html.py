"""The page shell every pixelmill report shares: escaping, the inline CSS, the page, writing it.

Reports are single self-contained ``.html`` files (inline CSS, images embedded or
linked relatively), written through :mod:`pixelmill.datasets.storage` so any fsspec
URL works.
"""

from __future__ import annotations

import html
import posixpath
from datetime import UTC, datetime
from typing import Any

from pixelmill.datasets import storage


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


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
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
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
