"""The stage contract: what every data-parallel stage is, whatever runs it.

A stage is a small class: the constructor takes its config (plain data, cheap to ship),
``setup()`` loads models once per worker, and ``__call__(batch)`` maps an Arrow table to
an Arrow table. Resources are data on the stage; ``tasks/ray_data.py`` is the one place
that turns them into Ray arguments.

Every output row carries ``status``: ``ok``, ``reject`` (with ``error`` and ``stage``: a
bad input row is recorded, never lost and never fatal to the batch) or ``dropped`` (a
candidate a stage drops by design, kept with its scores in ``__dropped/``). A stage that
makes several rows per input names the input in ``parent_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

STATUS_OK = "ok"
STATUS_REJECT = "reject"
STATUS_DROPPED = "dropped"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int | None = None


class Stage:
    """Base class for data-parallel stages (see the module docstring).

    A stage declares what the generic runner (``flows/stage_run.py``) needs to run it
    over any dataset: ``dataset`` (the output's schema name and version),
    :meth:`input_columns` (what it reads) and :meth:`dropped_columns` (input columns it
    passes through but that must not reach the output).
    """

    name: ClassVar[str] = "stage"
    dataset: ClassVar[tuple[str, int]] = ("stage", 1)
    # Input rows per call: a shard is streamed through a worker this many rows at a time, so the
    # worker's memory does not grow with the shard (None: whole shards; a config's
    # ``placement.rows_per_call`` overrides it). Rows are seeded per id, never per call.
    rows_per_call: ClassVar[int | None] = None
    # Whether ``config["model"]`` names a model every worker loads: a hub id is then fetched once per
    # node before the actors start, and the actors are pinned to its commit (``models/hub.py``).
    hub_model: ClassVar[bool] = False
    _heartbeat: Callable[[str], None] | None = None  # set by the call's guard (tasks/call_guard.py)

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        """The input columns this stage reads for ``config``."""
        return ["id"]

    @classmethod
    def dropped_columns(cls, config: dict[str, Any]) -> tuple[str, ...]:
        """Input columns the stage's output rows carry that the output dataset leaves out."""
        return ()

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        self.config = config
        self.resources = resources or Resources()

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker."""

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - interface
        raise NotImplementedError

    def beat(self, progress: str = "") -> None:
        """Say the current call made progress (a batch done); ``progress`` says how far, for a timeout's reason.

        A call whose stage does not beat for the stall time (``timeouts.stall``) is ended
        (``tasks/call_guard.py``); outside a timed call this does nothing.
        """
        if self._heartbeat is not None:
            self._heartbeat(progress)


class RowError(Exception):
    """A problem with one row: it becomes a reject with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def set_torch_threads(cpus: float) -> None:
    """Use as many torch threads as the worker was allotted CPUs (at least one)."""
    import torch

    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def run_stage_inline(specs: list[dict[str, Any]], columns: list[str], builder, workers: int = 1, guard=None):
    """Run a stage in this process, shard by shard: ``ray_data.run_stage``'s contract without Ray.

    For tests and debugging (one worker; ``workers`` and ``guard`` are ignored: a timed-out
    call would end this process).
    """
    from pixelmill.datasets.incremental import read_planned

    stage = builder()
    set_torch_threads(stage.resources.cpus)
    stage.setup()
    for spec in specs:
        out = stage(read_planned(spec, columns))
        if out.num_rows:
            yield out
