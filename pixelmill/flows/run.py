"""The pipeline flow: several flows chained into ONE Prefect flow, each step a subflow.

Reading the flow shows the DAG: for each step in order, fill in the references to
earlier steps' results, check the step's config (as its own command would), run the
step's flow as a child flow run, record what it offers later steps. Datasets between
steps are ordinary pixelmill datasets, so a rerun skips finished steps' work (their
shards and jobs are committed) and resumes the unfinished step at its shard or job.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from prefect import flow

from pixelmill.config import ConfigError
from pixelmill.config.pipeline import substitute
from pixelmill.flows.summary import combine, publish_figures


def _as_dict(summary: Any) -> dict[str, Any]:
    return asdict(summary) if is_dataclass(summary) else dict(summary or {})


@flow(name="pipeline", log_prints=True)
def pipeline_flow(steps: list[dict[str, Any]], overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run ``steps`` (``{"name", "uses", "data"}``, checked by ``pixelmill run``) in order.

    Each step's flow publishes its own summary artifact; this parent flow publishes the
    chain's (``pixelmill-pipeline-summary``: the first step's inputs, the last step's
    outputs, rejects, GPU-hours and notes of every step).

    Raises:
        RuntimeError: a step reported failed jobs or videos (later steps would read them).
    """
    from pixelmill import registry

    offered: dict[str, dict[str, str]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    figures = []
    for step in steps:
        pipeline = registry.get("pipeline", step["uses"]).obj
        data = substitute(step["data"], lambda name, key: offered[name][key])
        try:
            cfg = pipeline.config_model().model_validate(data).preflight(overwrite=overwrite)
        except ConfigError as e:
            raise type(e)(f"step {step['name']!r}: {e}") from None
        print(f"step {step['name']} ({step['uses']}): {cfg.output}")
        result = pipeline.run_flow(cfg, flow_run_name=step["name"])
        summaries[step["name"]] = _as_dict(result)
        if hasattr(result, "figures"):
            f = result.figures()
            f.flow = step["name"]
            figures.append(f)
        if summaries[step["name"]].get("failed"):
            publish_figures(combine("pipeline", str(cfg.output), figures))
            raise RuntimeError(f"step {step['name']!r} failed: {summaries[step['name']]['failed']}")
        offered[step["name"]] = pipeline.results(cfg)
    publish_figures(combine("pipeline", figures[-1].output if figures else "", figures))
    return summaries
