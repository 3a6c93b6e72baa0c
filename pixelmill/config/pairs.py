"""Instruction pairs (InstructPix2Pix's dataset): captions → instructions → image pairs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pixelmill.config.base import FlowConfig, StageTimeouts, StrictModel
from pixelmill.config.edit import AdapterSpec, adapters_affecting


class InstructionSettings(StrictModel):
    """The text stage: which writer writes (instruction, edited caption) for each caption.

    Args:
        writer: a registered instruction writer (built in: ``template``, ``transformers``,
            ``openai``); ``options`` are that writer's.
    """

    writer: str = "template"
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=16, ge=1)
    min_length: int = Field(default=2, ge=0)
    max_length: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _check_writer(self) -> InstructionSettings:
        from pixelmill import registry

        try:
            registry.get("writer", self.writer)
        except registry.UnknownEntry as e:
            raise ValueError(f"writer: {e}") from None
        return self


PAPER_THRESHOLDS: dict[str, float] = {"min_image_similarity": 0.7, "min_direction": 0.2, "min_image_caption": 0.2}
"""InstructPix2Pix's CLIP-filter thresholds, set for CLIP ViT-L/14: the defaults for every CLIP model
not in ``MODEL_THRESHOLDS`` (``pair_filter.FilterThresholds`` has the same)."""
MODEL_THRESHOLDS: dict[str, dict[str, float]] = {
    # calibrated on the toy world (pixelmill/toy/pairs_quality.py, README "Quality"): the toy CLIP's
    # image-image cosines are low and its direction cosines high; the paper's values keep 1 caption in 9
    "toy:clip": {"min_image_similarity": 0.3, "min_direction": 0.6, "min_image_caption": 0.35},
}
"""Per CLIP model, the thresholds a pairs config gets when it leaves them out."""


def default_thresholds(clip_model: str | None) -> dict[str, float]:
    """The three filter thresholds a pairs config gets for ``clip_model`` when it names none."""
    return dict(MODEL_THRESHOLDS.get(clip_model or "", PAPER_THRESHOLDS))


class PairRenderSettings(StrictModel):
    """The image stage: Prompt-to-Prompt rendering and the CLIP filter (InstructPix2Pix defaults).

    ``safety_checker``: as the edit config's (left out: on where the checkpoint ships one, a
    flagged pair is an ``nsfw`` reject; ``off``: loaded without it).
    """

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
    # left out: InstructPix2Pix's 0.7 / 0.2 / 0.2 (set for CLIP ViT-L/14), or the values calibrated
    # for a toy CLIP (``pair_filter.MODEL_THRESHOLDS``: toy:clip 0.3 / 0.6 / 0.35)
    min_image_similarity: float | None = None
    min_direction: float | None = None
    min_image_caption: float | None = None
    max_per_caption: int = Field(default=4, ge=1)
    adapters: list[AdapterSpec] = Field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    safety_checker: Literal["on", "off"] | None = None

    @model_validator(mode="after")
    def _thresholds(self) -> PairRenderSettings:
        for key, value in default_thresholds(self.clip_model).items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        return self

    @field_validator("safety_checker", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # YAML: on → True


class PairsConfig(FlowConfig):
    """Instruction pairs (InstructPix2Pix's dataset): captions → instructions → image pairs.

    Args:
        input: dataset with ``id`` and a caption column.
        output: root folder with ``text/`` (instructions, reused when complete) and ``pairs/``.
        timeouts: ``stall`` (default 1800 s without a finished batch in a shard's call;
            null: off) and ``attempts`` (default 2), for both stages: a hung call's worker is
            ended and the shard retried; after ``attempts`` its rows are rejects naming the
            timeout (:class:`~pixelmill.config.base.StageTimeouts`; not hashed).
    """

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> PairsConfig:
        from pixelmill.config.preflight import check_pairs

        return check_pairs(self, overwrite=overwrite, dry_run=dry_run)

    input: str
    output: str
    caption_column: str = "caption"
    seed: int = 0
    text: InstructionSettings = Field(default_factory=InstructionSettings)
    images: PairRenderSettings
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)

    LEGACY_PLACEMENT: ClassVar[dict[str, str]] = {
        "workers": "workers", "num_gpus_per_worker": "gpus", "num_cpus_per_worker": "cpus"}

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
        if cfg.get("safety_checker") in (None, "on"):  # the default: hashes of earlier outputs unchanged
            cfg.pop("safety_checker")
        adapters = cfg.pop("adapters")
        if adapters:
            cfg["adapters"] = adapters_affecting(self.images.adapters)
        cfg["p_range"], cfg["cfg_range"] = list(cfg["p_range"]), list(cfg["cfg_range"])
        return {"text": self.text_affecting(), **cfg}


