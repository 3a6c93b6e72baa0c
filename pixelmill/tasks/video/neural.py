"""Neural Layered Atlases (Kasten et al. 2021), small enough to train on a CPU in tests.

A video is fitted by per-video MLPs over normalised pixel coordinates ``(x, y, t)``:

- two mapping networks ``(x, y, t) -> (u, v)``, one per layer (background, foreground),
  each the identity scaled by ``uv_scale`` plus a learned residual (its last layer starts
  at zero, so training starts from the identity mapping without a pre-training phase);
- an alpha network ``(x, y, t) -> alpha`` (Fourier features, sigmoid);
- two atlas networks ``(u, v) -> RGB`` (Fourier features, sigmoid). The paper shares one
  atlas MLP with the layers in separate halves of UV space; here each layer has its own
  small atlas MLP, so the layers cannot bleed into each other and each UV domain is the
  whole plane.

Losses: RGB reconstruction of ``alpha * fg + (1 - alpha) * bg``; optical-flow consistency
(Farnebäck flow between consecutive frames, forward and backward, on pixels that pass a
forward–backward check: a point's UV at ``t`` equals the UV of its flow-displaced point at
``t ± 1``, weighted by the layer's visibility; alpha is likewise carried along the flow);
rigidity (finite-difference Jacobian of each mapping, divided by ``uv_scale``, pushed to a
rotation with the symmetric Dirichlet energy ``(tr M + tr M^-1) / 4 - 1``, ``M = JᵀJ``);
foreground sparsity (mean alpha); and, when rough masks are given (the paper uses Mask
R-CNN), a bootstrap binary cross-entropy between alpha and the masks for the first
``bootstrap_iterations`` steps.

Training is deterministic for a seed: initialisation uses a forked RNG, and the pixels of
step ``i`` are drawn from a generator seeded with ``(seed, i)``, so a run resumed from a
checkpoint (weights and Adam moments in safetensors, step and fingerprints in JSON) ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelmill.config.video import NeuralAtlasConfig
from pixelmill.tasks.video.atlas import Atlas, AtlasError, AtlasLayer
from pixelmill.tasks.video.flow import consistent_flow_mask, farneback_flow
from pixelmill.tasks.video.metrics import psnr
from pixelmill.tasks.video.render import render_frames

CHECKPOINT_JSON = "checkpoint.json"
_RESUME_FREE_KEYS = ("iterations", "checkpoint_every", "progress_every")


@dataclass
class NeuralAtlasStats:
    """What a training run did and how well the exported atlas reconstructs the video.

    Attributes:
        start_iteration: step training started from (> 0 when resumed from a checkpoint).
        iterations: total steps reached.
        seconds: wall time of this call's training loop.
        losses: the last step's loss terms.
        psnr: dB, frames re-rendered from the exported atlas images vs the input frames.
        psnr_mlp: dB, the networks' own reconstruction (no atlas resampling).
        flow_pixels: fraction of pixels with a consistent flow used by the flow loss.
        atlas_sizes: (width, height) of each exported layer image.
    """

    start_iteration: int
    iterations: int
    seconds: float
    losses: dict[str, float]
    psnr: float
    psnr_mlp: float
    flow_pixels: float
    atlas_sizes: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FourierFeatures(nn.Module):
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for ``k < octaves``."""

    def __init__(self, dims: int, octaves: int) -> None:
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(octaves, dtype=torch.float32)) * math.pi)
        self.out_dim = dims * (1 + 2 * octaves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freqs.numel() == 0:
            return x
        arg = (x[..., None] * self.freqs).flatten(-2)
        return torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=-1)


