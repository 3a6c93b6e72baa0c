"""Measuring toy-world image models with the frozen detectors (``pixelmill.toy.detect``).

Held-out prompts from a world seed no model trains on, batched seeded generation, and the
share of images whose detected colour / shape match the prompt's. ``train_sd`` measures the
shipped toy SD with these; quality tests and ``make quality`` use them too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pixelmill.toy import world

EVAL_SEED = 12
"""World seed of the held-out prompts (no toy model trains on it)."""


def eval_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[str, str, str]]:
    """``(caption, colour, shape)`` of held-out rows of world ``seed`` (training shapes only)."""
    out = []
    for i in range(n):
        _, caption, obj = world.make_row(seed, i, world.TRAIN_SHAPES)
        out.append((caption, obj.color, obj.shape))
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str], guidance: float, steps: int, seed: int = 0, size: int = world.IMAGE_SIZE,
             chunk: int = 50) -> list:
    """PIL images of ``prompts`` (one per prompt, seeded per chunk)."""
    images = []
    for i in range(0, len(prompts), chunk):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i:i + chunk], guidance_scale=guidance, num_inference_steps=steps, height=size,
                       width=size, generator=g).images
    return images


def agreement(images, items: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of images whose detected colour / shape / both match the prompt's."""
    from PIL import Image

    from pixelmill.toy.detect import detect

    color = shape = both = 0
    for img, (_, c, s) in zip(images, items):
        if img.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            img = img.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.BICUBIC)
        d = detect(img)
        color += d.color == c
        shape += d.shape == s
        both += d.color == c and d.shape == s
    n = len(items)
    return {"color": color / n, "shape": shape / n, "both": both / n}


def save_sheet(grid, path: Path) -> None:
    """A sample sheet as a palette PNG (256 colours; a toy image has few): a third of the RGB file's size,
    so the model cards' sheets fit the toy models' shared 40 MB."""
    from PIL import Image

    grid.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=256).save(path, optimize=True)


def save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n = world.IMAGE_SIZE
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * n, rows * n))
    for i, img in enumerate(images):
        grid.paste(img.resize((n, n)), ((i % cols) * n, (i // cols) * n))
    save_sheet(grid, path)
