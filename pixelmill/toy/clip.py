"""The toy CLIP: its open_clip architecture, its data and the measurements of its model card.

The architecture is a plain open_clip ``CLIP`` (ViT image tower, causal text transformer
pooled at the end token), small enough to train on one CPU thread in well under an hour
and to ship in a few MB of fp16. The tokenizer is open_clip's ``SimpleTokenizer`` — the
real CLIP byte-level BPE (49,408 tokens), bundled with open_clip — with a context of 24
tokens (toy captions use at most 17). The folder layout is the hub one
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so
``pixelmill.models.load_clip(path)`` loads it like any other open_clip checkpoint.

What the model card measures (``evaluate``), on rows of ``EVAL_SEED`` never used in
training:

- text->image recall@1: for each caption, the most similar gallery image (the images of
  the same rows) is a hit when its colour and shape are the caption's;
- text-text geometry at ``THRESHOLD`` (0.85, the retrieval threshold): a caption pair
  is right when its cosine is >= 0.85 exactly when the two captions name the same colour
  and shape; rates over all pairs, over agreeing pairs and over differing pairs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelmill.toy import world

PACKAGED_CLIP = Path(__file__).with_name("models") / "clip"
CONTEXT_LENGTH = 24
EMBED_DIM = 64
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
THRESHOLD = 0.85
TRAIN_SEED = 1
EVAL_SEED = 2

MODEL_CFG: dict[str, Any] = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": 3, "width": 64, "head_width": 32,
                   "mlp_ratio": 2.0, "patch_size": 4},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 32, "heads": 4,
                 "layers": 3, "mlp_ratio": 2.0},
}


def toy_clip_config() -> dict[str, Any]:
    """The ``open_clip_config.json`` content (hub layout: ``model_cfg`` + ``preprocess_cfg``)."""
    return {
        "model_cfg": json.loads(json.dumps(MODEL_CFG)),
        "preprocess_cfg": {"size": world.IMAGE_SIZE, "mean": list(MEAN), "std": list(STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def build_toy_clip(seed: int = 0) -> torch.nn.Module:
    """A random-weight toy CLIP (open_clip ``CLIP`` from ``MODEL_CFG``)."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**json.loads(json.dumps(MODEL_CFG)))


def toy_tokenizer():
    """open_clip's ``SimpleTokenizer`` (the CLIP BPE) with the toy context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 pixels -> normalised ``(N, 3, H, W)`` floats, as the eval preprocess does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def attribute_key(color: str, shape: str) -> int:
    """One integer per (colour, shape) pair."""
    return list(world.COLORS).index(color) * len(world.SHAPES) + world.SHAPES.index(shape)


@dataclass
class ToyRows:
    """Toy-world rows held in memory for training or evaluation.

    Args:
        images: ``(N, 32, 32, 3)`` uint8.
        captions: the dataset captions.
        alt_captions: a second caption per row from another template (for text-text terms).
        keys: ``attribute_key`` of each row.
        colors, shapes: labels.
    """

    images: np.ndarray
    captions: list[str]
    alt_captions: list[str]
    keys: np.ndarray
    colors: list[str]
    shapes: list[str]


def make_rows(seed: int, start: int, stop: int) -> ToyRows:
    """Rows ``start .. stop - 1`` of world ``seed``, with a second caption each."""
    images, captions, alts, keys, colors, shapes = [], [], [], [], [], []
    for index in range(start, stop):
        image, caption, obj = world.make_row(seed, index)
        alt_rng = np.random.default_rng([seed, index, 1])
        templates = [t for t in world.CAPTION_TEMPLATES if world.caption_for(obj, t) != caption]
        images.append(np.asarray(image))
        captions.append(caption)
        alts.append(world.caption_for(obj, templates[alt_rng.integers(len(templates))]))
        keys.append(attribute_key(obj.color, obj.shape))
        colors.append(obj.color)
        shapes.append(obj.shape)
    return ToyRows(np.stack(images), captions, alts, np.asarray(keys), colors, shapes)


@dataclass
class ClipMetrics:
    """The toy CLIP's model-card figures (see the module docstring)."""

    captions: int
    recall_at_1: float
    color_recall_at_1: float
    shape_recall_at_1: float
    pairs: int
    pair_accuracy: float
    agreeing_pairs: int
    agreeing_above: float
    differing_pairs: int
    differing_below: float
    one_attribute_differing_pairs: int
    one_attribute_differing_below: float
    mean_cos_agreeing: float
    mean_cos_differing: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer, texts: list[str], batch: int = 512) -> torch.Tensor:
    """Normalised text embeddings."""
    out = [model.encode_text(tokenizer(texts[i:i + batch]), normalize=True) for i in range(0, len(texts), batch)]
    return torch.cat(out).float()


