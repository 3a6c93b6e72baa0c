"""The video run's report: the metrics table, then per video its frame strips, atlases and player."""

from __future__ import annotations

from typing import Any

from pixelmill.report.html import _e, _fmt, _page, _write

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
