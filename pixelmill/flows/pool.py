"""``pixelmill pool build``: embed a dataset's captions and/or images into a retrieval pool.

One Prefect task on a Ray worker drives a Ray Data pipeline of ``PoolEmbedder`` actors
(open_clip loaded once per actor); shards commit as they complete, so a rerun resumes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options
from prefect_ray.task_runners import RayTaskRunner

from pixelmill.datasets import Dataset, DatasetWriter
from pixelmill.flows.common import plan_shards, run_stage_into_writer

SCHEMA = ("pool", 1)


@task(name="embed-pool", cache_policy=NO_CACHE)
def embed_pool(config: dict[str, Any], plan) -> dict[str, int]:
    """Embed the planned shards and commit each as it completes."""
    from pixelmill.tasks.retrieval import PoolEmbedder

    columns = ["id"] + [c for c in (config["caption_column"], config["image_column"], *config["keep_columns"]) if c]
    stats = run_stage_into_writer(
        plan=plan,
        builder=partial(PoolEmbedder, {k: config[k] for k in ("clip_model", "caption_column", "image_column",
                                                              "batch_size", "device")}),
        columns=list(dict.fromkeys(columns)),
        writer=DatasetWriter(config["output"], *SCHEMA, plan.config),
        workers=config["workers"],
        drop_columns=(config["image_column"],) if config["image_column"] else (),
    )
    return {"rows": stats.rows_out, "rejects": stats.rejects}


@flow(name="pool-build", task_runner=RayTaskRunner(), log_prints=True)
def build_pool_flow(dataset: str, out: str, clip_model: str, caption_column: str | None = "caption",
                    image_column: str | None = "image", batch_size: int = 64, overwrite: bool = False,
                    device: str = "auto", workers: int = 1) -> dict[str, int]:
    """Embed ``dataset`` into a pool at ``out`` (Parquet layout; the manifest names the CLIP model)."""
    from pixelmill.datasets.storage import remove

    names = Dataset.open(dataset).schema.names
    for col in (caption_column, image_column):
        if col and col not in names:
            raise ValueError(f"column {col!r} is not in {dataset} (columns: {', '.join(names)})")
    keep = [c for c in names if c not in {"id", caption_column, image_column}]
    config = dict(input=dataset, output=out, clip_model=clip_model, caption_column=caption_column,
                  image_column=image_column, batch_size=batch_size, device=device, workers=workers,
                  keep_columns=keep, limit=None)
    from pixelmill.datasets.pool import pool_manifest_config
    from pixelmill.tasks.regularization import clip_embed_dim

    hashed = {k: config[k] for k in ("input", "caption_column", "image_column")}
    hashed.update(pool_manifest_config(clip_model, clip_embed_dim(clip_model) or 0))
    if overwrite:
        remove(out)
    plan = plan_shards(config, hashed)
    result = {"rows": 0, "rejects": 0}
    if plan.todo:
        with remote_options(num_cpus=0):
            result = embed_pool.submit(config, plan).result()
    DatasetWriter(out, *SCHEMA, hashed).open().finish()
    return result
