"""Bulk-edit stages: SDEdit (fixed t0 or a per-image t0 search) and InstructPix2Pix.

Each stage maps a batch of input rows to one output row per input: an edited row, or a
reject with its reason (undecodable or oversized image, missing prompt, ``nsfw``).
Rows are normalised on read, grouped by size, edited in batches with one generator per
row (seeded by the row id and the config seed, so a row's noise never depends on its
batch), and scored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

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
        if self.config.get("clip_model"):
            self.clip = ClipScorer(self.config["clip_model"], device=str(self.device))

    def load_pipeline(self):  # pragma: no cover - interface
        raise NotImplementedError

    def edit(self, images: list[Image.Image], texts: list[str], seeds: list[int]) -> list[dict]:
        """Edit same-size images; one dict per row with ``image`` and method fields, or ``reject``."""
        raise NotImplementedError  # pragma: no cover

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
        groups: dict[tuple[int, int], list[tuple[int, Image.Image, str, int]]] = defaultdict(list)
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
            except RowError as e:
                out[i] = self._reject(row, e.reason)
                continue
            groups[image.size].append((i, image, text, row_seed(c["seed"], str(row["id"]))))

        for items in groups.values():
            for start in range(0, len(items), c["batch_size"]):
                chunk = items[start : start + c["batch_size"]]
                results = self._edit_isolating_failures(chunk)
                self._score(rows, chunk, results)
                for (i, image, text, seed), res in zip(chunk, results):
                    if res.get("reject"):
                        out[i] = self._reject(rows[i], res["reject"])
                    else:
                        out[i] = self._ok(rows[i], image, text, seed, res)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _edit_isolating_failures(self, chunk) -> list[dict]:
        """Edit a chunk; if it fails, retry row by row so one bad row cannot sink the batch.

        A row that fails on its own becomes a reject naming the exception (a batch failure
        such as running out of memory is retried at batch size 1 first).
        """
        try:
            return self.edit([x[1] for x in chunk], [x[2] for x in chunk], [x[3] for x in chunk])
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

    def _search(self, images, texts, seeds) -> list[dict]:
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
            b = best[i] or {"image": images[i].copy(), "l2": 0.0}
            if i in nsfw:
                results.append({"reject": "nsfw"})
            else:
                results.append({"image": b["image"], "l2": b["l2"], "t0_steps": lo[i],
                                "strength": lo[i] / steps})
        return results


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


def sdedit_steps(pipe, images, texts, ks, steps, guidance, negative, seeds):
    """SDEdit with a different number of noised steps ``k`` per row, in one batch.

    Each row is noised to the timestep ``steps - k`` places from the start of a
    ``steps``-step DDIM schedule (as diffusers' img2img does for strength ``k/steps``)
    and denoised from there; rows join the batch when their start step comes. ``k = 0``
    returns the input unchanged.

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
        x = pipe.image_processor.preprocess(images).to(device=device, dtype=dtype)
        sf = pipe.vae.config.scaling_factor
        lat0 = torch.cat(
            [pipe.vae.encode(x[i : i + 1]).latent_dist.sample(gens[i]) for i in range(n)]
        ) * sf
        noise = torch.cat(
            [torch.randn(lat0[i : i + 1].shape, generator=gens[i], dtype=torch.float32) for i in range(n)]
        ).to(device=device, dtype=dtype)
        lat = lat0.clone()
        alphas = sched.alphas_cumprod.to(device)
        final_alpha = sched.final_alpha_cumprod.to(device)
        stride = sched.config.num_train_timesteps // steps
        for i, k in enumerate(ks):
            if k > 0:
                t = timesteps[steps - k]
                lat[i : i + 1] = sched.add_noise(lat0[i : i + 1], noise[i : i + 1], t.reshape(1))
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
        decoded = pipe.vae.decode(lat / sf).sample
        flags = [False] * n
        if getattr(pipe, "safety_checker", None) is not None:
            decoded, nsfw = pipe.run_safety_checker(decoded, device, cond.dtype)
            flags = [bool(f) for f in nsfw] if nsfw is not None else flags
        out = pipe.image_processor.postprocess(decoded, output_type="pil")
    return [im.copy() if k == 0 else o for im, o, k in zip(images, out, ks)], flags
