"""GPU requests resolved against the Ray cluster a run is connected to: one rule for every command.

A GPU count in a config (``placement.gpus``, a fine-tuning job's ``num_gpus``) is
``auto`` (the default) or a number:

- ``auto`` uses GPUs where the cluster has them (one per worker, or the largest share a
  node offers) and otherwise runs on CPU, saying so in the run's summary;
- a number is what each worker (or, for a fine-tuning job, the whole job) claims; ``0``
  is CPU on purpose; a number the cluster's nodes cannot provide is refused with a
  :class:`PlacementError` (exit status 2) before any work starts, instead of waiting
  forever for a GPU that is not there.

Pure data: the caller passes the GPUs of each node (``pixelmill.runtime.node_gpus``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pixelmill.config.base import AUTO, ConfigError, GpuCount

__all__ = ["AUTO", "NO_GPUS", "GpuChoice", "GpuCount", "GpuRequest", "PlacementError", "check_gpu_requests",
           "explicit_gpus", "resolve_gpus"]

NO_GPUS = "ran on CPU: the Ray cluster has no GPUs"


class PlacementError(ConfigError):
    """A GPU count the connected Ray cluster cannot provide (exit status 2, nothing started)."""


@dataclass(frozen=True)
class GpuRequest:
    """One GPU count of a config, as the work that uses it claims it.

    Args:
        field: where it is set, for messages (``placement.gpus``, ``jobs[dog].num_gpus``).
        value: ``auto`` or a number.
        workers: how many workers claim it.
        per_job: ``value`` is the whole job's, split evenly between ``workers`` (fine-tuning);
            otherwise it is each worker's (stages, video jobs).
        whole: each worker needs a GPU of its own (data-parallel training: two NCCL ranks
            cannot share one), so ``auto`` with fewer GPUs than workers runs on CPU.
    """

    field: str
    value: float | str
    workers: int = 1
    per_job: bool = False
    whole: bool = False


@dataclass(frozen=True)
class GpuChoice:
    """What a request resolved to on the connected cluster.

    Args:
        gpus: GPUs each worker claims (0: CPU).
        workers: workers that claim them.
        note: why the run is on CPU although it did not ask for it (``auto`` without GPUs).
    """

    gpus: float
    workers: int = 1
    note: str | None = None

    @property
    def total(self) -> float:
        """GPUs the work claims over all its workers (a fine-tuning job's ``num_gpus``)."""
        return self.gpus * self.workers


def slots(node_gpus: list[float], per_worker: float) -> int:
    """How many workers claiming ``per_worker`` GPUs each fit on nodes with ``node_gpus``."""
    if per_worker <= 0:
        return math.inf  # type: ignore[return-value]
    return sum(int(g / per_worker + 1e-9) for g in node_gpus)


def describe_nodes(node_gpus: list[float]) -> str:
    """``has no GPUs`` / ``has 1 GPU (nodes: 1, 0, 0)``, for messages."""
    total = sum(node_gpus)
    if total <= 0:
        return "has no GPUs"
    per_node = ", ".join(f"{g:g}" for g in node_gpus)
    return f"has {total:g} GPU(s) (per node: {per_node})"


def resolve_gpus(request: GpuRequest, node_gpus: list[float]) -> GpuChoice:
    """Resolve ``request`` against a cluster whose nodes have ``node_gpus`` GPUs.

    Raises:
        PlacementError: an explicit count that no node (or, for a several-worker job, not
            enough nodes) can provide.
    """
    workers = max(1, request.workers)
    biggest = max(node_gpus, default=0.0)
    if request.value == AUTO:
        if biggest <= 0:
            return GpuChoice(0.0, workers, NO_GPUS)
        if request.whole and workers > 1:
            if slots(node_gpus, 1.0) >= workers:
                return GpuChoice(1.0, workers)
            return GpuChoice(0.0, workers, f"ran on CPU: {request.field} is auto and the job's {workers} workers "
                                           f"need one whole GPU each; the Ray cluster {describe_nodes(node_gpus)}")
        return GpuChoice(min(1.0, biggest), workers)
    asked = float(request.value)
    if asked <= 0:
        return GpuChoice(0.0, workers)
    per_worker = asked / workers if request.per_job else asked
    need = workers if request.per_job else 1
    if slots(node_gpus, per_worker) < need:
        if request.per_job and workers > 1:
            asked_text = f"{asked:g} GPU(s) asked ({per_worker:g} for each of {workers} workers)"
        else:
            asked_text = f"{asked:g} GPU(s) asked per worker"
        per_node = ", ".join(f"{g:g}" for g in node_gpus)
        where = ("the Ray cluster has no GPUs" if biggest <= 0 else
                 f"the Ray cluster's nodes cannot provide that (GPUs per node: {per_node})")
        raise PlacementError(f"{request.field}: {asked_text}, but {where}; the work would wait forever. "
                             f"Set {request.field}: auto (GPUs where the cluster has them, else CPU) or 0 (CPU)")
    return GpuChoice(per_worker, workers)


def check_gpu_requests(requests: list[GpuRequest], node_gpus: list[float]) -> list[GpuChoice]:
    """Resolve every request (a command checks its config this way as soon as Ray is connected)."""
    return [resolve_gpus(r, node_gpus) for r in requests]


def explicit_gpus(requests: list[GpuRequest]) -> list[GpuRequest]:
    """The requests that name a GPU count (only those can fail on a cluster: ``auto`` and 0 never do)."""
    return [r for r in requests if r.value != AUTO and float(r.value) > 0]
