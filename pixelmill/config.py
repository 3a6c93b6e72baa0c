"""Typed flow configs: loaded from YAML, overridden from the CLI, validated before work starts.

Every flow config names its inputs and its ``output`` at the top level, so
``pixelmill <flow> CONFIG.yaml --set output=URL`` works the same for every flow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what is wrong."""


class StrictModel(BaseModel):
    """Base for configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(StrictModel):
    """Where work runs. Empty values mean the embedded local runtime."""

    ray_address: str | None = None
    prefect_api_url: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)


class EditConfig(StrictModel):
    """The bulk-edit flow: SDEdit or InstructPix2Pix over an image dataset.

    Args:
        input: dataset URL with an image column (a pixelmill dataset or a folder of Parquet files).
        output: dataset URL to write.
        method: ``sdedit`` (img2img with strength t0) or ``instruct_pix2pix``.
        model: local folder or hub id of the diffusers pipeline.
        prompt / prompt_column: one prompt for all rows (``{column}`` placeholders are
            filled from the row, e.g. ``"a watercolor painting of {caption}"``), or a
            per-row column (SDEdit).
        instruction / instruction_column: the same for InstructPix2Pix.
        strength: SDEdit t0 in (0, 1], or ``auto`` to search t0 per image for ``target_l2``.
        target_l2: with ``strength: auto``, the largest RMSE (RGB in [0, 1]) allowed.
        clip_model: optional open_clip model for CLIP metrics.
    """

    input: str
    output: str
    method: Literal["sdedit", "instruct_pix2pix"] = "sdedit"
    model: str
    image_column: str = "image"
    caption_column: str | None = "caption"
    prompt: str | None = None
    prompt_column: str | None = None
    instruction: str | None = None
    instruction_column: str | None = None
    negative_prompt: str | None = None
    strength: float | Literal["auto"] = 0.6
    target_l2: float | None = Field(default=None, gt=0, le=1)
    steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0)
    image_guidance_scale: float = Field(default=1.5, ge=0)
    resolution: int = Field(default=512, ge=8, le=4096)
    max_pixels: int = Field(default=50_000_000, ge=64)
    seed: int = 0
    batch_size: int = Field(default=4, ge=1)
    clip_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    num_gpus_per_worker: float = Field(default=1.0, ge=0)
    num_cpus_per_worker: float = Field(default=1.0, gt=0)
    workers: int = Field(default=1, ge=1)
    limit: int | None = Field(default=None, ge=1)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _check_method_fields(self) -> "EditConfig":
        if self.method == "sdedit":
            if self.prompt is None and self.prompt_column is None:
                raise ValueError("sdedit needs `prompt` (one for all rows) or `prompt_column`")
            if self.strength == "auto":
                if self.target_l2 is None:
                    raise ValueError("`strength: auto` needs `target_l2` (RMSE in [0, 1])")
            elif not 0 < self.strength <= 1:
                raise ValueError("`strength` must be in (0, 1] or 'auto'")
        else:
            if self.instruction is None and self.instruction_column is None:
                raise ValueError(
                    "instruct_pix2pix needs `instruction` (one for all rows) or `instruction_column`"
                )
        return self

    def output_affecting(self) -> dict[str, Any]:
        """The keys whose change changes the output rows (hashed into the manifest).

        Placement (workers, GPUs, device, batch size, output) is left out: it changes
        where and how fast rows are made, not what they are (batching changes pixels
        only within float tolerance, since every row has its own generator).
        """
        return self.model_dump(exclude={"runtime", "workers", "device", "num_gpus_per_worker", "batch_size",
                                        "num_cpus_per_worker", "output"})


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


def load_config(
    model: type[StrictModel], path: str | os.PathLike | None, overrides: list[str] | None = None
) -> StrictModel:
    """Load a YAML config, apply ``--set`` overrides, validate into ``model``.

    Raises:
        ConfigError: naming the file, the field and the problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a mapping")
        node[keys[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path)) from None


def format_validation_error(err: ValidationError, path: Any = None) -> str:
    """One line per problem: ``field: message``."""
    where = f"{path}: " if path else ""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{where}{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


class RetrievalFilters(StrictModel):
    """Optional filters on pool metadata columns LAION ships."""

    max_punsafe: float | None = Field(default=None, ge=0, le=1)
    max_pwatermark: float | None = Field(default=None, ge=0, le=1)
    min_width: int | None = Field(default=None, ge=1)
    min_height: int | None = Field(default=None, ge=1)
    max_aspect: float | None = Field(default=None, ge=1)


class DownloadSettings(StrictModel):
    """How candidate images are fetched (img2dataset-like defaults, safe by default)."""

    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=2, ge=0)
    backoff: float = Field(default=0.5, ge=0)
    max_bytes: int = Field(default=20_000_000, ge=1024)
    concurrency: int = Field(default=32, ge=1)
    per_host_concurrency: int = Field(default=4, ge=1)
    respect_robots_tags: bool = True
    allow_loopback: bool = False
    allow_private_addresses: bool = False
    user_agent: str | None = None


