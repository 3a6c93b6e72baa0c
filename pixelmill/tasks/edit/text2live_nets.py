"""Text2Live's pieces: the U-Net layer generator, the internal dataset, ViT keys, relevancy maps.

- ``LayerUNet``: a small U-Net (the paper's generator is a U-Net-like "skip" net) from an
  RGB image to a straight-alpha RGBA layer of the same size.
- ``internal_views``: the image's internal dataset: random crops (at least ``min_crop``
  of the side), horizontal flips and colour jitter of the input, resized back to the
  image's size; the mask and the bootstrap target ride along with the same geometry.
- ``KeyExtractor``: the cosine self-similarity of the last transformer layer's attention
  **keys** (the paper's structure descriptor, DINO there) from a timm ViT or from an
  open_clip vision tower (the CLIP model's own when no ViT is given).
- ``attention_relevancy``: where CLIP sees a text in an image, by Chefer et al.'s
  gradient×attention relevancy (what the paper bootstraps alpha with), for open_clip ViTs;
  ``relevancy_map``: the simpler SmoothGrad input-gradient saliency, for any CLIP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _block(cin: int, cout: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(1, cout),
                               torch.nn.SiLU(), torch.nn.Conv2d(cout, cout, 3, padding=1), torch.nn.SiLU())


class LayerUNet(torch.nn.Module):
    """A U-Net RGB → RGBA: ``depth`` 2× down-samplings (width doubling), skip connections.

    Any input size works: the input is reflect-padded to a multiple of ``2 ** depth`` and
    the output cropped back. Alpha starts near ``alpha_init`` everywhere (zero-ish last
    layer, bias at its logit).
    """

    def __init__(self, width: int = 32, depth: int = 3, alpha_init: float = 0.1) -> None:
        super().__init__()
        widths = [width * 2 ** min(i, 3) for i in range(depth + 1)]
        self.depth = depth
        self.inp = _block(3, widths[0])
        self.down = torch.nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = torch.nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in range(depth))
        self.out = torch.nn.Conv2d(widths[0], 4, 1)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
            self.out.bias[3] = float(np.log(alpha_init / (1 - alpha_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: (N, 3, H, W) in [0, 1] → (rgb (N, 3, H, W), alpha (N, 1, H, W)), both in [0, 1]."""
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        y = x * 2 - 1
        if ph or pw:
            y = F.pad(y, (0, pw, 0, ph), mode="replicate")
        skips = [self.inp(y)]
        for down in self.down:
            skips.append(down(F.avg_pool2d(skips[-1], 2)))
        z = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            z = up(torch.cat([F.interpolate(z, size=skip.shape[-2:], mode="nearest"), skip], 1))
        o = self.out(z)[..., :h, :w]
        return torch.sigmoid(o[:, :3]), torch.sigmoid(o[:, 3:4])


