"""SDEdit: ``SDEditEditor`` (fixed strength, or the per-image t0 search) and the ``sdedit_steps`` loop.

``sdedit_steps`` denoises rows noised to different steps in one batch, which is what
lets the t0 search try every row's candidate at once; with masks it is also the loop
of masked SDEdit (see :mod:`pixelmill.tasks.edit.masked_sdedit`), so the compositing
helpers it ends with (``paste_outside_mask``, ``unedited_output``) live here too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from pixelmill.models.family import ALL_FAMILIES
from pixelmill.registry import register
from pixelmill.tasks.edit.base import BulkEditor
from pixelmill.tasks.metrics import rgb_rmse


def check_sdedit(settings) -> None:
    """``strength`` is a t0 in (0, 1], or ``auto`` with a ``target_l2`` to search t0 for."""
    if settings.strength == "auto":
        if settings.target_l2 is None:
            raise ValueError("`strength: auto` needs `target_l2` (RMSE in [0, 1])")
    elif not 0 < settings.strength <= 1:
        raise ValueError("`strength` must be in (0, 1] or 'auto'")
    elif int(settings.steps * settings.strength) < 1 and not (getattr(settings, "mask_column", None)
                                                             or getattr(settings, "stroke_column", None)):
        # diffusers runs int(steps * strength) denoising steps; zero would return no image at all.
        # (Masked SDEdit's own loop takes t0 = 0 to mean "paste the guide into the region".)
        raise ValueError(f"`strength: {settings.strength}` with `steps: {settings.steps}` runs "
                         f"int({settings.steps} x {settings.strength}) = 0 denoising steps; raise `steps` to at "
                         f"least {math.ceil(1 / settings.strength)} or `strength`")


@register("edit", "sdedit", text="prompt", needs_model=True, adapters=True, masks=True, check=check_sdedit,
          families=ALL_FAMILIES)
class SDEditEditor(BulkEditor):
    """SDEdit: noise the image to t0 and denoise with the prompt.

    ``strength`` in (0, 1] runs the diffusers image-to-image pipeline of the checkpoint's
    family (SD 1.x, 2.x, SDXL). ``strength: auto`` searches, per image, the largest whole
    number of noised steps whose output stays within ``target_l2`` of the input, by
    binary search batched across rows, with the same sampler (``sdedit_steps``), so the
    chosen t0 is the strength a fixed run would need.
    """

    method = "sdedit"
    text_key = "prompt"

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> type[BulkEditor]:
        """Masked SDEdit when the config names a mask or stroke column."""
        if config.get("mask_column") or config.get("stroke_column"):
            from pixelmill.tasks.edit.masked_sdedit import MaskedSDEditEditor

            return MaskedSDEditEditor
        return cls

    def load_pipeline(self):
        from pixelmill.models.loading import load_img2img_pipeline

        return load_img2img_pipeline(self.config["model"], **self.load_options())

    def pipe_call(self, images, texts, seeds):
        """The img2img call at a fixed strength; None for ``strength: auto`` (the t0 search is its own loop)."""
        c = self.config
        if c["strength"] == "auto":
            return None
        negative = [c["negative_prompt"]] * len(texts) if c.get("negative_prompt") else None
        kwargs = dict(
            prompt=texts,
            image=images,
            strength=c["strength"],
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance_scale"],
            negative_prompt=negative,
            generator=self.generators(seeds),
        )
        k = min(int(c["steps"] * c["strength"]), c["steps"])
        return kwargs, [{"strength": k / c["steps"], "t0_steps": k} for _ in images]

    def edit(self, images, texts, seeds):
        if self.config["strength"] == "auto":
            return self._search(images, texts, seeds)
        return super().edit(images, texts, seeds)

    def _search(self, images, texts, seeds, masks=None, originals=None) -> list[dict]:
        """Binary-search t0 per row; ``masks``/``originals`` make it masked SDEdit (see ``sdedit_steps``).

        The faithfulness measured is RMSE to ``images`` (SDEdit's guides).
        """
        c = self.config
        steps, target = c["steps"], c["target_l2"]
        n = len(images)
        lo, hi = [0] * n, [steps] * n
        best: list[dict | None] = [None] * n
        nsfw: set[int] = set()
        while True:
            active = [i for i in range(n) if lo[i] < hi[i]]
            if not active:
                break
            mids = {i: (lo[i] + hi[i] + 1) // 2 for i in active}
            outs, flags = sdedit_steps(
                self.pipe, [images[i] for i in active], [texts[i] for i in active],
                [mids[i] for i in active], steps, c["guidance_scale"], c.get("negative_prompt"),
                [seeds[i] for i in active],
                masks=[masks[i] for i in active] if masks is not None else None,
                originals=[originals[i] for i in active] if originals is not None else None,
            )
            for j, i in enumerate(active):
                if flags[j]:
                    nsfw.add(i)
                    lo[i] = hi[i]
                    continue
                l2 = rgb_rmse(images[i], outs[j])
                if l2 <= target:
                    lo[i] = mids[i]
                    best[i] = {"image": outs[j], "l2": l2}
                else:
                    hi[i] = mids[i] - 1
        results = []
        for i in range(n):
            unedited = unedited_output(images[i], masks[i] if masks is not None else None,
                                       originals[i] if originals is not None else None)
            b = best[i] or {"image": unedited, "l2": rgb_rmse(images[i], unedited)}
            if i in nsfw:
                results.append({"reject": "nsfw"})
            else:
                results.append({"image": b["image"], "l2": b["l2"], "t0_steps": lo[i],
                                "strength": lo[i] / steps})
        return results


def sdedit_steps(pipe, images, texts, ks, steps, guidance, negative, seeds, masks=None, originals=None):
    """SDEdit with a different number of noised steps ``k`` per row, in one batch, with the pipeline's sampler.

    Each row runs exactly what the pipeline's own img2img call runs at strength
    ``k/steps``: its scheduler (class, config, prediction type: epsilon or v) set to
    ``steps`` steps, started ``steps - k`` steps in, the image encoded and noised with
    the row's generator in the pipeline's order. So the t0 search and fixed-strength
    SDEdit are the same sampler, and a row's output at its chosen ``k`` is what a
    fixed-strength run with that strength gives. Rows with the same ``k`` share a copy
    of the scheduler (samplers keep state); every active row goes through one UNet call
    per step, joining when its start step comes. ``k = 0`` returns the input unchanged.
    Works for every family (``models/conditioning.py``: SDXL's pooled text and time ids).

    With ``masks`` this is masked SDEdit (the SDEdit paper's editing and compositing):
    outside each row's mask, max-pooled to latent resolution, the latent is replaced
    after the initial noising and after every step by the original's latent noised to
    the next step with the row's noise (the clean latent after the last step), as
    diffusers' inpainting pipelines do; after decoding, the original's pixels are pasted
    back outside the pixel mask, so they come back bit for bit.

    Args:
        pipe: an SD 1.x/2.x or SDXL pipeline (see ``models/family.py``).
        images: same-size RGB images, SDEdit's guides.
        texts: one prompt per row.
        ks: noised steps per row, 0 to ``steps``.
        steps: steps of the full schedule (the pipeline's ``num_inference_steps``).
        guidance: classifier-free guidance scale (off at 1 or below).
        negative: negative prompt for every row, or None.
        seeds: one generator seed per row.
        masks: optional bool arrays (H, W), True where a row may change.
        originals: with ``masks``, the images kept outside them (default: ``images``);
            a row whose original is not its guide encodes both, drawing from its
            generator in the order guide, original, noise.

    Returns:
        (images, nsfw flags)
    """
    import copy
    import inspect

    import torch

    from pixelmill.models.conditioning import encode_text

    device = pipe.unet.device
    dtype = pipe.unet.dtype
    n = len(images)
    base = copy.deepcopy(pipe.scheduler)  # never the pipeline's own: fixed-strength calls share it
    base.set_timesteps(steps, device=device)
    order = getattr(base, "order", 1)
    timesteps = base.timesteps
    takes_generator = "generator" in inspect.signature(base.step).parameters
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    guided = guidance > 1.0
    vae = pipe.vae
    with torch.no_grad():
        text = encode_text(pipe, texts, negative, guided, device, size=(images[0].height, images[0].width))
        sf = vae.config.scaling_factor

        def encode(ims, rows):
            x = pipe.image_processor.preprocess(ims).to(device=device, dtype=vae.dtype)
            return [vae.encode(x[j : j + 1]).latent_dist.sample(gens[i]).to(dtype) * sf for j, i in enumerate(rows)]

        lat0 = torch.cat(encode(images, range(n)))
        keep0 = lmask = None
        if masks is not None:
            originals = list(originals) if originals is not None else list(images)
            own = [i for i in range(n) if originals[i] is not images[i]]
            keep0 = lat0.clone()
            if own:
                keep0[own] = torch.cat(encode([originals[i] for i in own], own))
            lmask = torch.stack([
                torch.nn.functional.adaptive_max_pool2d(
                    torch.from_numpy(np.asarray(m, dtype=np.float32))[None], tuple(lat0.shape[-2:]))
                for m in masks
            ]).to(device=device, dtype=dtype)
        noise = torch.cat(
            [torch.randn((1, *lat0.shape[1:]), generator=gens[i], dtype=dtype) for i in range(n)]
        ).to(device)
        lat = lat0.clone()
        groups: dict[int, tuple[list[int], Any, int]] = {}
        for k in sorted({k for k in ks if k > 0}):
            rows = [i for i, kk in enumerate(ks) if kk == k]
            sched = copy.deepcopy(base)
            start = (steps - k) * order
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            groups[k] = (rows, sched, start)
            t0 = timesteps[start : start + 1].repeat(len(rows))
            lat[rows] = sched.add_noise(lat0[rows], noise[rows], t0)
            if lmask is not None:
                lat[rows] = _keep_outside(lat[rows], lmask[rows], sched.add_noise(keep0[rows], noise[rows], t0))
        for j, t in enumerate(timesteps):
            active = [g for g in groups.values() if j >= g[2]]
            if not active:
                continue
            rows = [i for g in active for i in g[0]]
            x = torch.cat([g[1].scale_model_input(lat[g[0]], t) for g in active])
            if guided:
                out = pipe.unet(torch.cat([x, x]), t, **text.unet_kwargs(rows, guided=True)).sample
                eu, ec = out.chunk(2)
                out = eu + guidance * (ec - eu)
            else:
                out = pipe.unet(x, t, **text.unet_kwargs(rows)).sample
            at = 0
            for group_rows, sched, _ in active:
                part = out[at : at + len(group_rows)]
                at += len(group_rows)
                extra = {"generator": [gens[i] for i in group_rows]} if takes_generator else {}
                stepped = sched.step(part, t, lat[group_rows], **extra, return_dict=False)[0].to(dtype)
                if lmask is not None:
                    kept = keep0[group_rows]
                    if j + 1 < len(timesteps):
                        t_next = timesteps[j + 1 : j + 2].repeat(len(group_rows))
                        kept = sched.add_noise(kept, noise[group_rows], t_next)
                    stepped = _keep_outside(stepped, lmask[group_rows], kept)
                lat[group_rows] = stepped
        decoded = vae.decode(lat.to(vae.dtype) / sf).sample
        flags = [False] * n
        if getattr(pipe, "safety_checker", None) is not None:
            decoded, nsfw = pipe.run_safety_checker(decoded, device, text.dtype)
            flags = [bool(f) for f in nsfw] if nsfw is not None else flags
        out = pipe.image_processor.postprocess(decoded, output_type="pil")
    results = [im.copy() if k == 0 else o for im, o, k in zip(images, out, ks)]
    if masks is not None:
        results = [paste_outside_mask(r, o, m) for r, o, m in zip(results, originals, masks)]
    return results, flags


def _keep_outside(lat, mask, kept):
    """``lat`` inside the latent ``mask``, ``kept`` (the original, noised to the same step) outside it."""
    return (mask * lat + (1 - mask) * kept).to(lat.dtype)


def unedited_output(guide: Image.Image, mask: Any = None, original: Image.Image | None = None) -> Image.Image:
    """What (masked) SDEdit returns at t0 = 0: the guide, with the original pasted outside the mask."""
    if mask is None:
        return guide.copy()
    return paste_outside_mask(guide, original if original is not None else guide, mask)


def paste_outside_mask(edited: Image.Image, original: Image.Image, mask: Any) -> Image.Image:
    """``edited`` inside ``mask`` (bool H×W), ``original``'s exact pixels everywhere else.

    Raises:
        ValueError: the images and the mask differ in size.
    """

    e = np.asarray(edited.convert("RGB"))
    o = np.asarray(original.convert("RGB"))
    m = np.asarray(mask, dtype=bool)
    if e.shape != o.shape or m.shape != o.shape[:2]:
        raise ValueError(f"paste: edited {e.shape}, original {o.shape} and mask {m.shape} differ in size")
    return Image.fromarray(np.where(m[..., None], e, o), "RGB")