def _mlp(inp: int, width: int, depth: int, out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = inp
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


class MappingNet(nn.Module):
    """(x, y, t) -> (u, v): ``uv_scale * (x, y)`` plus a residual MLP that starts at zero."""

    def __init__(self, width: int, depth: int, uv_scale: float) -> None:
        super().__init__()
        self.scale = uv_scale
        self.mlp = _mlp(3, width, depth, 2)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        return self.scale * xyt[..., :2] + self.mlp(xyt)


class FieldNet(nn.Module):
    """Fourier features then an MLP then a sigmoid: the alpha and atlas networks."""

    def __init__(self, dims: int, octaves: int, width: int, depth: int, out: int) -> None:
        super().__init__()
        self.enc = FourierFeatures(dims, octaves)
        self.mlp = _mlp(self.enc.out_dim, width, depth, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.enc(x)))


class LayeredAtlasModel(nn.Module):
    """The five networks of a two-layer neural atlas."""

    def __init__(self, cfg: NeuralAtlasConfig) -> None:
        super().__init__()
        self.map_bg = MappingNet(cfg.mapping_width, cfg.mapping_depth, cfg.uv_scale)
        self.map_fg = MappingNet(cfg.mapping_width, cfg.mapping_depth, cfg.uv_scale)
        self.alpha = FieldNet(3, cfg.alpha_frequencies, cfg.alpha_width, cfg.alpha_depth, 1)
        self.atlas_bg = FieldNet(2, cfg.atlas_frequencies, cfg.atlas_width, cfg.atlas_depth, 3)
        self.atlas_fg = FieldNet(2, cfg.atlas_frequencies, cfg.atlas_width, cfg.atlas_depth, 3)

    def alpha_at(self, xyt: torch.Tensor) -> torch.Tensor:
        return self.alpha(xyt)[..., 0].clamp(1e-4, 1.0 - 1e-4)

    def forward(self, xyt: torch.Tensor) -> dict[str, torch.Tensor]:
        uv_b, uv_f = self.map_bg(xyt), self.map_fg(xyt)
        a = self.alpha_at(xyt)
        c_b, c_f = self.atlas_bg(uv_b), self.atlas_fg(uv_f)
        rgb = a[..., None] * c_f + (1.0 - a[..., None]) * c_b
        return {"uv_bg": uv_b, "uv_fg": uv_f, "alpha": a, "rgb": rgb}


