"""A new concept (the held-out heart), each fine-tuning method on the toy SD, measured by the detectors.

Fast case (CI): LoRA for a third of its steps. Full (``make quality``): every method, the
prior-preservation comparison, and the learning-quality issue's targets where they are met;
``quality-report/concepts.json`` holds the figures the README's table quotes.
"""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from pixelmill.toy import concepts, world

D = namedtuple("D", "color shape")


def test_instances_are_hearts_in_the_two_instance_colours_only(tmp_path):
    from pixelmill.datasets import Dataset

    captions = concepts.write_instances(str(tmp_path / "inst"))
    t = Dataset.open(str(tmp_path / "inst")).to_table(["shape", "color"]).to_pylist()
    assert len(t) == len(captions) == 6
    assert {r["shape"] for r in t} == {world.HELD_OUT_SHAPE}
    assert {r["color"] for r in t} == set(concepts.INSTANCE_COLORS)
    assert concepts.NEW_COLOR not in concepts.INSTANCE_COLORS


def test_tv_distance_and_shares():
    a = [D("red", "circle")] * 2 + [D("blue", "star")] * 2
    assert concepts.tv_distance(a, a) == 0.0
    assert concepts.tv_distance(a, [D("green", "heart")] * 3) == 1.0
    assert concepts.tv_distance(a, [D("red", "circle")] * 4) == 0.5
    assert concepts.share(a, "circle") == 0.5 and concepts.share(a, "star", "blue") == 0.5
    assert concepts.share(a, color="green") == 0.0


@pytest.mark.slow
def test_lora_learns_the_held_out_heart_fast_case(tmp_path, one_torch_thread):
    """The base model never draws a heart for the token; a third of the LoRA run already does, often:
    a LoRA that trained nothing (or was not loaded) scores the base model's rate."""
    doc = concepts.measure_concepts(tmp_path, concepts.FAST)
    r = doc["methods"]["lora"]
    assert r["base_heart"] <= 0.1 and r["heart"] >= r["base_heart"] + 0.25, r
    assert r["alignment"] > r["base_alignment"], r
    assert json.loads((tmp_path / "concepts.json").read_text())["methods"]["lora"]["heart"] == r["heart"]


@pytest.mark.quality
def test_every_method_learns_the_heart(one_torch_thread):
    """``make quality``: every method on the held-out heart; figures in quality-report/concepts.json."""
    from pathlib import Path

    doc = concepts.measure_concepts(Path("quality-report"), concepts.FULL)
    m = doc["methods"]
    for method, r in m.items():  # each method raises the heart's rate well above the base model's
        assert r["heart"] >= r["base_heart"] + 0.3, (method, r)
        assert r["alignment"] > r["base_alignment"], (method, r)
    assert m["dreambooth"]["heart"] >= 0.8 and m["lora"]["heart"] >= 0.7, m
    p = doc["prior"]
    assert p["tv_with_prior"] < p["tv_without_prior"], p