@torch.no_grad()
def embed_images(model: torch.nn.Module, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Normalised image embeddings of preprocessed ``(N, 3, H, W)`` tensors."""
    out = [model.encode_image(pixels[i:i + batch], normalize=True) for i in range(0, len(pixels), batch)]
    return torch.cat(out).float()


def measure(
    text_emb: torch.Tensor, image_emb: torch.Tensor, colors: list[str], shapes: list[str], threshold: float = THRESHOLD
) -> ClipMetrics:
    """Recall@1 and text-text geometry from embeddings of the same rows' captions and images."""
    n = len(colors)
    color_ids = torch.tensor([list(world.COLORS).index(c) for c in colors])
    shape_ids = torch.tensor([world.SHAPES.index(s) for s in shapes])
    top = (text_emb @ image_emb.T).argmax(dim=1)
    color_hit = color_ids[top] == color_ids
    shape_hit = shape_ids[top] == shape_ids
    cos = text_emb @ text_emb.T
    iu = torch.triu_indices(n, n, offset=1)
    pair_cos = cos[iu[0], iu[1]]
    same_color = color_ids[iu[0]] == color_ids[iu[1]]
    same_shape = shape_ids[iu[0]] == shape_ids[iu[1]]
    agree = same_color & same_shape
    one_diff = same_color ^ same_shape
    above = pair_cos >= threshold

    def rate(mask: torch.Tensor) -> float:
        return float(mask.float().mean()) if mask.numel() else float("nan")

    return ClipMetrics(
        captions=n,
        recall_at_1=rate(color_hit & shape_hit),
        color_recall_at_1=rate(color_hit),
        shape_recall_at_1=rate(shape_hit),
        pairs=int(pair_cos.numel()),
        pair_accuracy=rate(above == agree),
        agreeing_pairs=int(agree.sum()),
        agreeing_above=rate(above[agree]),
        differing_pairs=int((~agree).sum()),
        differing_below=rate(~above[~agree]),
        one_attribute_differing_pairs=int(one_diff.sum()),
        one_attribute_differing_below=rate(~above[one_diff]),
        mean_cos_agreeing=float(pair_cos[agree].mean()),
        mean_cos_differing=float(pair_cos[~agree].mean()),
    )


def evaluate(model: torch.nn.Module, tokenizer, rows: ToyRows, preprocess=None) -> ClipMetrics:
    """Measure ``model`` on ``rows`` (captions against the same rows' images).

    Args:
        model: an open_clip model in eval mode.
        tokenizer: its tokenizer.
        rows: evaluation rows (``make_rows(EVAL_SEED, ...)``).
        preprocess: the model's PIL eval transform; without it, ``images_to_tensor``.
    """
    if preprocess is not None:
        from PIL import Image

        pixels = torch.stack([preprocess(Image.fromarray(a)) for a in rows.images])
    else:
        pixels = images_to_tensor(rows.images)
    was_training = model.training
    model.eval()
    try:
        return measure(embed_texts(model, tokenizer, rows.captions), embed_images(model, pixels),
                       rows.colors, rows.shapes)
    finally:
        model.train(was_training)
