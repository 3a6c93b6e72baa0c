"""Dense optical flow (OpenCV Farnebäck) and flow warping, shared by training and metrics."""

from __future__ import annotations

import cv2
import numpy as np


def _gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame if frame.dtype == np.uint8 else np.clip(frame, 0, 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def farneback_flow(
    src: np.ndarray,
    dst: np.ndarray,
    winsize: int | None = None,
    levels: int | None = None,
    iterations: int = 5,
) -> np.ndarray:
    """Flow from ``src`` to ``dst``: ``src[y, x]`` moves to ``(x, y) + flow[y, x]`` in ``dst``.

    Window size and pyramid depth scale with the frame size, so 32-pixel test clips and
    full-HD videos both get sensible defaults.

    Args:
        src, dst: RGB uint8 frames (or grayscale) of the same size.
        winsize: averaging window (default: about a sixth of the short side, 5 to 21).
        levels: pyramid levels (default: down to about 16 pixels, at most 5).
        iterations: iterations per pyramid level.

    Returns:
        float32 HxWx2 flow in pixels, (dx, dy).
    """
    a, b = _gray(src), _gray(dst)
    short = min(a.shape)
    if winsize is None:
        winsize = int(np.clip(short // 6, 5, 21)) | 1
    if levels is None:
        levels = int(np.clip(np.log2(max(short, 16) / 16.0), 1, 5))
    return cv2.calcOpticalFlowFarneback(
        a, b, None, pyr_scale=0.5, levels=levels, winsize=winsize,
        iterations=iterations, poly_n=5, poly_sigma=1.1, flags=0,
    )


def warp_by_flow(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``image`` at ``p + flow(p)`` (bilinear) for every pixel ``p``.

    With ``flow`` the flow from frame B to frame A, ``warp_by_flow(A, flow)`` predicts B.

    Returns:
        (warped float32 image, bool mask of pixels whose sample point lies inside ``image``).
    """
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    warped = cv2.remap(
        image.astype(np.float32), mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return warped, valid


def consistent_flow_mask(forward: np.ndarray, backward: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """Pixels whose forward flow, followed back by the backward flow, returns within ``tolerance`` px.

    Occluded and badly tracked pixels fail this check; flow losses ignore them.
    """
    back_at_target, valid = warp_by_flow(backward, forward)
    err = np.linalg.norm(forward + back_at_target, axis=-1)
    return valid & (err < tolerance)
