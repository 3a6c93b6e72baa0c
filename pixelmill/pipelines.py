"""The built-in pipelines: what ``pixelmill run`` can chain, each declared once.

A pipeline entry (``pixelmill.registry``, kind ``pipeline``) names its config model
(whose ``preflight()`` runs before it starts), its Prefect flow, and what its result
offers to later steps (``output``; a fine-tuning step also ``jobs.NAME``).
Everything is named by import path, so declaring a pipeline imports nothing heavy. A
plugin adds a pipeline the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pixelmill.registry import register


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Pipeline:
    """A flow that can run on its own (``pixelmill <name>``) or as a step of ``pixelmill run``.

    Args:
        name: the step kind (``uses:``).
        config: ``module:Class`` of its config model.
        flow: ``module:function(config_dict) -> summary``: the Prefect flow.
        job_outputs: whether it offers ``jobs.NAME`` (a fine-tuning job's artifacts).
    """

    name: str
    config: str
    flow: str
    job_outputs: bool = False

    def config_model(self):
        return _load(self.config)

    def run_flow(self, cfg, flow_run_name: str | None = None):
        fn = _load(self.flow)
        if flow_run_name:
            fn = fn.with_options(flow_run_name=flow_run_name)
        return fn(cfg.model_dump())

    def offers(self, cfg) -> set[str]:
        """Reference keys later steps may use: ``output``, and ``jobs.NAME`` for each job."""
        keys = {"output"}
        if self.job_outputs:
            keys |= {f"jobs.{j.name}" for j in cfg.expand()}
        return keys

    def results(self, cfg) -> dict[str, str]:
        """The reference values once the step has run (job folders need the data, so only then)."""
        out = {"output": cfg.output}
        if self.job_outputs:
            from pixelmill.datasets import storage
            from pixelmill.tasks.train.plan import plan_campaign

            for j in plan_campaign(cfg).jobs:
                out[f"jobs.{j.spec['name']}"] = storage.join(j.spec["dir"], "artifacts")
        return out


for _p in (
    Pipeline("edit", "pixelmill.config:EditConfig", "pixelmill.flows.bulk_edit:bulk_edit_flow"),
    Pipeline("retrieve", "pixelmill.config:RetrieveConfig", "pixelmill.flows.retrieve:retrieve_flow"),
    Pipeline("pairs", "pixelmill.config:PairsConfig", "pixelmill.flows.pairs:pairs_flow"),
    Pipeline("finetune", "pixelmill.config:CampaignConfig", "pixelmill.flows.finetune:finetune_flow",
             job_outputs=True),
    Pipeline("video", "pixelmill.config:VideoConfig", "pixelmill.flows.video:video_flow"),
):
    register("pipeline", _p.name)(_p)
