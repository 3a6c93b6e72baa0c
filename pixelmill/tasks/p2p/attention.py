"""Prompt-to-Prompt attention: controllers, the attention processor, token alignment.

The batch layout and what is shared on which step are described in the package
docstring (``pixelmill.tasks.p2p``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


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


# Processors whose projections are the ``Attention`` module's own (they differ only in how
# softmax(QKᵀ)V is computed, which the controller takes over).
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                     "AttnProcessorNPU")
# Custom Diffusion's processors carry their own K/V (and optionally Q/out) projections.
_CUSTOM_DIFFUSION_PROCESSORS = ("CustomDiffusionAttnProcessor", "CustomDiffusionAttnProcessor2_0",
                                "CustomDiffusionXFormersAttnProcessor")


def _processor_classes(names: Sequence[str]) -> tuple[type, ...]:
    import diffusers.models.attention_processor as ap

    return tuple(c for c in (getattr(ap, n, None) for n in names) if isinstance(c, type))


def composable_processor(name: str, processor: Any) -> Any | None:
    """The processor P2P must keep projecting with, or ``None`` when it is a plain one.

    Args:
        name: The layer's processor name (for the error).
        processor: The processor installed on that layer now.

    Returns:
        A Custom Diffusion processor (its K/V, Q and out projections are used as it would
        use them), or ``None`` for processors that use the ``Attention`` module's own.

    Raises:
        ValueError: Any other processor (an IP-Adapter, fused QKV, a user's own): P2P
            cannot compose with it, and replacing it would silently drop what it does.
    """
    if isinstance(processor, P2PAttnProcessor):
        return processor.original
    if isinstance(processor, _processor_classes(_CUSTOM_DIFFUSION_PROCESSORS)):
        return processor
    if isinstance(processor, _processor_classes(_PLAIN_PROCESSORS)):
        return None
    raise ValueError(
        f"Prompt-to-Prompt cannot compose with the attention processor {type(processor).__name__} on {name}: "
        "replacing it would drop what it does (supported: diffusers' plain processors and Custom Diffusion's)"
    )


class P2PAttnProcessor:
    """A diffusers attention processor that hands the attention core to a controller.

    Projections, norms, residual and output layers are exactly ``AttnProcessor``'s; only
    softmax(QKᵀ)V is delegated, so the controller can share or replace attention maps.
    With ``original`` a Custom Diffusion processor, its trained projections replace the
    module's exactly where it uses them (K/V with ``train_kv``, Q and out with
    ``train_q_out``), so an adapter loaded before the render keeps acting.

    Args:
        controller: Shared by all layers of the UNet.
        layer: This layer's name, for recording.
        original: The Custom Diffusion processor this one stands in for, or ``None``.
    """

    def __init__(self, controller: AttentionController, layer: str, original: Any | None = None) -> None:
        self.controller = controller
        self.layer = layer
        self.original = original
        self.custom_kv = bool(original is not None and original.train_kv)
        self.custom_q_out = bool(original is not None and original.train_q_out)

    def _key_value(self, attn: Any, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.custom_kv:
            return attn.to_k(states), attn.to_v(states)
        cd, dtype = self.original, attn.to_q.weight.dtype
        key = cd.to_k_custom_diffusion(states.to(cd.to_k_custom_diffusion.weight.dtype)).to(dtype)
        value = cd.to_v_custom_diffusion(states.to(cd.to_v_custom_diffusion.weight.dtype)).to(dtype)
        return key, value

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
        if self.custom_q_out:
            query = self.original.to_q_custom_diffusion(hidden_states).to(attn.to_q.weight.dtype)
        else:
            query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = self._key_value(attn, encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        hidden_states = self.controller.attend(attn, self.layer, is_cross, query, key, value, attention_mask)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        out = self.original.to_out_custom_diffusion if self.custom_q_out else attn.to_out
        hidden_states = out[0](hidden_states)
        hidden_states = out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(unet: Any, controller: AttentionController) -> Iterator[None]:
    """Install a ``P2PAttnProcessor`` on every attention layer of ``unet``; restore on exit.

    Each P2P processor composes with the processor it replaces (Custom Diffusion's
    projections are kept); a processor it cannot compose with is refused before anything
    is installed (``composable_processor``).
    """
    original = dict(unet.attn_processors)
    kept = {name: composable_processor(name, proc) for name, proc in original.items()}
    unet.set_attn_processor({name: P2PAttnProcessor(controller, name.removesuffix(".processor"), kept[name])
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
