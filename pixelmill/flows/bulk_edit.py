"""The bulk-edit flow: SDEdit (optionally masked), InstructPix2Pix or Text2Live over an image dataset.

Reading the flow function shows the DAG: plan shards (skip committed ones), run the edit
stage over the rest as one Ray Data pipeline driven by one Prefect task on a Ray worker,
then commit the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options
from prefect_ray.task_runners import RayTaskRunner

from pixelmill.config import EditConfig
from pixelmill.datasets import Dataset, DatasetWriter
from pixelmill.flows.common import Progress, ShardPlan, plan_shards, wait_with_progress
from pixelmill.tasks.edit import input_columns

SCHEMA_NAME = "edits"
SCHEMA_VERSION = 1


@dataclass
class EditSummary:
    """What a bulk-edit run did."""

    output: str
    rows_in: int = 0
    rows_out: int = 0
    rejects: int = 0
    shards_run: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.rows_out / self.seconds if self.seconds > 0 else 0.0


def editor_builder(config: dict[str, Any], num_gpus: float = 0.0):
    """A picklable builder for the configured editor (built on the worker, not here)."""
    from functools import partial

    from pixelmill.tasks.edit import InstructPix2PixEditor, MaskedSDEditEditor, SDEditEditor
    from pixelmill.tasks.stage import Resources
    from pixelmill.tasks.text2live import Text2LiveEditor

    if config["method"] == "sdedit":
        masked = config.get("mask_column") or config.get("stroke_column")
        cls = MaskedSDEditEditor if masked else SDEditEditor
    elif config["method"] == "text2live":
        cls = Text2LiveEditor
    else:
        cls = InstructPix2PixEditor
    return partial(cls, config, Resources(cpus=config["num_cpus_per_worker"], gpus=num_gpus))


@task(name="edit-shards", retries=0, cache_policy=NO_CACHE)
def edit_shards(config: dict[str, Any], plan: ShardPlan, num_gpus: float, progress: Progress | None) -> EditSummary:
    """Run the edit stage over the planned shards and commit each as it completes."""
    from pixelmill.flows.common import run_stage_into_writer

    t0 = time.perf_counter()
    stats = run_stage_into_writer(
        plan=plan,
        builder=editor_builder(config, num_gpus),
        columns=input_columns(config),
        writer=DatasetWriter(config["output"], SCHEMA_NAME, SCHEMA_VERSION, plan.config),
        workers=config["workers"],
        progress=progress,
    )
    return EditSummary(
        output=config["output"], rows_in=stats.rows_in, rows_out=stats.rows_out,
        rejects=stats.rejects, shards_run=plan.todo, seconds=time.perf_counter() - t0,
        worker=stats.worker,
    )


@task(name="commit-manifest", cache_policy=NO_CACHE)
def commit_manifest(config: dict[str, Any], plan: ShardPlan) -> int:
    """Mark the output dataset complete; returns its row count."""
    writer = DatasetWriter(config["output"], SCHEMA_NAME, SCHEMA_VERSION, plan.config)
    writer.open()
    writer.finish()
    return Dataset.open(config["output"]).num_rows


@flow(name="bulk-edit", task_runner=RayTaskRunner(), log_prints=True)
def bulk_edit_flow(config: dict[str, Any], num_gpus: float = 0.0, show_progress: bool = True) -> EditSummary:
    """Plan → edit the shards not yet committed → commit the manifest."""
    plan = plan_shards(config, EditConfig.model_validate(config).output_affecting())
    summary = EditSummary(output=config["output"], shards_skipped=plan.skip)
    if plan.todo:
        progress = Progress.create(total=plan.rows_todo) if show_progress else None
        with remote_options(num_cpus=0):
            future = edit_shards.submit(config, plan, num_gpus, progress)
        summary = wait_with_progress(future, progress, plan.rows_todo, "editing")
        summary.shards_skipped = plan.skip
    if plan.todo or not plan.output_complete:
        commit_manifest(config, plan)
    return summary
