"""Regularization retrieval: exactly N real images per class prompt from a pool."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pixelmill.config.base import FlowConfig, Placement, StrictModel


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


class RetrieveConfig(FlowConfig):
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
        image_format / image_quality: how downloaded images are stored (after resizing to
            ``resolution``): ``jpeg`` at ``image_quality`` (95, img2dataset's default; RGB), or
            lossless ``png`` (quality not used).
        placement: ``workers`` is the number of scan tasks the pool is split over
            (old key: ``scan_tasks``).
    """

    def preflight(self, *, overwrite: bool = False, dry_run: bool = False) -> RetrieveConfig:
        from pixelmill.config.preflight import check_retrieve

        return check_retrieve(self, overwrite=overwrite, dry_run=dry_run)

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
    image_format: Literal["jpeg", "png"] = "jpeg"
    image_quality: int = Field(default=95, ge=1, le=100)
    max_pixels: int = Field(default=50_000_000, ge=64)
    scan_block_rows: int = Field(default=262_144, ge=1024)
    invalid_vectors: Literal["error", "reject"] = "error"
    export: bool = True
    placement: Placement = Field(default_factory=lambda: Placement(workers=4, gpus=0))

    LEGACY_PLACEMENT: ClassVar[dict[str, str]] = {"scan_tasks": "workers"}

    @model_validator(mode="after")
    def _check_prompts(self) -> RetrieveConfig:
        for i, p in enumerate(self.prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}] is empty")
        if len({p.strip().lower() for p in self.prompts}) != len(self.prompts):
            raise ValueError("prompts contain duplicates")
        return self

    def gpu_requests(self) -> list:
        """None: scanning and downloading claim no GPUs (``placement.gpus`` is not read)."""
        return []

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
        if (self.image_format, self.image_quality) != ("jpeg", 95):  # the defaults: hashes made before them hold
            d.update(image_format=self.image_format, image_quality=self.image_quality)
        return d


