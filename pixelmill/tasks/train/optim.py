"""The trainer's optimiser kernel and its gradient all-reduce.

* ``adamw_kernel``: which AdamW implementation runs the update. ``fused`` (one kernel for
  all tensors) when every parameter is a floating CUDA tensor, else ``foreach`` (a few
  multi-tensor ops instead of a Python loop over parameters). Both compute AdamW's
  update; the choice is made here only.
* ``all_reduce_bucketed``: sum tensors over a process group in about ``bucket_bytes``
  flat buckets, one ``all_reduce`` per bucket instead of one per tensor (what DDP does).
  Each element is summed with the same elements of the other ranks as before, so with
  two ranks (a + b either way) the result is bitwise the per-tensor one; with more
  ranks a backend may group the additions differently for another message size, which
  changes only float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


def adamw_kernel(params: Iterable[Any]) -> dict[str, bool]:
    """AdamW's keyword for its implementation: ``{"fused": True}`` when every parameter is a
    floating-point CUDA tensor, else ``{"foreach": True}`` (the CPU, mixed devices, or none)."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
    return {"fused": True} if fused else {"foreach": True}


def make_adamw(params: Sequence[torch.Tensor], **kw: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` with the kernel ``adamw_kernel`` chooses."""
    return torch.optim.AdamW(list(params), **kw, **adamw_kernel(params))


def set_adamw_kernel(optimizer: torch.optim.Optimizer) -> None:
    """Re-apply this machine's kernel choice after ``load_state_dict`` (which restores the
    saving run's flags: a checkpoint written on a GPU says ``fused`` even when resumed on a CPU)."""
    for group in optimizer.param_groups:
        choice = adamw_kernel(group["params"])
        group["fused"], group["foreach"] = choice.get("fused", False), choice.get("foreach", False)


def all_reduce_bucketed(tensors: Sequence[torch.Tensor], group: Any = None,
                        bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum each tensor in place over the process group, in flat buckets of ~``bucket_bytes``.

    Consecutive tensors of one dtype and device share a bucket until it holds at least
    ``bucket_bytes`` (a tensor larger than that is a bucket of its own). Returns the number
    of all-reduce calls made.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets: list[list[torch.Tensor]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[int]]] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        if key not in open_:
            open_[key] = ([], [0])
            buckets.append(open_[key][0])
        bucket, size = open_[key]
        bucket.append(t)
        size[0] += t.numel() * t.element_size()
        if size[0] >= bucket_bytes:
            del open_[key]
    for bucket in buckets:
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], group=group)
            continue
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(reduced)
    return len(buckets)
