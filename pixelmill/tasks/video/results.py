"""The video run's metrics table and report, from each video's record.

One row per input video (``metrics.parquet`` under the output root): id, status and
reason, frame count, frame rate, size, atlas method and its reconstruction PSNR, the
temporal consistency of the original and of the edited video, the edit's PSNR to the
original, timings and the paths of what the job wrote. Every input video is a row:
``finished``, ``rejected`` (with the reason) or ``failed`` (with the error).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.tasks.video.job import STATUS_REJECTED, read_record

METRICS_SCHEMA = pa.schema([
    ("id", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("frames", pa.int64()), ("fps", pa.float64()), ("fps_fraction", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()),
    ("atlas_method", pa.string()), ("atlas_psnr", pa.float64()), ("atlas_reused", pa.bool_()),
    ("edit_method", pa.string()), ("edit_layer", pa.string()),
    ("temporal_consistency_original", pa.float64()), ("temporal_consistency_edited", pa.float64()),
    ("edit_psnr", pa.float64()),
    ("seconds", pa.float64()), ("atlas_seconds", pa.float64()), ("edit_seconds", pa.float64()),
    ("edited_video", pa.string()), ("atlas_dir", pa.string()), ("edit_layer_image", pa.string()),
    ("job_dir", pa.string()), ("source", pa.string()),
])


def _source_text(source: dict[str, Any]) -> str:
    if source.get("kind") == "bytes":
        return f"{source.get('column')} bytes in {source.get('shard_url')}"
    return source.get("path") or ""


def record_for(spec: dict[str, Any]) -> dict[str, Any]:
    """The video's record; a video rejected at planning that has none yet gets one written."""
    rec = read_record(spec["dir"])
    if spec.get("reject") and (rec.get("hash") != spec["hash"] or rec.get("status") != STATUS_REJECTED):
        from pixelmill.tasks.video.job import run_video_job

        rec = run_video_job(spec)
    return rec


def result_row(spec: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """The metrics-table row of one video (``not started`` when it has no record)."""
    m = rec.get("metrics") or {}
    files = rec.get("files") or {}
    d = spec["dir"]

    def path(key: str) -> str | None:
        return storage.join(d, files[key]) if files.get(key) else None

    return {
        "id": spec["id"], "status": rec.get("status", "not started"), "error": rec.get("error"),
        "frames": m.get("frames"), "fps": m.get("fps"), "fps_fraction": m.get("fps_fraction"),
        "width": m.get("width"), "height": m.get("height"),
        "atlas_method": m.get("atlas_method") or spec["atlas"]["method"], "atlas_psnr": m.get("atlas_psnr"),
        "atlas_reused": m.get("atlas_reused"), "edit_method": spec["edit"]["method"],
        "edit_layer": spec["edit"]["layer"],
        "temporal_consistency_original": m.get("temporal_consistency_original"),
        "temporal_consistency_edited": m.get("temporal_consistency_edited"), "edit_psnr": m.get("edit_psnr"),
        "seconds": rec.get("seconds"), "atlas_seconds": m.get("atlas_seconds"), "edit_seconds": m.get("edit_seconds"),
        "edited_video": path("edited_video"), "atlas_dir": path("atlas"), "edit_layer_image": path("edit_layer"),
        "job_dir": d, "source": _source_text(spec["source"]),
    }


def write_video_results(output: str, specs: list[dict[str, Any]]) -> tuple[str, str]:
    """Write ``metrics.parquet`` and ``report.html`` under ``output``; returns their paths."""
    from pixelmill.datasets.writer import write_parquet_file
    from pixelmill.report import render_video_report

    records = [record_for(s) for s in specs]
    rows = [result_row(s, r) for s, r in zip(specs, records)]
    table_url = storage.join(output, "metrics.parquet")
    write_parquet_file(table_url, pa.Table.from_pylist(rows, schema=METRICS_SCHEMA))
    videos = []
    for spec, rec, row in zip(specs, records, rows):
        prefix = str(output).rstrip("/") + "/"
        rel = spec["dir"][len(prefix):] if spec["dir"].startswith(prefix) else spec["dir"]
        videos.append({"row": row, "record": rec, "rel_dir": rel})
    report_url = storage.join(output, "report.html")
    render_video_report(report_url, videos)
    return table_url, report_url
