"""The instruction-pairs flow (InstructPix2Pix's dataset): captions → instructions → image pairs.

The DAG: the text stage (a writer adds an instruction and an edited caption to each
caption) → commit ``text/`` → the image stage (Prompt-to-Prompt renders before/after
pairs from K seeds, a CLIP filter keeps the good ones) → commit ``pairs/``. Each is one
Prefect task on a Ray worker driving a Ray Data pipeline; ``text/`` is reused when
complete, and both resume per shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options
from prefect_ray.task_runners import RayTaskRunner

from pixelmill.config import PairsConfig
from pixelmill.datasets import DatasetWriter, read_manifest
from pixelmill.datasets.storage import join
from pixelmill.flows.common import ShardPlan, plan_shards, run_stage_into_writer
from pixelmill.tasks.stage import Resources

TEXT = ("instructions", 1)
PAIRS = ("pairs", 1)
TEXT_COLUMNS = ["id", "caption", "edit_prompt", "edited_caption"]


def stage_urls(config: dict[str, Any]) -> dict[str, str]:
    """``text/`` and ``pairs/`` under the output root."""
    return {"text": join(config["output"], "text"), "pairs": join(config["output"], "pairs")}


def plans(cfg: PairsConfig) -> tuple[ShardPlan, ShardPlan | None]:
    """The text plan, and the pairs plan when ``text/`` is complete (else it is planned after)."""
    urls = stage_urls(cfg.model_dump())
    text = plan_shards({"input": cfg.input, "output": urls["text"], "limit": cfg.limit}, cfg.text_affecting())
    if text.todo or not text.output_complete:
        return text, None
    return text, plan_shards({"input": urls["text"], "output": urls["pairs"], "limit": None},
                             cfg.pairs_affecting())


@dataclass
class PairsSummary:
    """What a pairs run did."""

    output: str
    captions: int = 0
    instructions: int = 0
    text_rejects: int = 0
    pairs: int = 0
    dropped: int = 0
    pair_rejects: int = 0
    text_skipped: list[str] = field(default_factory=list)
    pairs_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


@task(name="write-instructions", cache_policy=NO_CACHE)
def write_instructions(config: dict[str, Any], plan: ShardPlan) -> dict[str, int]:
    """Text stage over the planned caption shards, deduplicating captions across all shards."""
    from pixelmill.tasks.instructions import InstructionStage, find_duplicate_captions

    cfg = PairsConfig.model_validate(config)
    duplicates = join(config["output"], "text-duplicates.json")
    find_duplicate_captions(cfg.input, cfg.caption_column, cfg.limit, duplicates)
    stage_config = {**cfg.text_stage_config(), "duplicates_url": duplicates}
    stats = run_stage_into_writer(
        plan=plan,
        builder=partial(InstructionStage, stage_config, Resources(cpus=cfg.num_cpus_per_worker)),
        columns=["id", cfg.caption_column],
        writer=DatasetWriter(stage_urls(config)["text"], *TEXT, plan.config),
        workers=cfg.workers,
    )
    return {"rows_in": stats.rows_in, "rows_out": stats.rows_out, "rejects": stats.rejects}


@task(name="render-pairs", cache_policy=NO_CACHE)
def render_pairs(config: dict[str, Any], plan: ShardPlan, num_gpus: float) -> dict[str, int]:
    """Image stage over the instruction shards: render, score, filter."""
    from pixelmill.tasks.p2p import PairRenderStage

    cfg = PairsConfig.model_validate(config)
    stats = run_stage_into_writer(
        plan=plan,
        builder=partial(PairRenderStage, cfg.image_stage_config(),
                        Resources(cpus=cfg.num_cpus_per_worker, gpus=num_gpus)),
        columns=TEXT_COLUMNS,
        writer=DatasetWriter(stage_urls(config)["pairs"], *PAIRS, plan.config),
        workers=cfg.workers,
    )
    return {"rows_in": stats.rows_in, "rows_out": stats.rows_out, "rejects": stats.rejects,
            "dropped": stats.dropped}


@task(name="commit-manifest", cache_policy=NO_CACHE)
def commit(url: str, schema: tuple[str, int], hashed: dict[str, Any]) -> None:
    """Mark a dataset complete."""
    DatasetWriter(url, *schema, hashed).open().finish()


@flow(name="pairs", task_runner=RayTaskRunner(), log_prints=True)
def pairs_flow(config: dict[str, Any], num_gpus: float = 0.0) -> PairsSummary:
    """Text stage → commit ``text/`` → image stage → commit ``pairs/``."""
    t0 = time.perf_counter()
    cfg = PairsConfig.model_validate(config)
    urls = stage_urls(config)
    summary = PairsSummary(output=cfg.output)
    text_plan, _ = plans(cfg)
    summary.text_skipped = text_plan.skip
    if text_plan.todo:
        with remote_options(num_cpus=0):
            t = write_instructions.submit(config, text_plan).result()
        summary.captions, summary.instructions, summary.text_rejects = t["rows_in"], t["rows_out"], t["rejects"]
    if text_plan.todo or not text_plan.output_complete:
        commit(urls["text"], TEXT, text_plan.config)
    _, pair_plan = plans(cfg)
    summary.pairs_skipped = pair_plan.skip
    if pair_plan.todo:
        with remote_options(num_cpus=0):
            r = render_pairs.submit(config, pair_plan, num_gpus).result()
        summary.pairs, summary.dropped, summary.pair_rejects = r["rows_out"], r["dropped"], r["rejects"]
    m = read_manifest(urls["pairs"])
    if pair_plan.todo or m is None or not m.complete:
        commit(urls["pairs"], PAIRS, pair_plan.config)
    summary.seconds = time.perf_counter() - t0
    return summary
