"""Fine-tuning campaigns: concepts, jobs listed or expanded from a grid, and their settings.

Which training methods exist, which settings each reads and how many concepts it trains
at once are declared by the methods themselves (``pixelmill.registry``, kind ``train``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixelmill.config.base import (
    AUTO,
    ConfigError,
    FlowConfig,
    GpuCount,
    Placement,
    StallTimeouts,
    StrictModel,
    format_validation_error,
)

# Settings that change where, how fast or how often a job runs, what it reports or refuses,
# but not the weights it ends with: left out of the job id. ``max_steps`` is left out on
# purpose: raising it on a finished job resumes that job instead of starting a new one.
PLACEMENT_SETTINGS = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "validation_every", "validation_prompts",
    "num_gpus", "num_workers", "cpus_per_worker", "cache_latents", "cache_text_embeddings",
    "gradient_checkpointing", "compile", "frozen_weights", "offload_idle", "device", "log_every", "prior_shortfall",
})


def train_method(name: str):
    """The registered training method ``name`` (its declared metadata), or a ValueError listing the known ones."""
    from pixelmill import registry

    try:
        return registry.get("train", name)
    except registry.UnknownEntry as e:
        raise ValueError(str(e)) from None


PRIOR_SETTINGS = ("with_prior_preservation", "prior_loss_weight", "num_class_images")


def prior_in_use(declared: bool | str | None, with_prior_preservation: bool | None) -> bool:
    """Whether a job trains with prior preservation, from its method's ``prior=`` and its setting.

    Methods registered with ``prior=True`` (DreamBooth, Custom Diffusion) use it unless
    ``with_prior_preservation: false``; ``prior="opt_in"`` (LoRA, as diffusers'
    DreamBooth-LoRA scripts) only with ``with_prior_preservation: true``.
    """
    if declared == "opt_in":
        return with_prior_preservation is True
    return bool(declared) and with_prior_preservation is not False


def method_families(name: str) -> tuple[str, ...]:
    """The model families (``models/family.py``) training method ``name`` declares; SD 1.x/2.x when it
    declares none (a plugin written before SDXL support)."""
    from pixelmill.models.family import SD_FAMILIES

    return tuple(train_method(name).meta.get("families", SD_FAMILIES))


def method_settings(name: str) -> set[str]:
    """Settings only ``name`` (and perhaps other methods) reads; a job's id ignores the ones its method does not."""
    return set(train_method(name).meta.get("settings", ()))


