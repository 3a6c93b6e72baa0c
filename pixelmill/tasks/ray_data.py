"""The one place that speaks Ray Data: runs a Stage as ``map_batches`` over an actor pool.

Ray Data's arguments changed twice in two years (``compute=`` replaced ``concurrency=``
in Ray 2.51); keeping them here means stages never see them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from pixelmill.tasks.call_guard import CallGuard, SetupTimedOut
from pixelmill.tasks.stage import Stage, set_torch_threads

WORKER_COLUMN = "_worker"
"""Control column each output batch carries: ``<node id>/<actor id>`` of the actor that made it."""
CALL_SECONDS_COLUMN = "_call_s"
"""Control column: the stage call's seconds on the first row of its output (0 on the others)."""
SETUP_SECONDS_COLUMN = "_setup_s"
"""Control column: the actor's set-up seconds (model loading) on the first row of its first output, else 0."""
PEAK_RSS_COLUMN = "_peak_rss"
"""Control column: the actor process's peak resident memory (bytes) after the call, on the first row."""
TIMING_COLUMNS = (CALL_SECONDS_COLUMN, SETUP_SECONDS_COLUMN, PEAK_RSS_COLUMN)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kibibytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _first_row(value: float, rows: int) -> pa.Array:
    return pa.array([value] + [0.0] * (rows - 1), pa.float64())


class _StageActor:
    """Ray Data actor: builds the stage from its builder on the worker, sets it up once.

    Tags its output rows with where they were made (``WORKER_COLUMN``), so a run can say
    which nodes and how many actors did the work (and so its GPU-hours), and with how long
    the call and the actor's set-up took (``TIMING_COLUMNS``: a run's steady state and fixed
    costs are measured inside it, not by difference of whole runs). With a ``guard``,
    each call is timed and counted (``tasks/call_guard.py``): a hung call ends this actor's
    process, Ray Data restarts the actor and calls it again with the shard, and a shard out
    of attempts comes back as rejects without calling the stage.
    """

    def __init__(self, builder: Callable[[], Stage], columns: list[str], guard: CallGuard | None = None) -> None:
        import ray

        started = time.perf_counter()
        ctx = ray.get_runtime_context()
        self.where = f"{ctx.get_node_id()}/{ctx.get_actor_id()}"
        self.guard = guard
        self.columns = columns
        self.stage = builder()
        set_torch_threads(self.stage.resources.cpus)
        if guard is None:
            self.stage.setup()
        else:
            guard.setup(self.stage)
        self.setup_seconds = time.perf_counter() - started  # reported with the first output row

    def __call__(self, specs: dict) -> pa.Table:
        batch = _read_spec_batch(specs, self.columns)  # the planned call's rows
        started = time.perf_counter()
        out = self.stage(batch) if self.guard is None else self.guard.run(self.stage, batch)
        seconds = time.perf_counter() - started
        out = out.append_column(WORKER_COLUMN, pa.array([self.where] * out.num_rows, pa.string()))
        if not out.num_rows:
            return out
        out = out.append_column(CALL_SECONDS_COLUMN, _first_row(seconds, out.num_rows))
        setup, self.setup_seconds = self.setup_seconds, 0.0
        out = out.append_column(SETUP_SECONDS_COLUMN, _first_row(setup, out.num_rows))
        return out.append_column(PEAK_RSS_COLUMN, _first_row(float(peak_rss_bytes()), out.num_rows))


def quiet_data_context() -> None:
    """No Ray Data progress bars or per-run stats logs: pixelmill shows its own progress."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it warns that progress bars are off, which is what we asked for
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_remote_args(stage: Stage) -> dict[str, Any]:
    """Ray actor arguments for a stage's declared resources."""
    r = stage.resources
    args: dict[str, Any] = {"num_cpus": r.cpus}
    if r.gpus:
        args["num_gpus"] = r.gpus
    if r.memory_bytes:
        args["memory"] = r.memory_bytes
    return args


def _read_spec_batch(batch: dict, columns: list[str]) -> pa.Table:
    """Read the input shard(s) named in a batch of specs; tag rows with their shard."""
    from pixelmill.datasets.incremental import read_planned

    tables = [read_planned(dict(zip(batch, values)), columns) for values in zip(*batch.values())]
    return pa.concat_tables(tables)


def run_stage(
    specs: list[dict[str, Any]],
    columns: list[str],
    builder: Callable[[], Stage],
    workers: int,
    guard: CallGuard | None = None,
) -> Iterator[pa.Table]:
    """Stream input shards through the stage on a pool of ``workers`` actors.

    Each actor reads the rows of the call it is given (the driver never holds the input).
    Each stage call gets one planned call's rows and batches them itself (its config's
    ``batch_size``): Ray Data coalesces blocks in arrival order, so letting it form the
    batches would make a row's batch, and so its floating-point result, vary between
    identical runs.

    Args:
        specs: one dict per stage call: ``url``, ``shard`` (name) and ``rows`` (how many
            of its first rows to read), optionally ``select`` (planned ids or raw files,
            ``datasets.incremental.read_spec``) and ``start``/``stop`` (this call's part of
            those rows: ``flows.common.split_specs``).
        columns: input columns to read.
        builder: a picklable zero-argument callable that builds the stage on the worker
            (builders, not objects, cross process boundaries).
        workers: actor pool size.
        guard: per-call time limit and bounded attempts (``tasks/call_guard.py``); Ray
            Data restarts an actor whose process ended and retries its shard (checked with
            Ray 2.60: actors get ``max_restarts=-1, max_task_retries=-1``).

    Yields:
        Output tables as they complete (order not guaranteed).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    quiet_data_context()
    probe = builder()
    # One block per planned call. The actor reads its call's rows itself: a read task per call
    # would cost a Ray task, a hop through the object store and, claiming no CPU (so that a
    # stage claiming every CPU cannot starve it), a worker process per read in flight (over
    # 1,000 shards, Ray started dozens); the read is small beside the stage's call.
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    # One call per planned call (batch_size=None: whole blocks) also with GPUs: the public
    # ``map_batches`` refuses that combination, ``map_batches_internal`` (Ray's DeveloperAPI,
    # what ``map_groups`` uses for the same reason) does not validate it.
    remote = ray_remote_args(probe)
    map_batches = ds.map_batches_internal if remote.get("num_gpus") and hasattr(ds, "map_batches_internal") \
        else ds.map_batches
    ds = map_batches(
        _StageActor,
        fn_constructor_kwargs={"builder": builder, "guard": guard, "columns": columns},
        batch_size=None,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        **remote,
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows:
                yield batch
    except Exception as e:
        reason = setup_timeout_in(e)
        if reason is None:
            raise
        raise SetupTimedOut(reason) from None


def setup_timeout_in(error: BaseException) -> str | None:
    """The reason of a :class:`SetupTimedOut` that ended the stage's actors, from Ray's wrapping of it."""
    marker = f"{SetupTimedOut.__name__}: "
    text = str(error)
    if marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip().splitlines()[0]
