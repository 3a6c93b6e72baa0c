"""Text2Live layer editing: an RGBA edit layer optimised on the image itself, composited over it.

After Bar-Tal et al., "Text2LIVE: Text-Driven Layered Image and Video Editing" (ECCV
2022). A small convolutional generator maps the image to an RGBA layer; it is trained
on that one image (no pretrained generator) with

- a composition loss: CLIP cosine distance between the layer composited over the image
  and the edit text ("fire");
- a screen loss: the layer composited over a green screen vs ``"{text} over a green
  screen"``, so the layer alone depicts the edit;
- a structure loss: self-similarity matrices of ViT tokens (the paper uses DINO; any
  timm ViT here) of the input vs the composite, so the scene's layout stays;
- an alpha regulariser ``gamma * L1(alpha) + L0approx(alpha)`` with
  ``L0approx(x) = 2 * sigmoid(5x) - 1``, so the layer stays sparse;

each evaluated on random square crops with random flips every step (cheap stand-ins
for the paper's internal augmentations). The layer is kept as straight-alpha 8-bit
RGBA; alpha below 1/255 is zeroed and there the input pixels are copied exactly.

``Text2LiveLayerGenerator`` is the reusable piece; ``Text2LiveEditor``
(``text2live.py``) is the editing method built on it, for images and video atlases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelmill.tasks.edit.text2live import Text2LiveSettings

ALPHA_THRESHOLD = 1.0 / 255.0
GREEN_SCREEN = (0.0, 177.0 / 255.0, 64.0 / 255.0)


def _as_float_image(image: Any) -> np.ndarray:
    """An image (PIL, or an H×W×3 array: uint8, or float in [0, 1]) as float32 H×W×3 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _as_uint8_image(image: Any) -> np.ndarray:
    """An image as uint8 H×W×3 (float inputs in [0, 1] are rounded)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)[..., :3]
    if arr.dtype == np.uint8:
        return arr
    return np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def composite(image: Any, rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha "over" of an 8-bit RGBA layer on an image, in exact integer arithmetic.

    ``out = (A * L + (255 - A) * I + 127) // 255`` per channel, so a pixel with ``A == 0``
    is the input pixel bit for bit and ``A == 255`` is the layer's colour.

    Args:
        image: PIL image or H×W×3 array (uint8, or float in [0, 1]).
        rgba: H×W×4 uint8 layer (as ``Text2LiveLayerGenerator.generate`` returns).

    Returns:
        H×W×3 uint8 composite.
    """
    base = _as_uint8_image(image).astype(np.int32)
    layer = np.asarray(rgba)
    if layer.dtype != np.uint8 or layer.ndim != 3 or layer.shape[2] != 4:
        raise ValueError(f"expected an H×W×4 uint8 layer, got {layer.dtype} {layer.shape}")
    if layer.shape[:2] != base.shape[:2]:
        raise ValueError(f"layer is {layer.shape[:2]}, the image {base.shape[:2]}")
    a = layer[..., 3:4].astype(np.int32)
    out = (a * layer[..., :3].astype(np.int32) + (255 - a) * base + 127) // 255
    return out.astype(np.uint8)


