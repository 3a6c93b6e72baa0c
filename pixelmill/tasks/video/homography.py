"""Homography atlas: the fast default for static scenes and camera pans/rotations.

Every frame is registered to a reference frame (the middle one by default) with feature
matches (SIFT or ORB) and a RANSAC homography. A frame that cannot be matched to the
reference directly is chained through its neighbour towards the reference. The warped
frames are blended (median by default, which also removes moving objects that cover a
place less than half the time) into one background mosaic, and each frame's UV map is its
homography into that mosaic. The result is a single-layer :class:`Atlas`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import cv2
import numpy as np

from pixelmill.tasks.video.atlas import Atlas, AtlasError, AtlasLayer
from pixelmill.tasks.video.render import render_frames

MAX_CANVAS_SIDE = 8192


@dataclass
class Registration:
    """Homographies of all frames to the reference frame.

    Attributes:
        homographies: float64 [T, 3, 3], frame pixel -> reference pixel.
        reference: index of the reference frame.
        inliers: RANSAC inlier count of the match each homography came from (0 for the reference).
        chained: whether each frame was registered through a neighbour rather than directly.
        methods: how each frame was matched: ``features``, ``features+ecc``, ``ecc`` or ``reference``.
    """

    homographies: np.ndarray
    reference: int
    inliers: list[int]
    chained: list[bool]
    methods: list[str]


class _Matcher:
    def __init__(self, detector: str, max_features: int, ratio: float) -> None:
        if detector == "sift":
            self.det = cv2.SIFT_create(nfeatures=max_features)
            self.norm = cv2.NORM_L2
        elif detector == "orb":
            self.det = cv2.ORB_create(nfeatures=max_features, edgeThreshold=8, patchSize=15)
            self.norm = cv2.NORM_HAMMING
        else:
            raise ValueError(f"detector must be 'sift' or 'orb', got {detector!r}")
        self.ratio = ratio
        self.cache: dict[int, tuple] = {}

    def features(self, index: int, frame: np.ndarray) -> tuple:
        if index not in self.cache:
            gray = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
            self.cache[index] = self.det.detectAndCompute(gray, None)
        return self.cache[index]

    def match(self, a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
        (ka, da), (kb, db) = a, b
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
        pairs = cv2.BFMatcher(self.norm).knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        src = np.float32([ka[m.queryIdx].pt for m in good]).reshape(-1, 2)
        dst = np.float32([kb[m.trainIdx].pt for m in good]).reshape(-1, 2)
        return src, dst


def _plausible(h: np.ndarray) -> bool:
    det = float(np.linalg.det(h[:2, :2]))
    return bool(np.all(np.isfinite(h))) and 0.2 < det < 5.0 and float(np.abs(h[2, :2]).max()) < 0.01


def _gray(frame: np.ndarray, scale: float) -> np.ndarray:
    g = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if scale != 1.0:
        g = cv2.resize(g, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return g


def _ecc(src: np.ndarray, dst: np.ndarray, init: np.ndarray, scale: float) -> tuple[np.ndarray | None, float]:
    """Refine ``init`` (src pixel -> dst pixel) by dense ECC alignment; (None, 0) if it fails."""
    s = np.diag([scale, scale, 1.0])
    warp = (s @ np.linalg.inv(init) @ np.linalg.inv(s)).astype(np.float32)
    warp /= warp[2, 2]
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-6)
    try:
        cc, warp = cv2.findTransformECC(dst, src, warp, cv2.MOTION_HOMOGRAPHY, criteria, None, 3)
    except cv2.error:
        return None, 0.0
    h = np.linalg.inv(s) @ np.linalg.inv(warp.astype(np.float64)) @ s
    return h / h[2, 2], float(cc)


def register_frames(
    frames: Sequence[np.ndarray],
    reference: int | None = None,
    detector: Literal["sift", "orb"] = "sift",
    min_inliers: int = 12,
    ransac_threshold: float = 1.5,
    max_features: int = 4000,
    ratio: float = 0.75,
    refine: bool = True,
    min_ecc: float = 0.9,
    ecc_max_side: int = 640,
) -> Registration:
    """Homography of every frame to the reference frame.

    Frames are visited outwards from the reference; each is matched to the reference
    directly, and if that fails, to its already-registered neighbour towards the
    reference, whose homography it is chained with. A match is feature-based (Lowe ratio
    test, RANSAC with at least ``min_inliers`` inliers, then a least-squares fit on the
    inliers), refined by dense ECC alignment for sub-pixel accuracy. Frames too small or
    smooth for features (e.g. 32-pixel clips) fall back to phase correlation + ECC,
    accepted when the ECC correlation reaches ``min_ecc``.

    Args:
        frames: HxWx3 uint8 RGB frames.
        reference: reference frame index (default: the middle frame).
        detector: ``sift`` (default, more matches on small or smooth frames) or ``orb``.
        min_inliers: fewest RANSAC inliers accepted for a match.
        ransac_threshold: RANSAC reprojection threshold in pixels.
        max_features: features detected per frame.
        ratio: Lowe ratio-test threshold.
        refine: refine feature homographies with ECC (and allow the ECC fallback).
        min_ecc: lowest ECC correlation accepted for a fallback match.
        ecc_max_side: ECC runs on frames downscaled to at most this side length.

    Raises:
        AtlasError: a frame matches neither the reference nor its neighbour; names the frame.
    """
    n = len(frames)
    if n == 0:
        raise AtlasError("no frames to register")
    ref = n // 2 if reference is None else reference
    if not 0 <= ref < n:
        raise AtlasError(f"reference frame {ref} is outside 0..{n - 1}")
    matcher = _Matcher(detector, max_features, ratio)
    h, w = frames[0].shape[:2]
    scale = min(1.0, ecc_max_side / max(h, w))
    grays: dict[int, np.ndarray] = {}

    def gray(i: int) -> np.ndarray:
        if i not in grays:
            grays[i] = _gray(frames[i], scale)
        return grays[i]

    homs = np.zeros((n, 3, 3))
    homs[ref] = np.eye(3)
    inliers, chained, methods = [0] * n, [False] * n, ["reference"] * n

    def estimate(i: int, j: int) -> tuple[np.ndarray | None, int, str]:
        src, dst = matcher.match(matcher.features(i, frames[i]), matcher.features(j, frames[j]))
        hom, count = None, 0
        if len(src) >= 4:
            hom, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_threshold, maxIters=4000, confidence=0.999)
            count = 0 if mask is None else int(mask.sum())
            if hom is not None and count >= min_inliers and _plausible(hom):
                inl = mask.ravel().astype(bool)
                fit, _ = cv2.findHomography(src[inl], dst[inl], 0)
                hom = fit if fit is not None and _plausible(fit) else hom
            else:
                hom = None
        if hom is not None:
            if refine:
                fine, cc = _ecc(gray(i), gray(j), hom, scale)
                if fine is not None and _plausible(fine) and cc >= min_ecc:
                    return fine, count, "features+ecc"
            return hom, count, "features"
        if not refine:
            return None, count, "failed"
        (dx, dy), _ = cv2.phaseCorrelate(gray(i), gray(j))
        init = np.array([[1.0, 0.0, dx / scale], [0.0, 1.0, dy / scale], [0.0, 0.0, 1.0]])
        fine, cc = _ecc(gray(i), gray(j), init, scale)
        if fine is not None and _plausible(fine) and cc >= min_ecc:
            return fine, count, "ecc"
        return None, count, "failed"

    order = sorted(range(n), key=lambda i: (abs(i - ref), i))[1:]
    for i in order:
        hom, count, how = estimate(i, ref)
        nb = i + 1 if i < ref else i - 1
        if hom is None and nb != ref:
            hom_nb, count_nb, how = estimate(i, nb)
            if hom_nb is not None:
                hom, count, chained[i] = homs[nb] @ hom_nb, count_nb, True
            else:
                count = max(count, count_nb)
        if hom is None:
            via = "" if nb == ref else f" or its neighbour frame {nb}"
            raise AtlasError(
                f"frame {i}: cannot register it to reference frame {ref}{via} "
                f"({count} feature inliers, need {min_inliers}; dense alignment also failed)"
            )
        homs[i] = hom / hom[2, 2]
        inliers[i], methods[i] = count, how
    return Registration(homographies=homs, reference=ref, inliers=inliers, chained=chained, methods=methods)


def _frame_grid(w: int, h: int) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    return np.stack([gx, gy, np.ones_like(gx)], axis=-1)


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = pts @ h.T
    return p[..., :2] / p[..., 2:3]


def _blend(
    frames: Sequence[np.ndarray], to_atlas: np.ndarray, size: tuple[int, int], blend: str, max_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    wa, ha = size
    n = len(frames)
    rows = max(1, min(ha, max_bytes // max(1, n * wa * 3 * 4)))
    image = np.zeros((ha, wa, 3), np.float32)
    covered = np.zeros((ha, wa), bool)
    ones = np.ones(frames[0].shape[:2], np.float32)
    for r0 in range(0, ha, rows):
        r1 = min(ha, r0 + rows)
        shift = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -r0], [0.0, 0.0, 1.0]])
        stack = np.full((n, r1 - r0, wa, 3), np.nan, np.float32)
        for t, frame in enumerate(frames):
            m = shift @ to_atlas[t]
            warped = cv2.warpPerspective(frame.astype(np.float32), m, (wa, r1 - r0), flags=cv2.INTER_LINEAR)
            cover = cv2.warpPerspective(ones, m, (wa, r1 - r0), flags=cv2.INTER_LINEAR)
            ok = cover > 0.999
            stack[t][ok] = warped[ok]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            band = np.nanmedian(stack, axis=0) if blend == "median" else np.nanmean(stack, axis=0)
        covered[r0:r1] = np.isfinite(band[..., 0])
        image[r0:r1] = np.nan_to_num(band, nan=0.0)
    return image, covered


def build_homography_atlas(
    frames: Sequence[np.ndarray],
    reference: int | None = None,
    blend: Literal["median", "mean"] = "median",
    fps: Fraction | None = None,
    detector: Literal["sift", "orb"] = "sift",
    min_inliers: int = 12,
    ransac_threshold: float = 1.5,
    max_blend_bytes: int = 256 * 2**20,
) -> Atlas:
    """A single-layer background atlas (mosaic) of a static scene or camera pan.

    The canvas bounds all warped frames; the reference frame lands on it by an integer
    offset, so its pixels map to atlas pixels exactly. Atlas pixels no frame covers are
    black (see ``meta["covered_fraction"]`` and :func:`render.atlas_validity_mask`).

    Args:
        frames: HxWx3 uint8 RGB frames.
        reference: reference frame index (default: middle frame).
        blend: ``median`` (robust to moving objects) or ``mean`` of the warped frames.
        fps: frame rate to record on the atlas.
        detector, min_inliers, ransac_threshold: passed to :func:`register_frames`.
        max_blend_bytes: memory bound of the blend; the canvas is blended in row bands.

    Raises:
        AtlasError: registration failed (names the frame) or the mosaic would be implausibly large.
    """
    if blend not in ("median", "mean"):
        raise ValueError(f"blend must be 'median' or 'mean', got {blend!r}")
    reg = register_frames(frames, reference, detector, min_inliers, ransac_threshold)
    h, w = frames[0].shape[:2]
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64)
    pts = np.concatenate([_apply(hm, corners) for hm in reg.homographies])
    lo, hi = np.floor(pts.min(0)), np.ceil(pts.max(0))
    wa, ha = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
    if max(wa, ha) > MAX_CANVAS_SIDE or wa * ha > 64 * w * h:
        raise AtlasError(f"mosaic would be {wa}x{ha} pixels for {w}x{h} frames: registration is implausible")
    offset = np.array([[1.0, 0.0, -lo[0]], [0.0, 1.0, -lo[1]], [0.0, 0.0, 1.0]])
    to_atlas = np.stack([offset @ hm for hm in reg.homographies])
    image, covered = _blend(frames, to_atlas, (wa, ha), blend, max_blend_bytes)
    grid = _frame_grid(w, h)
    uv = np.stack([_apply(m, grid) for m in to_atlas]).astype(np.float32)
    layer = AtlasLayer("background", np.clip(np.rint(image), 0, 255).astype(np.uint8), uv)
    meta = {
        "reference": reg.reference,
        "homographies": to_atlas.tolist(),
        "inliers": reg.inliers,
        "chained": reg.chained,
        "methods": reg.methods,
        "blend": blend,
        "covered_fraction": float(covered.mean()),
    }
    return Atlas(layers=[layer], alpha=None, method="homography", fps=fps, meta=meta)


def motion_masks(
    frames: Sequence[np.ndarray], atlas: Atlas, threshold: float = 0.1, open_px: int = 1
) -> list[np.ndarray]:
    """Rough per-frame foreground masks: pixels that differ from the background atlas.

    With a median-blended homography atlas, moving objects are absent from the mosaic, so
    where a frame differs from its re-rendered background is a rough mask of what moves.
    Useful to bootstrap the neural atlas's alpha when no segmentation masks are available.

    Args:
        frames: the frames the atlas was built from.
        atlas: a single-layer (background) atlas of those frames.
        threshold: mean absolute RGB difference in [0, 1] above which a pixel is foreground.
        open_px: radius of a morphological opening that removes isolated pixels (0: none).
    """
    rendered = render_frames(atlas)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_px + 1, 2 * open_px + 1))
    masks = []
    for frame, back in zip(frames, rendered):
        diff = np.abs(frame.astype(np.float32) - back.astype(np.float32)).mean(-1) / 255.0
        mask = (diff > threshold).astype(np.uint8)
        if open_px > 0:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        masks.append(mask.astype(bool))
    return masks
