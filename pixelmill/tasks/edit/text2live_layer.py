"""Text2Live layer editing: an RGBA edit layer generator trained on the image itself.

After Bar-Tal et al., "Text2LIVE: Text-Driven Layered Image and Video Editing" (ECCV
2022). A small U-Net maps an image to an RGBA layer composited over it; it is trained
on that one image's internal dataset (random crops, flips and colour jitter of the input;
``text2live_nets.internal_views``), each view scored against a random text template
("a photo of {}", "{} in the scene", …), with

- composition: CLIP cosine distance between the composite and the edit text;
- directional: 1 - cos(E(composite) - E(input), T(edit text) - T(source text)), the
  source text being the input's description (the row's caption or ``source_prompt``);
- screen: the layer over a green screen vs ``"{text} over a green screen"``;
- structure: MSE between the cosine self-similarities of the last ViT layer's attention
  keys of input and composite (DINO in the paper; here a timm ViT, or CLIP's own vision
  tower when none is given);
- sparsity: ``sparsity_l1 * L1(alpha) + sparsity_l0 * L0approx(alpha)``,
  ``L0approx(x) = 2 * sigmoid(5x) - 1``;
- bootstrap: for the first ``bootstrap_iterations``, MSE between alpha and CLIP's
  relevancy map of the edited object on the input (weight annealed linearly to 0).

The layer is kept as straight-alpha 8-bit RGBA; alpha below 1/255 is zeroed and there the
input pixels are copied exactly.

``Text2LiveLayerGenerator`` is the reusable piece; ``Text2LiveEditor``
(``text2live.py``) is the editing method built on it, for images and video atlases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixelmill.tasks.edit.text2live import Text2LiveSettings
from pixelmill.tasks.edit.text2live_nets import (
    AtlasFrames,
    KeyExtractor,
    LayerUNet,
    attention_relevancy,
    internal_views,
    relevancy_map,
    stretch,
    view_boxes,
)

ALPHA_THRESHOLD = 1.0 / 255.0
GREEN_SCREEN = (0.0, 177.0 / 255.0, 64.0 / 255.0)
SOURCE_IMAGE_EVERY = 10
"""Every this many steps the first training view is the whole, unaugmented image."""


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


@dataclass
class Text2LiveResult:
    """One optimised layer.

    Attributes:
        rgba: H×W×4 uint8 straight-alpha layer (alpha < 1/255 zeroed, colour 0 there).
        losses: the total training loss at each step (random views: noisy).
        curves: each loss term (unweighted) at each step; ``bootstrap`` only while it applies.
        initial_loss: the total loss on the fixed view (the whole image, every text
            template) before optimisation, without the bootstrap term.
        final_loss: the same after optimisation, on the float layer.
        terms: the final fixed-view loss terms by name.
        relevancy: the bootstrap target (H×W in [0, 1]), or None without bootstrapping.
        seconds: wall-clock time of the optimisation.
    """

    rgba: np.ndarray
    losses: list[float] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    terms: dict[str, float] = field(default_factory=dict)
    relevancy: np.ndarray | None = None
    seconds: float = 0.0


class Text2LiveLayerGenerator:
    """Trains a Text2Live RGBA edit layer generator on one image and an edit text.

    Args:
        clip_model: an open_clip CLIP model (``load_clip``); frozen here.
        tokenizer: its tokenizer (list of strings → token ids).
        settings: ``Text2LiveSettings`` or a dict of its fields (defaults when None).
        structure: ``(vit, preprocess)`` from ``pixelmill.models.vit.load_vit`` for the
            structure loss's keys; None: the CLIP model's vision tower.
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
        self.keys = None
        if self.settings.structure_weight > 0 and structure is not None:
            self.keys = KeyExtractor(*structure)
        elif self.settings.structure_weight > 0:
            try:
                self.keys = KeyExtractor(self.clip.visual, self.clip_pre)
            except ValueError as e:
                raise ValueError(f"the structure loss reads ViT keys, and this CLIP's vision tower has none ({e}): "
                                 "set text2live.structure_model (a timm ViT) or structure_weight: 0") from None
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

    def _texts(self, text: str) -> torch.Tensor:
        """(T, D) normalised embeddings of ``text`` in every template (the bare text without templates)."""
        key = "\0".join([text, *self.settings.text_templates])
        if key not in self._text_cache:
            if len(self._text_cache) >= 256:  # per-row prompts: keep memory bounded
                self._text_cache.clear()
            texts = [t.format(text) for t in self.settings.text_templates] or [text]
            with torch.no_grad():
                e = self.clip.encode_text(self.tokenizer(texts).to(self.device)).float()
            self._text_cache[key] = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self._text_cache[key]

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        e = self.clip.encode_image(self.clip_pre(images)).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def relevancy(self, image: Any, text: str, seed: int = 0) -> np.ndarray:
        """The bootstrap target: CLIP's relevancy map of ``text`` on ``image`` (H×W in [0, 1])."""
        x = torch.from_numpy(_as_float_image(image)).permute(2, 0, 1)[None].to(self.device)
        e = self._texts(text).mean(0, keepdim=True)
        e = e / e.norm()
        rel = None
        if self.settings.relevancy == "attention":
            rel = attention_relevancy(self.clip.visual, self.clip_pre, x, e)
            rel = None if rel is None else stretch(rel)
        if rel is None:
            rel = relevancy_map(self._encode, x, e, self.settings.relevancy_samples, seed=seed)
        return rel[0, 0].cpu().numpy()

    def _losses(self, x, rgb, alpha, texts, template, rel=None, bootstrap_w=0.0,
                sparsity: bool = True) -> tuple[torch.Tensor, dict]:
        """The weighted total loss and its terms on views ``x`` (N, 3, H, W) with layers
        ``rgb``/``alpha``; ``texts``: target, screen and source (or None) embeddings (T, D);
        ``template``: (N,) template index per view (None: every template, averaged);
        ``sparsity``: whether the alpha prior is part of it (not on rendered frames: the
        layer's alpha is regularised once, on the atlas, where it lives)."""
        s = self.settings
        n = x.shape[0]
        target, screen, source = texts
        green = torch.tensor(GREEN_SCREEN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        comp = alpha * rgb + (1 - alpha) * x
        over_green = alpha * rgb + (1 - alpha) * green
        need_input = source is not None and s.directional_weight > 0
        e = self._encode(torch.cat([comp, over_green, x] if need_input else [comp, over_green]))
        e_comp, e_screen = e[:n], e[n:2 * n]

        def pick(t: torch.Tensor) -> torch.Tensor:
            """(T, D) texts → (N, K, D): each view's template (K = 1), or all of them (K = T)."""
            return t[template][:, None] if template is not None else t[None].expand(n, -1, -1)

        def distance(img_e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return (1 - torch.einsum("nd,ntd->nt", img_e, pick(t))).mean()

        terms = {"composition": distance(e_comp, target), "screen": distance(e_screen, screen)}
        if need_input:
            d_img = (e_comp - e[2 * n:].detach())[:, None]
            d_txt = pick(target - source)
            terms["directional"] = (1 - F.cosine_similarity(d_img, d_txt, dim=-1, eps=1e-8)).mean()
        total = s.composition_weight * terms["composition"] + s.screen_weight * terms["screen"]
        if sparsity:
            terms["sparsity"] = (s.sparsity_l1 * alpha.mean()
                                 + s.sparsity_l0 * (2 * torch.sigmoid(5 * alpha) - 1).mean())
            total = total + s.sparsity_weight * terms["sparsity"]
        if "directional" in terms:
            total = total + s.directional_weight * terms["directional"]
        if self.keys is not None:
            with torch.no_grad():
                ref = self.keys.self_similarity(x)
            terms["structure"] = ((self.keys.self_similarity(comp) - ref) ** 2).mean()
            total = total + s.structure_weight * terms["structure"]
        if rel is not None and bootstrap_w > 0:
            terms["bootstrap"] = ((alpha - rel) ** 2).mean()
            total = total + bootstrap_w * terms["bootstrap"]
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def fit(self, image: Any, text: str, seed: int = 0, mask: Any = None, source: str | None = None,
            frames: AtlasFrames | None = None) -> Text2LiveResult:
        """Train the layer generator on ``image``'s internal dataset for ``text``; see ``generate``.

        Args:
            image: PIL image or H×W×3 array (uint8, or float in [0, 1]).
            text: the edit text ("fire").
            seed: seeds the generator's weights, the augmentations and the relevancy map.
            mask: optional H×W array (bool, or float in [0, 1]): alpha is multiplied by
                it, so the layer is exactly transparent where it is 0 (an atlas's
                invalid area).
            source: text describing the input (directional loss, bootstrap); the
                ``source_prompt`` setting wins over it. None: those two losses are off.
            frames: when ``image`` is a video atlas layer, the video's frames and the
                layer's UV maps: every step the layer (the generator on the whole atlas
                image) is rendered into ``frame_views`` random frames and the CLIP and
                structure losses are applied to those edited frames as well (weight
                ``frame_weight``), so the edit reads right in every frame. The sparsity
                prior is not: it is the layer's, applied once on the atlas (on the frames
                too, it collapsed the layer in 4 of 10 toy clips).

        Returns:
            the layer, the loss curves and the bootstrap target.
        """
        s = self.settings
        start = time.monotonic()
        arr = _as_float_image(image)
        h, w = arr.shape[:2]
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.device)
        m = None
        if mask is not None:
            m_arr = np.asarray(mask, dtype=np.float32)
            if m_arr.shape != (h, w):
                raise ValueError(f"mask is {m_arr.shape}, the image {(h, w)}")
            m = torch.from_numpy(np.clip(m_arr, 0.0, 1.0))[None, None].to(self.device)
        source = s.source_prompt or source
        texts = (self._texts(text), self._texts(s.screen_text.format(text=text)),
                 self._texts(source) if source else None)
        result = Text2LiveResult(rgba=np.zeros((h, w, 4), np.uint8))
        rel = None
        boot_text = s.bootstrap_text or source
        if boot_text and s.bootstrap_iterations > 0 and s.bootstrap_weight > 0:
            result.relevancy = self.relevancy(arr, boot_text, seed)
            rel = torch.from_numpy(result.relevancy)[None, None].to(self.device)
            if m is not None:
                rel = rel * m
        g = torch.Generator("cpu").manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = LayerUNet(s.width, s.depth, s.alpha_init).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=s.lr)
        floor = s.lr_min / s.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(s.lr_decay ** i, floor))

        def evaluate() -> tuple[float, dict]:
            with torch.no_grad():
                rgb, alpha = net(x)
                total, terms = self._losses(x, rgb, alpha * m if m is not None else alpha, texts, None)
            return float(total), terms

        result.initial_loss, _ = evaluate()
        n_templates = texts[0].shape[0]
        # Deterministic cuDNN kernels while the layer trains (no effect on CPU).
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True):
            for step in range(s.iterations):
                boxes = view_boxes(h, w, s.views, s.min_crop, s.flip_p, s.jitter_p, g)
                if step % SOURCE_IMAGE_EVERY == 0:  # the whole image, as it is, now and then
                    boxes[0] = (0, 0, h, w, False, False)
                template = torch.randint(0, n_templates, (len(boxes),), generator=g).to(self.device)
                boot = s.bootstrap_weight * (1 - step / s.bootstrap_iterations) if (
                    rel is not None and step < s.bootstrap_iterations) else 0.0
                xv, (mv, rv) = internal_views(x, [m, rel if boot > 0 else None], boxes, s.jitter, g)
                rgb, alpha = net(xv)
                if mv is not None:
                    alpha = alpha * mv
                total, terms = self._losses(xv, rgb, alpha, texts, template, rv, boot)
                if frames is not None and s.frame_weight > 0:
                    full_rgb, full_alpha = net(x)
                    index = torch.randint(0, len(frames), (s.frame_views,), generator=g).to(self.device)
                    fx, frgb, falpha = frames.render(full_rgb, full_alpha * m if m is not None else full_alpha, index)
                    ftemplate = torch.randint(0, n_templates, (s.frame_views,), generator=g).to(self.device)
                    ftotal, fterms = self._losses(fx, frgb, falpha, texts, ftemplate,
                                                   sparsity=False)
                    total = total + s.frame_weight * ftotal
                    terms.update({f"frame {k}": v for k, v in fterms.items()})
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                sched.step()
                result.losses.append(float(total.detach()))
                for k, v in terms.items():
                    result.curves.setdefault(k, []).append(v)
                if s.time_budget_s is not None and time.monotonic() - start > s.time_budget_s:
                    break
        result.final_loss, result.terms = evaluate()
        with torch.no_grad():
            rgb, alpha = net(x)
            if m is not None:
                alpha = alpha * m
        result.rgba = _to_rgba8(rgb[0].permute(1, 2, 0).cpu().numpy(), alpha[0, 0].cpu().numpy())
        result.seconds = time.monotonic() - start
        return result

    def generate(self, image: Any, text: str, seed: int = 0, mask: Any = None, source: str | None = None) -> np.ndarray:
        """Train the generator and return the edit layer: H×W×4 uint8, straight alpha, ``image``'s size.

        Alpha below 1/255 is exactly 0 (with colour 0): compositing leaves those input
        pixels bit-identical. The same image, text, seed, settings and models give the
        same layer (bit for bit on CPU; not under a ``time_budget_s`` that cuts training).

        Args:
            image: PIL image or H×W×3 array (uint8, or float in [0, 1]).
            text: the edit text.
            seed: seeds the generator's weights and the augmentations.
            mask: optional H×W validity mask; alpha is 0 wherever it is 0.
            source: the input's description (see ``fit``).
        """
        return self.fit(image, text, seed, mask, source).rgba

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
