"""Video editing through layered atlases: the atlas (homography or neural), the edit, the render."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixelmill.config.base import FlowConfig, StrictModel
from pixelmill.config.edit import VideoEditSettings


class NeuralAtlasConfig(BaseModel):
    """Training settings of a neural layered atlas.

    Defaults are a mid-size CPU/GPU setting for short clips; :meth:`tiny` trains in well
    under a minute on 2 CPU cores for a ~32x32, ~8-frame clip.

    Args:
        iterations: optimisation steps.
        batch_size: pixels sampled per step (over all frames).
        learning_rate: Adam learning rate (constant, so a resumed run equals an unbroken one).
        mapping_width, mapping_depth: hidden width / hidden layers of each mapping MLP.
        alpha_width, alpha_depth, alpha_frequencies: alpha MLP and its Fourier feature octaves.
        atlas_width, atlas_depth, atlas_frequencies: atlas MLPs and their Fourier octaves.
        uv_scale: initial (and rigid) scale of the mappings; below 1 leaves room in the atlas
            for camera motion.
        rgb_weight, flow_weight, alpha_flow_weight, rigidity_weight, sparsity_weight:
            loss weights.
        bootstrap_weight, bootstrap_iterations: weight and duration of the alpha-vs-mask loss.
        flow_tolerance: forward–backward flow check threshold in pixels.
        rigidity_delta: finite-difference step of the rigidity loss in frame pixels.
        atlas_resolution: atlas pixels per frame pixel at export.
        max_atlas_side: cap on an exported atlas image side.
        seed: initialisation and sampling seed.
        checkpoint_every: steps between checkpoints (0: only at the end) when a checkpoint
            folder is given.
        progress_every: steps between progress callbacks.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    iterations: int = Field(default=4000, ge=0)
    batch_size: int = Field(default=4096, ge=16)
    learning_rate: float = Field(default=1e-3, gt=0)
    mapping_width: int = Field(default=128, ge=4)
    mapping_depth: int = Field(default=4, ge=1)
    alpha_width: int = Field(default=128, ge=4)
    alpha_depth: int = Field(default=4, ge=1)
    alpha_frequencies: int = Field(default=5, ge=0)
    atlas_width: int = Field(default=256, ge=4)
    atlas_depth: int = Field(default=5, ge=1)
    atlas_frequencies: int = Field(default=8, ge=0)
    uv_scale: float = Field(default=0.5, gt=0, le=1)
    rgb_weight: float = Field(default=1.0, ge=0)
    flow_weight: float = Field(default=0.01, ge=0)
    alpha_flow_weight: float = Field(default=0.05, ge=0)
    rigidity_weight: float = Field(default=0.01, ge=0)
    sparsity_weight: float = Field(default=0.002, ge=0)
    bootstrap_weight: float = Field(default=0.1, ge=0)
    bootstrap_iterations: int = Field(default=1000, ge=0)
    flow_tolerance: float = Field(default=1.0, gt=0)
    rigidity_delta: float = Field(default=1.0, gt=0)
    atlas_resolution: float = Field(default=1.0, gt=0)
    max_atlas_side: int = Field(default=2048, ge=8)
    seed: int = 0
    checkpoint_every: int = Field(default=500, ge=0)
    progress_every: int = Field(default=100, ge=1)

    @classmethod
    def tiny(cls, **overrides: Any) -> NeuralAtlasConfig:
        """Small networks and few steps for tests and the demo: a 32x32, 8-frame clip trains in
        about 16 s on one CPU thread (33.9 dB re-rendered PSNR with rough masks)."""
        base = dict(
            iterations=1500,
            batch_size=1024,
            learning_rate=3e-3,
            mapping_width=32,
            mapping_depth=2,
            alpha_width=64,
            alpha_depth=2,
            alpha_frequencies=5,
            atlas_width=64,
            atlas_depth=3,
            atlas_frequencies=5,
            bootstrap_iterations=300,
            atlas_resolution=2.0,
            checkpoint_every=250,
        )
        base.update(overrides)
        return cls(**base)


# Neural atlas settings that change how often training reports or saves, not the atlas.
NEURAL_PLACEMENT_SETTINGS = frozenset({"checkpoint_every", "progress_every"})


