"""What every bulk-edit stage shares: the output schema, row seeds, prompt templates, ``BulkEditor``.

``BulkEditor`` reads and normalises rows, rejects the bad ones with their reason,
groups the rest by size, edits them in batches (one generator per row, seeded by the
row id and the config seed, so a row's noise never depends on its batch), isolates
failures row by row and scores the results; subclasses implement ``edit``, or
``pipe_call`` when an edit is one call of the diffusers pipeline. The ``speed`` settings
(layout, compile, ``batch_size: auto``, decoding overlapped with the next batch's
denoising, image I/O threads) are applied here, once per worker, for every method.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pixelmill.datasets.images import IMAGE_TYPE, ImageError, encode_image, normalize_image
from pixelmill.datasets.text import TextError, table_rows, text_value
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
        ("notes", pa.list_(pa.string())),
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
    """Fill ``{column}`` placeholders from the row; a missing, empty or non-UTF-8 value is a row error."""
    fields = template_fields(template)
    if not fields:
        return template
    values = {}
    for f in fields:
        v = row.get(f)
        if isinstance(v, (bytes, str)) or v is None:
            try:
                v = text_value(v, f"{f!r} for the prompt template", max_chars=1 << 62)
            except TextError as e:
                raise RowError(str(e)) from None
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
    dataset = ("edits", 1)
    hub_model = True  # a hub ``model`` is fetched once per node before the actors start (models/hub.py)
    rows_per_call = 256  # a shard streams through the actor 256 images at a time

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return input_columns(config)

    method = ""
    text_key: str | None = "prompt"
    extra_fields: tuple[pa.Field, ...] = ()

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        self.pipe = None
        self.clip: ClipScorer | None = None
        self.batch_size: int | None = None  # config["batch_size"], with ``auto`` resolved by setup()
        self.tuning: list[str] = []  # what the speed settings did to the pipeline
        self._io: ThreadPoolExecutor | None = None
        self._decoder = None  # overlap.LatentDecoder, with speed.overlap_decode

    def setup(self) -> None:
        from pixelmill.models.device import resolve_device, resolve_dtype
        from pixelmill.models.loading import model_fingerprint

        self.device = resolve_device(self.config["device"])
        self.dtype = resolve_dtype(self.config["dtype"], self.device)
        self.pipe = self.load_pipeline()
        self.model_info = self.check_family(self.pipe)
        self.model_hash = model_fingerprint(self.config["model"], self.config.get("revision"))
        if self.config.get("adapters"):
            from pixelmill.models.adapters import adapter_fingerprint, apply_adapters

            self.adapters = apply_adapters(self.pipe, self.config["adapters"])
            self.model_hash += "+" + "+".join(adapter_fingerprint(a["path"]) for a in self.config["adapters"])
        if self.config.get("clip_model"):
            self.clip = ClipScorer(self.config["clip_model"], device=str(self.device))
        self.apply_speed()

    def apply_speed(self) -> None:
        """Apply the ``speed`` settings to the loaded pipeline and resolve ``batch_size: auto``.

        Called by ``setup`` after the model and its adapters are loaded; the batch size is
        measured before compiling, on the eager model.
        """
        from pixelmill.models.speed import auto_batch_size, tune_pipeline
        from pixelmill.tasks.edit.overlap import LatentDecoder, supports_overlap

        speed = self.config.get("speed") or {}
        overlap = bool(speed.get("overlap_decode")) and supports_overlap(self.pipe)
        self.tuning = tune_pipeline(self.pipe, channels_last=bool(speed.get("channels_last")))
        if self.config["batch_size"] == "auto":
            self.batch_size = auto_batch_size(self.pipe, self.config["resolution"], self.unet_rows_per_image(),
                                              self.device, overlap_decode=overlap)
        else:
            self.batch_size = int(self.config["batch_size"])
        self.tuning += tune_pipeline(self.pipe, compile=speed.get("compile") or "off",
                                     attention=speed.get("attention") or "auto", fuse_qkv=bool(speed.get("fuse_qkv")))
        if overlap:
            self._decoder = LatentDecoder(self.device)
            self.tuning.append("decode overlapped with the next batch")
        if speed.get("io_threads"):
            self._io = ThreadPoolExecutor(int(speed["io_threads"]), thread_name_prefix="pixelmill-io")

    def unet_rows_per_image(self) -> int:
        """Denoiser rows per image in one step: 2 with classifier-free guidance, else 1."""
        return 2 if self.config["guidance_scale"] > 1 else 1

    def _batch_size(self) -> int:
        """Rows per chunk: as set up, or (a stage whose setup is its own, as Text2Live's) the config's."""
        from pixelmill.models.speed import AUTO_BATCH_FALLBACK

        size = self.batch_size or self.config["batch_size"]
        return AUTO_BATCH_FALLBACK if size == "auto" else int(size)

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> type[BulkEditor]:
        """The stage class that runs ``config``: this one, unless a method picks a variant (masked SDEdit)."""
        return cls

    def edit_rgba(self, image: np.ndarray, valid: np.ndarray, row_id: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Edit one H×W×3 image outside a dataset (a video atlas layer): the RGBA result and its metrics.

        The edit is the image pass of this stage (one row named ``row_id``, so its seed is
        the row's); alpha is 255 where ``valid``. A rejected row raises ``RowError``.
        """
        table = pa.table({"id": pa.array([row_id], pa.string()),
                          "image": pa.array([encode_image(Image.fromarray(image))], IMAGE_TYPE)})
        row = self(table).to_pylist()[0]
        if row["status"] != STATUS_OK:
            raise RowError(str(row["error"]))
        from pixelmill.datasets.images import decode_image

        edited = decode_image(row["edited_image"]).convert("RGB")
        h, w = image.shape[:2]
        if edited.size != (w, h):
            edited = edited.resize((w, h), Image.Resampling.LANCZOS)
        rgba = np.dstack([np.asarray(edited, dtype=np.uint8), np.where(valid, 255, 0).astype(np.uint8)])
        info = {k: row.get(k) for k in ("model", "model_hash", "strength", "t0_steps", "l2", "clip_image_text",
                                        "clip_direction", "seed")}
        info["resolution"] = [row["width"], row["height"]]
        return rgba, info

    def check_family(self, pipe):
        """The loaded pipeline's ``ModelInfo``; an error unless the method's declared families include it.

        Preflight checked the model name already; this covers what loads on the worker.
        """
        from pixelmill import registry
        from pixelmill.models.family import family_of_pipeline, require_family

        info = family_of_pipeline(pipe)
        families = registry.get("edit", self.method).meta.get("families")
        if families:
            require_family(info, families, f"edit method {self.method!r}", self.config.get("model") or "")
        return info

    def load_options(self) -> dict[str, Any]:
        """The loader keywords every method passes: device, dtype, hub revision, safety checker."""
        return {"device": str(self.device), "dtype": self.dtype, "revision": self.config.get("revision"),
                "safety_checker": self.config.get("safety_checker") != "off"}

    def load_pipeline(self):  # pragma: no cover - interface
        raise NotImplementedError

    def pipe_call(self, images: list[Image.Image], texts: list[str], seeds: list[int]
                  ) -> tuple[dict[str, Any], list[dict]] | None:
        """The one pipeline call that edits these rows: ``(keyword arguments, method fields per row)``.

        None (the default) for a method that edits otherwise (its own loop): it implements
        ``edit`` instead. A method that is one call gets ``edit`` from here, and can have its
        decoding overlapped with the next batch (``speed.overlap_decode``).
        """
        return None

    def edit(self, images: list[Image.Image], texts: list[str], seeds: list[int]) -> list[dict]:
        """Edit same-size images; one dict per row with ``image`` and method fields, or ``reject``."""
        call = self.pipe_call(images, texts, seeds)
        if call is None:  # pragma: no cover - interface
            raise NotImplementedError
        kwargs, extras = call
        return _with_safety(self.pipe(**kwargs), extras)

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

    def _row_text(self, row: dict, notes: list[str]) -> str:
        """The row's prompt/instruction: its column, or the config text with ``{column}`` filled in.

        Null, empty and non-UTF-8 texts are row errors; text over ``MAX_TEXT_CHARS`` is
        cut, and the cut is recorded in ``notes``.
        """
        c = self.config
        cap = c.get("caption_column")
        if cap and isinstance(row.get(cap), bytes) and row[cap]:  # a binary caption column, or invalid UTF-8
            try:
                row[cap] = text_value(row[cap], f"caption in column {cap!r}", max_chars=1 << 62)
            except TextError as e:
                raise RowError(str(e)) from None
        if self.text_key is None:  # a method that reads no text (declared with ``text=None``)
            return ""
        column = c.get(f"{self.text_key}_column")
        text = row.get(column) if column else fill_template(c.get(self.text_key), row)
        try:
            return text_value(text, self.text_key + (f" in column {column!r}" if column else ""), notes=notes)
        except TextError as e:
            raise RowError(str(e)) from None

    def _read_row(self, row: dict) -> tuple[Image.Image, str, dict] | RowError:
        """The row's normalised image, text and extra inputs, or the ``RowError`` that rejects it."""
        c = self.config
        notes: list[str] = []
        try:
            raw = row.get(c["image_column"])
            if raw is None:
                raise RowError(f"missing image in column {c['image_column']!r}")
            data = raw["bytes"] if isinstance(raw, dict) else raw
            try:
                image = normalize_image(data or b"", c["resolution"], c["max_pixels"], notes=notes)
            except ImageError as e:
                raise RowError(str(e)) from None
            text = self._row_text(row, notes)
            extra = self.row_inputs(row, image)
        except RowError as e:
            return e
        row["__notes"] = notes
        return image, text, extra

    def _map_io(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``fn`` over ``items`` in order: on the I/O threads (``speed.io_threads``), else here."""
        if self._io is None:
            return [fn(x) for x in items]
        return list(self._io.map(fn, items))

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        rows = table_rows(batch)
        out: list[dict] = [None] * len(rows)  # type: ignore[list-item]
        groups: dict[tuple[int, int], list[tuple[int, Image.Image, str, int, dict]]] = defaultdict(list)
        for i, (row, read) in enumerate(zip(rows, self._map_io(self._read_row, rows))):
            if isinstance(read, RowError):
                out[i] = self._reject(row, read.reason)
                continue
            image, text, extra = read
            groups[image.size].append((i, image, text, row_seed(c["seed"], str(row["id"])), extra))

        size = self._batch_size()
        chunks = [items[start : start + size] for items in groups.values() for start in range(0, len(items), size)]
        total, done = sum(len(chunk) for chunk in chunks), 0
        for chunk, finished in self._edited(rows, chunks):
            for i, row_out in finished:
                out[i] = row_out
            done += len(chunk)
            self.beat(f"{done} of {total} rows edited")
        return pa.Table.from_pylist(out, schema=self.output_schema)

    def _finish(self, rows, chunk, results) -> list[tuple[int, dict]]:
        """Score a chunk's results and turn them into output rows ``(row index, row)``."""
        self._score(rows, chunk, results)

        def output_row(pair) -> tuple[int, dict]:
            (i, image, text, seed, _), res = pair
            if res.get("reject"):
                return i, self._reject(rows[i], res["reject"])
            return i, self._ok(rows[i], image, text, seed, res)

        return self._map_io(output_row, list(zip(chunk, results)))

    def _edited(self, rows, chunks) -> Iterator[tuple[list, list[tuple[int, dict]]]]:
        """Each chunk with its output rows, in order; with ``speed.overlap_decode`` a chunk is
        decoded and finished on the decoder's thread while the next one denoises."""
        if self._decoder is None:
            for chunk in chunks:
                yield chunk, self._finish(rows, chunk, self._edit_isolating_failures(chunk))
            return
        pending = None
        for chunk in chunks:
            future = results = call = None
            try:
                call = self.pipe_call([x[1] for x in chunk], [x[2] for x in chunk], [x[3] for x in chunk])
                if call is not None:
                    latents = self.pipe(**call[0], output_type="latent").images
            except Exception:  # noqa: BLE001 - the batch failed: row by row, as _edit_isolating_failures does
                results = [self._edit_isolating_failures([x])[0] for x in chunk]
            else:
                if call is None:  # not one pipeline call: edited here and now
                    results = self._edit_isolating_failures(chunk)
                else:
                    future = self._decoder.submit(latents, partial(self._decode_and_finish, rows, chunk, call[1]))
            if pending is not None:
                yield pending[0], self._collect(rows, *pending)
            pending = (chunk, future, results)
        if pending is not None:
            yield pending[0], self._collect(rows, *pending)

    def _decode_and_finish(self, rows, chunk, extras, latents) -> list[tuple[int, dict]]:
        from pixelmill.tasks.edit.overlap import decode_latents

        return self._finish(rows, chunk, _with_safety(decode_latents(self.pipe, latents), extras))

    def _collect(self, rows, chunk, future, results) -> list[tuple[int, dict]]:
        """A pending chunk's output rows: its decoder's, or made here (edited here, or its decoding failed)."""
        if future is not None:
            try:
                return future.result()
            except Exception:  # noqa: BLE001 - decoding failed: edit again here, isolating failures
                results = self._edit_isolating_failures(chunk)
        return self._finish(rows, chunk, results)

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
        caption = row.get(cap) if cap else None
        return {
            "id": str(row.get("id")),
            "caption": caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption,  # rejects only
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
            "notes": row.get("__notes") or None,
            "status": STATUS_OK,
            **{f.name: res.get(f.name) for f in self.extra_fields},
        }

    def generators(self, seeds: list[int]):
        import torch

        return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _with_safety(result, extras: list[dict]) -> list[dict]:
    """Pair pipeline images with extras; a safety-flagged image becomes a ``nsfw`` reject."""
    from pixelmill.models.loading import safety_flags

    flags = safety_flags(result)
    return [
        {"reject": "nsfw"} if flagged else {"image": image, **extra}
        for image, flagged, extra in zip(result.images, flags, extras)
    ]
