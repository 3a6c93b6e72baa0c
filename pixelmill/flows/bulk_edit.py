"""The bulk-edit flow: a registered editing method over an image dataset.

Reading the flow function shows the DAG: look the method up in the registry, then one
stage run (plan shards, skip committed ones, edit the rest as one Ray Data pipeline
driven by one Prefect task on a Ray worker, commit the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect_ray.task_runners import RayTaskRunner

from pixelmill.config import EditConfig
from pixelmill.flows.stage_run import choose_gpus, run_stage
from pixelmill.flows.summary import FlowSummary, RunFigures, gpu_hours, publish


@dataclass
class EditSummary(FlowSummary):
    """What a bulk-edit run did (``worker``: the process that drove the stage; ``nodes``: where its actors ran)."""

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

    def figures(self) -> RunFigures:
        return RunFigures(flow="bulk-edit", output=self.output, rows_in=self.rows_in, rows_out=self.rows_out,
                          rejected=dict(self.rejected_by_reason), skipped=len(self.shards_skipped),
                          seconds=self.seconds, gpu_hours=self.gpu_hours, notes=list(self.notes))


def editor_class(config: dict[str, Any]) -> type:
    """The stage class that runs ``config``'s method (a method may pick a variant, e.g. masked SDEdit)."""
    from pixelmill import registry

    return registry.get("edit", config["method"]).obj.for_config(config)


@flow(name="bulk-edit", task_runner=RayTaskRunner(), log_prints=True)
def bulk_edit_flow(config: dict[str, Any], show_progress: bool = True) -> EditSummary:
    """Edit every row not yet committed under the same config → commit the manifest."""
    cfg = EditConfig.model_validate(config)
    gpus = choose_gpus(cfg.placement.gpu_request())
    r = run_stage(editor_class(config), config, cfg.placement.resources(gpus.gpus), input=cfg.input,
                  output=cfg.output, hashed=cfg.output_affecting(), workers=cfg.placement.workers, limit=cfg.limit,
                  task_name="edit-shards", show_progress=show_progress, progress_label="editing")
    return publish(EditSummary(
        output=cfg.output, rows_in=r.stats.rows_in, rows_out=r.stats.rows_out, rejects=r.stats.rejects,
        shards_run=r.shards_run, shards_skipped=r.shards_skipped, seconds=r.stats.seconds, worker=r.stats.worker,
        notes=[gpus.note] if gpus.note and r.shards_run else [], gpus=gpus.gpus,
        gpu_hours=gpu_hours(gpus.gpus, r.stats.actors, r.stats.seconds),
        rejected_by_reason=r.stats.reject_reasons, nodes=r.stats.nodes))
