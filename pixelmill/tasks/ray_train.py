"""The one place that speaks Ray Train: runs a function on N data-parallel workers.

Beside ``ray_data.py`` (the one place that speaks Ray Data), so the trainer itself
(``tasks/train/``) knows nothing of Ray: it receives a rank, a world size and a device.
Ray Train's checkpoints and result folder are not used; pixelmill keeps its own
checkpoints in the job's folder, so Ray's storage path is a temporary directory removed
afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any


def current_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): a job records it on each attempt."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - only descriptive
        return None


def _loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    ray.get(config["nodes"].set.remote(rank, ray.get_runtime_context().get_node_id()))
    config["worker"](rank, ctx.get_world_size(), ray.train.torch.get_device())


def _node_recorder():
    """A small actor (claims nothing) the workers tell which node each rank runs on."""
    import ray

    @ray.remote(num_cpus=0)
    class _Nodes:
        def __init__(self) -> None:
            self.nodes: dict[int, str] = {}

        def set(self, rank: int, node: str) -> None:
            self.nodes[rank] = node

        def get(self) -> list[str]:
            return [self.nodes[r] for r in sorted(self.nodes)]

    return _Nodes.remote()


def run_data_parallel(worker: Callable[[int, int, Any], None], *, name: str, num_workers: int,
                      cpus_per_worker: float, num_gpus: float) -> list[str]:
    """Call ``worker(rank, world, device)`` on ``num_workers`` Ray Train workers, wait for all,
    and return the Ray node id each rank ran on (rank order).

    ``num_gpus`` is the job's total, split evenly between workers; with GPUs the process
    group uses NCCL, without them Gloo. ``worker`` must be picklable (a module-level
    function or a ``functools.partial`` of one).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = num_gpus > 0
    per_worker = {"CPU": cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = num_gpus / num_workers
    ray_storage = tempfile.mkdtemp(prefix="pixelmill-train-")
    nodes = _node_recorder()
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"worker": worker, "nodes": nodes},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=ray_storage),
    )
    try:
        trainer.fit()
        return ray.get(nodes.get.remote())
    finally:
        ray.kill(nodes)
        shutil.rmtree(ray_storage, ignore_errors=True)
