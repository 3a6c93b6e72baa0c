"""A new concept (the held-out heart), each fine-tuning method on the toy SD, measured by the detectors.

Fast case (CI): LoRA for a fifth of its steps. Full (``make quality``): every method, the
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
    # each image's own training prompt names its colour (the Concept's instance_prompt_column)
    rows = Dataset.open(str(tmp_path / "inst")).to_table(["color", concepts.PROMPT_COLUMN]).to_pylist()
    assert [r[concepts.PROMPT_COLUMN] for r in rows] == [f"a {r['color']} {{subject}}" for r in rows]


def test_the_prior_is_the_instance_prompts_without_the_identifier(tmp_path):
    """DreamBooth's class prompts are its instance prompts with the identifier taken out, and each class
    image is the base model's sample for its own prompt, kept with that prompt (the class_prompt_column)."""
    from pixelmill.datasets import Dataset

    prompts = concepts.prior_prompts()
    word = concepts.CLASS_WORD
    assert prompts == [concepts.instance_prompt(c).format(subject=word) for c in concepts.INSTANCE_COLORS]
    assert prompts == ["a purple shape", "a orange shape"]
    base = concepts.BaseSamples(concepts._pipeline("toy:sd"))
    url = concepts.write_prior_class_images(str(tmp_path / "class"), base, 2, seed=5)
    rows = Dataset.open(url).to_table(["caption"]).to_pylist()
    assert [r["caption"] for r in rows] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert base._drawn.keys() == {(p, 2, 5 + 3000) for p in prompts}


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


@pytest.fixture(scope="module")
def full(one_torch_thread):
    """``make quality``: every method on the held-out heart, once; figures in quality-report/concepts.json."""
    from pathlib import Path

    return concepts.measure_concepts(Path("quality-report"), concepts.FULL)


@pytest.mark.quality
def test_the_methods_that_can_learn_a_new_shape_learn_it(full):
    """DreamBooth, LoRA and Custom Diffusion change the UNet (or its attention) and draw the heart
    far above the base model, Textual Inversion well above it; every method moves its samples toward
    the instance images in toy-CLIP space; the prior keeps the class prompt near the base model
    (total-variation distance at least 0.2 smaller than without it)."""
    m = full["methods"]
    for method in ("dreambooth", "lora", "custom_diffusion"):
        assert m[method]["heart"] >= m[method]["base_heart"] + 0.5, (method, m[method])
    # Textual Inversion changes no weight: only its 48 vectors find the heart in the frozen model (one: 0.02)
    ti = m["textual_inversion"]
    assert ti["num_vectors"] == 48 and ti["heart"] >= ti["base_heart"] + 0.3, ti
    assert m["custom_diffusion"]["heart"] >= 0.8, m["custom_diffusion"]
    for method, r in m.items():
        assert r["alignment"] > r["base_alignment"] + 0.1, (method, r)
    p = full["prior"]
    assert p["tv_with_prior"] <= p["tv_without_prior"] - 0.2, p


@pytest.mark.quality
@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_dreambooth_and_lora_learn_the_heart_and_recontextualise_it(full, method):
    """The issue's targets as written: trained on per-image prompts naming the instances' colours
    (purple, orange), DreamBooth with the prior, "a photo of <subject>" is a heart in >= 0.8 of
    samples, and "a green <subject>", a colour no instance has, a green heart in >= 0.6 -- which the
    base model never draws."""
    r = full["methods"][method]
    assert r["instance_prompts"] == "per image" and r["recontext_prompt"] == "a green sks shape", r
    # DreamBooth with its prior preservation, as the issue asks (LoRA's prior is opt-in, as in diffusers' scripts)
    assert r["prior"] is (method == "dreambooth") and r["class_images_per_prompt"] == (50 if r["prior"] else 0), r
    assert r["base_heart"] <= 0.05 and r["base_recontext"] <= 0.05, r
    assert r["heart"] >= 0.8 and r["recontext"] >= 0.6, r
