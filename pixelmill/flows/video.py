"""The video flow: every video of a dataset edited through a layered atlas.

Reading the flow function shows the DAG: plan the videos (skip finished ones, record the
ones known bad) → one Prefect task per video on Ray, claiming the ``placement``'s CPUs and
GPUs (decode, atlas, edit, render, encode, measure: ``tasks/video/job.py``)
→ the metrics table and report. A rejected or failed video is recorded and never stops
the others; a rerun skips finished and rejected videos, retries failed ones and resumes
neural atlas training from its checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pixelmill.config import VideoConfig
from pixelmill.config.placement import GpuChoice
from pixelmill.flows.ray_runner import LazyRayTaskRunner, remote_options
from pixelmill.flows.stage_run import choose_gpus
from pixelmill.flows.summary import FlowSummary, RunFigures, add_counts, gpu_hours, publish, reason_counts
from pixelmill.tasks.video.plan import VideoPlan, plan_videos, write_output_config


@dataclass
class VideoSummary(FlowSummary):
    """What a video run did. Every planned video is in exactly one of ``ran``, ``skipped``,
    ``rejected`` or ``failed``."""

    output: str
    videos: int = 0
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    num_gpus: float = 0.0
    metrics: str | None = None
    report: str | None = None
    seconds: float = 0.0

    def figures(self) -> RunFigures:
        rejected = add_counts(reason_counts(self.rejected.values()), reason_counts(self.failed.values()), "failed: ")
        return RunFigures(flow="video", output=self.output, unit_in="videos", unit_out="videos",
                          rows_in=self.videos - len(self.skipped), rows_out=len(self.ran), rejected=rejected,
                          skipped=len(self.skipped), seconds=self.seconds, gpu_hours=self.gpu_hours,
                          notes=list(self.notes))


@task(name="video-job", cache_policy=NO_CACHE, retries=0)
def video_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Edit one video through its atlas (resuming atlas work where there is some)."""
    from pixelmill.tasks.video.job import run_video_job

    return run_video_job(spec)


@task(name="collect-video-results", cache_policy=NO_CACHE)
def collect_video_results(output: str, specs: list[dict[str, Any]]) -> tuple[str, str]:
    """Write ``metrics.parquet`` and ``report.html`` under the output root."""
    from pixelmill.tasks.video.results import write_video_results

    return write_video_results(output, specs)


@flow(name="video", task_runner=LazyRayTaskRunner(), log_prints=True)
def video_flow(config: dict[str, Any]) -> VideoSummary:
    """Plan → one job per video on Ray → metrics table and report."""
    t0 = time.perf_counter()
    cfg = VideoConfig.model_validate(config)
    plan: VideoPlan = plan_videos(cfg)
    write_output_config(cfg.output, plan.config)
    # GPUs looked up (and Ray connected) only when a video is to be made
    choice = choose_gpus(cfg.placement.gpu_request()) if any(job.runs for job in plan.jobs) else GpuChoice(0.0)
    gpus = choice.gpus
    summary = VideoSummary(output=cfg.output, videos=len(plan.jobs), num_gpus=gpus, gpus=gpus)
    if choice.note and any(job.runs for job in plan.jobs):
        summary.notes.append(choice.note)
    futures = {}
    for job in plan.jobs:
        if job.runs:
            with remote_options(num_cpus=cfg.placement.cpus, num_gpus=gpus):
                futures[job.spec["id"]] = video_job.submit(job.spec)
        elif job.action == "skip":
            summary.skipped.append(job.spec["id"])
        else:
            summary.rejected[job.spec["id"]] = job.reason or "rejected"
    for vid, fut in futures.items():
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001 - one failed video never stops the others
            summary.failed[vid] = f"{type(e).__name__}: {e}"
            continue
        summary.gpu_hours += gpu_hours(gpus, 1, float(result.get("seconds") or 0.0))
        if result.get("status") == "rejected":
            summary.rejected[vid] = result.get("error") or "rejected"
        else:
            summary.ran.append(vid)
    summary.metrics, summary.report = collect_video_results(cfg.output, [j.spec for j in plan.jobs])
    summary.seconds = time.perf_counter() - t0
    summary.rejected_by_reason = summary.figures().rejected
    return publish(summary)
