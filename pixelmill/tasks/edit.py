"""Bulk-edit stages: SDEdit (fixed t0 or a per-image t0 search, optionally masked) and InstructPix2Pix.

Each stage maps a batch of input rows to one output row per input: an edited row, or a
reject with its reason (undecodable or oversized image, missing prompt, bad mask, ``nsfw``).
Rows are normalised on read, grouped by size, edited in batches with one generator per
row (seeded by the row id and the config seed, so a row's noise never depends on its
batch), and scored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pixelmill.datasets.images import IMAGE_TYPE, ImageError, encode_image, normalize_image
from pixelmill.tasks.metrics import ClipScorer, rgb_rmse
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, RowError, Stage

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_image", IMAGE_TYPE),
        ("edited_image", IMAGE_TYPE),
        ("edit_prompt", pa.string()),
        ("caption", pa.string()),
        ("method", pa.string()),
        ("strength", pa.float64()),
        ("t0_steps", pa.int64()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("image_guidance_scale", pa.float64()),
        ("seed", pa.int64()),
        ("l2", pa.float64()),
        ("clip_image_text", pa.float64()),
        ("clip_direction", pa.float64()),
        ("model", pa.string()),
        ("model_hash", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)


def row_seed(config_seed: int, row_id: str) -> int:
    """A 63-bit seed derived from the config seed and the row id (stable across runs)."""
    h = hashlib.blake2b(f"{config_seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFF_FFFF_FFFF_FFFF


def template_fields(template: str | None) -> list[str]:
    """The ``{column}`` names a prompt template uses (``{{`` and ``}}`` are literal braces)."""
    import string

    if not template:
        return []
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def fill_template(template: str | None, row: dict) -> str | None:
    """Fill ``{column}`` placeholders from the row; a missing or empty value is a row error."""
    fields = template_fields(template)
    if not fields:
        return template
    values = {}
    for f in fields:
        v = row.get(f)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise RowError(f"missing {f!r} for the prompt template")
        values[f] = v
    return template.format_map(values)


def input_columns(config: dict[str, Any]) -> list[str]:
    """The input columns the edit stage reads (``id`` first, then image, texts, templates)."""
    cols = ["id", config["image_column"]]
    for key in ("caption_column", "prompt_column", "instruction_column"):
        if config.get(key):
            cols.append(config[key])
    for key in ("prompt", "instruction"):
        cols += template_fields(config.get(key))
    for key in ("mask_column", "stroke_column"):
        if config.get(key):
            cols.append(config[key])
    return list(dict.fromkeys(cols))


class BulkEditor(Stage):
    """Shared row handling of the edit stages; subclasses implement ``edit``.

    Args:
        config: the bulk-edit config as a dict (``EditConfig.model_dump()``).
        resources: CPUs/GPUs per worker.
    """

    name = "edit"
    method = ""
    text_key = "prompt"
    extra_fields: tuple[pa.Field, ...] = ()

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        self.pipe = None
        self.clip: ClipScorer | None = None

    def setup(self) -> None:
        from pixelmill.models.device import resolve_device, resolve_dtype
        from pixelmill.models.loading import model_fingerprint

        self.device = resolve_device(self.config["device"])
        self.dtype = resolve_dtype(self.config["dtype"], self.device)
        self.pipe = self.load_pipeline()
        self.model_hash = model_fingerprint(self.config["model"])
        if self.config.get("adapters"):
            from pixelmill.models.adapters import apply_adapters

            from pixelmill.models.adapters import adapter_fingerprint

            self.adapters = apply_adapters(self.pipe, self.config["adapters"])
            self.model_hash += "+" + "+".join(adapter_fingerprint(a["path"]) for a in self.config["adapters"])
        if self.config.get("clip_model"):
            self.clip = ClipScorer(self.config["clip_model"], device=str(self.device))

    def load_pipeline(self):  # pragma: no cover - interface
        raise NotImplementedError

    def edit(self, images: list[Image.Image], texts: list[str], seeds: list[int]) -> list[dict]:
        """Edit same-size images; one dict per row with ``image`` and method fields, or ``reject``."""
        raise NotImplementedError  # pragma: no cover

    @property
    def output_schema(self) -> pa.Schema:
        """``OUTPUT_SCHEMA`` plus this editor's own result columns (``extra_fields``)."""
        return pa.schema(list(OUTPUT_SCHEMA) + list(self.extra_fields))

    def row_inputs(self, row: dict, image: Image.Image) -> dict:
        """Per-row inputs beyond image and text (a mask, a guide image); a ``RowError`` rejects the row.

        Args:
            row: the input row.
            image: the row's image, normalised to the working size.
        """
        return {}

    def edit_chunk(self, chunk: list[tuple]) -> list[dict]:
        """Edit one chunk of ``(index, image, text, seed, inputs)`` items (``inputs``: from ``row_inputs``)."""
        return self.edit([x[1] for x in chunk], [x[2] for x in chunk], [x[3] for x in chunk])

    def _row_text(self, row: dict) -> str:
        """The row's prompt/instruction: its column, or the config text with ``{column}`` filled in."""
        c = self.config
        column = c.get(f"{self.text_key}_column")
        text = row.get(column) if column else fill_template(c.get(self.text_key), row)
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"missing {self.text_key}" + (f" in column {column!r}" if column else ""))
        return text

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        rows = batch.to_pylist()
        out: list[dict] = [None] * len(rows)  # type: ignore[list-item]
        groups: dict[tuple[int, int], list[tuple[int, Image.Image, str, int, dict]]] = defaultdict(list)
        for i, row in enumerate(rows):
            try:
                raw = row.get(c["image_column"])
                if raw is None:
                    raise RowError(f"missing image in column {c['image_column']!r}")
                data = raw["bytes"] if isinstance(raw, dict) else raw
                try:
                    image = normalize_image(data or b"", c["resolution"], c["max_pixels"])
                except ImageError as e:
                    raise RowError(str(e)) from None
                text = self._row_text(row)
                extra = self.row_inputs(row, image)
            except RowError as e:
                out[i] = self._reject(row, e.reason)
                continue
            groups[image.size].append((i, image, text, row_seed(c["seed"], str(row["id"])), extra))

        for items in groups.values():
            for start in range(0, len(items), c["batch_size"]):
                chunk = items[start : start + c["batch_size"]]
                results = self._edit_isolating_failures(chunk)
                self._score(rows, chunk, results)
                for (i, image, text, seed, _), res in zip(chunk, results):
                    if res.get("reject"):
                        out[i] = self._reject(rows[i], res["reject"])
                    else:
                        out[i] = self._ok(rows[i], image, text, seed, res)
        return pa.Table.from_pylist(out, schema=self.output_schema)

    def _edit_isolating_failures(self, chunk) -> list[dict]:
        """Edit a chunk; if it fails, retry row by row so one bad row cannot sink the batch.

        A row that fails on its own becomes a reject naming the exception (a batch failure
        such as running out of memory is retried at batch size 1 first).
        """
        try:
            return self.edit_chunk(chunk)
        except Exception as batch_error:  # noqa: BLE001 - isolate, then report per row
            if len(chunk) == 1:
                return [{"reject": f"edit_failed: {type(batch_error).__name__}: {batch_error}"[:500]}]
        return [self._edit_isolating_failures([x])[0] for x in chunk]

    def _score(self, rows, chunk, results) -> None:
        idx = [k for k, r in enumerate(results) if not r.get("reject")]
        for k in idx:
            if "l2" not in results[k]:
                results[k]["l2"] = rgb_rmse(chunk[k][1], results[k]["image"])
        if self.clip is None or not idx:
            return
        cap = self.config.get("caption_column")
        img_text, direction = self.clip.score(
            [chunk[k][1] for k in idx],
            [results[k]["image"] for k in idx],
            [chunk[k][2] for k in idx],
            [rows[chunk[k][0]].get(cap) if cap else None for k in idx],
        )
        for j, k in enumerate(idx):
            results[k]["clip_image_text"] = img_text[j]
            results[k]["clip_direction"] = direction[j]

    def _base(self, row: dict) -> dict:
        cap = self.config.get("caption_column")
        return {
            "id": str(row.get("id")),
            "caption": row.get(cap) if cap else None,
            "method": self.method,
            "steps": self.config["steps"],
            "guidance_scale": self.config["guidance_scale"],
            "model": self.config["model"],
            "shard": row.get("shard"),
        }

    def _reject(self, row: dict, reason: str) -> dict:
        return {**self._base(row), "status": STATUS_REJECT, "error": reason, "stage": self.name}

    def _ok(self, row: dict, image: Image.Image, text: str, seed: int, res: dict) -> dict:
        edited: Image.Image = res["image"]
        return {
            **self._base(row),
            "input_image": encode_image(image),
            "edited_image": encode_image(edited),
            "edit_prompt": text,
            "strength": res.get("strength"),
            "t0_steps": res.get("t0_steps"),
            "image_guidance_scale": res.get("image_guidance_scale"),
            "seed": seed,
            "l2": res.get("l2"),
            "clip_image_text": res.get("clip_image_text"),
            "clip_direction": res.get("clip_direction"),
            "model_hash": self.model_hash,
            "width": edited.width,
            "height": edited.height,
            "status": STATUS_OK,
            **{f.name: res.get(f.name) for f in self.extra_fields},
        }

    def generators(self, seeds: list[int]):
        import torch

        return [torch.Generator("cpu").manual_seed(s) for s in seeds]


