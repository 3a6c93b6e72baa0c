"""The instruction-pairs flow (InstructPix2Pix's dataset): captions → instructions → image pairs.

The DAG: find duplicate captions → the text stage (a writer adds an instruction and an
edited caption to each caption) → commit ``text/`` → the image stage (Prompt-to-Prompt
renders before/after pairs from K seeds, a CLIP filter keeps the good ones) → commit
``pairs/``. Each stage is one generic stage run (``flows/stage_run.py``); ``text/`` is
reused when complete, and both resume per shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pixelmill.config import PairsConfig
from pixelmill.config.placement import GpuChoice
from pixelmill.datasets.storage import join
from pixelmill.flows.common import plan_shards
from pixelmill.flows.ray_runner import LazyRayTaskRunner
from pixelmill.flows.stage_run import choose_gpus, run_stage
from pixelmill.flows.summary import FlowSummary, RunFigures, add_counts, gpu_hours, publish


def stage_urls(config: dict[str, Any]) -> dict[str, str]:
    """``text/`` and ``pairs/`` under the output root."""
    return {"text": join(config["output"], "text"), "pairs": join(config["output"], "pairs")}


@dataclass
class PairsSummary(FlowSummary):
    """What a pairs run did (``rejected_by_reason`` keys start with the stage: ``text:``, ``pairs:``)."""

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

    def figures(self) -> RunFigures:
        return RunFigures(flow="pairs", output=self.output, unit_in="captions", unit_out="pairs",
                          rows_in=self.captions, rows_out=self.pairs, rejected=dict(self.rejected_by_reason),
                          dropped=self.dropped, skipped=len(self.text_skipped) + len(self.pairs_skipped),
                          seconds=self.seconds, gpu_hours=self.gpu_hours, notes=list(self.notes))


@task(name="find-duplicate-captions", cache_policy=NO_CACHE)
def find_duplicates(cfg: PairsConfig, url: str) -> None:
    """Record captions that repeat across all input shards, so each is written once."""
    from pixelmill.tasks.instructions import find_duplicate_captions

    find_duplicate_captions(cfg.input, cfg.caption_column, cfg.limit, url)


@flow(name="pairs", task_runner=LazyRayTaskRunner(), log_prints=True)
def pairs_flow(config: dict[str, Any]) -> PairsSummary:
    """Duplicates → text stage → commit ``text/`` → image stage → commit ``pairs/``."""
    from pixelmill.tasks.instructions import InstructionStage
    from pixelmill.tasks.p2p import PairRenderStage

    t0 = time.perf_counter()
    cfg = PairsConfig.model_validate(config)
    urls = stage_urls(config)
    duplicates = join(cfg.output, "text-duplicates.json")
    text_todo = plan_shards({"input": cfg.input, "output": urls["text"], "limit": cfg.limit}, cfg.text_affecting()).todo
    if text_todo:
        find_duplicates(cfg, duplicates)
    # the image stage's GPUs (the text stage runs on CPU), looked up (and Ray connected) only for work to do
    pairs_todo = text_todo or plan_shards({"input": urls["text"], "output": urls["pairs"]}, cfg.pairs_affecting()).todo
    gpus = choose_gpus(cfg.placement.gpu_request()) if pairs_todo else GpuChoice(0.0)
    text = run_stage(InstructionStage, {**cfg.text_stage_config(), "duplicates_url": duplicates},
                     cfg.placement.resources(0), input=cfg.input, output=urls["text"], hashed=cfg.text_affecting(),
                     workers=cfg.placement.workers, limit=cfg.limit, task_name="write-instructions",
                     timeouts=cfg.timeouts.model_dump())
    pairs = run_stage(PairRenderStage, cfg.image_stage_config(), cfg.placement.resources(gpus.gpus),
                      input=urls["text"], output=urls["pairs"], hashed=cfg.pairs_affecting(),
                      workers=cfg.placement.workers, task_name="render-pairs", timeouts=cfg.timeouts.model_dump(),
                      rows_per_call=cfg.placement.rows_per_call)
    rejected = add_counts({}, text.stats.reject_reasons, "text: ")
    return publish(PairsSummary(
        output=cfg.output, captions=text.stats.rows_in, instructions=text.stats.rows_out,
        text_rejects=text.stats.rejects, pairs=pairs.stats.rows_out, dropped=pairs.stats.dropped,
        pair_rejects=pairs.stats.rejects, text_skipped=text.shards_skipped, pairs_skipped=pairs.shards_skipped,
        seconds=time.perf_counter() - t0, notes=[gpus.note] if gpus.note and pairs.shards_run else [],
        gpus=gpus.gpus, gpu_hours=gpu_hours(gpus.gpus, pairs.stats.actors, pairs.stats.seconds),
        rejected_by_reason=add_counts(rejected, pairs.stats.reject_reasons, "pairs: "), nodes=pairs.stats.nodes))
