"""Small synthetic clips with known motion, for tests and the demo.

The texture is an analytic function of continuous coordinates (smooth colour blobs, thin
lines and a gradient), so a clip panned by sub-pixel shifts is exact: frame ``t`` samples
the same function at ``(x + dx_t, y + dy_t)``, with no resampling error. Blobs and line
crossings give feature detectors corners to match and optical flow texture to follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass
class SyntheticClip:
    """A synthetic clip and its ground truth.

    Attributes:
        frames: ``T`` RGB frames, HxWx3 uint8.
        fps: frame rate.
        shifts: float64 [T, 2], the (dx, dy) texture offset of each frame in pixels: pixel
            ``(x, y)`` of frame ``t`` shows texture point ``(x + dx_t, y + dy_t)``.
        masks: per-frame ground-truth foreground masks (bool HxW), or None for a pure pan.
        centers: float64 [T, 2], the (x, y) centre of the moving shape, or None.
    """

    frames: list[np.ndarray]
    fps: Fraction
    shifts: np.ndarray
    masks: list[np.ndarray] | None = None
    centers: np.ndarray | None = None


class Texture:
    """A smooth random colour texture defined on the whole plane.

    Args:
        seed: random seed of the blob and line layout.
        extent: (width, height) of the region the blobs and lines are scattered over.
        blobs: number of Gaussian colour blobs (default: one per 40 square pixels of ``extent``).
        lines: number of thin dark/bright lines.
        blob_sigma: (min, max) blob radius in pixels.
    """

    def __init__(
        self,
        seed: int = 0,
        extent: tuple[float, float] = (128.0, 128.0),
        blobs: int | None = None,
        lines: int = 8,
        blob_sigma: tuple[float, float] = (1.2, 4.5),
    ) -> None:
        rng = np.random.default_rng(seed)
        w, h = extent
        if blobs is None:
            blobs = max(8, int(w * h / 40))
        self.centers = rng.uniform([-8.0, -8.0], [w + 8.0, h + 8.0], size=(blobs, 2))
        self.sigmas = rng.uniform(*blob_sigma, size=blobs)
        self.colors = rng.uniform(-1.0, 1.0, size=(blobs, 3))
        angles = rng.uniform(0.0, np.pi, size=lines)
        self.normals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts = rng.uniform([0.0, 0.0], [w, h], size=(lines, 2))
        self.offsets = (self.normals * pts).sum(1)
        self.line_colors = rng.choice([-0.45, 0.45], size=lines)
        self.gradient = rng.uniform(-0.25, 0.25, size=(2, 3)) / max(w, h)
        self.base = rng.uniform(0.35, 0.65, size=3)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """RGB float values in [0, 1] at coordinates ``x``, ``y`` (same shape), shape (*x.shape, 3)."""
        pts = np.stack([x, y], axis=-1)[..., None, :]
        d2 = ((pts - self.centers) ** 2).sum(-1)
        weights = np.exp(-d2 / (2.0 * self.sigmas**2))
        rgb = self.base + 0.6 * weights @ self.colors
        dist = np.abs((pts * self.normals).sum(-1) - self.offsets)
        rgb = rgb + (np.exp(-((dist / 0.9) ** 2)) * self.line_colors)[..., None].sum(-2)
        rgb = rgb + x[..., None] * self.gradient[0] + y[..., None] * self.gradient[1]
        return np.clip(rgb, 0.0, 1.0)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def synthetic_pan(
    frames: int = 9,
    size: tuple[int, int] = (96, 72),
    shift: tuple[float, float] = (2.0, 1.0),
    shifts: np.ndarray | list[tuple[float, float]] | None = None,
    fps: Fraction | int = 24,
    seed: int = 0,
) -> SyntheticClip:
    """A camera pan over a static texture with known per-frame shifts.

    Args:
        frames: number of frames ``T``.
        size: (width, height) of the frames.
        shift: constant (dx, dy) per frame in pixels (may be fractional); frame ``t`` is
            offset by ``t * shift``. Ignored when ``shifts`` is given.
        shifts: explicit [T, 2] offsets of each frame.
        fps: frame rate recorded on the clip.
        seed: texture seed.
    """
    w, h = size
    if shifts is None:
        offs = np.arange(frames, dtype=np.float64)[:, None] * np.asarray(shift, dtype=np.float64)
    else:
        offs = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
        frames = len(offs)
    span = offs.max(0) - offs.min(0)
    tex = Texture(seed, extent=(w + span[0] + 16.0, h + span[1] + 16.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = offs.min(0) - 8.0
    out = [_to_uint8(tex(xx + dx - base[0], yy + dy - base[1])) for dx, dy in offs]
    return SyntheticClip(frames=out, fps=Fraction(fps), shifts=offs)


def synthetic_moving_shape(
    frames: int = 8,
    size: tuple[int, int] = (32, 32),
    radius: float = 5.0,
    start: tuple[float, float] | None = None,
    velocity: tuple[float, float] = (2.0, 1.0),
    color: tuple[int, int, int] = (230, 40, 40),
    textured: bool = True,
    fps: Fraction | int = 24,
    seed: int = 1,
) -> SyntheticClip:
    """A static textured background with a coloured disk moving along a straight line.

    The disk is drawn with an anti-aliased edge; its ground-truth mask is the set of
    pixels at least half covered. ``shifts`` is all zeros (static camera). A textured disk
    carries its own pattern (moving rigidly with it), like a real object: optical flow
    inside a uniform disk is ill-defined, so flow-based methods cannot track one.

    Args:
        frames: number of frames ``T``.
        size: (width, height) of the frames.
        radius: disk radius in pixels.
        start: (x, y) centre in frame 0; by default placed so the path is centred.
        velocity: (dx, dy) displacement of the centre per frame in pixels.
        color: disk RGB colour.
        textured: overlay a pattern on the disk colour (45% texture, 55% colour).
        fps: frame rate recorded on the clip.
        seed: background texture seed.
    """
    w, h = size
    vel = np.asarray(velocity, dtype=np.float64)
    if start is None:
        start_xy = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) - vel * (frames - 1) / 2.0
    else:
        start_xy = np.asarray(start, dtype=np.float64)
    centers = start_xy + np.arange(frames)[:, None] * vel
    tex = Texture(seed, extent=(float(w), float(h)), lines=4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    background = tex(xx, yy)
    disk = np.asarray(color, dtype=np.float64) / 255.0
    side = 2.0 * radius + 4.0
    pattern = Texture(
        seed + 1000, extent=(side, side), blobs=max(6, int(side * side / 10)), lines=2, blob_sigma=(1.0, 2.2)
    )
    out, masks = [], []
    for cx, cy in centers:
        if textured:
            disk = 0.55 * np.asarray(color, dtype=np.float64) / 255.0 + 0.45 * pattern(
                xx - cx + radius + 2.0, yy - cy + radius + 2.0
            )
        coverage = np.clip(radius - np.hypot(xx - cx, yy - cy) + 0.5, 0.0, 1.0)[..., None]
        out.append(_to_uint8(coverage * disk + (1.0 - coverage) * background))
        masks.append(coverage[..., 0] >= 0.5)
    return SyntheticClip(
        frames=out, fps=Fraction(fps), shifts=np.zeros((frames, 2)), masks=masks, centers=centers
    )