class SDEditEditor(BulkEditor):
    """SDEdit: noise the image to t0 and denoise with the prompt.

    ``strength`` in (0, 1] runs the diffusers image-to-image pipeline (any family the
    Auto pipeline loads). ``strength: auto`` searches, per image, the largest whole
    number of noised steps whose output stays within ``target_l2`` of the input, by
    binary search batched across rows; that needs an SD-shaped pipeline.
    """

    method = "sdedit"
    text_key = "prompt"

    def load_pipeline(self):
        from pixelmill.models.loading import load_img2img_pipeline, require_sd_shaped

        pipe = load_img2img_pipeline(self.config["model"], device=str(self.device), dtype=self.dtype)
        if self.config["strength"] == "auto":
            require_sd_shaped(pipe, "SDEdit t0 search")
        return pipe

    def edit(self, images, texts, seeds):
        c = self.config
        if c["strength"] == "auto":
            return self._search(images, texts, seeds)
        negative = [c["negative_prompt"]] * len(texts) if c.get("negative_prompt") else None
        result = self.pipe(
            prompt=texts,
            image=images,
            strength=c["strength"],
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance_scale"],
            negative_prompt=negative,
            generator=self.generators(seeds),
        )
        k = min(int(c["steps"] * c["strength"]), c["steps"])
        return _with_safety(result, [{"strength": k / c["steps"], "t0_steps": k} for _ in images])

    def _search(self, images, texts, seeds, masks=None, originals=None) -> list[dict]:
        """Binary-search t0 per row; ``masks``/``originals`` make it masked SDEdit (see ``sdedit_steps``).

        The faithfulness measured is RMSE to ``images`` (SDEdit's guides).
        """
        c = self.config
        steps, target = c["steps"], c["target_l2"]
        n = len(images)
        lo, hi = [0] * n, [steps] * n
        best: list[dict | None] = [None] * n
        nsfw: set[int] = set()
        while True:
            active = [i for i in range(n) if lo[i] < hi[i]]
            if not active:
                break
            mids = {i: (lo[i] + hi[i] + 1) // 2 for i in active}
            outs, flags = sdedit_steps(
                self.pipe, [images[i] for i in active], [texts[i] for i in active],
                [mids[i] for i in active], steps, c["guidance_scale"], c.get("negative_prompt"),
                [seeds[i] for i in active],
                masks=[masks[i] for i in active] if masks is not None else None,
                originals=[originals[i] for i in active] if originals is not None else None,
            )
            for j, i in enumerate(active):
                if flags[j]:
                    nsfw.add(i)
                    lo[i] = hi[i]
                    continue
                l2 = rgb_rmse(images[i], outs[j])
                if l2 <= target:
                    lo[i] = mids[i]
                    best[i] = {"image": outs[j], "l2": l2}
                else:
                    hi[i] = mids[i] - 1
        results = []
        for i in range(n):
            unedited = unedited_output(images[i], masks[i] if masks is not None else None,
                                       originals[i] if originals is not None else None)
            b = best[i] or {"image": unedited, "l2": rgb_rmse(images[i], unedited)}
            if i in nsfw:
                results.append({"reject": "nsfw"})
            else:
                results.append({"image": b["image"], "l2": b["l2"], "t0_steps": lo[i],
                                "strength": lo[i] / steps})
        return results


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

        pipe = load_img2img_pipeline(self.config["model"], device=str(self.device), dtype=self.dtype)
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


class InstructPix2PixEditor(BulkEditor):
    """InstructPix2Pix: edit each image by a written instruction (text and image guidance)."""

    method = "instruct_pix2pix"
    text_key = "instruction"

    def load_pipeline(self):
        from pixelmill.models.loading import load_instruct_pix2pix_pipeline

        return load_instruct_pix2pix_pipeline(self.config["model"], device=str(self.device), dtype=self.dtype)

    def edit(self, images, texts, seeds):
        c = self.config
        negative = [c["negative_prompt"]] * len(texts) if c.get("negative_prompt") else None
        result = self.pipe(
            prompt=texts,
            image=images,
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance_scale"],
            image_guidance_scale=c["image_guidance_scale"],
            negative_prompt=negative,
            generator=self.generators(seeds),
        )
        return _with_safety(result, [{"image_guidance_scale": c["image_guidance_scale"]} for _ in images])


def _with_safety(result, extras: list[dict]) -> list[dict]:
    """Pair pipeline images with extras; a safety-flagged image becomes a ``nsfw`` reject."""
    from pixelmill.models.loading import safety_flags

    flags = safety_flags(result)
    return [
        {"reject": "nsfw"} if flagged else {"image": image, **extra}
        for image, flagged, extra in zip(result.images, flags, extras)
    ]


def sdedit_steps(pipe, images, texts, ks, steps, guidance, negative, seeds, masks=None, originals=None):
    """SDEdit with a different number of noised steps ``k`` per row, in one batch.

    Each row is noised to the timestep ``steps - k`` places from the start of a
    ``steps``-step DDIM schedule (as diffusers' img2img does for strength ``k/steps``)
    and denoised from there; rows join the batch when their start step comes. ``k = 0``
    returns the input unchanged.

    With ``masks`` this is masked SDEdit (the SDEdit paper's editing and compositing):
    outside each row's mask, max-pooled to latent resolution, the latent is replaced
    after the initial noising and after every step by the original's latent noised to
    that step with the row's noise (the clean latent after the last step); after
    decoding, the original's pixels are pasted back outside the pixel mask, so they
    come back bit for bit.

    Args:
        pipe: an SD-shaped pipeline (see ``require_sd_shaped``).
        images: same-size RGB images, SDEdit's guides.
        texts: one prompt per row.
        ks: noised steps per row, 0 to ``steps``.
        steps: DDIM steps of the full schedule.
        guidance: classifier-free guidance scale (off at 1 or below).
        negative: negative prompt for every row, or None.
        seeds: one generator seed per row.
        masks: optional bool arrays (H, W), True where a row may change.
        originals: with ``masks``, the images kept outside them (default: ``images``);
            a row whose original is not its guide encodes both, drawing from its
            generator in the order guide, original, noise.

    Returns:
        (images, nsfw flags)
    """
    import torch
    from diffusers import DDIMScheduler

    device = pipe.unet.device
    dtype = pipe.unet.dtype
    n = len(images)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=device)
    timesteps = sched.timesteps
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    cfg = guidance > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(
            texts, device, 1, cfg, negative_prompt=[negative] * n if negative else None
        )
        sf = pipe.vae.config.scaling_factor

        def encode(ims, rows):
            x = pipe.image_processor.preprocess(ims).to(device=device, dtype=dtype)
            return [pipe.vae.encode(x[j : j + 1]).latent_dist.sample(gens[i]) * sf for j, i in enumerate(rows)]

        lat0 = torch.cat(encode(images, range(n)))
        keep0 = lmask = None
        if masks is not None:
            originals = list(originals) if originals is not None else list(images)
            own = [i for i in range(n) if originals[i] is not images[i]]
            keep0 = lat0.clone()
            if own:
                keep0[own] = torch.cat(encode([originals[i] for i in own], own))
            lmask = torch.stack([
                torch.nn.functional.adaptive_max_pool2d(
                    torch.from_numpy(np.asarray(m, dtype=np.float32))[None], tuple(lat0.shape[-2:]))
                for m in masks
            ]).to(device=device, dtype=dtype)
        noise = torch.cat(
            [torch.randn(lat0[i : i + 1].shape, generator=gens[i], dtype=torch.float32) for i in range(n)]
        ).to(device=device, dtype=dtype)

        def keep_outside(rows, t):
            """Outside the latent masks, the original latent noised to ``t`` (clean for t < 0)."""
            kept = keep0[rows] if t < 0 else sched.add_noise(keep0[rows], noise[rows], t.reshape(1))
            return lmask[rows] * lat[rows] + (1 - lmask[rows]) * kept

        lat = lat0.clone()
        alphas = sched.alphas_cumprod.to(device)
        final_alpha = sched.final_alpha_cumprod.to(device)
        stride = sched.config.num_train_timesteps // steps
        for i, k in enumerate(ks):
            if k > 0:
                t = timesteps[steps - k]
                lat[i : i + 1] = sched.add_noise(lat0[i : i + 1], noise[i : i + 1], t.reshape(1))
                if lmask is not None:
                    lat[i : i + 1] = keep_outside([i], t)
        for j, t in enumerate(timesteps):
            act = [i for i, k in enumerate(ks) if k > 0 and j >= steps - k]
            if not act:
                continue
            xa = lat[act]
            ca = cond[act]
            if cfg:
                eps = pipe.unet(torch.cat([xa, xa]), t, encoder_hidden_states=torch.cat([uncond[act], ca])).sample
                eu, ec = eps.chunk(2)
                eps = eu + guidance * (ec - eu)
            else:
                eps = pipe.unet(xa, t, encoder_hidden_states=ca).sample
            a_t = alphas[t]
            prev = t - stride
            a_prev = alphas[prev] if prev >= 0 else final_alpha
            x0 = (xa - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            lat[act] = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(dtype)
            if lmask is not None:
                lat[act] = keep_outside(act, prev).to(dtype)
        decoded = pipe.vae.decode(lat / sf).sample
        flags = [False] * n
        if getattr(pipe, "safety_checker", None) is not None:
            decoded, nsfw = pipe.run_safety_checker(decoded, device, cond.dtype)
            flags = [bool(f) for f in nsfw] if nsfw is not None else flags
        out = pipe.image_processor.postprocess(decoded, output_type="pil")
    results = [im.copy() if k == 0 else o for im, o, k in zip(images, out, ks)]
    if masks is not None:
        results = [paste_outside_mask(r, o, m) for r, o, m in zip(results, originals, masks)]
    return results, flags


def unedited_output(guide: Image.Image, mask: Any = None, original: Image.Image | None = None) -> Image.Image:
    """What (masked) SDEdit returns at t0 = 0: the guide, with the original pasted outside the mask."""
    if mask is None:
        return guide.copy()
    return paste_outside_mask(guide, original if original is not None else guide, mask)


def paste_outside_mask(edited: Image.Image, original: Image.Image, mask: Any) -> Image.Image:
    """``edited`` inside ``mask`` (bool H×W), ``original``'s exact pixels everywhere else.

    Raises:
        ValueError: the images and the mask differ in size.
    """

    e = np.asarray(edited.convert("RGB"))
    o = np.asarray(original.convert("RGB"))
    m = np.asarray(mask, dtype=bool)
    if e.shape != o.shape or m.shape != o.shape[:2]:
        raise ValueError(f"paste: edited {e.shape}, original {o.shape} and mask {m.shape} differ in size")
    return Image.fromarray(np.where(m[..., None], e, o), "RGB")
