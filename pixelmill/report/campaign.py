"""The fine-tuning campaign report: results table, concept reference images, loss curves, samples."""

from __future__ import annotations

import json
from typing import Any

from pixelmill.report.dataset import _thumbnail
from pixelmill.report.html import _e, _fmt, _page, _write


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
            (index entries with ``file``, ``prompt``, CLIP scores), ``rel_dir`` and optionally
            ``family`` (the base model's: sd1, sd2, sdxl).
        concepts: a few instance images (image cells) per concept, shown as the reference.
    """
    head = ("<tr><th>job</th><th>method (family)</th><th>concepts</th><th>varies</th><th>status</th><th>steps</th>"
            "<th>time (s)</th><th>peak MB</th><th>CLIP text</th><th>CLIP image</th><th>final loss</th></tr>")
    settings = [json.loads(j["row"]["settings"]) for j in jobs]
    keys = sorted(k for k in (settings[0] if settings else {})
                  if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)
    body_rows = []
    for j, st in zip(jobs, settings):
        r = j["row"]
        varies = ", ".join(f"{k}={st.get(k)}" for k in keys) or "—"
        family = f'<br><span class="muted">{_e(j["family"])}</span>' if j.get("family") else ""
        status = r["status"] if not r.get("error") else f'{r["status"]}: {r["error"]}'
        warns = "".join(f'<div class="warning" style="color:var(--warn)"><b>⚠ {_e(w)}</b></div>'
                        for w in r.get("warnings") or [])
        body_rows.append(
            f'<tr><td><a href="#job-{_e(r["job"])}">{_e(r["name"])}</a><br><span class="mono muted">{_e(r["job"])}'
            f'</span></td><td>{_e(r["method"])}{family}</td><td>{_e(", ".join(r["concepts"]))}</td>'
            f'<td class="mono">{_e(varies)}</td><td>{_e(status)}{warns}</td><td>{r["step"]}/{r["max_steps"]}</td>'
            f'<td>{_fmt(r["seconds"], 1)}</td>'
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
        warns = "".join(f'<p class="warning" style="color:var(--warn)"><b>⚠ {_e(w)}</b></p>'
                        for w in r.get("warnings") or [])
        sections.append(
            f'<section class="dataset" id="job-{_e(r["job"])}"><h2>{_e(r["name"])} '
            f'<span class="muted">{_e(r["method"])} · {_e(r["job"])}</span></h2>{warns}'
            f'<div class="summary"><div class="body"><div>{_loss_svg(j["log"])}</div>'
            f'<div class="meta"><span class="k">artifacts</span><ul>{arts}</ul>'
            f'<details><summary>settings</summary><pre>{_e(json.dumps(json.loads(r["settings"]), indent=2))}'
            f'</pre></details></div></div></div><h3>Samples</h3>{samples}</section>')
    body = (f'<h2>Results <span class="muted">({len(jobs)} jobs)</span></h2>'
            f'<table class="results"><thead>{head}</thead><tbody>{"".join(body_rows)}</tbody></table>'
            + _concepts_html(concepts or {}) + "".join(sections))
    _write(out_file, _page("pixelmill fine-tuning campaign", body))
    return out_file
