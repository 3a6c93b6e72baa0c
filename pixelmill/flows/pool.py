"""``pixelmill pool build``: embed a dataset's captions and/or images into a retrieval pool.

One generic stage run of ``PoolEmbedder`` actors (open_clip loaded once per actor);
shards commit as they complete, so a rerun resumes.
"""

from __future__ import annotations

from prefect import flow

from pixelmill.datasets import Dataset
from pixelmill.flows.ray_runner import LazyRayTaskRunner
from pixelmill.flows.stage_run import run_stage
from pixelmill.flows.summary import RunFigures, publish_figures
from pixelmill.tasks.stage import Resources


@flow(name="pool-build", task_runner=LazyRayTaskRunner(), log_prints=True)
def build_pool_flow(dataset: str, out: str, clip_model: str, caption_column: str | None = "caption",
                    image_column: str | None = "image", batch_size: int = 64, overwrite: bool = False,
                    device: str = "auto", workers: int = 1, timeouts: dict | None = None) -> dict[str, int]:
    """Embed ``dataset`` into a pool at ``out`` (Parquet layout; the manifest names the CLIP model).

    ``timeouts``: ``{"stall": seconds, "attempts": n}`` (``config.base.StageTimeouts``; default
    1800 s and 2): a call that stops embedding batches ends its worker and its shard is
    retried; after ``attempts`` its rows are rejects naming the timeout.
    """
    from pixelmill.config.base import StageTimeouts
    from pixelmill.datasets.pool import pool_manifest_config
    from pixelmill.datasets.storage import remove
    from pixelmill.tasks.regularization import clip_embed_dim
    from pixelmill.tasks.retrieval import PoolEmbedder

    names = Dataset.open(dataset).schema.names
    for col in (caption_column, image_column):
        if col and col not in names:
            raise ValueError(f"column {col!r} is not in {dataset} (columns: {', '.join(names)})")
    keep = [c for c in names if c not in {"id", caption_column, image_column}]
    stage_cfg = dict(clip_model=clip_model, caption_column=caption_column, image_column=image_column,
                     batch_size=batch_size, device=device, keep_columns=keep)
    hashed = {"input": dataset, "caption_column": caption_column, "image_column": image_column}
    hashed.update(pool_manifest_config(clip_model, clip_embed_dim(clip_model) or 0))
    if overwrite:
        remove(out)
    r = run_stage(PoolEmbedder, stage_cfg, Resources(), input=dataset, output=out, hashed=hashed, workers=workers,
                  task_name="embed-pool", timeouts=StageTimeouts.model_validate(timeouts or {}).model_dump())
    run = publish_figures(RunFigures(
        flow="pool-build", output=out, rows_in=r.stats.rows_in, rows_out=r.stats.rows_out,
        rejected=r.stats.reject_reasons, skipped=len(r.shards_skipped), seconds=r.stats.seconds))
    return {"rows": r.stats.rows_out, "rejects": r.stats.rejects, "flow_run_id": run}
