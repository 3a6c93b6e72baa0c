"""Video metrics: reconstruction PSNR and flow-based temporal consistency."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pixelmill.tasks.video.flow import farneback_flow, warp_by_flow


def _as_float(x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    arr = np.stack(list(x)) if isinstance(x, (list, tuple)) else np.asarray(x)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


def psnr(a: np.ndarray | Sequence[np.ndarray], b: np.ndarray | Sequence[np.ndarray]) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of two images or frame lists.

    uint8 inputs are scaled to [0, 1]; float inputs are taken to be in [0, 1] already.
    Identical inputs give ``inf``.
    """
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(1.0 / mse))


def temporal_consistency(
    frames: Sequence[np.ndarray], flow_frames: Sequence[np.ndarray] | None = None
) -> float:
    """Mean absolute difference between frame t+1 and frame t warped to t+1 by optical flow.

    Flow (Farnebäck, from t+1 back to t) is computed on ``flow_frames`` when given, so an
    edited video can be measured against the motion of its original; otherwise on
    ``frames``. Pixels whose flow leaves the frame are ignored. The result is in [0, 1]
    RGB units; lower means more temporally consistent (0: every frame is exactly its
    predecessor moved along the flow).

    Args:
        frames: the video to measure, HxWx3 uint8 (or float in [0, 1]).
        flow_frames: the video whose motion defines the warp (usually the unedited original).
    """
    if len(frames) < 2:
        raise ValueError("temporal_consistency needs at least 2 frames")
    motion = frames if flow_frames is None else flow_frames
    if len(motion) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(motion)} flow frames")
    vals = _as_float(frames)
    guide = [m if m.dtype == np.uint8 else np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8) for m in motion]
    total, count = 0.0, 0
    for t in range(len(frames) - 1):
        flow = farneback_flow(guide[t + 1], guide[t])
        warped, valid = warp_by_flow(vals[t].astype(np.float32), flow)
        diff = np.abs(warped - vals[t + 1]).mean(-1)
        total += float(diff[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)
