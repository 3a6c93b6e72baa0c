"""The regularization-retrieval flow: exactly N real images per class prompt from a pool.

The DAG: scan the pool once for every prompt not yet scanned (one Prefect task on a Ray
worker that fans the exact scan out over Ray tasks, or queries a faiss index) → one
download task per prompt not yet downloaded → commit → export the folder layout diffusers'
Custom Diffusion trainer reads with ``--real_prior``. Each stage's dataset is reused when
complete; each prompt is a shard, so a rerun resumes per prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pixelmill.config import RetrieveConfig
from pixelmill.datasets import DatasetWriter, ShardEntry, config_hash, read_manifest, stable_id, write_manifest
from pixelmill.datasets.storage import join
from pixelmill.flows.ray_runner import LazyRayTaskRunner, remote_options
from pixelmill.flows.stage_run import commit_manifest
from pixelmill.flows.summary import FlowSummary, RunFigures, publish, reason_counts

CANDIDATES = ("candidates", 1)
IMAGES = ("regularization", 1)


def prompt_id(prompt: str) -> str:
    """Stable shard/parent id of a class prompt."""
    return stable_id("prompt", prompt.strip())


def paths(config: dict[str, Any]) -> dict[str, str]:
    """The fixed sub-folders of the output root."""
    root = config["output"]
    return {name: join(root, name) for name in ("candidates", "images", "stats", "real_reg")}


@dataclass
class RetrievalPlan:
    """Which prompts still need a scan and which still need downloads."""

    prompts: dict[str, str]
    scan: list[str] = field(default_factory=list)
    download: list[str] = field(default_factory=list)
    scan_done: list[str] = field(default_factory=list)
    download_done: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{len(self.prompts)} prompt(s): {len(self.scan)} to scan, {len(self.download)} to download; "
                 f"{len(self.download_done)} already complete (skipped)"]
        for pid, prompt in self.prompts.items():
            state = ("done" if pid in self.download_done else
                     "download" if pid not in self.scan else "scan + download")
            lines.append(f"  {state:<16} {pid}  {prompt!r}")
        return "\n".join(lines)


def _committed(url: str, hashed: dict[str, Any]) -> set[str]:
    m = read_manifest(url)
    if m is None or m.config_hash != config_hash(hashed):
        return set()
    return set(m.shard_names())


def plan_retrieval(cfg: RetrieveConfig) -> RetrievalPlan:
    """Plan per prompt: skip scans and downloads already committed with the same config."""
    config = cfg.model_dump()
    prompts = {prompt_id(p): p for p in cfg.active_prompts()}
    scanned = _committed(paths(config)["candidates"], cfg.scan_affecting())
    downloaded = _committed(paths(config)["images"], cfg.output_affecting())
    plan = RetrievalPlan(prompts=prompts)
    for pid in prompts:
        if pid in downloaded:
            plan.download_done.append(pid)
            continue
        plan.download.append(pid)
        (plan.scan_done if pid in scanned else plan.scan).append(pid)
    return plan


@task(name="scan-pool", cache_policy=NO_CACHE)
def scan_pool(config: dict[str, Any], prompts: dict[str, str]) -> dict[str, int]:
    """Embed the prompts and scan the pool once for all of them; one candidates shard per prompt."""
    from pixelmill.tasks.regularization import write_candidates

    cfg = RetrieveConfig.model_validate(config)
    return write_candidates(cfg, prompts, paths(config)["candidates"], CANDIDATES)


@task(name="download-images", cache_policy=NO_CACHE)
def download_images(config: dict[str, Any], pid: str, prompt: str) -> dict[str, Any]:
    """Download exactly N images for one prompt from its ranked candidates."""
    from pixelmill.tasks.regularization import download_prompt

    cfg = RetrieveConfig.model_validate(config)
    p = paths(config)
    return download_prompt(cfg, pid, prompt, p["candidates"], p["images"], p["stats"], IMAGES)


@task(name="export-real-prior", cache_policy=NO_CACHE)
def export_real_prior(config: dict[str, Any], prompts: dict[str, str]) -> dict[str, str]:
    """Write the ``--real_prior`` folder layout (exactly N files per complete prompt)."""
    from pixelmill.tasks.regularization import export_custom_diffusion

    p = paths(config)
    return export_custom_diffusion(p["images"], p["real_reg"], prompts, config["num_images"])


def open_images_output(url: str, cfg: RetrieveConfig) -> DatasetWriter:
    """The images output, opened by the flow as its owner before the prompts download side by side.

    The flow alone tidies it and writes its manifest: a task opening it would delete the other
    tasks' staged shards, and two tasks writing the manifest would drop each other's entries. The
    manifest exists from the start, so a shard a task published before a kill, not yet recorded,
    is an unlisted file the rerun replaces, never a foreign file it refuses.
    """
    writer = DatasetWriter(url, *IMAGES, cfg.output_affecting()).open()
    if read_manifest(url) is None:
        write_manifest(url, writer.manifest)
    return writer


@dataclass
class RetrieveSummary(FlowSummary):
    """What a retrieval run did, per prompt (a prompt with no image at all is a reject)."""

    output: str
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    exported: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def figures(self) -> RunFigures:
        p = self.prompts.values()
        return RunFigures(flow="retrieve", output=self.output, unit_in="prompts", unit_out="images",
                          rows_in=len(self.prompts), rows_out=sum(s["downloaded"] for s in p),
                          rejected=reason_counts(s["reject"] for s in p if s.get("reject")),
                          dropped=sum(s["failed"] + s["dropped"] for s in p), skipped=len(self.skipped),
                          seconds=self.seconds, notes=list(self.notes))


@flow(name="retrieve", task_runner=LazyRayTaskRunner(), log_prints=True)
def retrieve_flow(config: dict[str, Any]) -> RetrieveSummary:
    """Scan (prompts not yet scanned) → download per prompt → commit → export."""
    t0 = time.perf_counter()
    cfg = RetrieveConfig.model_validate(config)
    plan = plan_retrieval(cfg)
    p = paths(config)
    summary = RetrieveSummary(output=cfg.output, skipped=plan.download_done)
    if plan.scan:
        with remote_options(num_cpus=0):
            scan_pool.submit(config, {pid: plan.prompts[pid] for pid in plan.scan}).result()
    scanned = read_manifest(p["candidates"])
    if plan.scan or scanned is None or not scanned.complete:
        commit_manifest(p["candidates"], CANDIDATES, cfg.scan_affecting())
    images = open_images_output(p["images"], cfg) if plan.download else None
    with remote_options(num_cpus=0.5):
        futures = {pid: download_images.submit(config, pid, plan.prompts[pid]) for pid in plan.download}
    failure: BaseException | None = None
    for pid, fut in futures.items():
        try:
            result = fut.result()
        except Exception as exc:  # noqa: BLE001 - the other prompts' shards are recorded first
            failure = failure or exc
            continue
        images.record(ShardEntry.model_validate(result.pop("shard")))
        summary.prompts[pid] = result
    if failure is not None:
        raise failure
    m = read_manifest(p["images"])
    if plan.download or m is None or not m.complete:
        commit_manifest(p["images"], IMAGES, cfg.output_affecting())
    if cfg.export:
        summary.exported = export_real_prior(config, plan.prompts)
    summary.seconds = time.perf_counter() - t0
    summary.rejected_by_reason = summary.figures().rejected
    return publish(summary)
