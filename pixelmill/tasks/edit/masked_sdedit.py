"""Masked SDEdit: ``MaskedSDEditEditor`` and its mask helpers (read, stroke region, resize, dilate).

The compositing itself (latents kept outside the mask at every step, original pixels
pasted back) is in :func:`pixelmill.tasks.edit.sdedit.sdedit_steps`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pixelmill.datasets.images import ImageError, normalize_image
from pixelmill.tasks.edit.sdedit import SDEditEditor, sdedit_steps
from pixelmill.tasks.metrics import rgb_rmse
from pixelmill.tasks.stage import RowError


class MaskedSDEditEditor(SDEditEditor):
    """Masked SDEdit: the SDEdit paper's stroke-based editing and image compositing.

    The guide (the input, or with ``stroke_column`` the stroke-painted input) is noised
    to t0 and denoised with the prompt; at every step, outside the edit region (max-pooled
    to latent resolution) the latent is replaced by the original image's latent noised
    to that step with the same noise, so the edit blends into kept surroundings (see
    ``sdedit_steps``). After decoding, the original pixels are pasted back everywhere
    outside the dilated edit region.

    The region comes from ``mask_column`` (nonzero = edit) or, with ``stroke_column``,
    from where the stroke image differs from the input by more than ``stroke_threshold``
    in some channel. It is read at the input's own size (a mask or stroke image of
    another size is a reject), brought to the working size conservatively (a working
    pixel is in the region when any source pixel under it is), then grown by
    ``mask_dilation`` pixels (square).

    Guarantee: outside the dilated region every pixel of ``edited_image`` equals
    ``input_image``, the input as the stage normalises it (8-bit RGB, EXIF-rotated, long
    side resized to ``resolution`` and snapped to multiples of 8). When the input is
    already an RGB image of that size, normalising leaves it as is, so those pixels are
    the input file's own, bit for bit.

    ``strength`` may be fixed or ``auto`` (the t0 search, measured against the guide).
    ``l2`` is the RMSE to the guide (SDEdit's faithfulness; with ``mask_column`` the guide
    is the input). ``mask_fraction`` is the fraction of output pixels allowed to change.
    Needs an SD-shaped pipeline. Rows with a missing, undecodable, empty or wrong-size
    mask (or stroke image) are rejects naming the problem.
    """

    extra_fields = (pa.field("mask_fraction", pa.float64()),)

    def load_pipeline(self):
        from pixelmill.models.loading import load_img2img_pipeline, require_sd_shaped

        pipe = load_img2img_pipeline(self.config["model"], **self.load_options())
        require_sd_shaped(pipe, "masked SDEdit")
        return pipe

    def row_inputs(self, row: dict, image: Image.Image) -> dict:
        c = self.config
        column = c.get("mask_column") or c["stroke_column"]
        kind = "mask" if c.get("mask_column") else "stroke"
        cell = row.get(column)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise RowError(f"{kind}_missing: no image in column {column!r}")
        source = _image_bytes(row.get(c["image_column"]))
        try:
            size = oriented_size(source)
            if kind == "mask":
                guide, region = image, read_mask(data, size)
            else:
                guide = normalize_image(data, c["resolution"], c["max_pixels"])
                region = stroke_region(source, data, c["stroke_threshold"], c["max_pixels"])
        except ImageError as e:
            raise RowError(f"{kind}_{e.reason}: {e.detail}" if e.detail else f"{kind}_{e.reason}") from None
        except Exception as e:  # noqa: BLE001 - a bad mask is a reject, never a failed batch
            raise RowError(f"{kind}_undecodable: {type(e).__name__}: {e}"[:500]) from None
        if not region.any():
            detail = ("has no nonzero pixel" if kind == "mask" else
                      f"differs from the input by at most stroke_threshold={c['stroke_threshold']} everywhere")
            raise RowError(f"{kind}_empty: the {kind} in column {column!r} {detail}")
        if guide.size != image.size:
            raise RowError(f"{kind}_size_mismatch: guide is {guide.size}, the image {image.size}")
        mask = dilate_mask(resize_mask(region, image.size), c["mask_dilation"])
        return {"guide": guide, "mask": mask, "mask_fraction": float(mask.mean())}

    def pipe_call(self, images, texts, seeds):
        """None: masked SDEdit is its own loop (``sdedit_steps``), never one img2img call."""
        return None

    def edit_chunk(self, chunk: list[tuple]) -> list[dict]:
        c = self.config
        images, texts, seeds = [x[1] for x in chunk], [x[2] for x in chunk], [x[3] for x in chunk]
        guides, masks = [x[4]["guide"] for x in chunk], [x[4]["mask"] for x in chunk]
        if c["strength"] == "auto":
            results = self._search(guides, texts, seeds, masks=masks, originals=images)
        else:
            steps = c["steps"]
            k = min(int(steps * c["strength"]), steps)
            outs, flags = sdedit_steps(self.pipe, guides, texts, [k] * len(chunk), steps, c["guidance_scale"],
                                       c.get("negative_prompt"), seeds, masks=masks, originals=images)
            results = [
                {"reject": "nsfw"} if flag else
                {"image": out, "l2": rgb_rmse(guide, out), "strength": k / steps, "t0_steps": k}
                for out, flag, guide in zip(outs, flags, guides)
            ]
        for res, item in zip(results, chunk):
            if not res.get("reject"):
                res["mask_fraction"] = item[4]["mask_fraction"]
        return results


def _image_bytes(cell: Any) -> bytes:
    return (cell.get("bytes") if isinstance(cell, dict) else cell) or b""


def oriented_size(data: bytes) -> tuple[int, int]:
    """An encoded image's (width, height) after EXIF orientation, read from its header only."""
    import io

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001
        raise ImageError("undecodable", f"{type(e).__name__}: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask image into a bool array (True = edit) of the source image's ``size``.

    A pixel is in the region when its grey level is nonzero and, for masks with
    transparency, it is not fully transparent. The size is checked from the header
    before any pixel is decoded (so the image's ``max_pixels`` bounds the mask too).

    Raises:
        ImageError: ``undecodable`` or ``size_mismatch``.
    """
    import io

    from PIL import ImageOps

    mask_size = oriented_size(data)
    if mask_size != tuple(size):
        raise ImageError("size_mismatch", f"mask is {mask_size[0]}x{mask_size[1]}, the image {size[0]}x{size[1]}")
    try:
        im = Image.open(io.BytesIO(bytes(data)))
        im.load()
        im = ImageOps.exif_transpose(im)
        region = np.asarray(im.convert("L")) > 0
        if "A" in im.getbands() or "transparency" in im.info:
            region &= np.asarray(im.convert("RGBA").getchannel("A")) > 0
    except Exception as e:  # noqa: BLE001
        raise ImageError("undecodable", f"{type(e).__name__}: {e}") from None
    return region


def stroke_region(image: bytes, strokes: bytes, threshold: int, max_pixels: int) -> np.ndarray:
    """Where a stroke-painted copy differs from the image: any channel by more than ``threshold``.

    Both are compared at the image's own size (decoded to RGB the way the stage reads
    images, without resizing), so thin strokes are not averaged away.

    Raises:
        ImageError: the stroke image is undecodable or of another size.
    """

    size = oriented_size(image)
    stroke_size = oriented_size(strokes)
    if stroke_size != size:
        raise ImageError("size_mismatch",
                         f"stroke image is {stroke_size[0]}x{stroke_size[1]}, the image {size[0]}x{size[1]}")
    a = np.asarray(normalize_image(image, max(size), max_pixels, multiple=1), dtype=np.int16)
    b = np.asarray(normalize_image(strokes, max(size), max_pixels, multiple=1), dtype=np.int16)
    return np.abs(a - b).max(axis=-1) > threshold


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bring a bool mask to ``size`` (width, height) conservatively: True wherever any source pixel is."""

    if mask.shape == (size[1], size[0]):
        return mask.copy()
    area = Image.fromarray(mask.astype(np.float32), "F").resize(size, Image.Resampling.BOX)
    return np.asarray(area) > 0


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by ``radius`` pixels (square structuring element, separable max filter)."""
    import torch

    if radius <= 0 or not mask.any():
        return mask.copy()
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * radius + 1
    t = torch.nn.functional.max_pool2d(t, (1, k), stride=1, padding=(0, radius))
    t = torch.nn.functional.max_pool2d(t, (k, 1), stride=1, padding=(radius, 0))
    return t[0, 0].numpy() > 0
