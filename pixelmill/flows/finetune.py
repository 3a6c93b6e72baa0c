"""The fine-tuning campaign flow.

Reading the flow function shows the DAG: plan the jobs (skip finished ones) → run the
campaign's retrieval when it has one (its datasets are reused when complete) →
generate missing class images (one Ray Data stage per class prompt) → build shared
latent / text-embedding caches (one task per cache, reused by every job that shares
it) → one Prefect task per job on Ray with the job's GPUs (a multi-worker job drives a
Ray Train ``TorchTrainer`` from a task that claims nothing) → the results table and
report. A failed job is recorded and does not stop the others; a rerun retries it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pixelmill.config import CampaignConfig
from pixelmill.config.campaign import job_gpu_request
from pixelmill.flows.ray_runner import LazyRayTaskRunner, remote_options
from pixelmill.flows.stage_run import choose_gpus, run_stage
from pixelmill.flows.summary import FlowSummary, RunFigures, add_counts, gpu_hours, publish, reason_counts
from pixelmill.tasks.train.plan import CampaignPlan, ClassImageRequest, plan_campaign


@dataclass
class CampaignSummary(FlowSummary):
    """What a campaign run did (``nodes``: Ray node id → workers of this run's jobs that trained there)."""

    output: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    class_images: int = 0
    results: str | None = None
    report: str | None = None
    seconds: float = 0.0

    def figures(self) -> RunFigures:
        return RunFigures(flow="finetune", output=self.output, unit_in="jobs", unit_out="jobs",
                          rows_in=len(self.ran) + len(self.failed), rows_out=len(self.ran),
                          rejected=dict(self.rejected_by_reason), skipped=len(self.skipped), seconds=self.seconds,
                          gpu_hours=self.gpu_hours, notes=list(self.notes))


def generate_class_images(request: ClassImageRequest, num_gpus: float, stall: float | None = None) -> int:
    """Generate one request's missing class images into its dataset (a stage run, resumable per shard).

    ``stall``: the campaign's ``timeouts.stall``, here seconds without a generated image in
    a call; a shard whose 2 calls both timed out has its prompts rejected saying so.
    """
    from pixelmill.config.base import StageTimeouts
    from pixelmill.datasets import storage
    from pixelmill.datasets.writer import write_table_dataset
    from pixelmill.tasks.stage import Resources
    from pixelmill.tasks.train.class_images import ClassImageGenerator, prompt_rows

    prompts = storage.join(request.url.rsplit("/", 1)[0], "prompts")
    table = prompt_rows(request.prompt, request.first_index, request.count, request.seed)
    write_table_dataset(prompts, table, "class-prompts", {"key": request.key}, rows_per_shard=8)
    r = run_stage(ClassImageGenerator, {"model": request.model, "resolution": request.resolution},
                  Resources(cpus=1, gpus=num_gpus), input=prompts, output=request.url, hashed={"key": request.key},
                  task_name="generate-class-images", timeouts=StageTimeouts(stall=stall, setup=None).model_dump())
    return r.plan.rows_todo


@task(name="build-cache", cache_policy=NO_CACHE)
def build_cache(spec: dict[str, Any]) -> list[str]:
    """Compute a job's latent / text-embedding caches once; jobs sharing the key reuse them."""
    from pixelmill.tasks.train.job import write_caches

    return write_caches(spec)


@task(name="train-job", cache_policy=NO_CACHE, retries=0)
def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, save and evaluate one job (resuming from its last checkpoint)."""
    from pixelmill.tasks.train.job import run_job

    return run_job(spec)


@task(name="collect-results", cache_policy=NO_CACHE)
def collect_results(config: dict[str, Any], specs: list[dict[str, Any]]) -> tuple[str, str]:
    """Write ``results.parquet`` and ``report.html`` under the campaign output."""
    from pixelmill.tasks.train.results import write_results

    return write_results(config["output"], specs)


def _job_resources(spec: dict[str, Any]) -> dict[str, float]:
    s = spec["settings"]
    if s["num_workers"] > 1:
        return {"num_cpus": 0, "num_gpus": 0}  # the TorchTrainer's workers claim the resources
    return {"num_cpus": s["cpus_per_worker"], "num_gpus": s["num_gpus"]}


@flow(name="finetune", task_runner=LazyRayTaskRunner(), log_prints=True)
def finetune_flow(config: dict[str, Any]) -> CampaignSummary:
    """Plan → retrieval → class images → caches → jobs → results and report."""
    t0 = time.perf_counter()
    cfg = CampaignConfig.model_validate(config)
    summary = CampaignSummary(output=cfg.output)
    plan: CampaignPlan = plan_campaign(cfg)
    if plan.retrieve is not None:
        from pixelmill.flows.retrieve import retrieve_flow

        retrieve_flow(plan.retrieve)
    todo = [j for j in plan.jobs if j.action != "skip"]
    summary.skipped = [j.spec["name"] for j in plan.jobs if j.action == "skip"]
    if todo:
        todo = [_placed(j, summary) for j in todo]
        gpus = max((j.spec["settings"]["num_gpus"] for j in todo), default=0)
        summary.gpus = gpus
        for request in plan.class_images:
            summary.class_images += generate_class_images(request, min(gpus, 1.0), cfg.timeouts.stall)
        caches: dict[tuple, dict[str, Any]] = {}
        for j in todo:
            c = j.spec["cache"]
            if c["latents"] or c["text"]:
                caches.setdefault((c["latents"], c["text"]), j.spec)
        for spec in caches.values():
            with remote_options(**_job_resources(spec)):
                build_cache.submit(spec).result()
        futures, specs = {}, {j.spec["name"]: j.spec for j in todo}
        for j in todo:
            with remote_options(**_job_resources(j.spec)):
                futures[j.spec["name"]] = train_job.submit(j.spec)
        for name, fut in futures.items():
            try:
                record = fut.result()
                summary.ran.append(name)
                _account(summary, record)
                if record.get("warnings"):
                    summary.warnings[name] = list(record["warnings"])
                    for w in record["warnings"]:
                        print(f"WARNING job {name}: {w}")
            except Exception as e:  # noqa: BLE001 - one failed job never stops the campaign
                summary.failed[name] = _failure(specs[name], e)
    summary.results, summary.report = collect_results(config, [j.spec for j in plan.jobs])
    summary.seconds = time.perf_counter() - t0
    summary.rejected_by_reason = add_counts({}, reason_counts(summary.failed.values()), "failed: ")
    return publish(summary)


def _failure(spec: dict[str, Any], exc: Exception) -> str:
    """Why a job failed: what it recorded itself (a timeout ends its worker, so the exception here
    only says the worker died), else the exception."""
    from pixelmill.tasks.train.checkpoint import JobStore

    try:
        rec = JobStore(spec["dir"]).record() or {}
    except Exception:  # noqa: BLE001 - the exception is the reason then
        rec = {}
    if rec.get("status") == "failed" and rec.get("error"):
        return str(rec["error"])
    return f"{type(exc).__name__}: {exc}"


def _placed(job, summary: CampaignSummary):
    """``job`` with its ``num_gpus`` resolved on the connected cluster (``auto`` → a number; notes kept)."""
    from dataclasses import replace

    s = job.spec["settings"]
    choice = choose_gpus(job_gpu_request(job.spec["name"], s["num_gpus"], s["num_workers"]))
    if choice.note and choice.note not in summary.notes:
        summary.notes.append(choice.note)
    return replace(job, spec={**job.spec, "settings": {**s, "num_gpus": choice.total}})


def _account(summary: CampaignSummary, record: dict[str, Any]) -> None:
    """Add a finished job's GPU-hours and nodes (its last attempt's) to the summary."""
    last = (record.get("attempts") or [{}])[-1]
    summary.gpu_hours += gpu_hours(float(last.get("num_gpus") or 0), 1, float(last.get("seconds") or 0))
    for node in last.get("nodes") or []:
        if node:
            summary.nodes[node] = summary.nodes.get(node, 0) + 1