class Concept(StrictModel):
    """A subject or style to learn, and the images that show it.

    Args:
        instance_data: dataset URL (pixelmill dataset or folder of Parquet files) with the
            concept's images; for ``instruct_pix2pix`` a pairs dataset.
        token: how prompts name the concept: the new token for Textual Inversion and Custom
            Diffusion (``<dog1>``), the rare identifier for DreamBooth/LoRA (``sks``).
        class_word: the concept's category ("dog"); fills ``{class}`` in prompts and is the
            default Textual Inversion initializer.
        class_data: a dataset of class (regularization) images for prior preservation,
            or ``retrieval`` to use the campaign's retrieval output for ``class_prompt``.
        property: ``object`` or ``style`` (Textual Inversion prompt templates).
        instance_prompt: one training prompt for every instance image; ``{token}``,
            ``{class}`` and ``{subject}`` (how the method names the concept: ``sks dog``,
            or the token alone for Textual Inversion) are filled in.
        instance_prompt_column: a string column of ``instance_data`` whose text is that
            image's training prompt (a caption per image, like the ``--caption_column`` of
            diffusers' DreamBooth LoRA scripts), formatted like ``instance_prompt``, e.g.
            ``"a photo of a purple {subject}"``. The formatted text must name the concept
            (contain ``token``). Instead of ``instance_prompt``; DreamBooth, LoRA, Custom
            Diffusion and text_to_image train with it (Textual Inversion's prompts are its
            templates and InstructPix2Pix's its instructions: refused for those).
        class_prompt_column: a string column of ``class_data`` (a dataset) whose text is that
            class image's prompt in the prior loss (``{class}`` filled in), e.g. class images
            of several colours captioned with their colour; class images the campaign
            generates to make up a shortfall keep ``class_prompt`` (they were drawn for it).
    """

    instance_data: str
    token: str = "sks"
    class_word: str = ""
    instance_prompt: str | None = None
    class_prompt: str | None = None
    class_data: str | None = None
    image_column: str = "image"
    instance_prompt_column: str | None = None
    class_prompt_column: str | None = None
    initializer_token: str | None = None
    property: Literal["object", "style"] = "object"

    @model_validator(mode="after")
    def _prompt_column(self) -> Concept:
        ccol = self.class_prompt_column
        if ccol is not None:
            if not ccol.strip() or ccol == "image":
                raise ValueError(f"class_prompt_column {ccol!r}: name the class_data column of prompts")
            if not self.class_data or self.class_data == "retrieval":
                raise ValueError("class_prompt_column needs class_data: a dataset of class images with that column")
        col = self.instance_prompt_column
        if col is None:
            return self
        if not col.strip():
            raise ValueError("instance_prompt_column: empty column name; name the instance_data column that holds "
                             "each image's prompt (or leave it out)")
        if self.instance_prompt:
            raise ValueError("give instance_prompt (one prompt for every image) or instance_prompt_column (a prompt "
                             "per image), not both")
        if col == self.image_column:
            raise ValueError(f"instance_prompt_column {col!r} is the image_column; name the column of prompts")
        return self

    def prompt_fields(self, method: str) -> dict[str, str]:
        """What ``{token}``, ``{class}`` and ``{subject}`` stand for in this concept's prompts."""
        return {"token": self.token, "class": self.class_word, "subject": self.subject(method)}

    def instance_text(self, method: str) -> str:
        """The training prompt: explicit, or the method's default for this concept."""
        if self.instance_prompt:
            return format_prompt(self.instance_prompt, self.prompt_fields(method), "instance_prompt")
        if train_method(method).meta.get("token_only"):
            return f"a photo of a {self.token}"
        return f"a photo of {self.token} {self.class_word}".strip()

    def class_text(self) -> str:
        if self.class_prompt:
            return self.class_prompt.format(**{"class": self.class_word})
        return f"a photo of a {self.class_word}".strip()

    def subject(self, method: str) -> str:
        """How a prompt names the learned concept (``{concept}`` in evaluation prompts)."""
        if train_method(method).meta.get("token_only"):
            return self.token
        return f"{self.token} {self.class_word}".strip()


