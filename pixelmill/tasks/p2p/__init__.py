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
processors share one controller that knows the current step. They compose with what was
installed before: a Custom Diffusion adapter's K/V (and Q/out) projections are kept, and
a processor P2P cannot compose with is refused rather than silently replaced.
"""


from __future__ import annotations

from pixelmill.tasks.p2p.attention import (
    AttentionController,
    P2PAttnProcessor,
    P2PController,
    _branches,
    _sdpa,
    attention_control,
    composable_processor,
    token_alignment,
)
from pixelmill.tasks.p2p.sampling import (
    RECORD_MAX_TOKENS,
    RenderedPairs,
    _check_size,
    ddim_denoise,
    decode_latents,
    initial_latents,
    render_pairs,
    require_p2p_pipeline,
    sample_params,
)
from pixelmill.tasks.p2p.stage import DEFAULTS, INPUT_COLUMNS, OUTPUT_SCHEMA, STATUS_DROPPED, PairRenderStage

__all__ = [
    "DEFAULTS", "INPUT_COLUMNS", "OUTPUT_SCHEMA", "RECORD_MAX_TOKENS", "STATUS_DROPPED", "AttentionController",
    "P2PAttnProcessor", "P2PController", "PairRenderStage", "RenderedPairs", "attention_control",
    "composable_processor", "ddim_denoise", "decode_latents", "initial_latents", "render_pairs",
    "require_p2p_pipeline", "sample_params", "token_alignment",
]