@dataclass
class _Video:
    """Frames and flow as tensors, with the coordinate normalisation."""

    rgb: torch.Tensor  # [T, H, W, 3] in [0, 1]
    fwd: torch.Tensor  # [T-1, H, W, 2] pixels, t -> t+1
    bwd: torch.Tensor  # [T-1, H, W, 2] pixels, t+1 -> t
    fwd_ok: torch.Tensor  # [T-1, H, W] bool
    bwd_ok: torch.Tensor  # [T-1, H, W] bool
    masks: torch.Tensor | None  # [T, H, W] float

    @property
    def shape(self) -> tuple[int, int, int]:
        t, h, w, _ = self.rgb.shape
        return t, h, w

    def normalise(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pixel (x, y, frame) -> isotropic coordinates: the long side spans [-1, 1], t in [-1, 1]."""
        n, h, w = self.shape
        s = float(max(h, w))
        return torch.stack(
            [(2.0 * x + 1.0 - w) / s, (2.0 * y + 1.0 - h) / s, 2.0 * t / max(n - 1, 1) - 1.0], dim=-1
        )

    @property
    def pixel(self) -> float:
        """One frame pixel in normalised units."""
        return 2.0 / float(max(self.shape[1:]))


def _prepare(
    frames: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None, cfg: NeuralAtlasConfig, device: torch.device
) -> _Video:
    if len(frames) < 2:
        raise AtlasError(f"a neural atlas needs at least 2 frames, got {len(frames)}")
    shape = frames[0].shape
    for i, f in enumerate(frames):
        if f.shape != shape or f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise AtlasError(f"frame {i}: expected HxWx3 uint8 like frame 0 {shape}, got {f.shape} {f.dtype}")
    fwd, bwd, fok, bok = [], [], [], []
    for a, b in zip(frames[:-1], frames[1:]):
        f, g = farneback_flow(a, b), farneback_flow(b, a)
        fwd.append(f)
        bwd.append(g)
        fok.append(consistent_flow_mask(f, g, cfg.flow_tolerance))
        bok.append(consistent_flow_mask(g, f, cfg.flow_tolerance))
    mask_t = None
    if masks is not None:
        if len(masks) != len(frames):
            raise AtlasError(f"got {len(masks)} masks for {len(frames)} frames")
        arrays = []
        for i, m in enumerate(masks):
            arr = np.asarray(m)
            if arr.shape != shape[:2]:
                raise AtlasError(f"mask {i}: shape {arr.shape}, frames are {shape[:2]}")
            arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 and arr.max() > 1 else 1.0)
            if arr.min() < 0.0 or arr.max() > 1.0:
                raise AtlasError(f"mask {i}: values must be in [0, 1] (or 0/255 uint8)")
            arrays.append(arr)
        mask_t = torch.from_numpy(np.stack(arrays)).to(device)
    return _Video(
        rgb=torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0).to(device),
        fwd=torch.from_numpy(np.stack(fwd)).to(device),
        bwd=torch.from_numpy(np.stack(bwd)).to(device),
        fwd_ok=torch.from_numpy(np.stack(fok)).to(device),
        bwd_ok=torch.from_numpy(np.stack(bok)).to(device),
        masks=mask_t,
    )


def _rigidity(net: MappingNet, xyt: torch.Tensor, base: torch.Tensor, delta: float, scale: float) -> torch.Tensor:
    dx = torch.zeros_like(xyt)
    dx[..., 0] = delta
    dy = torch.zeros_like(xyt)
    dy[..., 1] = delta
    j = torch.stack([(net(xyt + dx) - base), (net(xyt + dy) - base)], dim=-1) / (delta * scale)
    fro2 = (j**2).sum(dim=(-2, -1))
    det2 = torch.linalg.det(j) ** 2
    return ((fro2 + fro2 / det2.clamp_min(1e-4)) / 4.0 - 1.0).mean()


def _step_losses(
    model: LayeredAtlasModel, video: _Video, cfg: NeuralAtlasConfig, step: int
) -> dict[str, torch.Tensor]:
    n, h, w = video.shape
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(0, n * h * w, (cfg.batch_size,), generator=gen).to(video.rgb.device)
    t, rem = idx // (h * w), idx % (h * w)
    y, x = rem // w, rem % w
    xf, yf, tf = x.float(), y.float(), t.float()
    xyt = video.normalise(xf, yf, tf)
    out = model(xyt)
    target = video.rgb[t, y, x]
    losses: dict[str, torch.Tensor] = {"rgb": ((out["rgb"] - target) ** 2).mean()}

    flow_terms, alpha_terms = [], []
    to_px = 1.0 / (video.pixel * cfg.uv_scale)
    for direction in (1, -1):
        if direction == 1:
            sel = t < n - 1
            tt, yy, xx = t[sel], y[sel], x[sel]
            flow, ok = video.fwd[tt, yy, xx], video.fwd_ok[tt, yy, xx]
        else:
            sel = t > 0
            tt, yy, xx = t[sel], y[sel], x[sel]
            flow, ok = video.bwd[tt - 1, yy, xx], video.bwd_ok[tt - 1, yy, xx]
        if not bool(ok.any()):
            continue
        keep = sel.nonzero()[:, 0][ok]
        flow = flow[ok]
        moved = video.normalise(x[keep].float() + flow[:, 0], y[keep].float() + flow[:, 1], t[keep].float() + direction)
        a_here = out["alpha"][keep]
        vis = {"bg": (1.0 - a_here).detach(), "fg": a_here.detach()}
        for name, net in (("bg", model.map_bg), ("fg", model.map_fg)):
            diff = (net(moved) - out[f"uv_{name}"][keep]).norm(dim=-1) * to_px
            flow_terms.append((vis[name] * diff).sum() / max(1, keep.numel()))
        alpha_terms.append((model.alpha_at(moved) - a_here).abs().mean())
    zero = out["rgb"].new_zeros(())
    losses["flow"] = torch.stack(flow_terms).sum() / 2.0 if flow_terms else zero
    losses["alpha_flow"] = torch.stack(alpha_terms).mean() if alpha_terms else zero

    delta = cfg.rigidity_delta * video.pixel
    k = max(1, cfg.batch_size // 2)
    losses["rigidity"] = _rigidity(model.map_bg, xyt[:k], out["uv_bg"][:k], delta, cfg.uv_scale) + _rigidity(
        model.map_fg, xyt[:k], out["uv_fg"][:k], delta, cfg.uv_scale
    )
    losses["sparsity"] = out["alpha"].mean()
    if video.masks is not None and step < cfg.bootstrap_iterations:
        m = video.masks[t, y, x]
        losses["bootstrap"] = nn.functional.binary_cross_entropy(out["alpha"], m)
    else:
        losses["bootstrap"] = zero
    weights = {
        "rgb": cfg.rgb_weight,
        "flow": cfg.flow_weight,
        "alpha_flow": cfg.alpha_flow_weight,
        "rigidity": cfg.rigidity_weight,
        "sparsity": cfg.sparsity_weight,
        "bootstrap": cfg.bootstrap_weight,
    }
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def _fingerprint(frames: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(np.ascontiguousarray(f).tobytes())
    if masks is not None:
        for m in masks:
            h.update(np.ascontiguousarray(np.asarray(m, dtype=np.float32)).tobytes())
    return h.hexdigest()


def _resume_config(cfg: NeuralAtlasConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump().items() if k not in _RESUME_FREE_KEYS}


def save_checkpoint(
    directory: str | Path,
    model: LayeredAtlasModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: NeuralAtlasConfig,
    fingerprint: str,
) -> Path:
    """Write weights and Adam moments (safetensors) and the step (JSON), atomically.

    The JSON names the weights file of its step and is replaced last, so a crash leaves
    the previous checkpoint intact.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for key, val in st.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(val).detach().cpu().reshape(-1).contiguous()
    name = f"weights-{step:08d}.safetensors"
    save_file(tensors, str(out / (name + ".tmp")))
    os.replace(out / (name + ".tmp"), out / name)
    doc = {"step": step, "weights": name, "config": _resume_config(cfg), "video": fingerprint}
    (out / (CHECKPOINT_JSON + ".tmp")).write_text(json.dumps(doc, indent=2))
    os.replace(out / (CHECKPOINT_JSON + ".tmp"), out / CHECKPOINT_JSON)
    for old in out.glob("weights-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out / name


def load_checkpoint(
    directory: str | Path,
    model: LayeredAtlasModel,
    optimizer: torch.optim.Optimizer,
    cfg: NeuralAtlasConfig,
    fingerprint: str,
) -> int | None:
    """Restore weights and Adam state; returns the step, or None when there is no checkpoint.

    Raises:
        AtlasError: the checkpoint was made for another video or other training settings.
    """
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / CHECKPOINT_JSON).is_file():
        return None
    doc = json.loads((src / CHECKPOINT_JSON).read_text())
    if doc.get("video") != fingerprint:
        raise AtlasError(f"checkpoint in {src} was made for a different video (or masks)")
    theirs, ours = doc.get("config", {}), _resume_config(cfg)
    changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if changed:
        raise AtlasError(f"checkpoint in {src} was made with different settings: {', '.join(changed)}")
    tensors = load_file(str(src / doc["weights"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v.reshape(()) if key == "step" else v
    if state:
        params = list(model.parameters())
        for i, st in state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = st[key].reshape(params[i].shape)
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(doc["step"])


def checkpoint_weights(directory: str | Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The step and model weights of the checkpoint in ``directory`` (no optimizer state)."""
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / CHECKPOINT_JSON).is_file():
        raise AtlasError(f"{src}: no checkpoint")
    doc = json.loads((src / CHECKPOINT_JSON).read_text())
    tensors = load_file(str(src / doc["weights"]))
    return int(doc["step"]), {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


@torch.no_grad()
def _eval_grid(
    fn: Callable[[torch.Tensor], torch.Tensor], pts: torch.Tensor, device: torch.device, chunk: int = 65536
) -> torch.Tensor:
    """``fn`` over CPU points in chunks on ``device``; the result is on the CPU."""
    return torch.cat([fn(pts[i : i + chunk].to(device)).cpu() for i in range(0, len(pts), chunk)])


@torch.no_grad()
def _export_atlas(
    model: LayeredAtlasModel, video: _Video, cfg: NeuralAtlasConfig, fps: Fraction | None = None
) -> tuple[Atlas, np.ndarray]:
    """Render each layer's atlas network to an image and the mappings to per-frame UV maps.

    Each atlas image covers the bounding box of the UVs of the pixels where its layer is
    visible (alpha > 0.05 for the foreground, < 0.95 for the background), at
    ``atlas_resolution`` atlas pixels per frame pixel (estimated from the mapping's local
    scale). Returns the atlas and the networks' own reconstruction, [T, H, W, 3] in [0, 1].
    """
    n, h, w = video.shape
    ty, yy, xx = torch.meshgrid(
        torch.arange(n, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
        torch.arange(w, dtype=torch.float32), indexing="ij",
    )
    xyt = video.normalise(xx.reshape(-1), yy.reshape(-1), ty.reshape(-1))
    dev = video.rgb.device
    uv = {"bg": _eval_grid(model.map_bg, xyt, dev), "fg": _eval_grid(model.map_fg, xyt, dev)}
    alpha = _eval_grid(model.alpha_at, xyt, dev)
    mlp_rgb = _eval_grid(lambda p: model(p)["rgb"], xyt, dev).reshape(n, h, w, 3).numpy()
    nets = {"bg": model.atlas_bg, "fg": model.atlas_fg}
    layers, bounds = [], {}
    for name, vis in (("bg", alpha < 0.95), ("fg", alpha > 0.05)):
        coords = uv[name]
        grid_uv = coords.reshape(n, h, w, 2)
        du = (grid_uv[:, :, 1:] - grid_uv[:, :, :-1]).norm(dim=-1)
        dv = (grid_uv[:, 1:] - grid_uv[:, :-1]).norm(dim=-1)
        local = torch.cat([du.reshape(-1), dv.reshape(-1)])
        step = float(local.median()) / cfg.atlas_resolution if local.numel() else cfg.uv_scale * video.pixel
        step = max(step, 1e-6)
        seen = coords[vis] if bool(vis.any()) else coords
        lo = seen.min(0).values - 2 * step
        hi = seen.max(0).values + 2 * step
        size = ((hi - lo) / step).ceil().long() + 1
        if int(size.max()) > cfg.max_atlas_side:
            step *= float(size.max()) / cfg.max_atlas_side
            size = ((hi - lo) / step).ceil().long() + 1
        wa, ha = int(size[0]), int(size[1])
        gv, gu = torch.meshgrid(
            lo[1] + step * torch.arange(ha, dtype=torch.float32),
            lo[0] + step * torch.arange(wa, dtype=torch.float32), indexing="ij",
        )
        grid = torch.stack([gu.reshape(-1), gv.reshape(-1)], dim=-1)
        img = _eval_grid(nets[name], grid, dev).reshape(ha, wa, 3)
        image = (img * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        pix = ((coords - lo) / step).reshape(n, h, w, 2).numpy().astype(np.float32)
        layers.append(AtlasLayer("background" if name == "bg" else "foreground", image, pix))
        bounds[name] = {"origin": lo.tolist(), "step": step, "size": [wa, ha]}
    atlas = Atlas(
        layers=layers,
        alpha=alpha.reshape(n, h, w).numpy().astype(np.float32),
        method="neural",
        fps=fps,
        meta={"uv_bounds": bounds, "config": cfg.model_dump()},
    )
    return atlas, mlp_rgb


def train_neural_atlas(
    frames: Sequence[np.ndarray],
    config: NeuralAtlasConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    masks: Sequence[np.ndarray] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    fps: Fraction | None = None,
    device: str | torch.device = "cpu",
    on_checkpoint: Callable[[], None] | None = None,
) -> tuple[Atlas, NeuralAtlasStats]:
    """Fit a two-layer neural atlas to a clip and export it as an :class:`Atlas`.

    Args:
        frames: HxWx3 uint8 RGB frames (at least 2).
        config: training settings (default: :class:`NeuralAtlasConfig` defaults).
        checkpoint_dir: folder for checkpoints, written every ``checkpoint_every`` steps
            and at the end.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (it
            must come from the same frames, masks and settings other than ``iterations``,
            ``checkpoint_every`` and ``progress_every``).
        masks: optional rough foreground masks (HxW, bool or [0, 1]) per frame to bootstrap alpha.
        progress: called as ``progress(step, iterations, losses)`` every ``progress_every`` steps.
        fps: frame rate recorded on the atlas.
        on_checkpoint: called after each checkpoint is written (e.g. to upload it).
        device: torch device to train on. Initialisation and pixel sampling happen on the
            CPU, so a seed gives the same start on every device; bit-identical results
            (and resume equality) are guaranteed on the CPU only.

    Returns:
        The atlas (background and foreground layers, alpha) and training statistics;
        ``stats.psnr`` is measured on frames re-rendered from the exported atlas images.
    """
    cfg = config or NeuralAtlasConfig()
    dev = torch.device(device)
    video = _prepare(frames, masks, cfg, dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LayeredAtlasModel(cfg).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    fingerprint = _fingerprint(frames, masks)
    start = 0
    if checkpoint_dir is not None and resume:
        start = load_checkpoint(checkpoint_dir, model, optimizer, cfg, fingerprint) or 0
    began = time.perf_counter()
    losses: dict[str, float] = {}
    for step in range(start, cfg.iterations):
        terms = _step_losses(model, video, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        done = step + 1
        if done % cfg.progress_every == 0 or done == cfg.iterations:
            losses = {k: float(v.detach()) for k, v in terms.items()}
            if progress is not None:
                progress(done, cfg.iterations, losses)
        if checkpoint_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, model, optimizer, done, cfg, fingerprint)
            if on_checkpoint is not None:
                on_checkpoint()
    reached = max(start, cfg.iterations)
    if checkpoint_dir is not None and reached > start and (not cfg.checkpoint_every or reached % cfg.checkpoint_every):
        save_checkpoint(checkpoint_dir, model, optimizer, reached, cfg, fingerprint)
        if on_checkpoint is not None:
            on_checkpoint()
    seconds = time.perf_counter() - began
    atlas, mlp_rgb = _export_atlas(model, video, cfg, fps)
    rendered = render_frames(atlas)
    flow_ok = torch.cat([video.fwd_ok.reshape(-1), video.bwd_ok.reshape(-1)]).float().mean()
    stats = NeuralAtlasStats(
        start_iteration=start,
        iterations=reached,
        seconds=seconds,
        losses=losses,
        psnr=psnr(rendered, list(frames)),
        psnr_mlp=psnr(mlp_rgb, video.rgb.cpu().numpy()),
        flow_pixels=float(flow_ok),
        atlas_sizes=[(layer.image.shape[1], layer.image.shape[0]) for layer in atlas.layers],
    )
    atlas.meta["stats"] = {k: v for k, v in stats.to_dict().items() if k != "losses"}
    return atlas, stats
