"""Text2Live through a video atlas, measured on a toy clip: a red circle, moving in frame, made green.

The clip is ``toy_pan_clip`` (a camera pan across a red circle on a white/blue
background: the circle moves across the frames); its homography atlas
(``build_homography_atlas``) is one layer, the scene. The Text2Live layer is trained on
the atlas image with the toy settings of ``text2live_quality`` (``TARGET`` from
``SOURCE``) and composited into the frames by ``overlay_edit``, with and without the
losses on rendered frames (``frame_weight``). (A tiny neural atlas of
``synthetic_moving_shape``'s moving disk was tried first: after 300-2000 steps its
foreground layer does not hold the disk, so no foreground edit can recolour it.)
Figures per variant:

- ``colour``: the share of frames whose object the detectors read as green (target ≥ 0.7);
- ``temporal_ratio``: the edited clip's temporal consistency (``video.metrics``, flow from
  the original) over the original clip's (target ≤ 1.5).

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
    "atlas + 4 frames per step": {"frame_views": 4},
    "atlas + frames, weight 2": {"frame_weight": 2.0},
}


def measure_video(frames: int = 8, shift: tuple[int, int] = (2, 1), seed: int = 0, clip: str = "toy:clip",
                  variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build the clip and its atlas once, edit the atlas layer per variant, measure."""
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
    for name, change in (VARIANTS if variants is None else variants).items():
        gen = Text2LiveLayerGenerator(model, tokenizer, {**SETTINGS, "source_prompt": SOURCE, **change})
        t = time.monotonic()
        res = gen.fit(lay.image, TARGET, seed=seed, mask=valid, frames=af)
        edited = overlay_edit(shape.frames, atlas, layer, res.rgba)
        tc = temporal_consistency(edited, flow_frames=shape.frames)
        out["variants"][name] = {
            "colour": float(np.mean([detect(f).color == "green" for f in edited])),
            "temporal_consistency": tc, "temporal_ratio": tc / original_tc if original_tc > 0 else float("inf"),
            "alpha_mean": float(res.rgba[..., 3][valid].mean() / 255.0), "seconds": time.monotonic() - t,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--shift", type=int, nargs=2, default=(2, 1), help="camera pan per frame (x y, pixels)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(json.dumps(measure_video(args.frames, tuple(args.shift)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
