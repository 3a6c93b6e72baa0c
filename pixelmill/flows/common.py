"""Wiring shared by the flows: shard plans, progress, and streaming a stage into a writer."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from pixelmill.datasets import Dataset, DatasetWriter, config_hash, read_manifest
from pixelmill.flows.summary import reason_key
from pixelmill.tasks.ray_data import (
    CALL_SECONDS_COLUMN,
    PEAK_RSS_COLUMN,
    SETUP_SECONDS_COLUMN,
    TIMING_COLUMNS,
    WORKER_COLUMN,
)
from pixelmill.tasks.stage import STATUS_DROPPED, STATUS_OK, STATUS_REJECT

CONTROL_COLUMNS = ("status", "error", "stage", "shard", WORKER_COLUMN, *TIMING_COLUMNS)


@dataclass
class ShardPlan:
    """Which input shards a run edits and which it skips (and why)."""

    config: dict[str, Any]
    todo: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    specs: list[dict[str, Any]] = field(default_factory=list)
    rows_todo: int = 0
    rows_total: int = 0
    output_complete: bool = False

    def describe(self) -> str:
        lines = [f"{len(self.todo)} shard(s) to run ({self.rows_todo} rows), "
                 f"{len(self.skip)} already committed (skipped)"]
        lines += [f"  run   {s['shard']}  {s['rows']} rows  from {s['url']}" for s in self.specs]
        lines += [f"  skip  {name}  committed with the same config" for name in self.skip]
        return "\n".join(lines)


def plan_shards(config: dict[str, Any], hashed: dict[str, Any]) -> ShardPlan:
    """Plan output shards from the input's shard files (one output shard per input shard).

    The plan for existing rows never changes when the input grows: new input shards add
    new output shards. ``limit`` keeps the first N rows in shard order.
    """
    source = Dataset.open(config["input"])
    out = read_manifest(config["output"])
    same = out is not None and out.config_hash == config_hash(hashed)
    committed = set(out.shard_names()) if same else set()
    plan = ShardPlan(config=hashed, output_complete=bool(same and out.complete))
    remaining = config.get("limit")
    for name in source.shard_names():
        if remaining is not None and remaining <= 0:
            break
        rows = source.shard_rows(name)
        if remaining is not None:
            rows = min(rows, remaining)
            remaining -= rows
        if rows == 0:  # nothing to make from an empty input shard
            continue
        plan.rows_total += rows
        if name in committed:
            plan.skip.append(name)
            continue
        plan.todo.append(name)
        plan.specs.append({"url": source.shard_url(name), "shard": name, "rows": rows})
        plan.rows_todo += rows
    if plan.todo:
        plan.output_complete = False
    return plan


def head_resources() -> dict[str, float]:
    """Ray resources that place a task or actor on the head node ({} where no node is named head).

    What a run cannot lose mid-stage lives there (as Ray Train pins its state actor and Ray
    Jobs run their drivers): the task that drives a stage (it owns the stage's actors, so its
    node's loss would take them all) and the progress counter. A cluster that loses its head is
    lost anyway, while any other node may go mid-run. Both claim no CPU.
    """
    import ray

    head = {"node:__internal_head__": 0.001}
    if not any(head.keys() <= n["Resources"].keys() for n in ray.nodes() if n["Alive"]):
        return {}  # a cluster that names no head node: anywhere
    return head


def driver_on_head() -> bool:
    """Whether this process is on the Ray cluster's head node (or the cluster names no head):
    then it drives a stage itself instead of through a Ray task placed there."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    return not heads or me in heads


class Progress:
    """A row counter shared between the worker that does the work and the terminal.

    The counter actor lives on the head node, so a worker node that is lost mid-run cannot take
    it down; if it is lost anyway, the bar stops moving and the run goes on: progress is never
    a reason to fail. A stage driven in this process counts in this process (``local``).
    """

    def __init__(self, handle=None) -> None:
        self.handle = handle
        self.last = 0

    @classmethod
    def create(cls, total: int, local: bool = False) -> Progress:
        if local:
            return cls(None)
        import ray

        @ray.remote(num_cpus=0)
        class _Counter:
            def __init__(self) -> None:
                self.n = 0

            def add(self, k: int) -> None:
                self.n += k

            def get(self) -> int:
                return self.n

        return cls(_Counter.options(resources=head_resources()).remote())

    def add(self, k: int) -> None:
        if self.handle is None:
            self.last += k  # one thread adds (the stage's driver), the terminal's thread reads
            return
        try:
            self.handle.add.remote(k)
        except Exception:  # noqa: BLE001 - a lost counter only freezes the bar
            pass

    def get(self) -> int:
        if self.handle is None:
            return self.last
        import ray

        try:
            self.last = ray.get(self.handle.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a lost counter only freezes the bar
            pass
        return self.last


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("PIXELMILL_PROGRESS") != "1")


def wait_with_progress(future, progress: Progress | None, total: int, desc: str):
    """Wait for a submitted task, showing a progress bar fed by ``progress``."""
    if progress is None:
        return future.result()
    with _bar(total, desc) as bar:
        while True:
            future.wait(timeout=0.5)
            done = future.state.is_final()
            n = progress.get()
            bar.update(n - bar.n)
            if done:
                break
    return future.result()


@contextmanager
def progress_bar(progress: Progress | None, total: int, desc: str):
    """A progress bar fed by ``progress``, drawn by a daemon thread while the work runs in this one."""
    if progress is None:
        yield
        return
    import threading

    stop = threading.Event()
    with _bar(total, desc) as bar:
        def draw() -> None:
            while not stop.wait(0.5):
                bar.update(progress.get() - bar.n)

        thread = threading.Thread(target=draw, name="pixelmill-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
            bar.update(progress.get() - bar.n)


@dataclass
class StageStats:
    """What one stage run did.

    Args:
        reject_reasons: rejects counted by reason (``reason_key`` of their ``error``).
        nodes: output rows per Ray node id of the stage actors that made them.
        actors: how many stage actors made rows (each claimed the stage's GPUs).
        worker: the process that drove the stage (the command itself on the head node, else a Ray task
            there claiming no CPU).
        call_seconds: the stage calls' own time, summed over actors (what the stage computed:
            ``rows_in / call_seconds`` is one actor's steady rate); ``calls``: how many.
        setup_seconds: the actors' set-up (model loading), summed.
        peak_rss_bytes: the largest peak resident memory of a stage actor's process.
    """

    rows_in: int = 0
    rows_out: int = 0
    rejects: int = 0
    dropped: int = 0
    seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    actors: int = 0
    call_seconds: float = 0.0
    calls: int = 0
    setup_seconds: float = 0.0
    peak_rss_bytes: int = 0

    def timing(self) -> dict[str, float]:
        """Where the run's time went (the stage's calls and set-up inside it, the driver's wall time),
        and the largest peak memory of a stage worker process."""
        return {"calls": self.calls, "call_seconds": round(self.call_seconds, 3),
                "setup_seconds": round(self.setup_seconds, 3), "stage_seconds": round(self.seconds, 3),
                "worker_peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1)}


def split_specs(specs: list[dict[str, Any]], rows_per_call: int | None) -> list[dict[str, Any]]:
    """The planned units as stage calls of at most ``rows_per_call`` rows each (``start``/``stop``
    within the unit's rows); None: one call per unit."""
    calls = []
    for spec in specs:
        rows = int(spec["rows"])
        step = rows_per_call or max(rows, 1)
        calls += [{**spec, "start": start, "stop": min(rows, start + step)} for start in range(0, max(rows, 1), step)]
    return calls


def spec_rows(spec: dict[str, Any]) -> int:
    """The input rows one planned call reads."""
    return int(spec["stop"]) - int(spec["start"]) if "start" in spec else int(spec["rows"])


def _count_where(stats: StageStats, actors: set[str], part) -> None:
    if CALL_SECONDS_COLUMN in part.column_names:
        calls = part[CALL_SECONDS_COLUMN]
        stats.call_seconds += pc.sum(calls).as_py() or 0.0
        stats.calls += pc.sum(pc.greater(calls, 0.0).cast("int64")).as_py() or 0
        stats.setup_seconds += pc.sum(part[SETUP_SECONDS_COLUMN]).as_py() or 0.0
        stats.peak_rss_bytes = max(stats.peak_rss_bytes, int(pc.max(part[PEAK_RSS_COLUMN]).as_py() or 0))
    if WORKER_COLUMN not in part.column_names:
        return
    for where in part[WORKER_COLUMN].to_pylist():
        if where:
            node, _, actor = where.partition("/")
            stats.nodes[node] = stats.nodes.get(node, 0) + 1
            actors.add(actor)


def _worker_info() -> dict[str, Any]:
    info: dict[str, Any] = {"pid": os.getpid()}
    try:
        import ray

        if not ray.is_initialized():  # asking for the context would start a Ray of its own
            info["in_ray_worker"] = False
            return info
        ctx = ray.get_runtime_context()
        info.update(node_id=ctx.get_node_id(), worker_id=ctx.get_worker_id(), in_ray_worker=ctx.worker.mode == 1)
    except Exception:  # noqa: BLE001 - only descriptive
        info["in_ray_worker"] = False
    return info


def run_stage_into_writer(
    plan: ShardPlan,
    builder: Callable,
    columns: list[str],
    writer: DatasetWriter,
    workers: int,
    progress: Progress | None = None,
    drop_columns: tuple[str, ...] = (),
    execute: Callable | None = None,
    timeouts: dict[str, Any] | None = None,
    rows_per_call: int | None = None,
) -> StageStats:
    """Stream the planned input shards through a stage; commit each output shard when whole.

    Rows with ``status == ok`` go to the shard's data, ``dropped`` rows (candidates a
    stage drops by design) to its ``__dropped/`` table, ``reject`` rows to its rejects. A
    stage may make several rows per input (``parent_id`` names the input); a shard is
    committed once every one of its input ids came back (as a parent or a reject), so a
    crash never leaves a half shard that looks complete.

    ``execute`` runs the stage over the specs (default: Ray Data, ``tasks/ray_data.py``;
    ``tasks.stage.run_stage_inline`` runs it in this process). ``timeouts``
    (``{"stall": s, "attempts": n}``, a config's ``StageTimeouts``) times each stage call and
    bounds the calls a shard gets (``tasks/call_guard.py``; attempt records under the
    output's staging folder; None: neither); a shard out of attempts comes back as rejects only, without
    the stage's data columns: such a shard gets no data file (readers take the schema from
    the other shards), never a data file with a schema of ``id`` alone. ``rows_per_call``
    streams each shard through the stage in calls of at most that many rows (the stage's
    memory stays flat however large the shard); the output shard is written as its parts
    come back and committed when the last one did.
    """
    import time

    from pixelmill.datasets import storage
    from pixelmill.datasets.attempts import ATTEMPTS_DIR
    from pixelmill.tasks.call_guard import CallGuard
    from pixelmill.tasks.ray_data import run_stage

    execute = execute or run_stage
    t0 = time.perf_counter()
    writer.open()
    guard = None if timeouts is None else CallGuard.from_timeouts(timeouts, storage.join(writer.staging, ATTEMPTS_DIR))
    calls = split_specs(plan.specs, rows_per_call)
    expected: dict[str, int] = {}
    for spec in calls:
        expected[spec["shard"]] = expected.get(spec["shard"], 0) + spec_rows(spec)
    seen: dict[str, set[str]] = {name: set() for name in expected}
    shard_writers = {}
    stats = StageStats(rows_in=sum(expected.values()), worker=_worker_info())
    actors: set[str] = set()
    for out in execute(calls, columns, builder, workers=workers, **({"guard": guard} if guard else {})):
        _count_where(stats, actors, out)
        key = "parent_id" if "parent_id" in out.column_names else "id"
        for name in pc.unique(out["shard"]).to_pylist():
            part = out.filter(pc.equal(out["shard"], name))
            sw = shard_writers.get(name) or shard_writers.setdefault(name, writer.shard(name))
            status = part["status"]
            drop = [c for c in (*CONTROL_COLUMNS, *drop_columns) if c in part.column_names]
            ok = part.filter(pc.equal(status, STATUS_OK))
            data = ok.drop_columns(drop)
            if ok.num_rows or set(data.column_names) - {"id", "parent_id"}:  # not rejects made without the stage
                sw.write(data)
            dropped = part.filter(pc.equal(status, STATUS_DROPPED))
            if dropped.num_rows:
                sw.drop(dropped.drop_columns([c for c in drop if c not in ("error", "stage")]))
            rejected = part.filter(pc.equal(status, STATUS_REJECT)).select(["id", "error", "stage"])
            if rejected.num_rows:
                sw.reject(rejected)
                for error in rejected["error"].to_pylist():
                    reason = reason_key(error)
                    stats.reject_reasons[reason] = stats.reject_reasons.get(reason, 0) + 1
            before = len(seen[name])
            for table in (ok, dropped):
                seen[name].update(str(v) for v in table[key].to_pylist() if v is not None)
            seen[name].update(rejected["id"].to_pylist())
            stats.rows_out += ok.num_rows
            stats.rejects += rejected.num_rows
            stats.dropped += dropped.num_rows
            if progress is not None:
                progress.add(len(seen[name]) - before)
            if len(seen[name]) == expected[name]:
                sw.commit(input_rows=expected[name])
    unfinished = {k: (len(seen[k]), v) for k, v in expected.items() if len(seen[k]) != v}
    if unfinished:
        raise RuntimeError(f"stage accounted for a different number of inputs than it was given: {unfinished}")
    stats.actors = len(actors)
    stats.seconds = time.perf_counter() - t0
    return stats
