"""InstructPix2Pix's CLIP filter for rendered before/after pairs.

Scores per pair (CLIP embeddings, unit-normalised, from ``ClipScorer``):

- ``image_similarity``: cos(E(source image), E(edited image)), the pair shows one scene;
- ``direction``: cos(E(edited image) − E(source image), E(edited caption) − E(caption)),
  the change in the images follows the change in the text; undefined (``None``) when
  the two captions embed identically;
- ``source_caption``: cos(E(source image), E(caption));
- ``edited_caption``: cos(E(edited image), E(edited caption)).

The decision is pure (``threshold_failures``, ``select_pairs``, ``decide_caption``) so it
can be tested with given scores: a pair passes a threshold when its score is ≥ the
threshold (the paper's "≥ 0.7 / ≥ 0.2"); NaN fails. Passing pairs are ranked by
direction (descending; ties by sample index) and at most ``max_per_caption`` are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from pixelmill.tasks.metrics import ClipScorer

NSFW = "nsfw"
NO_SURVIVOR = "no_sample_passed_clip_filter"


@dataclass(frozen=True)
class PairScores:
    """CLIP scores of one pair (see the module docstring)."""

    image_similarity: float
    direction: float | None
    source_caption: float
    edited_caption: float


@dataclass(frozen=True)
class FilterThresholds:
    """The filter's settings; defaults are InstructPix2Pix's.

    Args:
        min_image_similarity: Lowest image–image similarity kept.
        min_direction: Lowest directional similarity kept.
        min_image_caption: Lowest similarity of each image to its caption.
        max_per_caption: Most pairs kept per caption.
    """

    min_image_similarity: float = 0.7
    min_direction: float = 0.2
    min_image_caption: float = 0.2
    max_per_caption: int = 4

    def __post_init__(self) -> None:
        if self.max_per_caption < 1:
            raise ValueError(f"max_per_caption must be at least 1; got {self.max_per_caption}")


@dataclass(frozen=True)
class PairDecision:
    """The filter's verdict on one sample.

    Attributes:
        keep: Whether the pair is kept.
        rank: 1-based rank by direction among samples that passed every threshold.
        reason: Why it was dropped (``None`` when kept).
    """

    keep: bool
    rank: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class CaptionDecision:
    """The verdict on all samples of one caption.

    Attributes:
        decisions: One ``PairDecision`` per sample, in sample order.
        reject: Why the caption has no kept pair, or ``None`` when it has one.
        best: Index of the scored sample closest to passing (for a reject's scores).
    """

    decisions: list[PairDecision]
    reject: str | None
    best: int | None


def _passes(value: float | None, threshold: float) -> bool:
    return value is not None and not math.isnan(value) and value >= threshold


def threshold_failures(s: PairScores, t: FilterThresholds) -> list[str]:
    """The thresholds a pair misses, as ``name<threshold`` strings (empty when it passes all).

    Args:
        s: The pair's scores.
        t: The thresholds.
    """
    out = []
    if not _passes(s.image_similarity, t.min_image_similarity):
        out.append(f"image_similarity<{t.min_image_similarity:g}")
    if s.direction is None:
        out.append("direction_undefined")
    elif not _passes(s.direction, t.min_direction):
        out.append(f"direction<{t.min_direction:g}")
    if not _passes(s.source_caption, t.min_image_caption):
        out.append(f"source_caption<{t.min_image_caption:g}")
    if not _passes(s.edited_caption, t.min_image_caption):
        out.append(f"edited_caption<{t.min_image_caption:g}")
    return out


def rank_key(s: PairScores, index: int) -> tuple[float, int]:
    """Sort key of passing pairs: higher direction first, then lower sample index."""
    return (-(s.direction if s.direction is not None else -math.inf), index)


def select_pairs(scores: Sequence[PairScores], t: FilterThresholds) -> list[PairDecision]:
    """Apply the thresholds, rank the passers by direction and keep at most ``max_per_caption``.

    Args:
        scores: One caption's scored samples.
        t: The thresholds.

    Returns:
        One decision per sample, in input order. Failing samples get the failed
        thresholds joined by ``;``; passers past the limit get ``surplus_rank>N``.
    """
    decisions: list[PairDecision | None] = [None] * len(scores)
    passers = []
    for i, s in enumerate(scores):
        failed = threshold_failures(s, t)
        if failed:
            decisions[i] = PairDecision(False, None, ";".join(failed))
        else:
            passers.append(i)
    passers.sort(key=lambda i: rank_key(scores[i], i))
    for rank, i in enumerate(passers, start=1):
        keep = rank <= t.max_per_caption
        decisions[i] = PairDecision(keep, rank, None if keep else f"surplus_rank>{t.max_per_caption}")
    return decisions  # type: ignore[return-value]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.3f}"


def decide_caption(samples: Sequence[PairScores | str], t: FilterThresholds) -> CaptionDecision:
    """Decide every sample of one caption, and whether the caption is a reject.

    Args:
        samples: Per sample, its scores, or a reason it was never scored (``"nsfw"``,
            ``"render_failed: …"``); such samples are dropped with that reason.
        t: The thresholds.

    Returns:
        The decisions; ``reject`` is ``"nsfw"`` when every sample was flagged, the first
        other unscored reason when no sample was scored, and otherwise (nothing kept)
        ``"no_sample_passed_clip_filter: best image_similarity=…, direction=…,
        source_caption=…, edited_caption=… (S scored, F nsfw, E failed)"`` naming the
        sample that missed the fewest thresholds (then best direction).
    """
    if not samples:
        return CaptionDecision([], "no samples rendered", None)
    scored = [i for i, s in enumerate(samples) if isinstance(s, PairScores)]
    picked = select_pairs([samples[i] for i in scored], t)
    decisions: list[PairDecision] = [
        PairDecision(False, None, s) if isinstance(s, str) else None for s in samples  # type: ignore[misc]
    ]
    for i, d in zip(scored, picked):
        decisions[i] = d
    if any(d.keep for d in decisions):
        return CaptionDecision(decisions, None, None)
    unscored = [s for s in samples if isinstance(s, str)]
    n_nsfw = sum(1 for s in unscored if s == NSFW)
    if not scored:
        others = [s for s in unscored if s != NSFW]
        return CaptionDecision(decisions, others[0] if others else NSFW, None)
    best = min(scored, key=lambda i: (len(threshold_failures(samples[i], t)), rank_key(samples[i], i)))
    b = samples[best]
    reason = (f"{NO_SURVIVOR}: best image_similarity={_fmt(b.image_similarity)}, direction={_fmt(b.direction)}, "
              f"source_caption={_fmt(b.source_caption)}, edited_caption={_fmt(b.edited_caption)} "
              f"({len(scored)} scored, {n_nsfw} nsfw, {len(unscored) - n_nsfw} failed)")
    return CaptionDecision(decisions, reason, best)


class ClipPairFilter:
    """Scores and filters rendered pairs with a ``ClipScorer`` (InstructPix2Pix's CLIP filter).

    Args:
        clip: A loaded ``ClipScorer``, or a CLIP model name to load one.
        thresholds: Filter settings (InstructPix2Pix's by default).
        device: Torch device, when ``clip`` is a name.
    """

    def __init__(self, clip: ClipScorer | str, thresholds: FilterThresholds | None = None,
                 device: str = "cpu") -> None:
        self.scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip, device=device)
        self.thresholds = thresholds or FilterThresholds()

    def score(
        self,
        sources: Sequence[Image.Image],
        editeds: Sequence[Image.Image],
        source_captions: Sequence[str],
        edited_captions: Sequence[str],
    ) -> list[PairScores]:
        """Score pairs (any mix of captions); each distinct caption is embedded once.

        Args:
            sources: Source images.
            editeds: Edited images, one per source.
            source_captions: The caption each source was rendered from.
            edited_captions: The edited caption of each pair.
        """
        n = len(sources)
        if not (len(editeds) == len(source_captions) == len(edited_captions) == n):
            raise ValueError("sources, editeds, source_captions and edited_captions need the same length")
        if n == 0:
            return []
        e_src, e_ed = self.scorer.images(list(sources)), self.scorer.images(list(editeds))
        texts = list(dict.fromkeys([*source_captions, *edited_captions]))
        index = {t: i for i, t in enumerate(texts)}
        e_txt = self.scorer.texts(texts)
        e_cs = e_txt[[index[t] for t in source_captions]]
        e_ce = e_txt[[index[t] for t in edited_captions]]
        image_sim = (e_src * e_ed).sum(-1)
        d_img = _unit(e_ed - e_src)
        raw_txt = e_ce - e_cs
        d_txt = _unit(raw_txt)
        direction = (d_img * d_txt).sum(-1)
        defined = raw_txt.norm(dim=-1) > 1e-6
        src_cap = (e_src * e_cs).sum(-1)
        ed_cap = (e_ed * e_ce).sum(-1)
        return [
            PairScores(float(image_sim[i]), float(direction[i]) if bool(defined[i]) else None,
                       float(src_cap[i]), float(ed_cap[i]))
            for i in range(n)
        ]

    def select(self, samples: Sequence[PairScores | str]) -> CaptionDecision:
        """Decide one caption's samples with this filter's thresholds (see ``decide_caption``)."""
        return decide_caption(samples, self.thresholds)

    def filter_caption(
        self,
        sources: Sequence[Image.Image],
        editeds: Sequence[Image.Image],
        caption: str,
        edited_caption: str,
    ) -> tuple[list[PairScores], CaptionDecision]:
        """Score and decide all rendered pairs of one caption.

        Returns:
            (per-sample scores, the caption's decision)
        """
        scores = self.score(sources, editeds, [caption] * len(sources), [edited_caption] * len(sources))
        return scores, self.select(scores)
