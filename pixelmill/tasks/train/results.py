"""The campaign results table and report, from each job's record on storage.

One row per job (``results.parquet`` under the campaign output): job id and name,
method, concepts, state, steps, wall time, peak memory, the CLIP metrics, the artifact
paths and the weight-affecting settings (as JSON), the prior-preservation class images
used and asked for, and the job's warnings (a short prior), so every job of every run
compares in one table (pandas, DuckDB, ``datasets``).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.tasks.train.checkpoint import JobStore

RESULTS_SCHEMA = pa.schema([
    ("job", pa.string()), ("name", pa.string()), ("method", pa.string()), ("concepts", pa.list_(pa.string())),
    ("status", pa.string()), ("step", pa.int64()), ("max_steps", pa.int64()), ("seconds", pa.float64()),
    ("steps_per_second", pa.float64()), ("peak_memory_mb", pa.float64()), ("memory_kind", pa.string()),
    ("clip_text_alignment", pa.float64()), ("clip_image_alignment", pa.float64()), ("final_loss", pa.float64()),
    ("artifacts", pa.list_(pa.string())), ("job_dir", pa.string()), ("settings", pa.string()),
    ("error", pa.string()), ("attempts", pa.int64()),
    ("class_images", pa.int64()), ("class_images_wanted", pa.int64()), ("warnings", pa.list_(pa.string())),
])


def _job_files(spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    store = JobStore(spec["dir"])
    return store.record() or {}, store.read_log()


def _settings(spec: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """The job's settings, with the GPUs it last ran with (its record: ``auto`` resolved) where it has run."""
    ran = (rec.get("settings") or {}).get("num_gpus")
    return {**spec["settings"], "num_gpus": ran} if ran is not None else spec["settings"]


def result_row(spec: dict[str, Any], files: tuple[dict, list] | None = None) -> dict[str, Any]:
    """The results-table row of one job (``not started`` when it has no record yet).

    Args:
        files: the job's record and loss log when the caller has read them already.
    """
    rec, log = files or _job_files(spec)
    metrics = rec.get("metrics") or {}
    artifacts = [storage.join(spec["dir"], "artifacts", a) for a in (rec.get("artifacts") or [])]
    peak = rec.get("peak_memory_bytes")
    prior = rec.get("prior") or []
    return {
        "job": spec["id"], "name": spec["name"], "method": spec["method"],
        "concepts": [c["name"] for c in spec["concepts"]], "status": rec.get("status", "not started"),
        "step": rec.get("step", 0), "max_steps": spec["settings"]["max_steps"], "seconds": rec.get("seconds"),
        "steps_per_second": rec.get("steps_per_second"), "peak_memory_mb": peak / 2**20 if peak else None,
        "memory_kind": rec.get("memory_kind"), "clip_text_alignment": metrics.get("clip_text_alignment"),
        "clip_image_alignment": metrics.get("clip_image_alignment"),
        "final_loss": log[-1]["loss"] if log else None, "artifacts": artifacts, "job_dir": spec["dir"],
        "settings": json.dumps(_settings(spec, rec), sort_keys=True), "error": rec.get("error"),
        "attempts": len(rec.get("attempts", [])),
        # prior preservation: class images used and asked for (summed over concepts; None without a prior)
        "class_images": sum(p["used"] for p in prior) if prior else None,
        "class_images_wanted": sum(p["wanted"] for p in prior) if prior else None,
        "warnings": list(rec.get("warnings") or []),
    }


def concept_images(specs: list[dict[str, Any]], per_concept: int = 6) -> dict[str, list[dict[str, Any]]]:
    """A few instance images per concept (image cells), for the report's reference row."""
    from pixelmill.datasets import Dataset

    out: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        for c in spec["concepts"]:
            if c["name"] in out:
                continue
            column = spec["settings"]["edited_column"] if spec["method"] == "instruct_pix2pix" \
                else c.get("image_column", "image")
            try:
                ds = Dataset.open(c["instance_data"])
                first = ds.shard_names()[0]
                out[c["name"]] = ds.read_shard(first, columns=[column]).column(column).to_pylist()[:per_concept]
            except (FileNotFoundError, IndexError, KeyError, ValueError):
                out[c["name"]] = []
    return out


def write_results(output: str, specs: list[dict[str, Any]]) -> tuple[str, str]:
    """Write ``results.parquet`` and ``report.html``; returns their URLs."""
    from pixelmill.datasets.writer import write_parquet_file
    from pixelmill.report import render_campaign_report

    files = [_job_files(s) for s in specs]
    rows = [result_row(s, f) for s, f in zip(specs, files)]
    table_url = storage.join(output, "results.parquet")
    write_parquet_file(table_url, pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
    # the base model's family (sd1, sd2, sdxl) is in the report, not the table (whose columns the golden pins)
    jobs = [{"row": row, "log": log, "samples": rec.get("samples") or [], "rel_dir": f"jobs/{spec['id']}",
             "family": spec.get("family")} for spec, row, (rec, log) in zip(specs, rows, files)]
    report_url = storage.join(output, "report.html")
    render_campaign_report(report_url, jobs, concepts=concept_images(specs))
    return table_url, report_url
