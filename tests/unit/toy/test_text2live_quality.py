"""Text2Live on the toy world: "a green circle" over a red circle, stills and through a video atlas.

Fast subsets here (a few scenes, the direction of each effect); the full measurement (50
scenes, every ablation; the README's table) is ``make quality``
(``python -m pixelmill.toy.text2live_quality``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pixelmill.toy import text2live_quality as q
from pixelmill.toy.detect import detect


def test_scenes_are_red_circles_on_backgrounds_that_are_neither_red_nor_green():
    for image, coverage in q.scenes(20):
        d = detect(image)
        assert d.color == "red" and d.shape == "circle"
        assert {d.background, d.background2} & {"red", "green"} == set()
        assert 0 < coverage.sum() and coverage.max() == 1.0


def test_score_reads_the_composite_and_the_alpha_mass_off_the_object():
    image, coverage = q.scenes(1)[0]
    rgba = np.zeros(image.shape[:2] + (4,), np.uint8)
    rgba[..., 1] = 200
    rgba[coverage > 0, 3] = 255  # an opaque green layer on exactly the circle's pixels
    s = q.score(image, coverage, rgba)
    assert s["colour"] == 1.0 and s["outside"] == 0.0 and 0 < s["outside_soft"] < 0.3
    rgba[..., 3] = 255  # the whole image
    assert q.score(image, coverage, rgba)["outside"] > 0.5


@pytest.mark.slow
def test_fast_subset_bootstrapping_puts_the_edit_on_the_object(one_torch_thread):
    """4 scenes: the full method turns the circle green with its alpha mostly on the circle;
    without bootstrapping the layer spreads (the 50-scene table: 0.09 vs 0.57 outside)."""
    res = q.measure(4, {k: q.ABLATIONS[k] for k in ("full", "no bootstrapping")})["ablations"]
    full, loose = res["full"], res["no bootstrapping"]
    assert full["colour"] >= 0.75, full
    assert full["outside"] < 0.3 and full["outside"] < loose["outside"] - 0.1, (full, loose)


@pytest.mark.slow
def test_fast_video_subset_recolours_every_frame_consistently(one_torch_thread):
    from pixelmill.toy.text2live_video_quality import measure_video

    res = measure_video(frames=6, seeds=(0,), variants={"atlas + frames": {}})
    v = res["variants"]["atlas + frames"]
    assert res["original_colour"] == ["red"] * 6
    assert v["colour"] >= 0.7 and v["temporal_ratio"] <= 2.0, v


@pytest.mark.quality
def test_full_text2live_quality(one_torch_thread):
    """``make quality``: 50 scenes × 4 variants and the video clip; figures in
    ``quality-report/text2live.json`` (the README's tables)."""
    from pixelmill.toy.text2live_video_quality import measure_video

    res = q.measure(50)
    res["video"] = measure_video()
    out = Path("quality-report")
    out.mkdir(exist_ok=True)
    (out / "text2live.json").write_text(json.dumps(res, indent=1))
    a = res["ablations"]
    assert a["full"]["colour"] >= 0.7 and a["full"]["outside"] < 0.1, a["full"]
    assert a["no bootstrapping"]["colour"] < a["full"]["colour"] - 0.2
    assert a["no bootstrapping"]["outside"] > a["full"]["outside"] + 0.2
    assert a["no directional"]["colour"] < a["full"]["colour"]
    v = {k: {m: x for m, x in fig.items() if m != "runs"} for k, fig in res["video"]["variants"].items()}
    # The defaults over 10 layer seeds: clips recoloured (>= 0.7 of frames green) and the mean temporal
    # consistency within 1.5x the original's; the losses on rendered frames steady the edit.
    assert v["atlas + frames"]["clips_green"] >= 0.7 and v["atlas + frames"]["temporal_ratio"] <= 1.5, v
    assert v["atlas only"]["temporal_ratio"] > v["atlas + frames"]["temporal_ratio"], v
