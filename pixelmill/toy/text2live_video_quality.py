"""Text2Live through a video atlas, measured on a toy clip: a red circle, moving in frame, made green.

The clip is ``toy_pan_clip`` (a camera pan across a red circle on a white/blue
background: the circle moves across the frames); its homography atlas
(``build_homography_atlas``) is one layer, the scene. The Text2Live layer is trained on
the atlas image with the toy settings of ``text2live_quality`` (``TARGET`` from
``SOURCE``) and composited into the frames by ``overlay_edit``, with and without the
losses on rendered frames (``frame_weight``). (A tiny neural atlas of
``synthetic_moving_shape``'s moving disk was tried first: after 300-2000 steps its
foreground layer does not hold the disk, so no foreground edit can recolour it.)
Each variant is trained once per layer seed (``seeds``: the generator's weights, its
augmentations and its relevancy map; one clip, one seed, is a single trial whose colour
reads all or nothing, since one layer is composited into every frame). Figures per seed:

- ``colour``: the share of frames whose object the detectors read as green (target ≥ 0.7);
- ``temporal_ratio``: the edited clip's temporal consistency (``video.metrics``, flow from
  the original) over the original clip's (target ≤ 1.5).

and per variant their means over the seeds, the share of clips recoloured (``clips_green``:
colour ≥ 0.7), the share meeting both targets (``clips_meeting_both``) and the largest
ratio.

``python -m pixelmill.toy.text2live_video_quality`` prints them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pixelmill.toy.text2live_quality import SETTINGS, SOURCE, TARGET

VARIANTS: dict[str, dict[str, Any]] = {
    "atlas only": {"frame_weight": 0.0},
    "atlas + frames": {},  # the defaults: frame_weight 1, 2 frames per step
    "atlas + frames, weight 2": {"frame_weight": 2.0},
}


def measure_video(frames: int = 8, shift: tuple[int, int] = (2, 1), seeds: tuple[int, ...] = tuple(range(10)),
                  clip: str = "toy:clip", variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build the clip and its atlas once, edit the atlas layer per variant and seed, measure."""
    from pixelmill.models.loading import load_clip
    from pixelmill.tasks.edit.text2live_layer import Text2LiveLayerGenerator
    from pixelmill.tasks.edit.text2live_nets import AtlasFrames
    from pixelmill.tasks.video.homography import build_homography_atlas
    from pixelmill.tasks.video.metrics import psnr, temporal_consistency
    from pixelmill.tasks.video.render import atlas_validity_mask, overlay_edit, render_frames
    from pixelmill.toy.detect import detect
    from pixelmill.toy.samples import toy_pan_clip

    shape = toy_pan_clip(frames=frames, shift=shift)
    start = time.monotonic()
    atlas = build_homography_atlas(shape.frames)
    atlas_s = time.monotonic() - start
    layer = 0
    lay = atlas.layers[layer]
    valid = atlas_validity_mask(atlas, layer)
    af = AtlasFrames(shape.frames, lay.uv, atlas.visibility(layer), lay.image.shape[:2])
    original_tc = temporal_consistency(shape.frames)
    model, _, tokenizer = load_clip(clip, device="cpu")
    out: dict[str, Any] = {
        "frames": frames, "shift": list(shift), "atlas_psnr": psnr(render_frames(atlas), shape.frames),
        "atlas_seconds": atlas_s, "original_colour": [detect(f).color for f in shape.frames],
        "temporal_consistency_original": original_tc, "settings": SETTINGS, "variants": {},
    }
    out["seeds"] = list(seeds)
    for name, change in (VARIANTS if variants is None else variants).items():
        gen = Text2LiveLayerGenerator(model, tokenizer, {**SETTINGS, "source_prompt": SOURCE, **change})
        runs = []
        for seed in seeds:
            t = time.monotonic()
            res = gen.fit(lay.image, TARGET, seed=seed, mask=valid, frames=af)
            edited = overlay_edit(shape.frames, atlas, layer, res.rgba)
            tc = temporal_consistency(edited, flow_frames=shape.frames)
            runs.append({
                "seed": seed, "colour": float(np.mean([detect(f).color == "green" for f in edited])),
                "temporal_consistency": tc, "temporal_ratio": tc / original_tc if original_tc > 0 else float("inf"),
                "alpha_mean": float(res.rgba[..., 3][valid].mean() / 255.0), "seconds": time.monotonic() - t,
            })
        out["variants"][name] = summarise(runs)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's figures over its seeds (the means, the shares of clips meeting each target, the worst ratio)."""
    green = [r["colour"] >= 0.7 for r in runs]
    steady = [r["temporal_ratio"] <= 1.5 for r in runs]
    return {
        "colour": float(np.mean([r["colour"] for r in runs])),
        "temporal_ratio": float(np.mean([r["temporal_ratio"] for r in runs])),
        "temporal_ratio_max": float(max(r["temporal_ratio"] for r in runs)),
        "clips_green": float(np.mean(green)),
        "clips_meeting_both": float(np.mean([g and st for g, st in zip(green, steady, strict=True)])),
        "seconds": float(sum(r["seconds"] for r in runs)), "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--shift", type=int, nargs=2, default=(2, 1), help="camera pan per frame (x y, pixels)")
    p.add_argument("--seeds", type=int, default=10, help="layer seeds per variant (0 .. N-1)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(json.dumps(measure_video(args.frames, tuple(args.shift), tuple(range(args.seeds))), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
