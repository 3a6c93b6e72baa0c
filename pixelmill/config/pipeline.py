"""Pipelines: several flows chained into one DAG (``pixelmill run PIPELINE.yaml``).

A pipeline is a list of steps; each step ``uses`` a registered pipeline (``edit``,
``pairs``, ``finetune``, ``retrieve``, ``video``, or one a plugin adds) with its config:
an optional base file (``config:``, relative to the pipeline file) deep-merged with
``with:``. A string anywhere in a step's config may name an earlier step's result as
``${steps.NAME.output}`` (its output root) or, for a fine-tuning step,
``${steps.NAME.jobs.JOB}`` (that job's ``artifacts/`` folder, which diffusers loads and
``adapters:``/``model:`` accept). References are checked before anything starts.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from pixelmill.config.base import FlowConfig, StrictModel

REFERENCE = re.compile(r"\$\{steps\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)\}")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class StepConfig(StrictModel):
    """One step: a name, the pipeline it uses, and its config (base file + ``with:``)."""

    name: str
    uses: str
    config: str | None = None
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")

    model_config = {**StrictModel.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _check(self) -> StepConfig:
        from pixelmill import registry

        if not NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '-' and '_'")
        try:
            registry.get("pipeline", self.uses)
        except registry.UnknownEntry as e:
            raise ValueError(f"uses: {e}") from None
        return self


class PipelineConfig(FlowConfig):
    """A pipeline: steps run in order as one Prefect flow, each step a subflow.

    Args:
        steps: the steps, in order (names unique).
        limit: passed to every step (only the first N input rows of each).
    """

    def preflight_steps(self, base_dir, *, overwrite: bool = False) -> list[dict[str, Any]]:
        """Every step validated (and those without references preflighted); the steps to run."""
        from pixelmill.config.preflight import check_pipeline

        return check_pipeline(self, base_dir, overwrite=overwrite)

    steps: list[StepConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        seen: set[str] = set()
        for s in self.steps:
            if s.name in seen:
                raise ValueError(f"steps: the name {s.name!r} is used twice")
            seen.add(s.name)
        return self


def references(value: Any) -> list[tuple[str, str]]:
    """Every ``(step, key)`` a config value names, nested values included."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


def substitute(value: Any, resolve) -> Any:
    """``value`` with every reference replaced by ``resolve(step, key)``."""
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: resolve(m.group(1), m.group(2)), value)
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` (mappings merged key by key, anything else replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pipeline_gpu_requests(steps: list[dict]) -> list:
    """Every step's GPU counts (references to earlier steps' results left as they are: they name paths)."""
    from dataclasses import replace

    from pixelmill import registry

    requests = []
    for step in steps:
        model = registry.get("pipeline", step["uses"]).obj.config_model()
        cfg = model.model_validate(substitute(step["data"], lambda name, key: f"steps.{name}.{key}"))
        requests += [replace(r, field=f"steps.{step['name']}: {r.field}") for r in cfg.gpu_requests()]
    return requests
