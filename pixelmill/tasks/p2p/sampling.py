"""Prompt-to-Prompt sampling: initial latents, DDIM denoising, decoding, ``render_pairs``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelmill.models.conditioning import TextConditioning, encode_text
from pixelmill.tasks.p2p.attention import AttentionController, P2PController, attention_control, token_alignment

RECORD_MAX_TOKENS = 1024


P2P_FAMILIES = ("sd1", "sd2", "sdxl")


def require_p2p_pipeline(pipe: Any) -> None:
    """Refuse pipelines Prompt-to-Prompt cannot drive: it needs a text-to-image UNet of a known family.

    Args:
        pipe: A loaded diffusers pipeline.

    Raises:
        ValueError: Not a supported family (``models/family.py``: SD 1.x, 2.x, SDXL; not
            transformer families), or a UNet whose input is not 4 latent channels
            (InstructPix2Pix, inpainting).
    """
    from pixelmill.models.family import UnsupportedFamily, family_of_pipeline, require_family

    what = "Prompt-to-Prompt pair rendering"
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"{what} needs a UNet and a VAE; got {type(pipe).__name__}")
    try:
        require_family(family_of_pipeline(pipe), P2P_FAMILIES, what)
    except UnsupportedFamily as e:
        raise ValueError(f"{e} (pipeline {type(pipe).__name__})") from None
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(
            "Prompt-to-Prompt pair rendering needs a text-to-image UNet "
            f"({pipe.vae.config.latent_channels} input channels); {type(pipe).__name__} has "
            f"{pipe.unet.config.in_channels} (InstructPix2Pix or inpainting checkpoint?)"
        )


@dataclass
class RenderedPairs(Sequence):
    """What ``render_pairs`` returns: a sequence of ``(source, edited)`` PIL pairs, plus extras.

    Attributes:
        pairs: ``(source image, edited image)`` per pair, in input order.
        nsfw: Per pair, whether the safety checker flagged either image (always
            ``False`` without a checker). A flagged pair must be reported as ``nsfw``.
        latents: Final latents, shape (N, 2 [source, edited], C, h, w).
        self_attention: With ``record=True``: one dict per step, layer name → self-attention
            probabilities shaped (2 [uncond, cond], 2 [source, edited], N, heads, Lq, Lk)
            as used (after sharing). ``None`` otherwise.
        cross_attention: With ``record=True``: the same for the cross-attention layers
            (Lk = text positions), as used (after any replacement).
    """

    pairs: list[tuple[Image.Image, Image.Image]]
    nsfw: list[bool]
    latents: torch.Tensor
    self_attention: list[dict[str, torch.Tensor]] | None = None
    cross_attention: list[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):  # type: ignore[override]
        return self.pairs[i]

    def __iter__(self):
        return iter(self.pairs)


def initial_latents(pipe: Any, seeds: Sequence[int], height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """One latent per seed, drawn exactly as diffusers' SD pipeline draws it from ``Generator().manual_seed(seed)``."""
    from diffusers.utils.torch_utils import randn_tensor

    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    device = pipe.unet.device
    return torch.cat(
        [randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(s)), device=device, dtype=dtype)
         for s in seeds]
    )


