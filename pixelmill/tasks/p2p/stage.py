"""``PairRenderStage``: InstructPix2Pix's image stage, its output schema and score columns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from pixelmill.datasets.images import IMAGE_TYPE, encode_image
from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.p2p.sampling import _check_size, require_p2p_pipeline, sample_params
from pixelmill.tasks.pair_filter import (
    CaptionDecision,
    ClipPairFilter,
    FilterThresholds,
    PairScores,
    decide_caption,
    rank_key,
    threshold_failures,
)
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, RowError, Stage

STATUS_DROPPED = "dropped"


INPUT_COLUMNS = ["id", "caption", "edit_prompt", "edited_caption"]

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parent_id", pa.string()),
        ("status", pa.string()),
        ("input_image", IMAGE_TYPE),
        ("edited_image", IMAGE_TYPE),
        ("edit_prompt", pa.string()),
        ("caption", pa.string()),
        ("edited_caption", pa.string()),
        ("sample", pa.int64()),
        ("seed", pa.int64()),
        ("p", pa.float64()),
        ("cfg", pa.float64()),
        ("steps", pa.int64()),
        ("cross_replace", pa.bool_()),
        ("clip_image_similarity", pa.float64()),
        ("clip_direction", pa.float64()),
        ("clip_source_caption", pa.float64()),
        ("clip_edited_caption", pa.float64()),
        ("rank", pa.int64()),
        ("model", pa.string()),
        ("model_hash", pa.string()),
        ("clip_model", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("drop_reason", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)

DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "dtype": "auto",
    "samples_per_caption": 100,
    "steps": 25,
    "height": 64,
    "width": 64,
    "p_range": (0.1, 0.9),
    "cfg_range": (7.5, 15.0),
    "cross_replace": False,
    "seed": 0,
    "batch_size": 4,
    "clip_model": None,
    "min_image_similarity": 0.7,
    "min_direction": 0.2,
    "min_image_caption": 0.2,
    "max_per_caption": 4,
}


@dataclass
class _Sample:
    row: int
    k: int
    seed: int
    p: float
    cfg: float
    outcome: PairScores | str | None = None
    images: tuple[Image.Image, Image.Image] | None = None


@dataclass
class _Caption:
    row: dict
    texts: tuple[str, str, str]
    samples: list[_Sample] = field(default_factory=list)
    done: int = 0


class PairRenderStage(Stage):
    """InstructPix2Pix's image stage: K Prompt-to-Prompt pairs per caption, CLIP-filtered.

    For each input row (``id``, ``caption``, ``edit_prompt``, ``edited_caption``) it renders
    ``samples_per_caption`` pairs. Sample ``k`` uses seed
    ``row_seed(seed, f"{id}:{k}")``; its ``p ~ U(p_range)`` and ``cfg ~ U(cfg_range)`` come
    from ``numpy.random.default_rng(that seed)`` (see ``sample_params``), so a sample is the
    same whatever batch it lands in. Samples of all rows are rendered ``batch_size``
    pairs per UNet batch (4·batch_size UNet rows with guidance), scored with
    ``ClipPairFilter`` and decided per caption by ``decide_caption``; only the images that
    can still be kept are held in memory.

    Output contract: ONE table (``OUTPUT_SCHEMA``); ``status`` says where a row goes.

    - ``ok`` (→ data): a kept pair. ``id`` = ``f"{caption_id}-{k:03d}"``, ``parent_id`` =
      caption id, ``input_image`` / ``edited_image`` (HF ``Image`` structs, PNG),
      ``edit_prompt``, ``caption``, ``edited_caption``, ``sample`` (k), ``seed``, ``p``,
      ``cfg``, ``steps``, ``cross_replace``, ``clip_image_similarity``, ``clip_direction``,
      ``clip_source_caption``, ``clip_edited_caption``, ``rank`` (1 = best direction),
      ``model``, ``model_hash``, ``clip_model``, ``width``, ``height``. At most
      ``max_per_caption`` per caption, in rank order.
    - ``dropped`` (→ ``__dropped/``): a sample filtered out by design; the same columns
      with null images, plus ``drop_reason``: the failed thresholds joined by ``;``
      (``image_similarity<0.7;direction<0.2``), ``direction_undefined``,
      ``surplus_rank>4`` (passed every threshold, ranked past ``max_per_caption``;
      ``rank`` set), ``nsfw`` (safety checker flagged it; no scores) or
      ``render_failed: …``.
    - ``reject`` (→ ``__rejects/``): a caption with no kept pair. ``id`` = caption id,
      ``parent_id`` null, ``stage`` = ``pairs``, ``error``: ``nsfw`` (every sample
      flagged), ``no_sample_passed_clip_filter: best image_similarity=…, direction=…,
      source_caption=…, edited_caption=… (…)`` (the sample closest to passing, whose
      scores also fill the ``clip_*`` columns), ``render_failed: …``, or a row problem
      (``missing 'edited_caption'``, ``edited_caption equals caption``).

    Accounting: every input id is the ``parent_id`` of ≥ 1 ``ok`` row or the ``id`` of
    exactly one ``reject`` row, never both; ``dropped`` rows name their caption in
    ``parent_id``.

    Args:
        config: Keys ``model`` (SD text-to-image pipeline, required), ``clip_model``
            (open_clip model, required), and the optional keys of ``DEFAULTS``.
        resources: CPUs/GPUs per worker.
    """

    name = "pairs"
    dataset = ("pairs", 1)
    hub_model = True  # a hub ``model``: fetched once per node before the actors start (models/hub.py)
    rows_per_call = 256  # captions per call: a shard streams through the actor, its memory stays flat

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        return list(INPUT_COLUMNS)


    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        c = {**DEFAULTS, **config}
        for key in ("model", "clip_model"):
            if not c.get(key):
                raise ValueError(f"pair rendering config needs {key!r}")
        for key, lo, hi in (("p_range", 0.0, 1.0), ("cfg_range", 0.0, math.inf)):
            r = c[key]
            if len(r) != 2 or not (lo <= float(r[0]) <= float(r[1]) <= hi):
                raise ValueError(f"{key} must be [low, high] with {lo} <= low <= high <= {hi}; got {r}")
        for key in ("samples_per_caption", "steps", "batch_size", "max_per_caption"):
            if int(c[key]) < 1:
                raise ValueError(f"{key} must be at least 1; got {c[key]}")
        super().__init__(c, resources)
        self.thresholds = FilterThresholds(
            min_image_similarity=float(c["min_image_similarity"]),
            min_direction=float(c["min_direction"]),
            min_image_caption=float(c["min_image_caption"]),
            max_per_caption=int(c["max_per_caption"]),
        )
        self.pipe = None
        self.filter: ClipPairFilter | None = None

    def setup(self) -> None:
        from pixelmill.models.device import resolve_device, resolve_dtype
        from pixelmill.models.loading import load_text2img_pipeline, model_fingerprint
        from pixelmill.tasks.metrics import ClipScorer

        c = self.config
        self.device = resolve_device(c["device"])
        self.dtype = resolve_dtype(c["dtype"], self.device)
        self.pipe = load_text2img_pipeline(c["model"], device=str(self.device), dtype=self.dtype,
                                           revision=c.get("revision"), safety_checker=c.get("safety_checker") != "off")
        require_p2p_pipeline(self.pipe)
        if c.get("adapters"):
            from pixelmill.models.adapters import apply_adapters

            apply_adapters(self.pipe, c["adapters"])
        _check_size(self.pipe, int(c["height"]), int(c["width"]))
        self.model_hash = model_fingerprint(c["model"], c.get("revision"))
        self.filter = ClipPairFilter(ClipScorer(c["clip_model"], device=str(self.device)), self.thresholds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        rows = batch.to_pylist()
        out: list[list[dict]] = [[] for _ in rows]
        captions: dict[int, _Caption] = {}
        queue: list[_Sample] = []
        for i, row in enumerate(rows):
            try:
                texts = self._texts(row)
            except RowError as e:
                out[i] = [self._reject(row, e.reason)]
                continue
            cap = captions[i] = _Caption(row=row, texts=texts)
            for k in range(int(c["samples_per_caption"])):
                seed = row_seed(int(c["seed"]), f"{row['id']}:{k}")
                p, cfg = sample_params(seed, c["p_range"], c["cfg_range"])
                cap.samples.append(_Sample(i, k, seed, p, cfg))
            queue += cap.samples
        bs = int(c["batch_size"])
        for start in range(0, len(queue), bs):
            chunk = queue[start : start + bs]
            self._render_isolating(chunk, captions)
            self._score(chunk, captions)
            for i in dict.fromkeys(s.row for s in chunk):
                cap = captions[i]
                cap.done += sum(1 for s in chunk if s.row == i)
                if cap.done == len(cap.samples):
                    out[i] = self._finish(cap)
                else:
                    self._prune(cap)
            self.beat(f"{start + len(chunk)} of {len(queue)} samples rendered")
        return pa.Table.from_pylist([r for rs in out for r in rs], schema=OUTPUT_SCHEMA)

    def _texts(self, row: dict) -> tuple[str, str, str]:
        if row.get("id") is None:
            raise RowError("missing 'id'")
        vals = []
        for key in ("caption", "edit_prompt", "edited_caption"):
            v = row.get(key)
            if not isinstance(v, str) or not v.strip():
                raise RowError(f"missing {key!r}")
            vals.append(v)
        if _normalize(vals[0]) == _normalize(vals[2]):
            raise RowError("edited_caption equals caption")
        return vals[0], vals[1], vals[2]

    def _render_isolating(self, chunk: list[_Sample], captions: dict[int, _Caption]) -> None:
        """Render a chunk; if it fails, retry sample by sample so one failure cannot sink the rest."""
        # Looked up on the package at call time, so patching ``p2p.render_pairs`` reaches here.
        from pixelmill.tasks import p2p

        c = self.config
        texts = [captions[s.row].texts for s in chunk]
        try:
            res = p2p.render_pairs(
                self.pipe, [t[0] for t in texts], [t[2] for t in texts], [s.seed for s in chunk],
                [s.p for s in chunk], [s.cfg for s in chunk], int(c["steps"]), int(c["height"]),
                int(c["width"]), cross_replace=bool(c["cross_replace"]),
            )
        except Exception as error:  # noqa: BLE001 - isolate, then report per sample
            if len(chunk) == 1:
                chunk[0].outcome = f"render_failed: {type(error).__name__}: {error}"[:500]
                return
            for s in chunk:
                self._render_isolating([s], captions)
            return
        for s, pair, flagged in zip(chunk, res.pairs, res.nsfw):
            if flagged:
                s.outcome = "nsfw"
            else:
                s.images = pair

    def _score(self, chunk: list[_Sample], captions: dict[int, _Caption]) -> None:
        todo = [s for s in chunk if s.images is not None and s.outcome is None]
        if not todo:
            return
        scores = self.filter.score(
            [s.images[0] for s in todo], [s.images[1] for s in todo],
            [captions[s.row].texts[0] for s in todo], [captions[s.row].texts[2] for s in todo],
        )
        for s, sc in zip(todo, scores):
            s.outcome = sc

    def _prune(self, cap: _Caption) -> None:
        """Free the images of samples that can no longer be kept (failed, or out-ranked by enough passers)."""
        passers = [s for s in cap.samples
                   if isinstance(s.outcome, PairScores) and not threshold_failures(s.outcome, self.thresholds)]
        passers.sort(key=lambda s: rank_key(s.outcome, s.k))
        keep = {id(s) for s in passers[: self.thresholds.max_per_caption]}
        for s in cap.samples:
            if s.images is not None and s.outcome is not None and id(s) not in keep:
                s.images = None

    def _finish(self, cap: _Caption) -> list[dict]:
        decision: CaptionDecision = decide_caption([s.outcome for s in cap.samples], self.thresholds)
        rows: list[dict] = []
        if decision.reject is not None:
            best = cap.samples[decision.best] if decision.best is not None else None
            rows.append(self._reject(cap.row, decision.reject,
                                     best.outcome if best is not None else None))
        kept, dropped = [], []
        for s, d in zip(cap.samples, decision.decisions):
            if d.keep:
                kept.append((d.rank, self._sample_row(cap, s, STATUS_OK, d.rank, None)))
            else:
                dropped.append(self._sample_row(cap, s, STATUS_DROPPED, d.rank, d.reason))
            s.images = None
        rows += [r for _, r in sorted(kept, key=lambda x: x[0])] + dropped
        return rows

    def _base(self, row: dict) -> dict:
        c = self.config
        return {
            "caption": row.get("caption"),
            "edit_prompt": row.get("edit_prompt"),
            "edited_caption": row.get("edited_caption"),
            "steps": int(c["steps"]),
            "cross_replace": bool(c["cross_replace"]),
            "model": c["model"],
            "model_hash": getattr(self, "model_hash", None),
            "clip_model": c["clip_model"],
            "shard": row.get("shard"),
        }

    def _reject(self, row: dict, reason: str, scores: PairScores | str | None = None) -> dict:
        out = {**self._base(row), "id": None if row.get("id") is None else str(row["id"]),
               "status": STATUS_REJECT, "error": reason, "stage": self.name}
        if isinstance(scores, PairScores):
            out.update(_score_columns(scores))
        return out

    def _sample_row(self, cap: _Caption, s: _Sample, status: str, rank: int | None, reason: str | None) -> dict:
        cid = str(cap.row["id"])
        out = {**self._base(cap.row), "id": f"{cid}-{s.k:03d}", "parent_id": cid, "status": status,
               "sample": s.k, "seed": s.seed, "p": s.p, "cfg": s.cfg, "rank": rank, "drop_reason": reason}
        if isinstance(s.outcome, PairScores):
            out.update(_score_columns(s.outcome))
        if status == STATUS_OK:
            src, edited = s.images
            out.update(input_image=encode_image(src), edited_image=encode_image(edited),
                       width=edited.width, height=edited.height)
        return out


def _score_columns(s: PairScores) -> dict:
    return {"clip_image_similarity": s.image_similarity, "clip_direction": s.direction,
            "clip_source_caption": s.source_caption, "clip_edited_caption": s.edited_caption}


def _normalize(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())
