"""Render frames from a (possibly edited) layered atlas, and paint edits onto atlas images.

Rendering is the same for every atlas method: each layer image is sampled bilinearly
through the frame's UV map (``cv2.remap``), and the foreground is composited over the
background with the frame's alpha. With the unedited layer images this reconstructs the
video; with an edited image the edit moves with the content it was painted on.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pixelmill.tasks.video.atlas import Atlas, AtlasError


def _scaled_uv(uv: np.ndarray, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> np.ndarray:
    if src_shape[:2] == dst_shape[:2]:
        return uv
    sx = dst_shape[1] / src_shape[1]
    sy = dst_shape[0] / src_shape[0]
    out = np.empty_like(uv)
    out[..., 0] = (uv[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (uv[..., 1] + 0.5) * sy - 0.5
    return out


def sample_layer(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` (HaxWaxC) at one frame's ``uv`` (HxWx2) -> float32 HxWxC.

    Coordinates outside the image take the nearest edge pixel.
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    return cv2.remap(
        img,
        np.ascontiguousarray(uv[..., 0]),
        np.ascontiguousarray(uv[..., 1]),
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    ).reshape(uv.shape[:2] + (img.shape[2] if img.ndim == 3 else 1,))


def render_frames(
    atlas: Atlas, layer_images: Sequence[np.ndarray | None] | None = None
) -> list[np.ndarray]:
    """The video frames seen through the atlas, HxWx3 uint8 RGB.

    Args:
        atlas: the atlas (UV maps and alpha).
        layer_images: replacement layer images (e.g. edited), one per layer, None to keep a
            layer's own image. A replacement may have a different resolution than the
            original layer (e.g. an upscaled atlas): its UV coordinates are rescaled.
    """
    images = [layer.image for layer in atlas.layers]
    if layer_images is not None:
        if len(layer_images) != len(images):
            raise AtlasError(f"got {len(layer_images)} layer images for {len(images)} layers")
        images = [orig if new is None else np.asarray(new) for orig, new in zip(images, layer_images)]
    uvs = [
        _scaled_uv(layer.uv, layer.image.shape, img.shape) for layer, img in zip(atlas.layers, images)
    ]
    images = [np.ascontiguousarray(img, dtype=np.float32) for img in images]
    frames = []
    for t in range(atlas.num_frames):
        out = sample_layer(images[0], uvs[0][t])
        if atlas.alpha is not None:
            fg = sample_layer(images[1], uvs[1][t])
            a = atlas.alpha[t][..., None]
            out = a * fg + (1.0 - a) * out
        frames.append(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    return frames


def composite_edit(atlas_image: np.ndarray, edit_rgba: np.ndarray) -> np.ndarray:
    """Alpha-over of a straight-alpha RGBA edit layer onto an atlas image.

    Pixels whose edit alpha is below 1/255 are returned bit-identical to ``atlas_image``.

    Args:
        atlas_image: Ha x Wa x 3 uint8.
        edit_rgba: Ha x Wa x 4, uint8 (0–255) or float (0–1), straight (not premultiplied) alpha.
    """
    base = np.asarray(atlas_image)
    edit = np.asarray(edit_rgba)
    if edit.shape[:2] != base.shape[:2] or edit.ndim != 3 or edit.shape[2] != 4:
        raise AtlasError(f"edit must be {base.shape[0]}x{base.shape[1]}x4 RGBA, got {edit.shape}")
    scale = 255.0 if edit.dtype == np.uint8 else 1.0
    rgb = edit[..., :3].astype(np.float32) * (255.0 / scale)
    alpha = edit[..., 3:].astype(np.float32) / scale
    mixed = np.clip(np.rint(alpha * rgb + (1.0 - alpha) * base.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.where(alpha >= 1.0 / 255.0, mixed, base).astype(np.uint8)


def atlas_validity_mask(atlas: Atlas, layer: int = 0, min_visibility: float = 0.5) -> np.ndarray:
    """Atlas pixels of ``layer`` that some frame shows (bool Ha x Wa).

    A frame pixel counts when the layer's visibility there (1 − alpha for the background,
    alpha for the foreground) is at least ``min_visibility``; it marks the (up to four)
    atlas pixels its bilinear sample reads. Editors use this to see where paint will show.
    """
    lay = atlas.layers[layer]
    ha, wa = lay.image.shape[:2]
    seen = np.zeros((ha, wa), dtype=bool)
    vis = atlas.visibility(layer)
    for t in range(atlas.num_frames):
        uv = lay.uv[t][vis[t] >= min_visibility]
        x0 = np.floor(uv[:, 0]).astype(np.int64)
        y0 = np.floor(uv[:, 1]).astype(np.int64)
        for dx in (0, 1):
            for dy in (0, 1):
                x, y = x0 + dx, y0 + dy
                ok = (x >= 0) & (x < wa) & (y >= 0) & (y < ha)
                seen[y[ok], x[ok]] = True
    return seen


def overlay_edit(
    frames: Sequence[np.ndarray], atlas: Atlas, layer: int, edit_rgba: np.ndarray
) -> list[np.ndarray]:
    """Composite an RGBA edit painted on one atlas layer over the original frames.

    The edit layer (straight alpha, the layer image's size) is sampled through each
    frame's UV map of ``layer`` (premultiplied, so transparent paint never bleeds colour)
    and weighted by that layer's visibility in the frame (``1 - alpha`` for the
    background, ``alpha`` for the foreground of a neural atlas). Frame pixels where the
    sampled edit is fully transparent come back bit-identical to the input frames, so
    the atlas's reconstruction error only shows where the edit is.

    Args:
        frames: the original HxWx3 uint8 frames the atlas was made from.
        atlas: their atlas.
        layer: index of the edited layer.
        edit_rgba: Ha x Wa x 4 uint8 straight-alpha edit of ``atlas.layers[layer].image``.
    """
    lay = atlas.layers[layer]
    edit = np.asarray(edit_rgba)
    if edit.shape[:2] != lay.image.shape[:2] or edit.ndim != 3 or edit.shape[2] != 4:
        raise AtlasError(f"edit must be {lay.image.shape[0]}x{lay.image.shape[1]}x4 RGBA, got {edit.shape}")
    if len(frames) != atlas.num_frames:
        raise AtlasError(f"got {len(frames)} frames for an atlas of {atlas.num_frames}")
    alpha = edit[..., 3:4].astype(np.float32) / 255.0
    premultiplied = np.concatenate([edit[..., :3].astype(np.float32) * alpha, alpha], axis=-1)
    visibility = atlas.visibility(layer)
    out = []
    for t, frame in enumerate(frames):
        s = sample_layer(premultiplied, lay.uv[t])
        vis = visibility[t][..., None]
        cover = s[..., 3:4] * vis
        mixed = frame.astype(np.float32) * (1.0 - cover) + s[..., :3] * vis
        mixed = np.where(cover > 0.0, mixed, frame.astype(np.float32))
        out.append(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
    return out