def _jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation (×[1-s, 1+s]) and a hue rotation (±s/2 turn) of (1, 3, H, W)."""
    def u() -> float:
        return float(torch.rand((), generator=g)) * 2 - 1

    x = x * (1 + strength * u())
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + strength * u()) + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * (1 + strength * u()) + grey
    theta = np.pi * strength * u()
    c, s = np.cos(theta), np.sin(theta)
    k = 1 / 3
    sq = np.sqrt(k)
    rot = torch.tensor([[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                        [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
                        [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]], dtype=x.dtype, device=x.device)
    x = torch.einsum("ij,njhw->nihw", rot, x)
    return x.clamp(0, 1)


def view_boxes(h: int, w: int, n: int, min_crop: float, flip_p: float, jitter_p: float,
               g: torch.Generator) -> list[tuple[int, int, int, int, bool, bool]]:
    """``n`` random ``(top, left, height, width, flip, jitter)`` crops, keeping the aspect ratio."""
    out = []
    for _ in range(n):
        frac = min_crop + (1 - min_crop) * float(torch.rand((), generator=g))
        ch, cw = max(1, min(h, round(frac * h))), max(1, min(w, round(frac * w)))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        flip = bool(torch.rand((), generator=g) < flip_p)
        jit = bool(torch.rand((), generator=g) < jitter_p)
        out.append((top, left, ch, cw, flip, jit))
    return out


def internal_views(x: torch.Tensor, extras: list[torch.Tensor | None], boxes, jitter: float,
                   g: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The crops of ``x`` (1, C, H, W) in ``boxes`` resized to (H, W), flipped and jittered as
    drawn; each of ``extras`` (1, c, H, W) (mask, bootstrap target) gets the same geometry."""
    h, w = x.shape[-2:]

    def crop(t: torch.Tensor, box) -> torch.Tensor:
        top, left, ch, cw, flip, _ = box
        c = t[:, :, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            c = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
        return c.flip(-1) if flip else c

    views = []
    for box in boxes:
        v = crop(x, box)
        views.append(_jitter(v, jitter, g) if box[5] and jitter > 0 else v)
    return torch.cat(views), [None if e is None else torch.cat([crop(e, b) for b in boxes]) for e in extras]


class KeyExtractor:
    """Self-similarity of the last layer's attention keys of a ViT (timm) or an open_clip vision tower.

    Args:
        model: a timm ``VisionTransformer`` (``blocks[-1].attn.qkv``) or an open_clip
            ``VisionTransformer`` (``transformer.resblocks[-1]``); frozen.
        preprocess: a callable (N, 3, H, W) in [0, 1] → the model's input (resize + normalise).
    """

    def __init__(self, model: torch.nn.Module, preprocess: Any) -> None:
        self.model, self.preprocess = model, preprocess
        self._captured: torch.Tensor | None = None
        if hasattr(model, "blocks") and hasattr(model.blocks[-1], "attn") and hasattr(model.blocks[-1].attn, "qkv"):
            self.kind = "timm"
            self.prefix = int(getattr(model, "num_prefix_tokens", 1))
            self.tap = model.blocks[-1].attn.qkv
        elif hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
            self.kind = "open_clip"
            self.prefix = 1 if getattr(model, "class_embedding", None) is not None else 0
            self.block = model.transformer.resblocks[-1]
            if not isinstance(getattr(self.block, "attn", None), torch.nn.MultiheadAttention):
                raise ValueError("open_clip vision tower without nn.MultiheadAttention: no keys to read")
            self.tap = self.block.ln_1
            self.batch_first = bool(getattr(model.transformer, "batch_first", True))
        else:
            raise ValueError(f"{type(model).__name__} is not a ViT whose attention keys can be read")

    def _hook(self, module, inputs, output) -> None:
        self._captured = output

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """(N, patches, dim) attention keys of the last layer (all heads concatenated)."""
        x = self.preprocess(images)
        handle = self.tap.register_forward_hook(self._hook)  # only while this call runs: the model may be shared
        try:
            if self.kind == "timm":
                self.model.forward_features(x)
            else:
                self.model(x)
        finally:
            handle.remove()
        captured, self._captured = self._captured, None
        if self.kind == "timm":
            qkv = captured
            d = qkv.shape[-1] // 3
            return qkv[..., d:2 * d][:, self.prefix:]
        h = captured if self.batch_first else captured.transpose(0, 1)
        attn = self.block.attn
        d = attn.embed_dim
        k = F.linear(h, attn.in_proj_weight[d:2 * d], None if attn.in_proj_bias is None else attn.in_proj_bias[d:2 * d])
        return k[:, self.prefix:]

    def self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """(N, P, P) cosine self-similarity of the keys."""
        k = self.keys(images).float()
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return k @ k.transpose(1, 2)


def relevancy_map(encode: Any, image: torch.Tensor, text_e: torch.Tensor, samples: int = 8,
                  sigma: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Where ``text_e`` is in ``image`` by CLIP: (1, 1, H, W) in [0, 1] (max 1 unless all zero).

    SmoothGrad: the absolute input gradient of the cosine similarity between the image's
    embedding (``encode``: (N, 3, H, W) in [0, 1] → (N, D)) and the text embedding, summed
    over colour channels and averaged over ``samples`` noisy copies, then blurred (3×3),
    and stretched so its median maps to 0 and its 90th percentile to 1 (clipped): the
    background's diffuse gradient goes to 0 and the object's to 1 (the object is assumed
    to cover between a tenth and a half of the image).
    """
    g = torch.Generator("cpu").manual_seed(int(seed))
    total = torch.zeros_like(image[:, :1])
    for i in range(samples):
        noise = torch.randn(image.shape, generator=g).to(image) * (sigma if i else 0.0)
        x = (image + noise).clamp(0, 1).detach().requires_grad_(True)
        with torch.enable_grad():
            e = encode(x).float()
            sim = (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12) @ text_e.T).sum()
            (grad,) = torch.autograd.grad(sim, x)
        total = total + grad.abs().sum(1, keepdim=True)
    total = F.avg_pool2d(F.pad(total, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return stretch(total)


def stretch(m: torch.Tensor) -> torch.Tensor:
    """A map stretched so its median goes to 0 and its 90th percentile to 1, clipped to [0, 1]."""
    lo, hi = torch.quantile(m.flatten().float(), torch.tensor([0.5, 0.9], device=m.device)).tolist()
    return ((m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)).clamp(0, 1).detach()


class AtlasFrames:
    """A video's frames and how one atlas layer maps into them, for losses on rendered frames.

    Args:
        frames: T×H×W×3 uint8 frames (the video the atlas was made from).
        uv: T×H×W×2 float UV map of the layer: where each frame pixel samples the layer
            image, in its pixel coordinates (x, y; pixel centres at integers).
        visibility: T×H×W how much the layer shows in each frame pixel.
        layer_shape: (height, width) of the layer image.
    """

    def __init__(self, frames: Any, uv: np.ndarray, visibility: np.ndarray, layer_shape: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        f = np.stack([np.asarray(x) for x in frames]).astype(np.float32) / 255.0
        self.frames = torch.from_numpy(f).permute(0, 3, 1, 2).to(device)
        hl, wl = layer_shape
        grid = np.asarray(uv, dtype=np.float32).copy()
        grid[..., 0] = grid[..., 0] / max(wl - 1, 1) * 2 - 1
        grid[..., 1] = grid[..., 1] / max(hl - 1, 1) * 2 - 1
        self.grid = torch.from_numpy(grid).to(device)
        self.visibility = torch.from_numpy(np.asarray(visibility, dtype=np.float32))[:, None].to(device)
        if not (self.frames.shape[0] == self.grid.shape[0] == self.visibility.shape[0]):
            raise ValueError("frames, uv and visibility disagree on the number of frames")

    def __len__(self) -> int:
        return self.frames.shape[0]

    def render(self, rgb: torch.Tensor, alpha: torch.Tensor, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer (rgb (1, 3, Ha, Wa), alpha (1, 1, Ha, Wa)) seen in frames ``index``:
        (frames, rgb, alpha) with ``alpha * rgb + (1 - alpha) * frames`` the edited frames,
        as ``video.render.overlay_edit`` composites them (premultiplied sampling, weighted
        by the layer's visibility)."""
        n = index.shape[0]
        pre = torch.cat([rgb * alpha, alpha], 1).expand(n, -1, -1, -1)
        s = F.grid_sample(pre, self.grid[index], mode="bilinear", padding_mode="zeros", align_corners=True)
        a = s[:, 3:4] * self.visibility[index]
        return self.frames[index], s[:, :3] / s[:, 3:4].clamp_min(1e-6), a


def attention_relevancy(visual: torch.nn.Module, preprocess: Any, image: torch.Tensor,
                        text_e: torch.Tensor) -> torch.Tensor | None:
    """Chefer et al.'s gradient×attention relevancy of ``text_e`` in ``image`` (1, 3, H, W) by an
    open_clip ViT tower: (1, 1, H, W) in [0, 1], or None when the tower is not one (no class
    token, or attention that is not ``nn.MultiheadAttention``).

    Every block's attention is recomputed explicitly (the same weights and maths as
    ``nn.MultiheadAttention``) so its probabilities ``A`` get gradients; with
    ``R = I`` and ``R += mean_heads(relu(dS/dA * A)) @ R`` over the blocks, the class
    token's row of ``R`` over the patches, upsampled to the image and scaled to [0, 1] by its
    minimum and maximum, is the map (``S``: the image-text cosine similarity). On the toy
    world (40 red circles, "a red circle") 0.18 of this map's mass lies off the circle,
    against 0.37 for the SmoothGrad ``relevancy_map``.
    """
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if (blocks is None or getattr(visual, "class_embedding", None) is None or not hasattr(visual, "grid_size")
            or not all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) for b in blocks)):
        return None
    batch_first = bool(getattr(visual.transformer, "batch_first", True))
    maps: list[torch.Tensor] = []

    def explicit(attn: torch.nn.MultiheadAttention):
        def attention(q_x, k_x=None, v_x=None, attn_mask=None):
            x = q_x if batch_first else q_x.transpose(0, 1)
            n, length, d = x.shape
            heads = attn.num_heads
            q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(d, -1)
            q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
            logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
            if attn_mask is not None:
                logits = logits + attn_mask.to(logits.dtype)
            a = logits.softmax(-1)
            maps.append(a)
            o = attn.out_proj((a @ v).transpose(1, 2).reshape(n, length, d))
            return o if batch_first else o.transpose(0, 1)
        return attention

    for b in blocks:
        b.attention = explicit(b.attn)  # an instance attribute: the class's method is back after ``del``
    try:
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            e = visual(preprocess(x)).float()
            sim = (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12) @ text_e.T).sum()
            grads = torch.autograd.grad(sim, maps)
    finally:
        for b in blocks:
            del b.attention
    length = maps[0].shape[-1]
    r = torch.eye(length, device=image.device)[None]
    for a, g in zip(maps, grads):
        r = r + (g * a).clamp_min(0).mean(1) @ r
    gh, gw = (int(s) for s in visual.grid_size)
    cls_row = r[:, 0, 1:].reshape(1, 1, gh, gw)
    up = F.interpolate(cls_row, size=image.shape[-2:], mode="bilinear", align_corners=False)
    lo, hi = up.min(), up.max()
    return ((up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)).detach()
