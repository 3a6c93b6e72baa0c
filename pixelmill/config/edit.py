"""Editing settings, shared by the bulk-edit flow and the video flow's ``edit:`` block.

Which methods exist is the registry's business (``pixelmill.registry``, kind ``edit``):
each editing method declares there what it needs (a diffusion ``model``, a ``prompt`` or
an ``instruction``, a ``clip_model``, masks, adapters) and, if it has any, its own
settings model, read from a block named after the method (``text2live: {...}``).
:class:`EditSettings` checks a config against that declaration, so adding a method never
touches this file.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pixelmill.config.base import FlowConfig, StageTimeouts, StrictModel, format_validation_error, placeholders


class AdapterSpec(StrictModel):
    """A fine-tuned adapter to load into the pipeline (a campaign job's folder or its ``artifacts/``).

    Args:
        path: the folder; the kind is read from its files unless ``kind`` says it.
        scale: LoRA strength (0 = the base model).
    """

    path: str
    kind: Literal["auto", "textual_inversion", "lora", "custom_diffusion"] = "auto"
    scale: float = 1.0


class EditSpeed(StrictModel):
    """How an edit stage uses its device: speed only, so never part of an output's hash.

    Every default leaves the stage as it was (the pipeline as loaded, driven from the
    stage's own thread), so outputs do not move. On a GPU ``dtype: auto`` already gives
    bf16, and diffusers' attention is PyTorch's fused SDPA; these add the rest.

    Args:
        channels_last: the UNet's and VAE's weights (and so their activations) in
            channels-last (NHWC) layout, the one tensor-core convolutions run fastest in.
        compile: ``torch.compile`` (inductor, default mode, no CUDA graphs) once per
            worker: ``unet``, ``unet+vae`` (also the VAE's encoder and decoder) or ``off``.
            Each new batch shape compiles once (a minute or more for an SD 1.5 UNet), so it
            pays on long runs; the first recompile makes the batch dimension dynamic.
        overlap_decode: decode each batch (VAE decoder, safety checker, metrics, PNG
            encoding) on a worker thread, on CUDA on a second stream, while the next batch
            denoises. Applies to methods that are one diffusers call (SDEdit at a fixed
            strength, InstructPix2Pix) on SD-shaped pipelines; the others run as before.
        io_threads: threads that decode input images and encode output PNGs (0: the
            stage's own thread).
        attention: the fused attention kernel the UNet prefers: ``auto`` (PyTorch's
            choice), ``cudnn`` (cuDNN's, fastest on Hopper GPUs), ``flash`` or
            ``efficient``; a shape the kernel lacks falls back to the others.
        fuse_qkv: fuse each attention's query/key/value projections into one matrix
            product (diffusers' ``fuse_qkv_projections``); not with LoRA adapters.
    """

    channels_last: bool = False
    compile: Literal["off", "unet", "unet+vae"] = "off"
    attention: Literal["auto", "cudnn", "flash", "efficient"] = "auto"
    fuse_qkv: bool = False
    overlap_decode: bool = False
    io_threads: int = Field(default=0, ge=0, le=64)


def adapters_affecting(adapters: list[AdapterSpec]) -> list[dict[str, Any]]:
    """Adapters as hashed into an output's config: kind, scale and a hash of their files."""
    from pixelmill.models.adapters import adapter_fingerprint

    return [{"kind": a.kind, "scale": a.scale, "files": adapter_fingerprint(a.path)} for a in adapters]


class EditSettings(StrictModel):
    """What an edit does, whatever it runs over (an image dataset, or a video atlas layer).

    Args:
        method: a registered editing method (built in: ``sdedit``, ``instruct_pix2pix``,
            ``text2live``); ``pixelmill edit --help`` lists them.
        model: local folder or hub id of the diffusers pipeline (methods that need one).
        prompt / instruction: the edit text (a prompt for SDEdit and Text2Live, an
            instruction for InstructPix2Pix).
        negative_prompt, steps, guidance_scale, image_guidance_scale, seed: sampling.
        strength: SDEdit t0 in (0, 1], or ``auto`` to search t0 per image for ``target_l2``.
        target_l2: with ``strength: auto``, the largest RMSE (RGB in [0, 1]) allowed.
        clip_model: open_clip model for CLIP metrics (optional), and for methods whose
            losses use CLIP (Text2Live, required there).
        adapters: campaign adapters loaded into the pipeline (methods that declare support).
        revision: hub branch, tag or commit of a hub ``model`` (default: ``main``); every
            node fetches it once before the stage starts, and all workers load that commit.
        safety_checker: ``on`` (the default, when left out): a checkpoint's own safety
            checker, where it ships one, turns flagged outputs into ``nsfw`` rejects; set to
            ``on`` for a checkpoint that ships none, the run goes unchecked and its summary
            says so. ``off``: the pipeline is loaded without it (nothing to do for a
            checkpoint without one).
        <method>: the method's own settings block, for methods that declare one.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    TEXT_SOURCES: ClassVar[dict[str, tuple[str, ...]]] = {"prompt": ("prompt",), "instruction": ("instruction",)}

    method: str = "sdedit"
    model: str | None = None
    prompt: str | None = None
    instruction: str | None = None
    negative_prompt: str | None = None
    strength: float | Literal["auto"] = 0.6
    target_l2: float | None = Field(default=None, gt=0, le=1)
    steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0)
    image_guidance_scale: float = Field(default=1.5, ge=0)
    seed: int = 0
    clip_model: str | None = None
    adapters: list[AdapterSpec] = Field(default_factory=list)
    revision: str | None = None
    safety_checker: Literal["on", "off"] | None = None  # None: on (left out of the config)

    @field_validator("safety_checker", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # YAML: on → True

    @field_validator("strength")
    @classmethod
    def _strength_in_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < value <= 1:
            raise ValueError(f"{value} is outside (0, 1]: strength is the fraction of the noise schedule "
                             "re-noised (1 = start from pure noise), or `auto`")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> EditSettings:
        from pixelmill import registry

        try:
            entry = registry.get("edit", self.method)
        except registry.UnknownEntry as e:
            raise ValueError(f"method: {e}") from None
        extra = self.__pydantic_extra__ or {}
        for key in list(extra):
            if key == self.method and entry.meta.get("settings") is not None:
                continue
            if key in registry.names("edit") and extra[key] is None:
                del extra[key]  # an empty block of another method says nothing
                continue
            if key in registry.names("edit"):
                raise ValueError(f"`{key}` settings apply only with `method: {key}`")
            raise ValueError(f"{key}: unknown key")
        settings_model = entry.meta.get("settings")
        if settings_model is not None:
            block = extra.get(self.method)
            if block is not None and not isinstance(block, BaseModel):
                try:
                    block = settings_model.model_validate(block)
                except ValidationError as e:
                    raise ValueError(f"{self.method}: " + "; ".join(
                        format_validation_error(e).split("\n  ")[1:])) from None
            extra[self.method] = block
        if entry.meta.get("needs_model") and not self.model:
            raise ValueError(f"{self.method} needs `model` (a diffusers pipeline folder or hub id)")
        if entry.meta.get("needs_clip") and not self.clip_model:
            raise ValueError(f"{self.method} needs `clip_model` (an open_clip model: its losses drive the edit)")
        text = entry.meta.get("text")
        if text and not any(getattr(self, k, None) is not None for k in self.TEXT_SOURCES[text]):
            raise ValueError(f"{self.method} needs {self._text_help(text)}")
        if self.adapters and not entry.meta.get("adapters", False):
            raise ValueError(f"`adapters` do not apply to {self.method} (it loads no diffusion pipeline)")
        check = entry.meta.get("check")
        if check is not None:
            check(self)
        return self

    def _text_help(self, text: str) -> str:
        return f"`{text}`"

    def method_settings(self) -> BaseModel | None:
        """The method's own settings block (its declared model; defaults when the block is left out)."""
        from pixelmill import registry

        model = registry.get("edit", self.method).meta.get("settings")
        if model is None:
            return None
        return (self.__pydantic_extra__ or {}).get(self.method) or model()

    def _affecting(self, exclude: set[str]) -> dict[str, Any]:
        # a default that changes nothing leaves the hash of outputs written before the key existed
        unset = {k for k, default in (("revision", None), ("safety_checker", None), ("safety_checker", "on"))
                 if getattr(self, k) == default}
        out = self.model_dump(exclude=exclude | {"adapters"} | unset)
        if self.adapters:  # outputs written before adapters existed keep their hashes
            out["adapters"] = adapters_affecting(self.adapters)
        return out


class EditConfig(FlowConfig, EditSettings):
    """The bulk-edit flow: a registered editing method over an image dataset.

    Args:
        input: dataset URL with an image column (a pixelmill dataset or a folder of Parquet
            files), or a folder / prefix of image files that may keep growing (row ids are
            the SHA-256 of each file's bytes; undecodable files become rejects).
        output: dataset URL to write. Runs are incremental: each edits only the input ids
            not yet processed under the same config, and appends new shards.
        input_glob: with a folder of files, only those matching (``*.jpg``; a pattern with
            ``/`` matches the relative path); without it, files with image extensions.
        retry_rejects: edit rejected ids again (``--retry-rejects``); otherwise a reject
            counts as processed.
        image_column / caption_column: the input's image and caption columns.
        prompt / prompt_column: one prompt for all rows (``{column}`` placeholders are
            filled from the row, e.g. ``"a watercolor painting of {caption}"``), or a
            per-row column.
        instruction / instruction_column: the same for instruction-following methods.
        resolution, max_pixels: the size images are edited at; larger inputs are rejects.
        batch_size: rows per forward pass (speed only: every row has its own generator), or
            ``auto``: on CUDA the largest batch, at most 32, whose memory (measured once per
            worker on the loaded model) fits in 80% of the free GPU memory; 4 elsewhere.
        speed: how the stage uses its device (:class:`EditSpeed`: channels-last, torch.compile,
            decoding overlapped with denoising, image I/O threads); all off by default.
        mask_column: masked SDEdit: an image column whose nonzero (white) pixels mark
            the region to edit; transparent pixels of a mask with alpha count as zero.
        stroke_column: masked SDEdit from strokes: an image column holding the input
            with strokes painted on; it is SDEdit's guide, and the edit region is where
            it differs from the input by more than ``stroke_threshold``.
        stroke_threshold: largest per-channel difference (0–255) still counted as unpainted.
        mask_dilation: pixels the edit region grows by (square dilation) before the
            original pixels are pasted back outside it.
        device, dtype: ``auto`` or explicit.
        placement: workers, CPUs, GPUs, memory per worker (old keys ``workers``,
            ``num_gpus_per_worker``, ``num_cpus_per_worker`` still parse into it).
        timeouts: ``stall`` (default 1800 s without a finished batch in a shard's call;
            null: off) and ``attempts`` (default 2): a hung call's worker is ended and the
            shard retried; after ``attempts`` its rows are rejects naming the timeout
            (:class:`~pixelmill.config.base.StageTimeouts`; not hashed).
        The other keys are :class:`EditSettings`'.
    """

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> EditConfig:
        from pixelmill.config.preflight import check_edit

        return check_edit(self, overwrite=overwrite, dry_run=dry_run)

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    LEGACY_PLACEMENT: ClassVar[dict[str, str]] = {
        "workers": "workers", "num_gpus_per_worker": "gpus", "num_cpus_per_worker": "cpus"}
    UNHASHED: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "speed", "input_glob", "retry_rejects"})
    TEXT_SOURCES: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompt": ("prompt", "prompt_column"), "instruction": ("instruction", "instruction_column")}

    input: str
    output: str
    input_glob: str | None = None
    retry_rejects: bool = False
    image_column: str = "image"
    caption_column: str | None = "caption"
    prompt_column: str | None = None
    instruction_column: str | None = None
    resolution: int = Field(default=512, ge=8, le=4096)
    max_pixels: int = Field(default=50_000_000, ge=64)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 4
    speed: EditSpeed = Field(default_factory=EditSpeed)
    mask_column: str | None = None
    stroke_column: str | None = None
    stroke_threshold: int = Field(default=10, ge=0, le=254)
    mask_dilation: int = Field(default=4, ge=0, le=256)
    device: str = "auto"
    dtype: str = "auto"
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)

    def _text_help(self, text: str) -> str:
        return f"`{text}` (one for all rows) or `{text}_column`"

    @model_validator(mode="after")
    def _check_columns(self) -> EditConfig:
        from pixelmill import registry

        masked = self.mask_column or self.stroke_column
        if masked and not registry.get("edit", self.method).meta.get("masks", False):
            masking = [e.name for e in registry.entries("edit") if e.meta.get("masks")]
            raise ValueError(f"`mask_column` / `stroke_column` (masked editing) need "
                             f"`method: {' or '.join(masking)}`")
        if self.mask_column and self.stroke_column:
            raise ValueError("set `mask_column` or `stroke_column`, not both (a stroke image implies its mask)")
        for key in ("mask_column", "stroke_column"):
            if getattr(self, key) and getattr(self, key) == self.image_column:
                raise ValueError(f"`{key}` must name another column than `image_column`")
        return self

    def output_affecting(self) -> dict[str, Any]:
        """The keys whose change changes the output rows (hashed into the manifest).

        Placement, runtime, plugins, device, batch size and speed settings are left out: they change where
        and how fast rows are made, not what they are (batching changes pixels only within
        float tolerance, since every row has its own generator).
        """
        exclude = set(self.NEVER_HASHED | self.UNHASHED)
        # Settings of a feature not in use change nothing, and leaving them out keeps the
        # hashes of outputs written before these keys existed.
        if not (self.mask_column or self.stroke_column):
            exclude |= {"mask_column", "stroke_column", "stroke_threshold", "mask_dilation"}
        return self._affecting(exclude)


class VideoEditSettings(EditSettings):
    """How a video's atlas is edited: the ``edit:`` block of a video config.

    The editors are the bulk-edit methods, applied to one atlas layer image; the edit is
    composited over the layer. ``prompt`` / ``instruction`` are plain text here (a video
    has no caption columns to fill placeholders from). With ``clip_model``, diffusion
    methods also report CLIP scores of the edited atlas.

    Args:
        layer: the atlas layer to edit: ``background`` (the homography atlas's only layer)
            or ``foreground`` (neural atlases: the moving object).
        resolution: long side the layer image is edited at (default: its own long side
            rounded up to a multiple of 8, at most 1024); the result is resized back.
        The other keys are :class:`EditSettings`'.
    """

    layer: Literal["background", "foreground"] = "background"
    resolution: int | None = Field(default=None, ge=8, le=4096)

    @model_validator(mode="after")
    def _check_video(self) -> VideoEditSettings:
        for key in ("prompt", "instruction", "negative_prompt"):
            if placeholders(getattr(self, key)):
                raise ValueError(f"`{key}`: {{column}} placeholders are not supported for videos; write the text")
        return self

    def stage_config(self, resolution: int, device: str = "auto", dtype: str = "auto",
                     num_cpus: float = 1.0) -> dict[str, Any]:
        """The bulk-edit stage config (``EditConfig`` as a dict) that edits one atlas image."""
        shared = self.model_dump(exclude={"layer", "resolution"})
        return EditConfig(
            **shared, input="atlas", output="atlas", caption_column=None, resolution=resolution, batch_size=1,
            device=device, dtype=dtype, placement={"cpus": num_cpus, "gpus": 0},
        ).model_dump()

    def affecting(self) -> dict[str, Any]:
        """What the edit depends on (hashed; a change re-edits from the saved atlas)."""
        return self._affecting(set())
