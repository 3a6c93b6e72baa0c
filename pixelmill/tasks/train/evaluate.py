"""Samples and the CustomConcept101 metrics of a trained job.

Text alignment: CLIP similarity between a sample and its prompt with the learned
concept replaced by its class word ("a photo of <dog1> on a beach" → "a photo of dog on
a beach"). Image alignment: mean CLIP similarity between a sample and the instance
images. For InstructPix2Pix jobs, the samples are edits of held-out source images;
text alignment scores the edit against the instruction and image alignment against
its source.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from pixelmill.datasets import storage
from pixelmill.tasks.train.data import TrainingData, _open


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_prompts(prompts: list[str], method, concepts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(prompt with the learned subject, prompt with the class word) for every prompt."""
    out = []
    for p in prompts:
        subject = " and ".join(method.subject(c) for c in concepts)
        plain = " and ".join(c["class_word"] or c["token"] for c in concepts)
        out.append((p.replace("{concept}", subject), p.replace("{concept}", plain)))
    return out


@torch.no_grad()
def render_samples(method, data: TrainingData, concepts: list[dict[str, Any]], prompts: list[str], n: int, steps: int,
                   guidance: float, image_guidance: float, seed: int, resolution, device) -> list[dict[str, Any]]:
    """Generate ``n`` samples per prompt with the in-memory trained pipeline (fixed seeds), at the
    training ``resolution`` (a side, or [width, height])."""
    from pixelmill.config.campaign import train_size

    width, height = train_size(resolution)
    pipe = method.pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    if method.name == "instruct_pix2pix":
        sources = [x for x in data.instance[: max(1, n)]]
        # SDXL's pipeline takes its size from the UNet's default unless told (SD's from the image)
        sized = {"height": height, "width": width} if getattr(method, "sdxl", False) else {}
        for p in prompts:
            for k, src in enumerate(sources):
                g = torch.Generator("cpu").manual_seed(seed + k)
                img = _open(src.source).resize((width, height))
                out = pipe(prompt=p, image=img, num_inference_steps=steps, guidance_scale=guidance,
                           image_guidance_scale=image_guidance, generator=g, **sized).images[0]
                rows.append({"prompt": p, "score_prompt": p, "seed": seed + k, "image": out, "source": img})
        return rows
    for p, plain in sample_prompts(prompts, method, concepts):
        for k in range(n):
            g = torch.Generator("cpu").manual_seed(seed + k)
            out = pipe(prompt=p, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                       height=height, width=width).images[0]
            rows.append({"prompt": p, "score_prompt": plain, "seed": seed + k, "image": out})
    return rows


def clip_metrics(rows: list[dict[str, Any]], data: TrainingData, clip_model: str | None, device: str) -> dict:
    """Mean CLIP text and image alignment of the samples (None without a CLIP model)."""
    if not clip_model or not rows:
        return {"clip_text_alignment": None, "clip_image_alignment": None}
    from pixelmill.tasks.metrics import ClipScorer

    scorer = ClipScorer(clip_model, device=device)
    imgs = scorer.images([r["image"] for r in rows])
    texts = scorer.texts([r["score_prompt"] for r in rows])
    text_align = (imgs * texts).sum(-1)
    if "source" in rows[0]:
        refs = scorer.images([r["source"] for r in rows])
        image_align = (imgs * refs).sum(-1)
    else:
        refs = scorer.images([_open(x.image) for x in data.instance if x.kind == "instance"][:32])
        image_align = (imgs @ refs.T).mean(-1)
    for r, ta, ia in zip(rows, text_align.tolist(), image_align.tolist()):
        r["clip_text_alignment"], r["clip_image_alignment"] = ta, ia
    return {"clip_text_alignment": float(text_align.mean()), "clip_image_alignment": float(image_align.mean())}


def write_samples(job_url: str, folder: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Save samples as PNGs under ``samples/<folder>/``; returns their index (no images)."""
    index = []
    for i, r in enumerate(rows):
        name = f"{i:03d}.png"
        storage.write_bytes(storage.join(job_url, "samples", folder, name), _png(r["image"]))
        entry = {k: v for k, v in r.items() if k not in ("image", "source")}
        index.append(entry | {"file": f"samples/{folder}/{name}"})
    return index
