"""Toy-world quality, fast subset (CI): pixelmill's own stages on the shipped toy models.

The full measurement (more rows, five strengths, the text-to-image table) is
``make quality`` (``python -m pixelmill.toy.measure``); both assert the issue's targets.
"""

from __future__ import annotations

import json

import pytest

from pixelmill.toy import measure, world


def test_edit_rows_change_only_the_colour_and_never_to_a_background_colour():
    rows = measure.edit_rows(60)
    for r in rows:
        parsed = world.parse_caption(r["edit_prompt"])
        assert parsed["color"] == r["target"] != r["color"] and parsed["shape"] == r["shape"]
        assert r["target"] not in parsed.get("background", "")
    assert len({r["target"] for r in rows}) == len(world.COLORS)


def check_targets(res: dict, strength: float = 0.8) -> None:
    """The issue's targets (``make quality``)."""
    r = res["retrieval"]
    assert r["retrieved"] >= r["prompts"] and r["precision"] >= 0.9, {k: v for k, v in r.items() if k != "per_prompt"}
    at = next(c for c in res["sdedit"] if c["strength"] == strength)
    assert at["rejects"] == 0 and at["colour"] >= 0.7 and at["shape_kept"] >= 0.7, at
    t = res["t0_search"]
    assert t["rejects"] == 0 and t["over_target"] == 0 and t["in_band"] >= 0.9, t


@pytest.mark.slow
def test_fast_quality_subset(tmp_path, one_torch_thread):
    """Regression floors on the shipped models, well above what a broken stage scores: an
    edit that returns its input reads the new colour in none of the rows (the target colour
    is never the object's or the background's), a pure-noise edit keeps no shape beyond
    chance (0.25), a retrieval that ignores the text scores the pool's base rate (~1/30)."""
    res = measure.measure_all(tmp_path, measure.FAST)
    r = res["retrieval"]
    assert r["retrieved"] >= r["prompts"] and r["precision"] >= 0.95 and r["recall"] >= 0.95, r
    at = res["sdedit"][0]
    assert at["rejects"] == 0 and at["colour"] >= 0.5 and at["shape_kept"] >= 0.7, at
    t = res["t0_search"]
    assert t["rejects"] == 0 and t["over_target"] == 0 and t["in_band"] >= 0.9, t
    assert json.loads((tmp_path / "quality.json").read_text())["sdedit"] == res["sdedit"]
    html = (tmp_path / "report.html").read_text()
    shown = min(8, measure.FAST["edits"])
    assert "SDEdit colour change" in html and "t0 search" in html
    assert html.count("data:image/png") == shown * (1 + len(measure.FAST["strengths"]))


@pytest.mark.quality
def test_full_quality_meets_the_targets(one_torch_thread):
    """``make quality``: the full sizes; figures and report in ``quality-report/``."""
    from pathlib import Path

    res = measure.measure_all(Path("quality-report"), measure.FULL)
    check_targets(res)
    curve = res["sdedit"]
    l2 = [c["l2_mean"] for c in curve]
    agree = [c["colour"] for c in curve]
    assert l2 == sorted(l2) and agree[-1] > agree[0], curve  # the SDEdit trade-off
    g = res["generation"]
    assert g["guided"]["color"] >= 0.8 and g["guided"]["shape"] >= 0.7, g
    assert g["unguided"]["color"] < g["guided"]["color"] - 0.1, g
    assert g["random_tiny_sd"]["color"] < 0.3 and g["random_tiny_sd"]["shape"] < 0.4, g
