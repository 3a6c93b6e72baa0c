"""The flows Prefect deployments run: one per pixelmill flow, each taking a whole config.

A deployment's run happens on a Prefect worker (``prefect worker start --pool P``) or in
``pixelmill serve``, in a fresh process with nothing set up. Each entrypoint here does
what the command line does before its flow: read the config (its contents as a mapping,
or a path/URL of a YAML file read where the run happens), validate it, preflight it
(paths made absolute, inputs/models/outputs checked), connect to Ray (``RAY_ADDRESS`` or
the config's ``runtime.ray_address``, else a local Ray) and check its GPU counts, then run
the flow as a child flow run, which publishes its summary artifact as usual. A run that
finds nothing new skips every committed shard, job or video, as a rerun of the command
does.

Entrypoints, by module path (``prefect.yaml``, ``pixelmill deploy``):
``pixelmill.flows.deployed.edit``, ``.retrieve``, ``.pairs``, ``.finetune``, ``.video``
and ``.run`` (a chained pipeline, as ``pixelmill run``).

A bad config, a failed job or video, or a failed step fails the flow run (so Prefect's
automations can notify); nothing is overwritten (a scheduled run never passes
``--overwrite``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from prefect import flow


def read_config(config: dict[str, Any] | str) -> tuple[dict[str, Any], Path | None]:
    """The config mapping and, for a local file, its folder (pipeline step files are relative to it)."""
    from pixelmill.config import ConfigError, read_yaml

    if isinstance(config, dict):
        return dict(config), None
    if "://" not in config or config.startswith("file://"):
        path = Path(config.removeprefix("file://")).expanduser().resolve()
        return read_yaml(path), path.parent
    import yaml

    from pixelmill.datasets import storage

    try:
        data = yaml.safe_load(storage.read_bytes(config)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: expected a mapping at the top level")
    return data, None


def _summary_dict(summary: Any) -> dict[str, Any]:
    return asdict(summary) if is_dataclass(summary) else dict(summary or {})


def run_deployed(kind: str, config: dict[str, Any] | str) -> dict[str, Any]:
    """Validate, preflight and run ``config`` as ``pixelmill <kind>`` would; returns the summary."""
    from pixelmill import registry
    from pixelmill.config import RuntimeConfig, validate
    from pixelmill.runtime import Runtime, check_cluster_gpus, default_home

    data, base_dir = read_config(config)
    where = config if isinstance(config, str) else None
    if kind == "run":
        from pixelmill.config.pipeline import PipelineConfig, pipeline_gpu_requests

        cfg = validate(PipelineConfig, data, where)
        steps = cfg.preflight_steps(base_dir or Path.cwd())
        requests = pipeline_gpu_requests(steps)
    else:
        pipeline = registry.get("pipeline", kind).obj
        cfg = validate(pipeline.config_model(), data, where).preflight()
        requests = cfg.gpu_requests()
    rc = cfg.runtime or RuntimeConfig()
    # The run's own Prefect API (set by the worker or `serve`) is kept; Ray as the config says.
    with Runtime(ray_address=rc.ray_address, prefect_api_url=os.environ.get("PREFECT_API_URL"),
                 home=default_home(), num_cpus=rc.num_cpus):
        check_cluster_gpus(requests)
        if kind == "run":
            from pixelmill.flows.run import pipeline_flow

            name = Path(where).stem if where else "pipeline"
            result = pipeline_flow.with_options(flow_run_name=name)(steps)
        else:
            result = _summary_dict(pipeline.run_flow(cfg))
    failed = result.get("failed") if kind != "run" else None
    print(_describe(kind, result))
    if failed:
        raise RuntimeError(f"{kind}: failed: {failed}")
    return result


def _describe(kind: str, s: dict[str, Any]) -> str:
    if kind == "run":
        return f"pipeline: {len(s)} step(s) done: {', '.join(s)}"
    if kind == "edit":
        if not s.get("shards_run"):
            return f"nothing new: {len(s.get('shards_skipped') or [])} shard(s) already committed in {s.get('output')}"
        return (f"{s.get('rows_in')} rows in -> {s.get('rows_out')} edited + {s.get('rejects')} rejected "
                f"({len(s['shards_run'])} shard(s) run, {len(s.get('shards_skipped') or [])} skipped)")
    figures = {k: (len(v) if isinstance(v, list | dict) else v) for k, v in s.items()
               if k in ("ran", "skipped", "failed", "rejected", "pairs", "captions", "videos")}
    return f"{kind}: {figures} -> {s.get('output')}"


@flow(name="pixelmill-edit", log_prints=True)
def edit(config: dict[str, Any] | str) -> dict[str, Any]:
    """Bulk edit (``pixelmill edit``): ``config`` is an edit config's contents, or a YAML path/URL."""
    return run_deployed("edit", config)


@flow(name="pixelmill-retrieve", log_prints=True)
def retrieve(config: dict[str, Any] | str) -> dict[str, Any]:
    """Regularization retrieval (``pixelmill retrieve``)."""
    return run_deployed("retrieve", config)


@flow(name="pixelmill-pairs", log_prints=True)
def pairs(config: dict[str, Any] | str) -> dict[str, Any]:
    """Instruction pairs (``pixelmill pairs``)."""
    return run_deployed("pairs", config)


@flow(name="pixelmill-finetune", log_prints=True)
def finetune(config: dict[str, Any] | str) -> dict[str, Any]:
    """A fine-tuning campaign (``pixelmill finetune``); failed jobs fail the run."""
    return run_deployed("finetune", config)


@flow(name="pixelmill-video", log_prints=True)
def video(config: dict[str, Any] | str) -> dict[str, Any]:
    """Video editing (``pixelmill video``); failed videos fail the run."""
    return run_deployed("video", config)


@flow(name="pixelmill-run", log_prints=True)
def run(config: dict[str, Any] | str) -> dict[str, Any]:
    """A chained pipeline (``pixelmill run``); step ``config:`` files are relative to a local pipeline file."""
    return run_deployed("run", config)


FLOWS = {"edit": edit, "retrieve": retrieve, "pairs": pairs, "finetune": finetune, "video": video, "run": run}