class _LayerNet(torch.nn.Module):
    """A small fully convolutional RGBA generator: dilated 3×3 convs for a wide receptive field."""

    def __init__(self, width: int, alpha_init: float) -> None:
        super().__init__()
        convs = [torch.nn.Conv2d(3, width, 3, padding=1)]
        for dilation in (2, 4, 8, 1):
            convs.append(torch.nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation))
        self.convs = torch.nn.ModuleList(convs)
        self.out = torch.nn.Conv2d(width, 4, 1)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
            self.out.bias[3] = float(np.log(alpha_init / (1 - alpha_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x * 2 - 1
        for conv in self.convs:
            h = torch.nn.functional.silu(conv(h))
        o = self.out(h)
        return torch.sigmoid(o[:, :3]), torch.sigmoid(o[:, 3:4])


@dataclass
class Text2LiveResult:
    """One optimised layer.

    Attributes:
        rgba: H×W×4 uint8 straight-alpha layer (alpha < 1/255 zeroed, colour 0 there).
        losses: the total training loss at each step (random views: noisy).
        initial_loss: the total loss on fixed views (centre square crop and whole
            image, no flip) before optimisation.
        final_loss: the same after optimisation, on the float layer.
        terms: the final fixed-view loss terms by name.
    """

    rgba: np.ndarray
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    terms: dict[str, float] = field(default_factory=dict)


class Text2LiveLayerGenerator:
    """Optimises a Text2Live RGBA edit layer for an image and an edit text.

    Args:
        clip_model: an open_clip CLIP model (``load_clip``); frozen here.
        tokenizer: its tokenizer (list of strings → token ids).
        settings: ``Text2LiveSettings`` or a dict of its fields (defaults when None).
        structure: ``(vit, preprocess)`` from ``pixelmill.models.vit.load_vit`` for the
            structure loss, or None to leave that loss out.
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        tokenizer: Any,
        settings: Text2LiveSettings | dict[str, Any] | None = None,
        structure: tuple[torch.nn.Module, Any] | None = None,
    ) -> None:
        from pixelmill.models.vit import ViTPreprocess

        self.settings = (settings if isinstance(settings, Text2LiveSettings)
                         else Text2LiveSettings.model_validate(settings or {}))
        self.clip = clip_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = next(self.clip.parameters()).device
        pp = dict(getattr(self.clip.visual, "preprocess_cfg", {}) or {})
        size = pp.get("size", getattr(self.clip.visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.clip_pre = ViTPreprocess(size=size, mean=tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                                      std=tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))))
        self.structure = structure
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, clip_model: str, settings: Text2LiveSettings | dict[str, Any] | None = None,
             device: str | torch.device = "auto") -> Text2LiveLayerGenerator:
        """Load CLIP (and the structure ViT the settings name) by name and build a generator.

        Args:
            clip_model: open_clip model name (see ``load_clip``).
            settings: ``Text2LiveSettings`` or a dict of its fields.
            device: see ``resolve_device``.
        """
        from pixelmill.models.loading import load_clip
        from pixelmill.models.vit import load_vit

        s = settings if isinstance(settings, Text2LiveSettings) else Text2LiveSettings.model_validate(settings or {})
        model, _, tokenizer = load_clip(clip_model, device=device)
        structure = load_vit(s.structure_model, s.structure_weights, device=device) if s.structure_model else None
        return cls(model, tokenizer, s, structure)

    def _text(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            if len(self._text_cache) >= 256:  # per-row prompts: keep memory bounded
                self._text_cache.clear()
            with torch.no_grad():
                e = self.clip.encode_text(self.tokenizer([text]).to(self.device)).float()
            self._text_cache[text] = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self._text_cache[text]

    def _clip_distance(self, views: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        e = self.clip.encode_image(self.clip_pre(views)).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (1 - e @ text.T).mean()

    def _self_similarity(self, views: torch.Tensor) -> torch.Tensor:
        vit, pre = self.structure
        tokens = vit.forward_features(pre(views))[:, vit.num_prefix_tokens:].float()
        tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return tokens @ tokens.transpose(1, 2)

    def _views(self, image: torch.Tensor, boxes: list[tuple[int, int, int, bool]], whole: bool) -> torch.Tensor:
        """Square (top, left, side, flip) crops of a (1, 3, H, W) image, plus the whole image if
        ``whole``, resized to CLIP's input size: one (K, 3, s, s) batch."""
        size = self.clip_pre.size
        crops = [image[:, :, top : top + side, left : left + side].flip(-1) if flip else
                 image[:, :, top : top + side, left : left + side] for top, left, side, flip in boxes]
        if whole:
            crops.append(image)
        return torch.cat([torch.nn.functional.interpolate(c, size=size, mode="bilinear", align_corners=False,
                                                          antialias=True) for c in crops])

    def _losses(self, x, rgb, alpha, text_e, screen_e, boxes, whole=False) -> tuple[torch.Tensor, dict]:
        """The weighted total loss and its terms, on the given views of composite, screen and input."""
        s = self.settings
        green = torch.tensor(GREEN_SCREEN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        comp_v = self._views(alpha * rgb + (1 - alpha) * x, boxes, whole)
        screen_v = self._views(alpha * rgb + (1 - alpha) * green, boxes, whole)
        terms = {
            "composition": self._clip_distance(comp_v, text_e),
            "screen": self._clip_distance(screen_v, screen_e),
            "sparsity": s.sparsity_l1 * alpha.mean() + (2 * torch.sigmoid(5 * alpha) - 1).mean(),
        }
        total = (s.composition_weight * terms["composition"] + s.screen_weight * terms["screen"]
                 + s.sparsity_weight * terms["sparsity"])
        if self.structure is not None:
            with torch.no_grad():
                ref = self._self_similarity(self._views(x, boxes, whole))
            terms["structure"] = ((self._self_similarity(comp_v) - ref) ** 2).mean()
            total = total + s.structure_weight * terms["structure"]
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def fit(self, image: Any, text: str, seed: int = 0, mask: Any = None) -> Text2LiveResult:
        """Optimise a layer for ``image`` and ``text``; see ``generate``.

        Args:
            image: PIL image or H×W×3 array (uint8, or float in [0, 1]).
            text: the edit text ("fire").
            seed: seeds the generator's weights and the augmentations.
            mask: optional H×W array (bool, or float in [0, 1]): alpha is multiplied by
                it, so the layer is exactly transparent where it is 0 (an atlas's
                invalid area).

        Returns:
            the layer and the loss history.
        """
        s = self.settings
        arr = _as_float_image(image)
        h, w = arr.shape[:2]
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.device)
        m = None
        if mask is not None:
            m_arr = np.asarray(mask, dtype=np.float32)
            if m_arr.shape != (h, w):
                raise ValueError(f"mask is {m_arr.shape}, the image {(h, w)}")
            m = torch.from_numpy(np.clip(m_arr, 0.0, 1.0))[None, None].to(self.device)
        text_e = self._text(text)
        screen_e = self._text(s.screen_text.format(text=text))
        g = torch.Generator("cpu").manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = _LayerNet(s.width, s.alpha_init).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=s.lr)

        def layer() -> tuple[torch.Tensor, torch.Tensor]:
            rgb, alpha = net(x)
            return rgb, (alpha * m if m is not None else alpha)

        short = min(h, w)
        centre = [((h - short) // 2, (w - short) // 2, short, False)]

        def evaluate() -> tuple[float, dict]:
            with torch.no_grad():
                rgb, alpha = layer()
                total, terms = self._losses(x, rgb, alpha, text_e, screen_e, centre, whole=True)
            return float(total), terms

        result = Text2LiveResult(rgba=np.zeros((h, w, 4), np.uint8))
        result.initial_loss, _ = evaluate()
        # Deterministic cuDNN kernels while the layer trains (no effect on CPU).
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True):
            for _ in range(s.iterations):
                boxes = []
                for _ in range(s.views):
                    frac = s.min_crop + (1 - s.min_crop) * float(torch.rand((), generator=g))
                    side = max(1, min(short, round(frac * short)))
                    top = int(torch.randint(0, h - side + 1, (), generator=g))
                    left = int(torch.randint(0, w - side + 1, (), generator=g))
                    boxes.append((top, left, side, bool(torch.rand((), generator=g) < 0.5)))
                rgb, alpha = layer()
                total, _ = self._losses(x, rgb, alpha, text_e, screen_e, boxes)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                result.losses.append(float(total.detach()))
        result.final_loss, result.terms = evaluate()
        with torch.no_grad():
            rgb, alpha = layer()
        result.rgba = _to_rgba8(rgb[0].permute(1, 2, 0).cpu().numpy(), alpha[0, 0].cpu().numpy())
        return result

    def generate(self, image: Any, text: str, seed: int = 0, mask: Any = None) -> np.ndarray:
        """Optimise and return the edit layer: H×W×4 uint8, straight alpha, same size as ``image``.

        Alpha below 1/255 is exactly 0 (with colour 0): compositing leaves those input
        pixels bit-identical. The same image, text, seed, settings and models give the
        same layer (bit for bit on CPU).

        Args:
            image: PIL image or H×W×3 array (uint8, or float in [0, 1]).
            text: the edit text.
            seed: seeds the generator's weights and the augmentations.
            mask: optional H×W validity mask; alpha is 0 wherever it is 0.
        """
        return self.fit(image, text, seed, mask).rgba

    @staticmethod
    def composite(image: Any, rgba: np.ndarray) -> np.ndarray:
        """The layer over the image (see the module-level ``composite``)."""
        return composite(image, rgba)


def _to_rgba8(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Float layer → uint8 RGBA; alpha below 1/255 becomes exactly 0, and so does its colour."""
    a = np.where(alpha < ALPHA_THRESHOLD, 0.0, alpha)
    a8 = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    rgb8 = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    rgb8[a8 == 0] = 0
    return np.dstack([rgb8, a8])
