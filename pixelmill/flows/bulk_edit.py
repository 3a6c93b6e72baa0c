"""The bulk-edit flow: a registered editing method over an image dataset or a folder of images.

Reading the flow function shows the DAG: look the method up in the registry, plan and
claim the ids not yet processed (``flows/incremental.py``), then one stage run (edit them
as one Ray Data pipeline driven by one Prefect task on the head node, commit new shards
and the manifest) while a heartbeat keeps the claim alive, then release the claim.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from prefect import flow

from pixelmill.config import EditConfig
from pixelmill.config.placement import GpuChoice
from pixelmill.flows.ray_runner import LazyRayTaskRunner
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
    run: str = ""
    rows_skipped: int = 0
    rows_claimed_elsewhere: int = 0
    retried: int = 0
    timing: dict[str, float] = field(default_factory=dict)  # the stage's own seconds: calls, set-up
    model_family: dict[str, Any] = field(default_factory=dict)  # models/family.py ModelInfo of `model`

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


@flow(name="bulk-edit", task_runner=LazyRayTaskRunner(), log_prints=True)
def bulk_edit_flow(config: dict[str, Any], show_progress: bool = True) -> EditSummary:
    """Edit every input id not yet processed under the same config (and claimed by no live run)."""
    from pixelmill.datasets.claims import Heartbeat, new_run_id
    from pixelmill.flows.incremental import plan_edit, release

    cfg = EditConfig.model_validate(config)
    stage_cls = editor_class(config)
    run = new_run_id()
    plan = plan_edit(config, cfg.output_affecting(), stage_cls.dataset, run=run, retry_rejects=cfg.retry_rejects)
    # GPUs are looked up (and Ray connected) only when there is something to edit
    gpus = choose_gpus(cfg.placement.gpu_request()) if plan.todo else GpuChoice(0.0)
    if plan.rows_claimed:
        print(f"{plan.rows_claimed} row(s) are claimed by live run(s) {', '.join(plan.others)}: left to them")
    try:
        with Heartbeat(plan.claim) if plan.claim else nullcontext():
            r = run_stage(stage_cls, config, cfg.placement.resources(gpus.gpus), input=cfg.input,
                          output=cfg.output, hashed=cfg.output_affecting(), workers=cfg.placement.workers,
                          task_name="edit-shards", show_progress=show_progress, progress_label="editing",
                          plan=plan, run=run, timeouts=cfg.timeouts.model_dump(),
                          rows_per_call=cfg.placement.rows_per_call)
    finally:
        release(plan, stage_cls.dataset)
    notes = ([gpus.note] if gpus.note and r.shards_run else []) + (
        [f"{plan.rows_claimed} row(s) left to live run(s) {', '.join(plan.others)}"] if plan.rows_claimed else [])
    if r.shards_run and cfg.model:
        from pixelmill.models.components import safety_note

        notes += r.notes + [n for n in [safety_note(cfg.model, cfg.safety_checker, cfg.revision)] if n]
    return publish(EditSummary(
        run=run, rows_skipped=plan.rows_done, rows_claimed_elsewhere=plan.rows_claimed, retried=len(plan.retried),
        output=cfg.output, rows_in=r.stats.rows_in, rows_out=r.stats.rows_out, rejects=r.stats.rejects,
        shards_run=r.shards_run, shards_skipped=r.shards_skipped, seconds=r.stats.seconds, worker=r.stats.worker,
        notes=notes, gpus=gpus.gpus, timing=r.stats.timing(),
        gpu_hours=gpu_hours(gpus.gpus, r.stats.actors, r.stats.seconds),
        rejected_by_reason=r.stats.reject_reasons, nodes=r.stats.nodes, model_family=_model_family(cfg.model)))


def _model_family(model: str | None) -> dict[str, Any]:
    """The edited model's family, prediction type and pipeline class (preflight read them already)."""
    from pixelmill.models.family import describe_model

    return describe_model(model).as_dict() if model else {}
