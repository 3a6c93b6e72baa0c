"""The one run-and-commit path: any stage over any dataset, resumable per shard.

``run_stage`` plans output shards from the input's (skipping those committed with the
same config), runs the stage over the rest as one Prefect task on the head node, which
drives a Ray Data pipeline (``tasks/ray_data.py``), then commits the output manifest. The
task runs in this process when it is on the head node (a local Ray, a command run on the
head: no Ray worker to start and import Prefect in, about 3 s), else on a Ray worker there
that claims no CPU (``head_resources``). Flows call it once per stage;
the stage class declares its input columns and output dataset name (``tasks/stage.py``),
so nothing here knows any method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pixelmill.datasets import DatasetWriter
from pixelmill.flows.common import (
    Progress,
    ShardPlan,
    StageStats,
    driver_on_head,
    head_resources,
    plan_shards,
    progress_bar,
    wait_with_progress,
)
from pixelmill.flows.ray_runner import remote_options
from pixelmill.runtime import ensure_ray


@dataclass
class StageResult:
    """What one stage run did: its plan, and the stats of the shards it ran (zeros when none)."""

    output: str
    plan: ShardPlan
    stats: StageStats = field(default_factory=StageStats)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def shards_run(self) -> list[str]:
        return self.plan.todo

    @property
    def shards_skipped(self) -> list[str]:
        return self.plan.skip


@task(name="run-stage", cache_policy=NO_CACHE)
def run_shards(stage_cls: type, config: dict[str, Any], resources: Any, plan: ShardPlan, output: str,
               workers: int, progress: Progress | None = None, run: str | None = None,
               timeouts: dict[str, Any] | None = None, rows_per_call: int | None = None) -> StageStats:
    """Run ``stage_cls`` over the planned shards and commit each output shard as it completes."""
    from pixelmill.flows.common import run_stage_into_writer

    return run_stage_into_writer(
        plan=plan,
        builder=partial(stage_cls, config, resources),
        columns=stage_cls.input_columns(config),
        writer=DatasetWriter(output, *stage_cls.dataset, plan.config, run=run),
        workers=workers,
        progress=progress,
        drop_columns=stage_cls.dropped_columns(config),
        timeouts=timeouts,
        rows_per_call=rows_per_call or stage_cls.rows_per_call,
    )


@task(name="commit-manifest", cache_policy=NO_CACHE)
def commit_manifest(output: str, dataset: tuple[str, int], hashed: dict[str, Any], run: str | None = None) -> None:
    """Mark the output dataset complete (every planned shard is committed)."""
    DatasetWriter(output, *dataset, hashed, run=run).open().finish()


def run_stage(stage_cls: type, config: dict[str, Any], resources: Any, *, input: str, output: str,
              hashed: dict[str, Any], workers: int = 1, limit: int | None = None, task_name: str | None = None,
              show_progress: bool = False, progress_label: str = "rows", plan: ShardPlan | None = None,
              run: str | None = None, timeouts: dict[str, Any] | None = None,
              rows_per_call: int | None = None) -> StageResult:
    """Plan → run the uncommitted shards on Ray → commit the manifest. Call from inside a flow.

    Args:
        stage_cls: a ``Stage`` subclass (built on the workers from ``config`` and ``resources``).
        config: the stage's config (plain data).
        resources: the stage's ``Resources`` per worker.
        input / output: dataset URLs.
        hashed: what the output's manifest records (a different hash means other rows).
        workers: actors in the stage's pool.
        limit: only the first N input rows (in shard order).
        task_name: the Prefect task's name (default ``run-stage``).
        show_progress: a progress bar on stderr while the shards run.
        plan: a plan made by the caller (``flows/incremental.py``) instead of one output
            shard per input shard.
        run: the id of the run whose claim covers ``plan`` (``datasets/claims.py``).
        timeouts: the config's ``StageTimeouts`` as plain data (``{"stall": s, "attempts": n}``):
            each stage call is timed and a shard gets at most ``attempts`` calls, then its
            rows are rejects naming why (``tasks/call_guard.py``). None: calls are neither
            timed nor counted (Ray Data retries a shard whose worker died without limit).
        rows_per_call: input rows per stage call (a config's ``placement.rows_per_call``);
            None: the stage's own ``rows_per_call``.
    """
    t0 = time.perf_counter()
    plan = plan or plan_shards({"input": input, "output": output, "limit": limit}, hashed)
    result = StageResult(output=output, plan=plan)
    if plan.todo:
        ensure_ray()  # the progress counter and the driver's placement ask the cluster
        if stage_cls.hub_model:  # a hub model: fetched once per node now, every actor pinned to its commit
            from pixelmill.models.hub import prefetch_stage_model

            config, note = prefetch_stage_model(config)
            result.notes += [note] if note else []
        here = driver_on_head()
        progress = Progress.create(total=plan.rows_todo, local=here) if show_progress else None
        task = run_shards.with_options(name=task_name) if task_name else run_shards
        args = (stage_cls, config, resources, plan, output, workers, progress, run, timeouts, rows_per_call)
        # On the head node: its loss would take every actor the task owns. This process, when it is
        # there already (a local Ray, a command run on the head): the task runs in this thread (a
        # Ctrl-C or a cancel interrupts it here), the bar is drawn by another. Else a Ray task there,
        # claiming no CPU.
        if here:
            with progress_bar(progress, plan.rows_todo, progress_label):
                result.stats = task(*args)
        else:
            with remote_options(num_cpus=0, resources=head_resources()):
                future = task.submit(*args)
            result.stats = wait_with_progress(future, progress, plan.rows_todo, progress_label)
    if plan.todo or not plan.output_complete:
        commit_manifest(output, stage_cls.dataset, plan.config, run)
    result.seconds = time.perf_counter() - t0
    return result


def choose_gpus(request):
    """``request`` (a ``GpuRequest``) resolved against the connected Ray cluster's nodes (a ``GpuChoice``).

    Raises:
        PlacementError: an explicit GPU count the cluster cannot provide (exit status 2).
    """
    from pixelmill.config.placement import resolve_gpus
    from pixelmill.runtime import node_gpus

    return resolve_gpus(request, node_gpus())