class VideoAtlasSettings(StrictModel):
    """How each video becomes a layered atlas: the ``atlas:`` block of a video config.

    Args:
        method: ``homography`` (one background mosaic, for static scenes and camera
            pans; seconds on a CPU) or ``neural`` (Neural Layered Atlases: background and
            foreground layers with per-frame alpha, trained per video; a GPU for real clips).
        neural: neural atlas training settings: ``NeuralAtlasConfig`` fields, optionally
            starting from ``preset: tiny`` (the small test/demo setting); ``neural: tiny``
            is short for ``{preset: tiny}``. Empty: ``NeuralAtlasConfig()`` defaults.
        masks: neural only: ``motion`` bootstraps alpha with rough masks of what moves
            against a homography atlas of the clip (skipped when the clip cannot be
            registered); ``none`` trains without masks.
        reference: homography only: the reference frame (default: the middle frame).
        blend: homography only: ``median`` (removes moving objects) or ``mean``.
        detector: homography only: ``sift`` or ``orb`` features.
        max_frames: the longest video accepted (every frame is held in memory); a longer
            one is a reject naming its length, never silently cut.
    """

    method: Literal["homography", "neural"] = "homography"
    neural: dict[str, Any] = Field(default_factory=dict)
    masks: Literal["motion", "none"] = "motion"
    reference: int | None = Field(default=None, ge=0)
    blend: Literal["median", "mean"] = "median"
    detector: Literal["sift", "orb"] = "sift"
    max_frames: int = Field(default=240, ge=2, le=100_000)

    @model_validator(mode="before")
    @classmethod
    def _preset_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("neural"), str):
            data = {**data, "neural": {"preset": data["neural"]}}
        elif isinstance(data, dict) and "neural" in data and data["neural"] is None:
            data = {**data, "neural": {}}
        return data

    @model_validator(mode="after")
    def _check(self) -> VideoAtlasSettings:
        if self.neural:
            self.neural_config()
        return self

    def neural_config(self):
        """The ``NeuralAtlasConfig`` these settings name (imports torch).

        Raises:
            ValueError: an unknown preset or a bad training setting, naming it.
        """
        fields = dict(self.neural)
        preset = fields.pop("preset", None)
        if preset not in (None, "tiny"):
            raise ValueError(f"neural.preset: unknown preset {preset!r} (known: tiny)")
        try:
            return NeuralAtlasConfig.tiny(**fields) if preset == "tiny" else NeuralAtlasConfig(**fields)
        except ValidationError as e:
            raise ValueError("neural: " + "; ".join(
                f"{'.'.join(str(x) for x in err['loc'])}: "
                f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}"
                for err in e.errors())) from None

    def affecting(self) -> dict[str, Any]:
        """What the atlas depends on besides the video (hashed; a change rebuilds the atlas)."""
        if self.method == "homography":
            return self.model_dump(include={"method", "reference", "blend", "detector", "max_frames"})
        neural = {k: v for k, v in self.neural_config().model_dump().items() if k not in NEURAL_PLACEMENT_SETTINGS}
        return {"method": "neural", "masks": self.masks, "max_frames": self.max_frames, "neural": neural}


class VideoConfig(FlowConfig):
    """The video flow: every video of a dataset edited through a layered atlas.

    One job per video (one Prefect task on Ray, claiming ``placement.gpus`` GPUs: ``auto``
    gives it one where the cluster has GPUs): decode, build or train the atlas, edit one atlas layer, render the edit
    through every frame's UV map (and alpha), encode an MP4 with the source's frame
    count, size and frame rate, and measure it.

    Args:
        input: a dataset (pixelmill dataset, or a folder of Parquet files) with ``id`` and
            a ``video_column`` holding each video's file bytes (binary) or path (string: a
            local path, relative to the dataset folder when relative, or an fsspec URL);
            or a folder of video files (``.mp4 .mov .m4v .avi .mkv .webm .mpg .mpeg``),
            each file a row whose id is its path relative to the folder; or one video file.
        output: local root folder (PyAV and the atlas checkpoints write files): per video
            ``videos/<id>/`` (``edited.mp4``, ``atlas/``, ``edit_layer.png``,
            ``edited_atlas.png``, ``frames/``, ``atlas-checkpoints/``, ``metrics.json``,
            ``job.json``), and ``metrics.parquet``, ``report.html``, ``config.json``.
        video_column: the input column with the videos.
        atlas: how the atlas is made (``VideoAtlasSettings``).
        edit: how the atlas is edited (``VideoEditSettings``).
        render: ``overlay`` (the edit layer, sampled through each frame's UV map and
            weighted by the layer's visibility, composited over the original frames: pixels
            the edit leaves transparent stay the original) or ``atlas`` (every frame
            re-rendered from the edited atlas layers, as in Neural Layered Atlases).
        device, dtype: ``auto`` (CUDA when the job has a GPU) or explicit.
        placement: ``gpus`` each video job claims (``auto``: one where the cluster has GPUs,
            else CPU; a number the cluster cannot provide is refused) and ``cpus`` (also its
            torch thread count); old keys ``num_gpus`` and ``cpus_per_job`` still parse into it.
        limit: only the first N input rows.
    """

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> VideoConfig:
        from pixelmill.config.preflight import check_video

        return check_video(self, overwrite=overwrite, dry_run=dry_run)

    input: str
    output: str
    video_column: str = "video"
    atlas: VideoAtlasSettings = Field(default_factory=VideoAtlasSettings)
    edit: VideoEditSettings
    render: Literal["overlay", "atlas"] = "overlay"
    device: str = "auto"
    dtype: str = "auto"

    LEGACY_PLACEMENT: ClassVar[dict[str, str]] = {"num_gpus": "gpus", "cpus_per_job": "cpus"}

    @model_validator(mode="after")
    def _check(self) -> VideoConfig:
        if self.edit.layer == "foreground" and self.atlas.method != "neural":
            raise ValueError("`edit.layer: foreground` needs `atlas.method: neural` "
                             "(a homography atlas has only the background layer)")
        return self

    def output_affecting(self) -> dict[str, Any]:
        """The keys whose change changes the outputs (hashed into ``config.json``).

        Placement (GPUs, CPUs, device, runtime) and ``limit`` (a larger limit only adds
        videos) are left out.
        """
        return {"input": self.input, "video_column": self.video_column, "atlas": self.atlas.affecting(),
                "edit": self.edit.affecting(), "render": self.render}

