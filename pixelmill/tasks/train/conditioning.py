"""What the UNet is conditioned on, per model family (``models/family.py``).

- **SD 1.x / 2.x**: the text encoder's last hidden states (``encoder_hidden_states``).
- **SDXL**, as diffusers' SDXL pipelines build it (``encode_prompt`` of
  ``StableDiffusionXLPipeline``): the prompt goes through both text encoders; each one's
  penultimate hidden states (``hidden_states[-2]``) are concatenated on the last dim; the
  second encoder's pooled projection (``text_embeds``) and the time ids
  ``(original h, w, crop top, left, target h, w)`` go to the UNet's ``added_cond_kwargs``.

``TextCond`` carries the text part (hidden states, and the pooled embedding on SDXL) so
the trainer's caching, conditioning dropout and UNet call do not branch on the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

POOLED_SUFFIX = "|pooled"
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def is_sdxl(parts: dict[str, Any]) -> bool:
    """Whether the loaded parts are SDXL's (a second text encoder)."""
    return parts.get("text_encoder_2") is not None


def text_encoders(parts: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, tokenizer, text encoder)`` of each text encoder the model has (one, or two on SDXL)."""
    return [(te, parts[tok], parts[te]) for tok, te in ENCODERS if parts.get(te) is not None]


@dataclass
class TextCond:
    """Encoded prompts: hidden states ``[B, L, D]`` and, on SDXL, the pooled embedding ``[B, P]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def detach(self) -> TextCond:
        return TextCond(self.embeds.detach(), None if self.pooled is None else self.pooled.detach())

    def where(self, drop: torch.Tensor, null: TextCond) -> TextCond:
        """Rows where ``drop`` is true replaced by ``null``'s (one row, broadcast)."""
        d = drop.to(self.embeds.device)
        embeds = torch.where(d[:, None, None], null.embeds.expand_as(self.embeds), self.embeds)
        pooled = None
        if self.pooled is not None:
            pooled = torch.where(d[:, None], null.pooled.expand_as(self.pooled), self.pooled)
        return TextCond(embeds, pooled)

    def cache_entries(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """``{key: embeds row}`` (and ``{key|pooled: pooled row}`` on SDXL), on the CPU, for the text cache."""
        out = {k: e for k, e in zip(keys, self.embeds.detach().cpu())}
        if self.pooled is not None:
            out.update({k + POOLED_SUFFIX: p for k, p in zip(keys, self.pooled.detach().cpu())})
        return out

    @classmethod
    def from_cache(cls, cache: dict[str, torch.Tensor], keys: list[str], device, sdxl: bool) -> TextCond | None:
        """The cached rows of ``keys`` (None unless every one is there)."""
        need = keys + ([k + POOLED_SUFFIX for k in keys] if sdxl else [])
        if not keys or not all(k in cache for k in need):
            return None
        embeds = torch.stack([cache[k] for k in keys]).to(device)
        pooled = torch.stack([cache[k + POOLED_SUFFIX] for k in keys]).to(device) if sdxl else None
        return cls(embeds, pooled)


def encode_prompts(parts: dict[str, Any], prompts: list[str], device) -> TextCond:
    """Encode ``prompts`` as the family's pipelines do (gradients flow if the caller allows them)."""
    if not is_sdxl(parts):
        tok, te = parts["tokenizer"], parts["text_encoder"]
        ids = _ids(tok, prompts, device)
        return TextCond(te(ids)[0].float())
    hidden, pooled = [], None
    for _, tok, te in text_encoders(parts):
        out = te(_ids(tok, prompts, device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (diffusers keeps the last encoder's)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL conditioning needs a text encoder with a projection (text_encoder_2's text_embeds)")
    return TextCond(torch.cat(hidden, dim=-1).float(), pooled.float())


def _ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def null_conditioning(parts: dict[str, Any], device) -> TextCond:
    """The unconditional text, as the model's pipelines use it for classifier-free guidance.

    The empty prompt's encoding; zeros on SDXL checkpoints whose pipeline sets
    ``force_zeros_for_empty_prompt`` (SDXL's default: its pipelines then use zeros for
    the unconditional branch, so training drops the text to what inference sees).
    """
    with torch.no_grad():
        null = encode_prompts(parts, [""], device)
    if is_sdxl(parts) and parts.get("force_zeros_for_empty_prompt", True):
        null = TextCond(torch.zeros_like(null.embeds), torch.zeros_like(null.pooled))
    return null


def time_ids(originals: list[tuple[int, int]], crops: list[tuple[int, int]], size: tuple[int, int],
             device) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per sample: (original h, w, crop top, left, target h, w).

    Args:
        originals: each sample's image size before resizing, ``(w, h)`` as PIL gives it.
        crops: each sample's crop offset ``(top, left)`` in the resized image.
        size: the bucket ``(w, h)`` the sample was cropped to (the target size).
    """
    w, h = size
    rows = [[oh or h, ow or w, top, left, h, w] for (ow, oh), (top, left) in zip(originals, crops)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def unet_kwargs(text: TextCond, originals, crops, size, device) -> dict[str, Any]:
    """The UNet's conditioning arguments for a batch (``encoder_hidden_states``, and SDXL's added ones)."""
    out: dict[str, Any] = {"encoder_hidden_states": text.embeds}
    if text.pooled is not None:
        out["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids(originals, crops, size, device)}
    return out