def format_prompt(template: str, fields: dict[str, str], what: str) -> str:
    """``template`` with ``{token}``, ``{class}`` and ``{subject}`` filled from ``fields`` (a ValueError
    naming ``what`` for any other placeholder or a stray brace)."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        names = ", ".join("{" + k + "}" for k in fields)
        raise ValueError(f"{what}: cannot fill {template!r} ({type(e).__name__}: {e}); its placeholders can be "
                         f"{names} (write a literal brace as {{{{ or }}}})") from None


class TrainSettings(StrictModel):
    """Training settings of one job; every method reads the common ones and its own.

    Defaults follow diffusers' example scripts except where noted in the README.
    """

    # one side (square images), or [width, height] to train at one non-square size (every image
    # resized to cover it and cropped; models that draw wide scenes): each side 8..4096
    resolution: int | tuple[int, int] = 512
    center_crop: bool = False
    random_flip: bool = True
    rescale: bool = False
    aspect_buckets: bool = False
    train_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=500, ge=1)
    learning_rate: float = Field(default=5e-6, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # under mixed precision (``auto``), frozen UNet / text-encoder Linear and conv weights are stored in the
    # autocast dtype: the same numbers autocast computes with, without its per-call casts; ``fp32`` keeps them
    frozen_weights: Literal["auto", "fp32"] = "auto"
    # with every latent (prompt embedding) cached, the VAE (frozen text encoders) leave memory until sampling
    offload_idle: bool = True
    gradient_checkpointing: bool = False
    # torch.compile (inductor) of the UNet's training forward and backward, once per worker: pays on
    # long jobs (the first steps compile, minutes on a CPU); needs a C compiler where the job runs
    compile: bool = False
    use_ema: bool | None = None
    ema_decay: float = Field(default=0.9999, gt=0, lt=1)
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    validation_every: int | None = Field(default=None, ge=1)
    validation_prompts: list[str] = Field(default_factory=list)
    log_every: int = Field(default=1, ge=1)
    # Textual Inversion
    num_vectors: int = Field(default=1, ge=1)
    # DreamBooth / Custom Diffusion prior preservation
    with_prior_preservation: bool | None = None
    prior_loss_weight: float = Field(default=1.0, ge=0)
    num_class_images: int = Field(default=100, ge=1)
    # a concept with fewer usable class images than num_class_images (downloads failed, the
    # safety checker flagged generated ones): ``error`` fails the job when it has none and
    # trains on what there is otherwise; ``warn`` trains anyway (without the prior when
    # none); ``strict`` fails on any shortfall. Every shortfall is recorded on the job,
    # in the results table and the report.
    prior_shortfall: Literal["error", "warn", "strict"] = "error"
    train_text_encoder: bool = False
    # LoRA
    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    # Custom Diffusion
    train: Literal["crossattn_kv", "crossattn"] = "crossattn_kv"
    # InstructPix2Pix
    conditioning_dropout_prob: float = Field(default=0.05, ge=0, le=1 / 3)
    input_column: str = "input_image"
    edited_column: str = "edited_image"
    instruction_column: str = "edit_prompt"
    # placement (not hashed)
    num_gpus: GpuCount = AUTO
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    device: str = "auto"

    @model_validator(mode="after")
    def _resolution(self) -> TrainSettings:
        sides = (self.resolution,) if isinstance(self.resolution, int) else self.resolution
        if any(not 8 <= side <= 4096 for side in sides):
            shown = self.resolution if isinstance(self.resolution, int) else list(self.resolution)
            raise ValueError(f"resolution {shown}: each side must be 8..4096 pixels")
        if self.aspect_buckets and not isinstance(self.resolution, int):
            raise ValueError(f"resolution {list(self.resolution)} with aspect_buckets: buckets are built around "
                             "one side (their area); give resolution as one number, or leave aspect_buckets off "
                             "to train at exactly this width and height")
        return self


def train_size(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(width, height) of a ``resolution`` setting: one side (square) or [width, height]."""
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


class JobConfig(StrictModel):
    """One training job: a method over one or more concepts with its settings."""

    name: str | None = None
    method: str
    concepts: list[str] = Field(min_length=1)
    model: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> JobConfig:
        train_method(self.method)
        return self


class GridConfig(StrictModel):
    """A grid that expands to jobs: every concept set × method × combination of settings.

    ``concepts`` entries are a concept name or a list of names (one multi-concept job);
    ``settings`` maps a setting to the list of values to try.
    """

    concepts: list[str | list[str]] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    settings: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_methods(self) -> GridConfig:
        for m in self.methods:
            train_method(m)
        return self


class EvalSettings(StrictModel):
    """Per-job evaluation: samples for prompts and the CustomConcept101 CLIP metrics.

    ``{concept}`` in a prompt becomes how the method names the concept (``<dog1>`` or
    ``sks dog``); CLIP text alignment scores the sample against the same prompt with the
    class word instead, as CustomConcept101 does.
    """

    prompts: list[str] = Field(default_factory=lambda: ["a photo of {concept}"])
    samples_per_prompt: int = Field(default=2, ge=1)
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=6.0, ge=0)
    image_guidance_scale: float = Field(default=1.5, ge=0)
    seed: int = 0