def ddim_denoise(
    pipe: Any,
    latents: torch.Tensor,
    text: TextConditioning,
    guidance: Sequence[float],
    steps: int,
    controller: AttentionController,
) -> torch.Tensor:
    """DDIM (eta=0) from pure noise with per-sample classifier-free guidance.

    Each UNet call sees ``[uncond (B), cond (B)]``; ``controller`` runs the attention
    of every layer and is told the step index before each call. The DDIM scheduler is
    built from the pipeline's scheduler config, so its prediction type (epsilon or v)
    is the checkpoint's.

    Args:
        pipe: A pipeline of a P2P family (its UNet and scheduler config are used).
        latents: Initial latents (B, C, h, w), already scaled by ``init_noise_sigma``.
        text: The batch's text conditioning (``models/conditioning.py``; SDXL's pooled
            text and time ids included), guided.
        guidance: Per-sample guidance scale (B values).
        steps: Number of DDIM steps.
        controller: The attention controller.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=latents.device)
    g = torch.tensor([float(x) for x in guidance], device=latents.device, dtype=latents.dtype).view(-1, 1, 1, 1)
    kwargs = text.unet_kwargs(guided=True)
    with attention_control(pipe.unet, controller):
        for j, t in enumerate(sched.timesteps):
            controller.begin_step(j)
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = pipe.unet(x, t, **kwargs, return_dict=False)[0]
            eu, ec = eps.chunk(2)
            latents = sched.step(eu + g * (ec - eu), t, latents, eta=0.0, return_dict=False)[0]
    return latents


def decode_latents(pipe: Any, latents: torch.Tensor, chunk: int = 8) -> tuple[list[Image.Image], list[bool]]:
    """Decode latents to PIL images and run the pipeline's safety checker, if any.

    Returns:
        (images, per-image nsfw flags)
    """
    images: list[Image.Image] = []
    flags: list[bool] = []
    sf = pipe.vae.config.scaling_factor
    for i in range(0, latents.shape[0], chunk):
        part = latents[i : i + chunk]
        decoded = pipe.vae.decode(part.to(pipe.vae.dtype) / sf, return_dict=False)[0]
        nsfw = None
        if getattr(pipe, "safety_checker", None) is not None:
            decoded, nsfw = pipe.run_safety_checker(decoded, pipe.unet.device, part.dtype)
        images += pipe.image_processor.postprocess(decoded, output_type="pil")
        flags += [bool(f) for f in nsfw] if nsfw is not None else [False] * part.shape[0]
    return images, flags


def _check_size(pipe: Any, height: int, width: int) -> None:
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} for this model; "
                         f"got {height}x{width}")


def render_pairs(
    pipe: Any,
    source_prompts: Sequence[str],
    edited_prompts: Sequence[str],
    seeds: Sequence[int],
    p_values: Sequence[float],
    cfg_values: Sequence[float],
    steps: int,
    height: int,
    width: int,
    cross_replace: bool = False,
    record: bool = False,
) -> RenderedPairs:
    """Render N before/after pairs with Prompt-to-Prompt in one batch (see the module docstring).

    Pair ``i`` starts both branches from the latent of ``seeds[i]``, shares self-attention
    for steps ``j < p_values[i] * steps`` and uses guidance ``cfg_values[i]``; a pair's
    result does not depend on the other pairs in the batch (up to float rounding).

    Args:
        pipe: SD 1.x/2.x or SDXL text-to-image pipeline (others are refused).
        source_prompts: Source captions.
        edited_prompts: Edited captions, one per source.
        seeds: Per-pair seeds.
        p_values: Per-pair shared fraction of steps, in [0, 1].
        cfg_values: Per-pair classifier-free guidance scale.
        steps: DDIM steps.
        height: Image height in pixels.
        width: Image width in pixels.
        cross_replace: Also replace the cross-attention maps of shared tokens.
        record: Record the self-attention maps (small sizes only, see ``RECORD_MAX_TOKENS``).

    Returns:
        ``RenderedPairs``: iterate it for ``(source, edited)`` PIL pairs; ``.nsfw`` flags.

    Raises:
        ValueError: Unsupported family, mismatched lengths, p outside [0, 1], bad size, or
            ``record`` at a size whose maps would be too large to keep.
    """
    require_p2p_pipeline(pipe)
    n = len(source_prompts)
    if n == 0 or not (len(edited_prompts) == len(seeds) == len(p_values) == len(cfg_values) == n):
        raise ValueError("source_prompts, edited_prompts, seeds, p_values and cfg_values need the same non-zero length")
    if any(not (0.0 <= float(p) <= 1.0) for p in p_values):
        raise ValueError(f"p values must lie in [0, 1]; got {list(p_values)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    _check_size(pipe, height, width)
    tokens = (height // pipe.vae_scale_factor) * (width // pipe.vae_scale_factor)
    if record and tokens > RECORD_MAX_TOKENS:
        raise ValueError(f"record=True keeps every self-attention map: use at most {RECORD_MAX_TOKENS} latent "
                         f"positions (got {tokens} for {height}x{width})")
    from diffusers import DDIMScheduler

    cross = ([token_alignment(pipe.tokenizer, s, e) for s, e in zip(source_prompts, edited_prompts)]
             if cross_replace else None)
    controller = P2PController(p_values, steps, cross_maps=cross, record=record)
    device = pipe.unet.device
    with torch.no_grad():
        text = encode_text(pipe, list(source_prompts) + list(edited_prompts), None, True, device, (height, width))
        x = initial_latents(pipe, seeds, height, width, text.dtype)
        x = x * DDIMScheduler.from_config(pipe.scheduler.config).init_noise_sigma
        lat = ddim_denoise(pipe, torch.cat([x, x]), text, list(cfg_values) * 2, steps, controller)
        images, flags = decode_latents(pipe, lat)
    return RenderedPairs(
        pairs=[(images[i], images[n + i]) for i in range(n)],
        nsfw=[flags[i] or flags[n + i] for i in range(n)],
        latents=lat.view(2, n, *lat.shape[1:]).transpose(0, 1).detach().cpu(),
        self_attention=controller.records if record else None,
        cross_attention=controller.cross_records if record else None,
    )


def sample_params(seed: int, p_range: Sequence[float], cfg_range: Sequence[float]) -> tuple[float, float]:
    """A sample's p and CFG: ``p ~ U(p_range)`` then ``cfg ~ U(cfg_range)`` from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    p = float(rng.uniform(p_range[0], p_range[1]))
    cfg = float(rng.uniform(cfg_range[0], cfg_range[1]))
    return p, cfg
