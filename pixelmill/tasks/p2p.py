"""Prompt-to-Prompt pair rendering: InstructPix2Pix's image stage.

A caption and its edited caption are rendered as a before/after pair that differ only
where the text differs. Both prompts run in ONE UNet batch, laid out as

    [uncond_source (N), uncond_edited (N), cond_source (N), cond_edited (N)]

for N pairs, from the SAME initial latent per pair (drawn like diffusers draws it, from
one CPU generator per pair seeded by the pair's seed). Sampling is DDIM with ``eta=0``
built from the pipeline's scheduler config: deterministic, so there is no per-step
noise to share (InstructPix2Pix used Euler-ancestral with the per-step noise shared
across the two branches; with DDIM ``eta=0`` the shared-noise property holds trivially).

For the first ``p`` of the steps (step ``j`` shares iff ``j < p * steps``; ``p`` per
pair), the edited branch's SELF-attention uses the source branch's attention
probabilities, in both the unconditional and the conditional half, which is what
InstructPix2Pix's generation code shares. Sharing the probabilities is the same as
computing the edited branch's attention with the source's queries and keys and its own
values, so when no maps are recorded it runs as ``scaled_dot_product_attention`` on
substituted Q/K (memory-efficient and flash-capable, no L×L map materialised); with
``record=True`` the maps are materialised, copied and stored.

With ``cross_replace=True`` the conditional edited branch also takes, over the same
steps, the source's CROSS-attention maps for the text tokens both prompts share
(Prompt-to-Prompt's replacement, as in its refinement edit): see ``token_alignment``.

Custom attention runs through a diffusers attention processor (``P2PAttnProcessor``)
installed on every attention layer of the UNet for the duration of a render; the
processors share one controller that knows the current step.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pixelmill.datasets.images import IMAGE_TYPE, encode_image
from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.pair_filter import (
    CaptionDecision,
    ClipPairFilter,
    FilterThresholds,
    PairScores,
    decide_caption,
    rank_key,
    threshold_failures,
)
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, RowError, Stage

STATUS_DROPPED = "dropped"
RECORD_MAX_TOKENS = 1024


def require_p2p_pipeline(pipe: Any) -> None:
    """Refuse pipelines Prompt-to-Prompt cannot drive: it needs an SD 1.x/2.x text-to-image layout.

    Args:
        pipe: A loaded diffusers pipeline.

    Raises:
        ValueError: Not SD-shaped (SDXL, transformer families, …), or a UNet whose input
            is not 4 latent channels (InstructPix2Pix, inpainting).
    """
    from pixelmill.models.loading import require_sd_shaped

    require_sd_shaped(pipe, "Prompt-to-Prompt pair rendering")
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(
            "Prompt-to-Prompt pair rendering needs a text-to-image UNet "
            f"({pipe.vae.config.latent_channels} input channels); {type(pipe).__name__} has "
            f"{pipe.unet.config.in_channels} (InstructPix2Pix or inpainting checkpoint?)"
        )


def token_alignment(tokenizer: Any, source: str, edited: str) -> list[int | None]:
    """Word-level alignment of the edited prompt's token positions to the source's.

    Both prompts are split on whitespace and each word is tokenized on its own (CLIP's
    tokenizer never merges across whitespace, so this gives the prompt's tokens). The
    word sequences are aligned with ``difflib.SequenceMatcher`` on their token ids; words
    in matching blocks map token by token. The start token maps to the start token, and
    the end-of-text token and the padding after it map to the source's end-of-text and
    padding, position by position. Words that are new or changed map to nothing, so
    they keep their own attention maps (Prompt-to-Prompt's refinement rule).

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        source: The source prompt.
        edited: The edited prompt.

    Returns:
        One entry per edited token position (``tokenizer.model_max_length`` of them):
        the source position whose maps it takes, or ``None``.
    """
    length = int(tokenizer.model_max_length)

    def words(text: str) -> list[tuple[int, ...]]:
        return [tuple(tokenizer(w, add_special_tokens=False).input_ids) for w in text.split()]

    def starts(ws: list[tuple[int, ...]]) -> list[int]:
        out, pos = [], 1
        for w in ws:
            out.append(pos)
            pos += len(w)
        return out

    src, ed = words(source), words(edited)
    s_pos, e_pos = starts(src), starts(ed)
    mapper: list[int | None] = [None] * length
    mapper[0] = 0
    last = length - 1
    matcher = difflib.SequenceMatcher(a=src, b=ed, autojunk=False)
    for block in matcher.get_matching_blocks():
        for off in range(block.size):
            a, b = block.a + off, block.b + off
            for t in range(len(ed[b])):
                sp, ep = s_pos[a] + t, e_pos[b] + t
                if sp < last and ep < last:
                    mapper[ep] = sp
    s_end = min(1 + sum(map(len, src)), last)
    e_end = min(1 + sum(map(len, ed)), last)
    for k in range(length - max(s_end, e_end)):
        mapper[e_end + k] = s_end + k
    return mapper


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class AttentionController:
    """The attention core shared by every ``P2PAttnProcessor`` of one UNet.

    The base class is plain attention; subclasses change what the edited branch sees.
    ``begin_step`` is called by the denoising loop before each UNet evaluation.
    """

    step: int = 0

    def begin_step(self, step: int) -> None:
        """Set the index of the denoising step about to run."""
        self.step = step

    def attend(
        self,
        attn: Any,
        layer: str,
        is_cross: bool,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention output for head-batched ``query/key/value`` of shape (batch·heads, L, d).

        Args:
            attn: The diffusers ``Attention`` module (heads, scale, ``get_attention_scores``).
            layer: The layer's name in the UNet (``down_blocks.0.attentions.0…attn1``).
            is_cross: Whether this is text cross-attention (else self-attention).
            query: Queries.
            key: Keys.
            value: Values.
            mask: Additive attention mask or ``None``.
        """
        return _sdpa(query, key, value, mask, attn.scale)


class P2PAttnProcessor:
    """A diffusers attention processor that hands the attention core to a controller.

    Projections, norms, residual and output layers are exactly ``AttnProcessor``'s; only
    softmax(QKᵀ)V is delegated, so the controller can share or replace attention maps.

    Args:
        controller: Shared by all layers of the UNet.
        layer: This layer's name, for recording.
    """

    def __init__(self, controller: AttentionController, layer: str) -> None:
        self.controller = controller
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            encoder_hidden_states.shape if is_cross else hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        hidden_states = self.controller.attend(attn, self.layer, is_cross, query, key, value, attention_mask)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(unet: Any, controller: AttentionController) -> Iterator[None]:
    """Install a ``P2PAttnProcessor`` on every attention layer of ``unet``; restore on exit."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: P2PAttnProcessor(controller, name.removesuffix(".processor"))
                             for name in original})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


def _branches(x: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """View a head-batched tensor as (guidance 2, branch 2, pair N, heads, …)."""
    return x.view(2, 2, n, heads, *x.shape[1:])


class P2PController(AttentionController):
    """Prompt-to-Prompt for N pairs in the batch layout of the module docstring.

    Args:
        p_values: Per pair, the fraction of steps whose attention is shared.
        steps: Number of denoising steps.
        cross_maps: Per pair, ``token_alignment`` of its prompts, or ``None`` for no
            cross-attention replacement.
        record: Store the self- and cross-attention probabilities of both branches at
            every step (``records`` and ``cross_records``: one dict per step, layer →
            tensor shaped (2 [uncond, cond], 2 [source, edited], N, heads, Lq, Lk)).
        explicit_maps: On steps that share, materialise and copy the maps instead of
            substituting Q/K (what a map-copying processor does; for benchmarks).
    """

    def __init__(
        self,
        p_values: Sequence[float],
        steps: int,
        cross_maps: Sequence[Sequence[int | None]] | None = None,
        record: bool = False,
        explicit_maps: bool = False,
    ) -> None:
        self.n = len(p_values)
        self.p = torch.tensor([float(p) for p in p_values], dtype=torch.float64)
        self.steps = steps
        self.record = record
        self.explicit = explicit_maps or record
        self.records: list[dict[str, torch.Tensor]] = []
        self.cross_records: list[dict[str, torch.Tensor]] = []
        self.cross_index: torch.Tensor | None = None
        self.cross_alpha: torch.Tensor | None = None
        if cross_maps is not None:
            self.cross_index = torch.tensor(
                [[j if m is None else m for j, m in enumerate(row)] for row in cross_maps]
            )
            self.cross_alpha = torch.tensor([[m is not None for m in row] for row in cross_maps])
        self.begin_step(0)
        self.records.clear()
        self.cross_records.clear()

    def begin_step(self, step: int) -> None:
        """Set the step and which pairs share on it (decided on the CPU: no device syncs per layer)."""
        self.step = step
        self.share = step < self.p * self.steps
        self.share_idx = self.share.nonzero().flatten()
        self.sharing = self.share_idx.numel() > 0
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        if self.record:
            self.records.append({})
            self.cross_records.append({})

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_cache:
            if name == "cross_mask":
                value = self.cross_alpha & self.share.view(-1, 1)
            else:
                value = getattr(self, name)
            self._device_cache[key] = value.to(device)
        return self._device_cache[key]

    def attend(self, attn, layer, is_cross, query, key, value, mask):
        n, heads = self.n, attn.heads
        if query.shape[0] != 4 * n * heads:
            raise ValueError(f"P2P expects a batch of 4×{n} pairs, got {query.shape[0] // heads}")
        if is_cross:
            replace = self.cross_index is not None and self.sharing
            if not (replace or self.record):
                return _sdpa(query, key, value, mask, attn.scale)
            probs = attn.get_attention_scores(query, key, mask)
            if replace:
                probs = self._replace_cross(probs, heads)
            if self.record:
                self.cross_records[-1][layer] = _branches(probs, n, heads).detach().to("cpu", torch.float32).clone()
            return torch.bmm(probs, value)
        if not (self.record or (self.explicit and self.sharing)):
            if self.sharing:
                query, key = self._copy_source(query, heads), self._copy_source(key, heads)
            return _sdpa(query, key, value, mask, attn.scale)
        probs = attn.get_attention_scores(query, key, mask)
        if self.sharing:
            probs = self._copy_source(probs, heads)
        if self.record:
            self.records[-1][layer] = _branches(probs, n, heads).detach().to("cpu", torch.float32).clone()
        return torch.bmm(probs, value)

    def _copy_source(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """Overwrite, in place, the edited rows of sharing pairs with their source rows.

        ``x`` is always a fresh tensor of this layer's call (projections or probabilities).
        """
        b = _branches(x.contiguous(), self.n, heads)
        if self.share_idx.numel() == self.n:
            b[:, 1] = b[:, 0]
        else:
            idx = self._on("share_idx", x.device)
            b[:, 1, idx] = b[:, 0, idx]
        return b.view(x.shape)

    def _replace_cross(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        """The conditional edited maps take the source's columns at aligned tokens (sharing pairs)."""
        b = _branches(probs.contiguous(), self.n, heads)
        lk = b.shape[-1]
        if self.cross_index.shape[1] != lk:
            raise ValueError(f"token alignment has {self.cross_index.shape[1]} positions, text has {lk}")
        src, ed = b[1, 0], b[1, 1]
        index = self._on("cross_index", probs.device).view(self.n, 1, 1, lk).expand_as(src)
        m = self._on("cross_mask", probs.device).view(self.n, 1, 1, lk)
        b[1, 1] = torch.where(m, torch.gather(src, -1, index), ed)
        return b.view(probs.shape)


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
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: Sequence[float],
    steps: int,
    controller: AttentionController,
) -> torch.Tensor:
    """DDIM (eta=0) from pure noise with per-sample classifier-free guidance.

    Each UNet call sees ``[uncond (B), cond (B)]``; ``controller`` runs the attention
    of every layer and is told the step index before each call.

    Args:
        pipe: An SD-shaped pipeline (its UNet and scheduler config are used).
        latents: Initial latents (B, C, h, w), already scaled by ``init_noise_sigma``.
        cond: Text embeddings (B, 77, D).
        uncond: Unconditional embeddings (B, 77, D).
        guidance: Per-sample guidance scale (B values).
        steps: Number of DDIM steps.
        controller: The attention controller.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=latents.device)
    g = torch.tensor([float(x) for x in guidance], device=latents.device, dtype=latents.dtype).view(-1, 1, 1, 1)
    text = torch.cat([uncond, cond])
    with attention_control(pipe.unet, controller):
        for j, t in enumerate(sched.timesteps):
            controller.begin_step(j)
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = pipe.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
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
        pipe: SD 1.x/2.x text-to-image pipeline (others are refused).
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
        ValueError: Non-SD pipeline, mismatched lengths, p outside [0, 1], bad size, or
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
        cond, uncond = pipe.encode_prompt(list(source_prompts) + list(edited_prompts), device, 1, True)
        x = initial_latents(pipe, seeds, height, width, cond.dtype)
        x = x * DDIMScheduler.from_config(pipe.scheduler.config).init_noise_sigma
        lat = ddim_denoise(pipe, torch.cat([x, x]), cond, uncond, list(cfg_values) * 2, steps, controller)
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


INPUT_COLUMNS = ["id", "caption", "edit_prompt", "edited_caption"]

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parent_id", pa.string()),
        ("status", pa.string()),
        ("input_image", IMAGE_TYPE),
        ("edited_image", IMAGE_TYPE),
        ("edit_prompt", pa.string()),
        ("caption", pa.string()),
        ("edited_caption", pa.string()),
        ("sample", pa.int64()),
        ("seed", pa.int64()),
        ("p", pa.float64()),
        ("cfg", pa.float64()),
        ("steps", pa.int64()),
        ("cross_replace", pa.bool_()),
        ("clip_image_similarity", pa.float64()),
        ("clip_direction", pa.float64()),
        ("clip_source_caption", pa.float64()),
        ("clip_edited_caption", pa.float64()),
        ("rank", pa.int64()),
        ("model", pa.string()),
        ("model_hash", pa.string()),
        ("clip_model", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("drop_reason", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)

DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "dtype": "auto",
    "samples_per_caption": 100,
    "steps": 25,
    "height": 64,
    "width": 64,
    "p_range": (0.1, 0.9),
    "cfg_range": (7.5, 15.0),
    "cross_replace": False,
    "seed": 0,
    "batch_size": 4,
    "clip_model": None,
    "min_image_similarity": 0.7,
    "min_direction": 0.2,
    "min_image_caption": 0.2,
    "max_per_caption": 4,
}


@dataclass
class _Sample:
    row: int
    k: int
    seed: int
    p: float
    cfg: float
    outcome: PairScores | str | None = None
    images: tuple[Image.Image, Image.Image] | None = None


@dataclass
class _Caption:
    row: dict
    texts: tuple[str, str, str]
    samples: list[_Sample] = field(default_factory=list)
    done: int = 0


class PairRenderStage(Stage):
    """InstructPix2Pix's image stage: K Prompt-to-Prompt pairs per caption, CLIP-filtered.

    For each input row (``id``, ``caption``, ``edit_prompt``, ``edited_caption``) it renders
    ``samples_per_caption`` pairs. Sample ``k`` uses seed
    ``row_seed(seed, f"{id}:{k}")``; its ``p ~ U(p_range)`` and ``cfg ~ U(cfg_range)`` come
    from ``numpy.random.default_rng(that seed)`` (see ``sample_params``), so a sample is the
    same whatever batch it lands in. Samples of all rows are rendered ``batch_size``
    pairs per UNet batch (4·batch_size UNet rows with guidance), scored with
    ``ClipPairFilter`` and decided per caption by ``decide_caption``; only the images that
    can still be kept are held in memory.

    Output contract: ONE table (``OUTPUT_SCHEMA``); ``status`` says where a row goes.

    - ``ok`` (→ data): a kept pair. ``id`` = ``f"{caption_id}-{k:03d}"``, ``parent_id`` =
      caption id, ``input_image`` / ``edited_image`` (HF ``Image`` structs, PNG),
      ``edit_prompt``, ``caption``, ``edited_caption``, ``sample`` (k), ``seed``, ``p``,
      ``cfg``, ``steps``, ``cross_replace``, ``clip_image_similarity``, ``clip_direction``,
      ``clip_source_caption``, ``clip_edited_caption``, ``rank`` (1 = best direction),
      ``model``, ``model_hash``, ``clip_model``, ``width``, ``height``. At most
      ``max_per_caption`` per caption, in rank order.
    - ``dropped`` (→ ``__dropped/``): a sample filtered out by design; the same columns
      with null images, plus ``drop_reason``: the failed thresholds joined by ``;``
      (``image_similarity<0.7;direction<0.2``), ``direction_undefined``,
      ``surplus_rank>4`` (passed every threshold, ranked past ``max_per_caption``;
      ``rank`` set), ``nsfw`` (safety checker flagged it; no scores) or
      ``render_failed: …``.
    - ``reject`` (→ ``__rejects/``): a caption with no kept pair. ``id`` = caption id,
      ``parent_id`` null, ``stage`` = ``pairs``, ``error``: ``nsfw`` (every sample
      flagged), ``no_sample_passed_clip_filter: best image_similarity=…, direction=…,
      source_caption=…, edited_caption=… (…)`` (the sample closest to passing, whose
      scores also fill the ``clip_*`` columns), ``render_failed: …``, or a row problem
      (``missing 'edited_caption'``, ``edited_caption equals caption``).

    Accounting: every input id is the ``parent_id`` of ≥ 1 ``ok`` row or the ``id`` of
    exactly one ``reject`` row, never both; ``dropped`` rows name their caption in
    ``parent_id``.

    Args:
        config: Keys ``model`` (SD text-to-image pipeline, required), ``clip_model``
            (open_clip model, required), and the optional keys of ``DEFAULTS``.
        resources: CPUs/GPUs per worker.
    """

    name = "pairs"

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        c = {**DEFAULTS, **config}
        for key in ("model", "clip_model"):
            if not c.get(key):
                raise ValueError(f"pair rendering config needs {key!r}")
        for key, lo, hi in (("p_range", 0.0, 1.0), ("cfg_range", 0.0, math.inf)):
            r = c[key]
            if len(r) != 2 or not (lo <= float(r[0]) <= float(r[1]) <= hi):
                raise ValueError(f"{key} must be [low, high] with {lo} <= low <= high <= {hi}; got {r}")
        for key in ("samples_per_caption", "steps", "batch_size", "max_per_caption"):
            if int(c[key]) < 1:
                raise ValueError(f"{key} must be at least 1; got {c[key]}")
        super().__init__(c, resources)
        self.thresholds = FilterThresholds(
            min_image_similarity=float(c["min_image_similarity"]),
            min_direction=float(c["min_direction"]),
            min_image_caption=float(c["min_image_caption"]),
            max_per_caption=int(c["max_per_caption"]),
        )
        self.pipe = None
        self.filter: ClipPairFilter | None = None

    def setup(self) -> None:
        from pixelmill.models.device import resolve_device, resolve_dtype
        from pixelmill.models.loading import load_text2img_pipeline, model_fingerprint
        from pixelmill.tasks.metrics import ClipScorer

        c = self.config
        self.device = resolve_device(c["device"])
        self.dtype = resolve_dtype(c["dtype"], self.device)
        self.pipe = load_text2img_pipeline(c["model"], device=str(self.device), dtype=self.dtype)
        require_p2p_pipeline(self.pipe)
        if c.get("adapters"):
            from pixelmill.models.adapters import apply_adapters

            apply_adapters(self.pipe, c["adapters"])
        _check_size(self.pipe, int(c["height"]), int(c["width"]))
        self.model_hash = model_fingerprint(c["model"])
        self.filter = ClipPairFilter(ClipScorer(c["clip_model"], device=str(self.device)), self.thresholds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        rows = batch.to_pylist()
        out: list[list[dict]] = [[] for _ in rows]
        captions: dict[int, _Caption] = {}
        queue: list[_Sample] = []
        for i, row in enumerate(rows):
            try:
                texts = self._texts(row)
            except RowError as e:
                out[i] = [self._reject(row, e.reason)]
                continue
            cap = captions[i] = _Caption(row=row, texts=texts)
            for k in range(int(c["samples_per_caption"])):
                seed = row_seed(int(c["seed"]), f"{row['id']}:{k}")
                p, cfg = sample_params(seed, c["p_range"], c["cfg_range"])
                cap.samples.append(_Sample(i, k, seed, p, cfg))
            queue += cap.samples
        bs = int(c["batch_size"])
        for start in range(0, len(queue), bs):
            chunk = queue[start : start + bs]
            self._render_isolating(chunk, captions)
            self._score(chunk, captions)
            for i in dict.fromkeys(s.row for s in chunk):
                cap = captions[i]
                cap.done += sum(1 for s in chunk if s.row == i)
                if cap.done == len(cap.samples):
                    out[i] = self._finish(cap)
                else:
                    self._prune(cap)
        return pa.Table.from_pylist([r for rs in out for r in rs], schema=OUTPUT_SCHEMA)

    def _texts(self, row: dict) -> tuple[str, str, str]:
        if row.get("id") is None:
            raise RowError("missing 'id'")
        vals = []
        for key in ("caption", "edit_prompt", "edited_caption"):
            v = row.get(key)
            if not isinstance(v, str) or not v.strip():
                raise RowError(f"missing {key!r}")
            vals.append(v)
        if _normalize(vals[0]) == _normalize(vals[2]):
            raise RowError("edited_caption equals caption")
        return vals[0], vals[1], vals[2]

    def _render_isolating(self, chunk: list[_Sample], captions: dict[int, _Caption]) -> None:
        """Render a chunk; if it fails, retry sample by sample so one failure cannot sink the rest."""
        c = self.config
        texts = [captions[s.row].texts for s in chunk]
        try:
            res = render_pairs(
                self.pipe, [t[0] for t in texts], [t[2] for t in texts], [s.seed for s in chunk],
                [s.p for s in chunk], [s.cfg for s in chunk], int(c["steps"]), int(c["height"]),
                int(c["width"]), cross_replace=bool(c["cross_replace"]),
            )
        except Exception as error:  # noqa: BLE001 - isolate, then report per sample
            if len(chunk) == 1:
                chunk[0].outcome = f"render_failed: {type(error).__name__}: {error}"[:500]
                return
            for s in chunk:
                self._render_isolating([s], captions)
            return
        for s, pair, flagged in zip(chunk, res.pairs, res.nsfw):
            if flagged:
                s.outcome = "nsfw"
            else:
                s.images = pair

    def _score(self, chunk: list[_Sample], captions: dict[int, _Caption]) -> None:
        todo = [s for s in chunk if s.images is not None and s.outcome is None]
        if not todo:
            return
        scores = self.filter.score(
            [s.images[0] for s in todo], [s.images[1] for s in todo],
            [captions[s.row].texts[0] for s in todo], [captions[s.row].texts[2] for s in todo],
        )
        for s, sc in zip(todo, scores):
            s.outcome = sc

    def _prune(self, cap: _Caption) -> None:
        """Free the images of samples that can no longer be kept (failed, or out-ranked by enough passers)."""
        passers = [s for s in cap.samples
                   if isinstance(s.outcome, PairScores) and not threshold_failures(s.outcome, self.thresholds)]
        passers.sort(key=lambda s: rank_key(s.outcome, s.k))
        keep = {id(s) for s in passers[: self.thresholds.max_per_caption]}
        for s in cap.samples:
            if s.images is not None and s.outcome is not None and id(s) not in keep:
                s.images = None

    def _finish(self, cap: _Caption) -> list[dict]:
        decision: CaptionDecision = decide_caption([s.outcome for s in cap.samples], self.thresholds)
        rows: list[dict] = []
        if decision.reject is not None:
            best = cap.samples[decision.best] if decision.best is not None else None
            rows.append(self._reject(cap.row, decision.reject,
                                     best.outcome if best is not None else None))
        kept, dropped = [], []
        for s, d in zip(cap.samples, decision.decisions):
            if d.keep:
                kept.append((d.rank, self._sample_row(cap, s, STATUS_OK, d.rank, None)))
            else:
                dropped.append(self._sample_row(cap, s, STATUS_DROPPED, d.rank, d.reason))
            s.images = None
        rows += [r for _, r in sorted(kept, key=lambda x: x[0])] + dropped
        return rows

    def _base(self, row: dict) -> dict:
        c = self.config
        return {
            "caption": row.get("caption"),
            "edit_prompt": row.get("edit_prompt"),
            "edited_caption": row.get("edited_caption"),
            "steps": int(c["steps"]),
            "cross_replace": bool(c["cross_replace"]),
            "model": c["model"],
            "model_hash": getattr(self, "model_hash", None),
            "clip_model": c["clip_model"],
            "shard": row.get("shard"),
        }

    def _reject(self, row: dict, reason: str, scores: PairScores | str | None = None) -> dict:
        out = {**self._base(row), "id": None if row.get("id") is None else str(row["id"]),
               "status": STATUS_REJECT, "error": reason, "stage": self.name}
        if isinstance(scores, PairScores):
            out.update(_score_columns(scores))
        return out

    def _sample_row(self, cap: _Caption, s: _Sample, status: str, rank: int | None, reason: str | None) -> dict:
        cid = str(cap.row["id"])
        out = {**self._base(cap.row), "id": f"{cid}-{s.k:03d}", "parent_id": cid, "status": status,
               "sample": s.k, "seed": s.seed, "p": s.p, "cfg": s.cfg, "rank": rank, "drop_reason": reason}
        if isinstance(s.outcome, PairScores):
            out.update(_score_columns(s.outcome))
        if status == STATUS_OK:
            src, edited = s.images
            out.update(input_image=encode_image(src), edited_image=encode_image(edited),
                       width=edited.width, height=edited.height)
        return out


def _score_columns(s: PairScores) -> dict:
    return {"clip_image_similarity": s.image_similarity, "clip_direction": s.direction,
            "clip_source_caption": s.source_caption, "clip_edited_caption": s.edited_caption}


def _normalize(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())