class Timeouts(StallTimeouts):
    """When a job is given up on (its worker ended; the job is recorded failed with the reason
    and a rerun resumes it from its last checkpoint). Never part of a job's id.

    Args:
        stall: seconds without a finished training step (counted from the first step;
            None: off). A hung GPU collective, driver or storage read stops the steps.
            Class-image generation uses it too: seconds without a generated image in a
            stage call (``config.base.StageTimeouts``, 2 attempts per shard).
        job: seconds for one attempt of a job, set-up and evaluation included (None: off).
    """

    job: float | None = Field(default=None, gt=0)


class CampaignConfig(FlowConfig):
    """A fine-tuning campaign: concepts, and jobs listed or expanded from a grid.

    Args:
        output: root folder: ``jobs/<id>/`` per job, ``class_images/``, ``cache/``,
            ``results.parquet`` and ``report.html``.
        model: the base diffusers pipeline (a job may name its own).
        defaults: settings every job starts from (a job's or grid's settings override).
        retrieve: optional regularization retrieval run first (its config without
            ``output``); concepts with ``class_data: retrieval`` train on its images.
        placement: each job's defaults for ``num_workers`` (data-parallel workers),
            ``cpus_per_worker`` and ``num_gpus`` (GPUs per job: ``auto``, the default, gives
            each worker a GPU where the cluster has one for every worker, else CPU; a number
            the cluster cannot provide is refused); ``defaults`` or a job's ``settings``
            override them per job.
        timeouts: ``stall`` (default 1800 s without a training step) and ``job`` (seconds
            per attempt, default none): a job past either is ended and recorded failed;
            rerun the campaign to resume it.
    """

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> CampaignConfig:
        from pixelmill.config.preflight import check_finetune

        return check_finetune(self, overwrite=overwrite, dry_run=dry_run)

    output: str
    model: str
    clip_model: str | None = None
    concepts: dict[str, Concept] = Field(min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)
    jobs: list[JobConfig] = Field(default_factory=list)
    grid: GridConfig | None = None
    eval: EvalSettings = Field(default_factory=EvalSettings)
    retrieve: dict[str, Any] | None = None
    placement: Placement = Field(default_factory=Placement)
    timeouts: Timeouts = Field(default_factory=Timeouts)

    def gpu_requests(self) -> list:
        """Each job's ``num_gpus``, as its workers claim it."""
        return [job_gpu_request(j.name, j.settings.num_gpus, j.settings.num_workers) for j in self.expand()]

    @model_validator(mode="after")
    def _check(self) -> CampaignConfig:
        if not self.jobs and self.grid is None:
            raise ValueError("a campaign needs `jobs` (a list) or a `grid`")
        names = [c for j in self.jobs for c in j.concepts]
        if self.grid:
            names += [c for e in self.grid.concepts for c in ([e] if isinstance(e, str) else e)]
        unknown = sorted(set(names) - set(self.concepts))
        if unknown:
            raise ValueError(f"unknown concept(s) {unknown}; defined: {sorted(self.concepts)}")
        try:
            TrainSettings.model_validate(self.defaults)
        except ValidationError as e:
            raise ValueError("defaults: " + format_validation_error(e).split("\n", 1)[1].strip()) from None
        if any(c.class_data == "retrieval" for c in self.concepts.values()) and not self.retrieve:
            raise ValueError("a concept has `class_data: retrieval` but the campaign has no `retrieve` section")
        return self

    def expand(self) -> list[ExpandedJob]:
        """The campaign's jobs: the listed ones, then the grid's, in a stable order."""
        import itertools

        out: list[ExpandedJob] = []
        for i, job in enumerate(self.jobs):
            out.append(self._expanded(job.name or f"{job.method}-{'+'.join(job.concepts)}-{i}",
                                      job.method, job.concepts, job.model, job.settings))
        if self.grid:
            keys = list(self.grid.settings)
            for entry in self.grid.concepts:
                cset = [entry] if isinstance(entry, str) else list(entry)
                for method in self.grid.methods:
                    for values in itertools.product(*(self.grid.settings[k] for k in keys)):
                        settings = dict(zip(keys, values))
                        suffix = "".join(f"-{k}={v}" for k, v in settings.items())
                        out.append(self._expanded(f"{method}-{'+'.join(cset)}{suffix}", method, cset,
                                                  None, settings))
        return out[: self.limit] if self.limit else out

    def _expanded(self, name, method, concepts, model, settings) -> ExpandedJob:
        p = self.placement
        merged = {"num_workers": p.workers, "cpus_per_worker": p.cpus, "num_gpus": p.gpus,
                  **self.defaults, **settings}
        try:
            ts = TrainSettings.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(f"job {name!r}: " + format_validation_error(e)) from None
        if train_method(method).meta.get("multi_concept") and len(concepts) > 1:
            tokens = [self.concepts[c].token for c in concepts]
            if len(set(tokens)) != len(tokens):
                raise ConfigError(f"job {name!r}: concepts trained jointly need distinct tokens, got {tokens}")
        meta = train_method(method).meta
        columned = [c for c in concepts if self.concepts[c].instance_prompt_column]
        if columned and (meta.get("token_only") or meta.get("data") == "pairs"):
            why = "Textual Inversion trains on its prompt templates" if meta.get("token_only") else \
                "InstructPix2Pix trains on its pairs' instructions"
            raise ConfigError(f"job {name!r}: {method} does not use instance_prompt_column (concept(s) {columned}): "
                              f"{why}")
        if len(concepts) != 1 and not train_method(method).meta.get("multi_concept"):
            joint = [e.name for e in _train_entries() if e.meta.get("multi_concept")]
            raise ConfigError(f"job {name!r}: {method} trains one concept per job "
                              f"({' and '.join(joint) or 'no method'} trains several jointly)")
        return ExpandedJob(name=name, method=method, concepts=list(concepts), model=model or self.model,
                           settings=ts)


