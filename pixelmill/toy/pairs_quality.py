"""InstructPix2Pix's pairs on the toy world: how good are they, before and after the CLIP filter?

Toy-world captions (training shapes only: the toy SD never drew a heart) go through the
two stages ``pixelmill pairs`` runs, called here in-process as a Ray actor calls them:
``InstructionStage`` with the template writer (``edits: [change_colour]``, ``colours``:
the toy world's six) and ``PairRenderStage`` with the toy SD and the toy CLIP. The
pairs are rendered with the filter OPEN (every threshold -1, every sample kept with its
CLIP scores); the filter's decision is pure (``pair_filter.decide_caption``), so applying
it afterwards to the stored scores is exactly what the stage would keep with those
thresholds, and one rendering serves every threshold tried.

Ground truth per pair, from the captions: the source caption's colour and shape, the
edited caption's (target) colour. A pair is **good** when the frozen detectors read, on
the before image, the source colour and shape, and on the after image the target colour,
the same shape and the same 3x3 position. Reported: the share of good pairs among all
rendered pairs and among the pairs the filter keeps.

The paper's thresholds (image-image 0.7, direction 0.2, image-caption 0.2) were set for
CLIP ViT-L/14; the toy CLIP's cosines live on another scale. ``calibrate`` picks them for
the toy CLIP on one caption seed (a grid; the highest good share among settings keeping
at least ``MIN_YIELD`` of the captions), and the report measures them on another seed.

``python -m pixelmill.toy.pairs_quality --out DIR [--fast]`` writes ``pairs.json`` there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from pixelmill.config.pairs import MODEL_THRESHOLDS, PAPER_THRESHOLDS
from pixelmill.toy import world

TRAIN_PAIRS_SEED = 21
"""World seed of the captions the shipped toy InstructPix2Pix was trained on (and the thresholds calibrated on)."""
REPORT_SEED = 22
"""World seed of the captions the pair-quality report measures (thresholds fixed before)."""
WRITER = {"writer": "template", "writer_options": {"edits": ["change_colour"], "colours": list(world.COLORS)}}
RENDER: dict[str, Any] = {"model": "toy:sd", "clip_model": "toy:clip", "samples_per_caption": 2, "steps": 15,
                          "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE, "p_range": (0.1, 0.9),
                          "cfg_range": (3.0, 6.0), "batch_size": 16, "device": "cpu", "dtype": "float32", "seed": 0}
"""The toy pairs settings: the toy SD's guidance is best near 4 (its model card), so cfg 3-6, not the paper's 7.5-15."""
OPEN = {"min_image_similarity": -1.0, "min_direction": -1.0, "min_image_caption": -1.0}
PAPER = PAPER_THRESHOLDS
TOY_THRESHOLDS = MODEL_THRESHOLDS["toy:clip"]
"""The filter's thresholds for toy:clip: ``calibrate`` on the 2,618 samples of 1,600 captions of world
``TRAIN_PAIRS_SEED`` (1,309 after the per-call duplicate check, 829 distinct; ``python -m pixelmill.toy.ip2p pairs
--calibrate``, 2026-12-04):
good share 0.597 unfiltered -> 0.810 kept, yield 0.51 (the paper's 0.7/0.2/0.2 there: 0.630, yield 0.12).
The toy CLIP's image-image cosines are low (median 0.46 between a pair's two images), its
direction cosines high (median 0.65). A pairs config naming ``clip_model: toy:clip`` and no thresholds
gets these (``config.pairs.MODEL_THRESHOLDS``); every other CLIP model gets the paper's."""
MIN_YIELD = 0.5
"""Calibration keeps only threshold settings under which at least this share of captions keeps a pair."""
GRID = {"min_image_similarity": (-1.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        "min_direction": (-1.0, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6),
        "min_image_caption": (-1.0, 0.2, 0.25, 0.3, 0.35, 0.4)}


def caption_table(seed: int, start: int, stop: int) -> pa.Table:
    """Rows ``start .. stop - 1`` of world ``seed`` (training shapes) as ``id``, ``caption``."""
    from pixelmill.toy.dataset import toy_row_id

    rows = []
    for i in range(start, stop):
        _, caption, _ = world.make_row(seed, i, world.TRAIN_SHAPES)
        rows.append({"id": toy_row_id(seed, i), "caption": caption})
    return pa.Table.from_pylist(rows)


def instructions(captions: pa.Table) -> pa.Table:
    """The instruction stage's output rows with status ``ok`` (id, caption, edit_prompt, edited_caption)."""
    from pixelmill.tasks.instructions.stage import InstructionStage

    stage = InstructionStage({**WRITER, "seed": 0})
    stage.setup()
    out = stage(captions)
    return out.filter(pa.compute.equal(out["status"], "ok")).select(["id", "caption", "edit_prompt",
                                                                     "edited_caption"])


def render(rows: pa.Table, overrides: dict[str, Any] | None = None) -> pa.Table:
    """Every rendered sample of ``rows`` with its CLIP scores (the filter open: nothing dropped)."""
    from pixelmill.tasks.p2p.stage import PairRenderStage

    cfg = {**RENDER, **OPEN, **(overrides or {})}
    cfg["max_per_caption"] = int(cfg["samples_per_caption"])
    stage = PairRenderStage(cfg)
    stage.setup()
    return stage(rows)


def judge(table: pa.Table) -> list[dict[str, Any]]:
    """Per rendered sample: its scores, ground truth and what the detectors read (``good``)."""
    import numpy as np

    from pixelmill.datasets.images import decode_image
    from pixelmill.toy.detect import detect

    out = []
    for r in table.to_pylist():
        if r["status"] != "ok":
            continue
        src, tgt = world.parse_caption(r["caption"]), world.parse_caption(r["edited_caption"])
        with np.errstate(divide="ignore", invalid="ignore"):  # a one-pixel-wide object box
            before = detect(decode_image(r["input_image"]).convert("RGB"))
            after = detect(decode_image(r["edited_image"]).convert("RGB"))
        ok_before = before.color == src["color"] and before.shape == src["shape"]
        ok_after = after.color == tgt["color"] and after.shape == before.shape and after.position == before.position
        out.append({"id": r["id"], "parent_id": r["parent_id"], "sample": r["sample"],
                    "scores": (r["clip_image_similarity"], r["clip_direction"], r["clip_source_caption"],
                               r["clip_edited_caption"]),
                    "target": tgt["color"], "target_is_background": tgt["color"] in tgt.get("background", ""),
                    "before_ok": ok_before, "after_colour": after.color == tgt["color"],
                    "after_shape": after.shape == before.shape, "after_position": after.position == before.position,
                    "after_background": after.background == before.background,
                    "good": ok_before and ok_after})
    return out


def kept(judged: list[dict[str, Any]], thresholds: dict[str, float], max_per_caption: int = 4) -> list[dict]:
    """The samples the CLIP filter keeps with ``thresholds`` (``decide_caption`` per caption)."""
    from pixelmill.tasks.pair_filter import FilterThresholds, PairScores, decide_caption

    t = FilterThresholds(**thresholds, max_per_caption=max_per_caption)
    by_caption: dict[str, list[dict]] = {}
    for j in judged:
        by_caption.setdefault(j["parent_id"], []).append(j)
    out = []
    for samples in by_caption.values():
        samples = sorted(samples, key=lambda j: j["sample"])
        decision = decide_caption([PairScores(*j["scores"]) for j in samples], t)
        out += [j for j, d in zip(samples, decision.decisions) if d.keep]
    return out


def summary(judged: list[dict[str, Any]], thresholds: dict[str, float] | None) -> dict[str, Any]:
    """Good share (and its parts) of all samples, or of those the filter keeps with ``thresholds``."""
    rows = judged if thresholds is None else kept(judged, thresholds)
    n = len(rows)
    captions = len({j["parent_id"] for j in judged})

    def share(key: str) -> float:
        return round(sum(bool(j[key]) for j in rows) / n, 4) if n else 0.0

    return {"pairs": n, "captions_kept": len({j["parent_id"] for j in rows}), "captions": captions,
            "yield": round(len({j["parent_id"] for j in rows}) / max(1, captions), 4),
            "good": share("good"), "before_ok": share("before_ok"), "after_colour": share("after_colour"),
            "after_shape": share("after_shape"), "after_position": share("after_position"),
            "after_background": share("after_background")}


def calibrate(judged: list[dict[str, Any]], min_yield: float = MIN_YIELD) -> dict[str, Any]:
    """The grid's thresholds with the highest good share among those keeping ``min_yield`` of the captions
    (ties: the higher yield); returns them with their summary and the grid's size."""
    best = None
    for sim, direction, cap in itertools.product(*GRID.values()):
        t = {"min_image_similarity": sim, "min_direction": direction, "min_image_caption": cap}
        s = summary(judged, t)
        if s["yield"] < min_yield:
            continue
        key = (s["good"], s["yield"])
        if best is None or key > best[0]:
            best = (key, t, s)
    if best is None:
        raise ValueError(f"no threshold setting keeps {min_yield} of the captions")
    return {"thresholds": best[1], "summary": best[2], "grid": {k: list(v) for k, v in GRID.items()},
            "min_yield": min_yield}


def measure_pairs(out: Path, captions: int, seed: int = REPORT_SEED,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Render ``captions`` captions of world ``seed``; good share open, with the paper's thresholds and
    the toy ones (``thresholds`` or ``TOY_THRESHOLDS``). Writes ``out/pairs.json``."""
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    rendered = render(instructions(caption_table(seed, 0, captions)))
    return report(rendered, out, seed, captions, thresholds, time.perf_counter() - t0)


def report(rendered: pa.Table, out: Path, seed: int, captions: int, thresholds: dict[str, float] | None = None,
           seconds: float | None = None) -> dict[str, Any]:
    """The figures of ``measure_pairs`` from its rendered samples (``render``'s table)."""
    judged = judge(rendered)
    toy = thresholds or TOY_THRESHOLDS
    doc = {"seed": seed, "captions": captions, "distinct_captions": len({j["parent_id"] for j in judged}),
           "render": _plain(RENDER), "writer": WRITER, "unfiltered": summary(judged, None),
           "paper_thresholds": PAPER, "paper_filter": summary(judged, PAPER), "toy_thresholds": toy,
           "toy_filter": summary(judged, toy), "seconds": None if seconds is None else round(seconds, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def foreign_colours(captions: int = 100, seed: int = REPORT_SEED) -> dict[str, Any]:
    """The template writer's OWN colour list (pink, golden, silver, turquoise: colours toy:sd never drew) on
    toy captions: per filter (open, the toy thresholds, the paper's), how many kept pairs ask for such a
    colour, and the good share of the rest."""
    from pixelmill.tasks.instructions.stage import InstructionStage

    stage = InstructionStage({"writer": "template", "writer_options": {"edits": ["change_colour"]}, "seed": 0})
    stage.setup()
    out = stage(caption_table(seed, 0, captions))
    rows = out.filter(pa.compute.equal(out["status"], "ok")).select(["id", "caption", "edit_prompt",
                                                                     "edited_caption"])
    judged = judge(render(rows))
    res: dict[str, Any] = {"seed": seed, "captions": captions}
    for name, t in (("open", None), ("toy", TOY_THRESHOLDS), ("paper", PAPER)):
        kept_rows = judged if t is None else kept(judged, t)
        ours = [j for j in kept_rows if j["target"] in world.COLORS]
        res[name] = {"pairs": len(kept_rows), "foreign_target": len(kept_rows) - len(ours),
                     "good_of_world_targets": round(sum(j["good"] for j in ours) / max(1, len(ours)), 4)}
    return res


def render_shards(work: Path, captions: int, seed: int = TRAIN_PAIRS_SEED, shard: int = 200, part: int = 0,
                  parts: int = 1) -> list[Path]:
    """Render captions ``0 .. captions - 1`` of world ``seed`` open, ``shard`` captions per Parquet file in
    ``work`` (shard ``k`` by process ``k % parts == part``; a finished file is kept: reruns resume)."""
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, captions, shard)):
        path = work / f"render-{seed}-{start:06d}.parquet"
        files.append(path)
        if k % parts != part or path.exists():
            continue
        table = render(instructions(caption_table(seed, start, min(captions, start + shard))))
        pq.write_table(table, str(path) + ".tmp")
        Path(str(path) + ".tmp").rename(path)
        print(f"{path.name}: {table.num_rows} samples", flush=True)
    return files


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Quality of toy-world InstructPix2Pix pairs, before/after the filter.")
    parser.add_argument("--out", default="quality-report")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=REPORT_SEED)
    parser.add_argument("--render-to", help="only render captions open into this folder (training pairs)")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--foreign-colours", action="store_true",
                        help="the writer's own colour list instead: how many kept pairs ask for a non-toy colour")
    args = parser.parse_args(argv)
    if args.foreign_colours:
        print(json.dumps(foreign_colours(args.captions, args.seed), indent=1))
        return 0
    if args.render_to:
        import torch

        torch.set_num_threads(1)
        render_shards(Path(args.render_to), args.captions, args.seed, part=args.part, parts=args.parts)
        return 0
    doc = measure_pairs(Path(args.out), args.captions, args.seed)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
