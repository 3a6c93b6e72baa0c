"""What every flow config shares: strict models, YAML loading with ``--set``, placement, plugins.

A flow config names its inputs and its ``output`` at the top level, so
``pixelmill <flow> CONFIG.yaml --set output=URL`` works the same for every flow. Where
work runs (``placement``, ``runtime``) and which plugin modules to import (``plugins``)
are declared once here, in :class:`FlowConfig`, and left out of every output hash by
construction: they change where and how fast rows are made, not what they are.

This package imports no compute (no torch, no tasks): a config validates as plain data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what is wrong."""


AUTO = "auto"

GpuCount = Annotated[float, Field(ge=0)] | Literal["auto"]
"""A config's GPU count: ``auto`` (GPUs where the cluster has them, else CPU) or a number
(``0``: CPU on purpose; more than the cluster can provide is refused). See ``config/placement.py``."""


class StrictModel(BaseModel):
    """Base for configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(StrictModel):
    """Where work runs. Empty values mean the embedded local runtime."""

    ray_address: str | None = None
    prefect_api_url: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)


class ScheduleConfig(StrictModel):
    """When a deployed config runs (``pixelmill deploy`` / ``pixelmill serve``): a cron line or an interval.

    Args:
        cron: a cron line, e.g. ``"0 2 * * *"`` (every night at 02:00 in ``timezone``).
        interval: seconds between runs (at least 1).
        timezone: IANA name (``Europe/Berlin``); default UTC. DST-aware for cron.
    """

    cron: str | None = None
    interval: float | None = Field(default=None, ge=1)
    timezone: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of `cron` and `interval` (seconds)")
        if self.cron is not None:
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=self.cron)
            except ValueError:
                raise ValueError(f"cron {self.cron!r} is not a valid cron line (e.g. \"0 2 * * *\")") from None
        if self.timezone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. UTC, "
                                 "Europe/Berlin)") from None
        return self


class DeploymentSettings(StrictModel):
    """How ``pixelmill deploy`` registers a config with Prefect (never part of an output's hash).

    Args:
        name: the deployment's name (default: the config file's name without ``.yaml``).
        work_pool: the Prefect work pool whose workers run it (created as a ``process`` pool
            when missing); ``pixelmill serve`` ignores it (it runs the schedule itself).
        work_queue: a queue of that pool, or the pool's default.
        concurrency_limit: runs of this deployment at the same time (default 1).
        collision_strategy: what a run that would exceed the limit does: ``enqueue`` (waits
            for the running one, then edits what is still new; default) or ``cancel_new``
            (is cancelled; the next scheduled run catches up).
        tags: Prefect tags on the deployment and its runs (``pixelmill`` is always added).
    """

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    work_pool: str = "pixelmill"
    work_queue: str | None = None
    concurrency_limit: int = Field(default=1, ge=1)
    collision_strategy: Literal["enqueue", "cancel_new"] = "enqueue"
    tags: list[str] = Field(default_factory=list)


class Placement(StrictModel):
    """How many workers a flow's stages (or jobs) use, and what each one claims.

    Turned into the stages' ``Resources`` in one place (:meth:`resources`); never part of
    an output's hash.

    Args:
        workers: actors per data-parallel stage (ignored by one-job-per-unit flows).
        cpus: CPUs each worker claims (and its torch thread count).
        gpus: GPUs each worker claims: ``auto`` (default: one where the Ray cluster has GPUs,
            else CPU, said in the run's summary), or a number (``0``: CPU; more than the
            cluster's nodes can provide is refused with exit status 2 before work starts).
        memory: bytes of memory each worker claims (Ray's ``memory`` resource), or none.
        rows_per_call: input rows a worker is given per call: shards are streamed through
            workers this many rows at a time, so a worker's memory does not grow with the
            shard size. Default: the stage's (256 for edits and pair rendering, whole shards
            for text stages). Rows are seeded per id, not per call; only images of mixed sizes
            can meet other batch neighbours.
    """

    workers: int = Field(default=1, ge=1)
    cpus: float = Field(default=1.0, gt=0)
    gpus: GpuCount = AUTO
    memory: int | None = Field(default=None, ge=1)
    rows_per_call: int | None = Field(default=None, ge=1)

    def gpu_request(self, field: str = "placement.gpus"):
        """This placement's GPU count as a ``GpuRequest`` (resolved with ``config.placement.resolve_gpus``)."""
        from pixelmill.config.placement import GpuRequest

        return GpuRequest(field, self.gpus, self.workers)

    def resources(self, gpus: float = 0.0):
        """The stage ``Resources`` for this placement, each worker claiming ``gpus`` (resolved) GPUs."""
        from pixelmill.tasks.stage import Resources

        return Resources(cpus=self.cpus, gpus=gpus, memory_bytes=self.memory)


class StallTimeouts(StrictModel):
    """When work that stopped making progress is given up on (a hung GPU collective, driver
    or storage read). Never part of an output's hash or a job's id: it decides when to give
    up, not what the rows are.

    A watchdog thread beside the work ends its worker process (``tasks/watchdog.py``): a
    hang in native code never returns to Python, so nothing softer is reliable.

    Args:
        stall: seconds without progress (None: off).
    """

    stall: float | None = Field(default=1800.0, gt=0)


class StageTimeouts(StallTimeouts):
    """Timeouts of a data-parallel stage's calls (one call edits, embeds or renders one input shard).

    Args:
        stall: seconds without progress in a call (stages report progress per batch they
            finish; one that reports none must finish the whole call in this time); the
            worker is then ended and Ray restarts it (None: off).
        attempts: calls a shard gets (the first included); a shard whose worker ended
            ``attempts`` times (timed out, or killed, out of memory, crashed) is not run
            again: each of its rows becomes a reject saying why ("timed out: ...; gave up
            after 2 attempt(s)"). Set-ups are counted the same way.
        setup: seconds a worker's set-up (model loading) may take (None: off); past it the
            worker is ended and Ray starts another; after ``attempts`` timed-out set-ups the
            stage run fails naming the timeout (no row is to blame, so none is rejected).
    """

    attempts: int = Field(default=2, ge=1)
    setup: float | None = Field(default=1800.0, gt=0)


class FlowConfig(StrictModel):
    """Base of every flow's config: ``placement``, ``runtime``, ``plugins``, ``limit``, and
    ``schedule`` / ``deployment`` (read by ``pixelmill deploy`` and ``pixelmill serve`` only).

    Subclasses set ``LEGACY_PLACEMENT`` (old flat keys → ``placement`` fields: configs
    written before the block existed still parse) and ``UNHASHED`` (other keys that
    change speed, not results); a config's ``output_affecting()`` leaves both out.
    """

    LEGACY_PLACEMENT: ClassVar[dict[str, str]] = {}
    UNHASHED: ClassVar[frozenset[str]] = frozenset()
    NEVER_HASHED: ClassVar[frozenset[str]] = frozenset(
        {"placement", "runtime", "plugins", "output", "schedule", "deployment", "timeouts"})

    placement: Placement = Field(default_factory=Placement)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    schedule: ScheduleConfig | None = None
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    plugins: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _legacy_placement(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.LEGACY_PLACEMENT:
            return data
        legacy = {k: data[k] for k in cls.LEGACY_PLACEMENT if k in data}
        if not legacy:
            return data
        data = {k: v for k, v in data.items() if k not in legacy}
        block = dict(data.get("placement") or {})
        for old, value in legacy.items():
            new = cls.LEGACY_PLACEMENT[old]
            if new in block:
                raise ValueError(f"`{old}` (old key) and `placement.{new}` both set; keep `placement.{new}`")
            block[new] = value
        data["placement"] = block
        return data

    def gpu_requests(self) -> list:
        """Every GPU count this run claims (``GpuRequest``), checked as soon as Ray is connected."""
        return [self.placement.gpu_request()]

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> Self:
        """What types cannot check, checked before the flow starts; returns the config to run.

        Subclasses make local paths absolute and check inputs, models and existing
        outputs (``pixelmill.config.preflight``), raising ``PreflightError`` naming the
        field. With ``overwrite`` an output made with another config is removed (not
        with ``dry_run``) instead of refused. The base checks nothing.
        """
        return self



def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` into a key path and a YAML-typed value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file's top-level mapping.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return loaded


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``data`` with ``--set key.path=value`` overrides applied (in place, returned)."""
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a mapping")
        node[keys[-1]] = value
    return data


def validate(model: type[BaseModel], data: dict[str, Any], where: Any = None) -> BaseModel:
    """``model.model_validate(data)``, with plugins imported first; errors as a ConfigError naming fields."""
    from pixelmill import registry

    plugins = data.get("plugins") if isinstance(data, dict) else None
    if plugins:
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(f"{where + ': ' if where else ''}plugins: expected a list of import paths")
        try:
            registry.load_plugins(plugins, [str(Path(where).parent)] if where else [])
        except registry.PluginError as e:
            raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None


def load_config(
    model: type[BaseModel], path: str | os.PathLike | None, overrides: list[str] | None = None
) -> BaseModel:
    """Load a YAML config, apply ``--set`` overrides, validate into ``model``.

    Raises:
        ConfigError: naming the file, the field and the problem.
    """
    data = read_yaml(path) if path is not None else {}
    return validate(model, apply_overrides(data, overrides), path)


def format_validation_error(err: ValidationError, path: Any = None) -> str:
    """One line per problem: ``field: message``."""
    where = f"{path}: " if path else ""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{where}{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def placeholders(text: str | None) -> list[str]:
    """The ``{field}`` names in a template."""
    import string

    return [f for _, f, _, _ in string.Formatter().parse(text or "") if f]