def job_gpu_request(name: str, num_gpus: float | str, num_workers: int):
    """A job's ``num_gpus`` as a ``GpuRequest``: the job's total, split between its workers, a whole GPU
    each when several train together (NCCL ranks cannot share one)."""
    from pixelmill.config.placement import GpuRequest

    return GpuRequest(f"jobs[{name}].num_gpus", num_gpus, num_workers, per_job=True, whole=True)


class ExpandedJob(BaseModel):
    """One job after expansion: what the flow plans and the trainer runs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    method: str
    concepts: list[str]
    model: str
    settings: TrainSettings

    def weight_affecting(self, concepts: dict[str, Concept], model_hash: str, data_hashes: dict[str, str]) -> dict:
        """What the job id hashes: method, model, data and the settings that change weights."""
        own = method_settings(self.method)
        prior = train_method(self.method).meta.get("prior")
        if prior == "opt_in" and not prior_in_use(prior, self.settings.with_prior_preservation):
            own -= set(PRIOR_SETTINGS)  # off: the prior settings change nothing (ids as before LoRA took them)
        other_methods = set().union(*(set(e.meta.get("settings", ())) for e in _train_entries()))
        s = self.settings.model_dump(exclude=set(PLACEMENT_SETTINGS) | (other_methods - own))
        return {
            "method": self.method, "model": model_hash,
            "concepts": [{**_id_fields(concepts[c]), "data": data_hashes.get(c)} for c in self.concepts],
            "settings": s,
        }




def _id_fields(concept: Concept) -> dict[str, Any]:
    """A concept's fields in a job id (the prompt columns only when set: ids made before they existed hold)."""
    out = concept.model_dump(exclude={"instance_data", "class_data"})
    for key in ("instance_prompt_column", "class_prompt_column"):
        if out[key] is None:
            del out[key]
    return out


def _train_entries():
    from pixelmill import registry

    return registry.entries("train")
