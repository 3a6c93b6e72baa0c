"""Text conditioning for the denoising loops pixelmill writes itself, for every family.

SD 1.x/2.x condition the UNet on one text encoder's hidden states. SDXL concatenates
two encoders' (penultimate) hidden states and adds ``added_cond_kwargs``: the second
encoder's pooled output (``text_embeds``) and the micro-conditioning ``time_ids``
(original size, crop top-left, target size). ``encode_text`` calls the pipeline's own
``encode_prompt`` (so prompt weighting, clip skip and SDXL's zeroed empty negative
prompt behave as in diffusers) and ``TextConditioning.unet_kwargs`` gives the UNet's
keyword arguments for any subset of rows, with or without classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextConditioning:
    """Per-row text conditioning; ``uncond*`` are None without classifier-free guidance.

    Attributes:
        cond, uncond: encoder hidden states (n, L, D).
        pooled, uncond_pooled: SDXL's pooled text embeddings (n, D2), else None.
        time_ids: SDXL's micro-conditioning (1, 6), else None.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.cond.dtype

    def unet_kwargs(self, rows: list[int] | None = None, guided: bool = False) -> dict[str, Any]:
        """``encoder_hidden_states`` (and SDXL's ``added_cond_kwargs``) for ``rows``.

        With ``guided`` the batch is ``[uncond rows, cond rows]``, the order of a
        ``torch.cat([x, x])`` model input.
        """
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        states = pick(self.cond)
        if guided:
            states = torch.cat([pick(self.uncond), states])
        out: dict[str, Any] = {"encoder_hidden_states": states}
        if self.pooled is not None:
            pooled = pick(self.pooled)
            if guided:
                pooled = torch.cat([pick(self.uncond_pooled), pooled])
            out["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": self.time_ids.to(pooled.device, pooled.dtype).repeat(len(pooled), 1),
            }
        return out


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def encode_text(
    pipe: Any,
    texts: list[str],
    negative: str | list[str] | None,
    guided: bool,
    device: torch.device,
    size: tuple[int, int] | None = None,
) -> TextConditioning:
    """Encode ``texts`` (and the negative prompt) with the pipeline's own ``encode_prompt``.

    Args:
        pipe: a loaded SD 1.x/2.x or SDXL pipeline.
        texts: one prompt per row.
        negative: one negative prompt for every row, one per row, or None.
        guided: whether classifier-free guidance will run (negative embeddings made).
        device: where the embeddings go.
        size: (height, width) of the images, for SDXL's time ids (original = target size,
            no crop, as diffusers' SDXL pipelines default to).
    """
    n = len(texts)
    if isinstance(negative, str):
        negative = [negative] * n
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(texts, device, 1, guided, negative_prompt=negative)
        return TextConditioning(cond, uncond if guided else None)
    if size is None:
        raise ValueError("SDXL conditioning needs the image size (its time ids)")
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
        negative_prompt=negative,
    )
    h, w = size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=device)
    return TextConditioning(cond, uncond if guided else None, pooled, uncond_pooled if guided else None, time_ids)