class RetrieveConfig(StrictModel):
    """Regularization retrieval: exactly N real images per class prompt from a pool.

    Args:
        prompts: class prompts ("a photo of a dog").
        pool: pool URL (LAION layout or a pixelmill Parquet pool).
        output: root folder: ``candidates/``, ``images/``, ``stats/`` and ``real_reg/``
            (the layout diffusers' Custom Diffusion trainer reads with ``--real_prior``).
        num_images: N, exactly this many per prompt (never more, never padded).
        threshold: keep pool rows whose CLIP similarity is strictly above this.
        embedding: compare the prompt with caption (``text``, the paper's criterion) or
            ``image`` embeddings.
        clip_model: the pool's CLIP model (default: what the pool's ``pool.json`` names).
        index: optional faiss index (``pixelmill pool index``) instead of the exact scan.
    """

    prompts: list[str] = Field(min_length=1)
    pool: str
    output: str
    num_images: int = Field(default=200, ge=1)
    threshold: float = Field(default=0.85, ge=-1, le=1)
    embedding: Literal["text", "image"] = "text"
    clip_model: str | None = None
    index: str | None = None
    index_k: int = Field(default=10_000, ge=1)
    max_candidates: int | None = Field(default=None, ge=1)
    filters: RetrievalFilters = Field(default_factory=RetrievalFilters)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    resolution: int = Field(default=512, ge=8, le=4096)
    max_pixels: int = Field(default=50_000_000, ge=64)
    scan_block_rows: int = Field(default=262_144, ge=1024)
    scan_tasks: int = Field(default=4, ge=1)
    invalid_vectors: Literal["error", "reject"] = "error"
    export: bool = True
    limit: int | None = Field(default=None, ge=1)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _check_prompts(self) -> "RetrieveConfig":
        for i, p in enumerate(self.prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}] is empty")
        if len({p.strip().lower() for p in self.prompts}) != len(self.prompts):
            raise ValueError("prompts contain duplicates")
        return self

    def active_prompts(self) -> list[str]:
        return self.prompts[: self.limit] if self.limit else list(self.prompts)

    def scan_affecting(self) -> dict[str, Any]:
        """What changes the candidate lists."""
        return self.model_dump(include={"pool", "threshold", "embedding", "clip_model", "index", "index_k",
                                        "max_candidates", "filters", "invalid_vectors"})

    def output_affecting(self) -> dict[str, Any]:
        """What changes the downloaded set (placement and concurrency excluded)."""
        d = self.scan_affecting()
        d.update(num_images=self.num_images, resolution=self.resolution, max_pixels=self.max_pixels,
                 download=self.download.model_dump(include={"max_bytes", "respect_robots_tags",
                                                            "allow_loopback", "allow_private_addresses"}))
        return d


class InstructionSettings(StrictModel):
    """The text stage: which writer writes (instruction, edited caption) for each caption."""

    writer: Literal["template", "transformers", "openai"] = "template"
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=16, ge=1)
    min_length: int = Field(default=2, ge=0)
    max_length: int = Field(default=256, ge=1)


class PairRenderSettings(StrictModel):
    """The image stage: Prompt-to-Prompt rendering and the CLIP filter (InstructPix2Pix defaults)."""

    model: str
    clip_model: str
    samples_per_caption: int = Field(default=100, ge=1)
    steps: int = Field(default=25, ge=1)
    height: int = Field(default=512, ge=8)
    width: int = Field(default=512, ge=8)
    p_range: tuple[float, float] = (0.1, 0.9)
    cfg_range: tuple[float, float] = (7.5, 15.0)
    cross_replace: bool = False
    batch_size: int = Field(default=4, ge=1)
    min_image_similarity: float = 0.7
    min_direction: float = 0.2
    min_image_caption: float = 0.2
    max_per_caption: int = Field(default=4, ge=1)
    device: str = "auto"
    dtype: str = "auto"


class PairsConfig(StrictModel):
    """Instruction pairs (InstructPix2Pix's dataset): captions → instructions → image pairs.

    Args:
        input: dataset with ``id`` and a caption column.
        output: root folder with ``text/`` (instructions, reused when complete) and ``pairs/``.
    """

    input: str
    output: str
    caption_column: str = "caption"
    seed: int = 0
    text: InstructionSettings = Field(default_factory=InstructionSettings)
    images: PairRenderSettings
    workers: int = Field(default=1, ge=1)
    num_gpus_per_worker: float = Field(default=1.0, ge=0)
    num_cpus_per_worker: float = Field(default=1.0, gt=0)
    limit: int | None = Field(default=None, ge=1)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def text_stage_config(self) -> dict[str, Any]:
        t = self.text
        return {"writer": t.writer, "writer_options": dict(t.options), "caption_column": self.caption_column,
                "seed": self.seed, "batch_size": t.batch_size, "min_length": t.min_length,
                "max_length": t.max_length}

    def image_stage_config(self) -> dict[str, Any]:
        d = self.images.model_dump()
        d["p_range"], d["cfg_range"] = tuple(d["p_range"]), tuple(d["cfg_range"])
        d["seed"] = self.seed
        return d

    def text_affecting(self) -> dict[str, Any]:
        cfg = self.text_stage_config()
        cfg.pop("batch_size")
        cfg["writer_options"] = {k: v for k, v in cfg["writer_options"].items()
                                 if k not in ("concurrency", "timeout", "device", "api_key_env")}
        return {"input": self.input, "limit": self.limit, **cfg}

    def pairs_affecting(self) -> dict[str, Any]:
        cfg = self.image_stage_config()
        for k in ("batch_size", "device"):
            cfg.pop(k)
        cfg["p_range"], cfg["cfg_range"] = list(cfg["p_range"]), list(cfg["cfg_range"])
        return {"text": self.text_affecting(), **cfg}
