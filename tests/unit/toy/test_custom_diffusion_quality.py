"""Custom Diffusion on the toy world: two concepts jointly vs the single-concept weights merged naively,
and retrieval from a toy pool as its real prior through one campaign (``pixelmill finetune``).

Fast case (``make test``): the instance images and the naive merge's arithmetic on two tiny
single-concept jobs. Full (``make quality``): the README's two tables, written to
``quality-report/custom_diffusion.json`` and ``quality-report/custom_diffusion_prior.json``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelmill.toy import custom_diffusion_prior as prior
from pixelmill.toy import custom_diffusion_quality as cdq
from pixelmill.toy import world


def test_instances_are_what_each_concept_names(tmp_path):
    from pixelmill.datasets import Dataset

    for which in cdq.CONCEPTS:
        cdq.write_concept(str(tmp_path / which), which)
    hearts = Dataset.open(str(tmp_path / "heart")).to_table(["shape", "color"]).to_pylist()
    hues = Dataset.open(str(tmp_path / "hue")).to_table(["shape", "color"]).to_pylist()
    assert {r["shape"] for r in hearts} == {world.HELD_OUT_SHAPE} and cdq.HUE_COLOR not in {r["color"] for r in hearts}
    assert {r["color"] for r in hearts} == set(cdq.HEART_COLORS)
    assert {r["color"] for r in hues} == {cdq.HUE_COLOR} and {r["shape"] for r in hues} == set(world.TRAIN_SHAPES)
    prior.write_concept(str(tmp_path / "star1"))
    stars = Dataset.open(str(tmp_path / "star1")).to_table(["shape", "color"]).to_pylist()
    assert {(r["shape"], r["color"]) for r in stars} == {(prior.CLASS_SHAPE, prior.CONCEPT_COLOR)}


def test_trial_designs_override_the_base_key_by_key():
    """The README's trial rows: each design changes only what it names; a concept's override keeps its images."""
    d = cdq.trial_design("hue-from-red")
    assert d["b"]["initializer_token"] == "red" and d["b"]["template"] == cdq.TRIAL_BASE["b"]["template"]
    assert d["b"]["wanted"] == cdq.TRIAL_BASE["b"]["wanted"] and "initializer_token" not in d["a"]
    after = cdq.trial_design("colour-after-prior")
    assert after["prompts"]["both"] == "a <heart> in <hue>" and after["prompts"]["a"] == "a <heart>"
    assert after["prior"]["per"] * len(after["prior"]["prompts"]) == 96 and "prior" not in cdq.trial_design("rare")
    for name in cdq.TRIALS:  # every prompt has its target, every template names its token
        d = cdq.trial_design(name)
        assert set(d["prompts"]) == set(d["want"]), name
        assert all(d[k]["token"] in cdq.trial_prompt(d[k]["template"], {"color": "red", "shape": "circle"},
                                                     d[k]["token"]) for k in ("a", "b")), name
    with pytest.raises(ValueError, match="unknown trial 'nope'; the trials are: rare, rare-prior"):
        cdq.trial_design("nope")


@pytest.mark.slow
def test_a_trial_reads_every_prompt_of_every_model(tmp_path, one_torch_thread):
    """A trial with a prior, a few steps and two samples: the base, three jobs and three merges, each prompt's
    samples all read; the instances carry their per-image prompts."""
    import json

    from pixelmill.datasets import Dataset

    doc = cdq.run_trial("rare-prior", tmp_path, joint_steps=4, single_steps=2, samples=2,
                        prior={"prompts": ["a red circle", "a blue star"], "per": 1})
    assert set(doc["models"]) == {"base", "joint", "a", "b", "merged (sum)", "merged (average)",
                                  "merged (optimisation)"}
    for rows in doc["models"].values():
        assert set(rows) == set(doc["design"]["prompts"])
        assert all(sum(r["colors"].values()) == sum(r["shapes"].values()) == 2 and 0 <= r["wanted"] <= 1
                   for r in rows.values())
    prompts = Dataset.open(str(tmp_path / "cd-trial-rare-prior" / "instances-b")).to_table(
        ["instance_prompt", "shape"]).to_pylist()
    assert {r["instance_prompt"] for r in prompts} == {f"a <hue> {r['shape']}" for r in prompts}
    assert json.loads((tmp_path / "custom_diffusion_trial-rare-prior.json").read_text())["design"]["samples"] == 2


@pytest.mark.slow
def test_naive_merge_adds_both_deltas_and_loads_both_tokens(tmp_path, one_torch_thread):
    """Two 10-step single-concept jobs; the merged pipeline's K/V are W0 + dA + dB (sum) or the mean, exactly,
    and both tokens are in its tokenizer."""
    import torch

    data = {k: str(tmp_path / k) for k in cdq.CONCEPTS}
    folders = {}
    for k in cdq.CONCEPTS:
        cdq.write_concept(data[k], k, per=1)
        folders[k], _ = cdq.train_cd(tmp_path / f"job-{k}", {k: {**cdq.CONCEPTS[k], "instance_data": data[k]}},
                                     steps=10, lr=1e-2)
    wa, wb = cdq.cd_weights(folders["heart"]), cdq.cd_weights(folders["hue"])
    key = next(k for k in wa if "to_k_custom_diffusion" in k)
    for how in ("sum", "average"):
        pipe = cdq.merged_pipeline(folders["heart"], folders["hue"], how)
        proc_name, param = key.split(".processor.")
        got = dict(pipe.unet.attn_processors[proc_name + ".processor"].named_parameters())[param]
        w0 = pipe.unet.state_dict()[f"{proc_name}.{param.replace('_custom_diffusion', '')}"]
        want = w0 + (wa[key] - w0) + (wb[key] - w0) if how == "sum" else (wa[key] + wb[key]) / 2
        assert torch.allclose(got, want.to(got.dtype), atol=1e-3)
        assert not torch.allclose(wa[key], wb[key])
        vocab = pipe.tokenizer.get_vocab()
        assert "<heart>" in vocab and "<hue>" in vocab
    images = cdq.sample(pipe, cdq.PROMPTS["both"], 2)
    assert len(cdq.read(images)) == 2


@pytest.fixture(scope="module")
def composition(one_torch_thread):
    return cdq.measure_composition(Path("quality-report"), cdq.FULL)


@pytest.fixture(scope="module")
def retrieval_prior(one_torch_thread):
    return prior.measure_prior(Path("quality-report"), prior.FULL)


@pytest.mark.quality
def test_each_concept_is_learned_alone(composition):
    m = composition["models"]
    assert m["heart only"]["heart"]["heart"] >= m["base"]["heart"]["heart"] + 0.4, m
    assert m["hue only"]["hue"]["blue"] >= m["base"]["hue"]["blue"] + 0.5, m


@pytest.mark.quality
@pytest.mark.xfail(strict=True, reason="README Quality: joint training does not beat the naive merge on the "
                                       "toy world (see the table)")
def test_joint_training_renders_both_more_often_than_the_naive_merge(composition):
    """The issue's target: both concepts in one prompt more often jointly than merged naively, by a margin a
    sample's noise cannot make (0.1 of 100 samples) and more often than the base model draws a blue heart."""
    m = composition["models"]
    both = m["joint"]["both"]["blue_heart"]
    merged = max(m["merged (sum)"]["both"]["blue_heart"], m["merged (average)"]["both"]["blue_heart"])
    assert both >= merged + 0.1 and both > m["base"]["both"]["blue_heart"], m


@pytest.mark.quality
def test_retrieved_prior_images_show_the_class(retrieval_prior):
    """Exactly N images whose captions name a star; the detectors read a star in nearly all, stored (PNG,
    ``image_format: png``) as served."""
    r = retrieval_prior["retrieved"]
    assert r["images"] == prior.FULL["class_images"] and r["caption_names_star"] == 1.0, r
    assert r["star"] == r["star_as_served"] >= 0.9, r


@pytest.mark.quality
def test_the_concept_is_learned_through_the_campaign(retrieval_prior):
    f = retrieval_prior["figures"]
    for job in ("cd-retrieval-prior", "cd-no-prior"):
        assert f[job]["concept_purple_star"] >= f["base"]["concept_purple_star"] + 0.6, f


@pytest.mark.quality
@pytest.mark.xfail(strict=True, reason="README Quality: the retrieved stars are mostly purple and blue (toy:clip "
                                       "ranks them first), so the prior holds the class to the concept's colour")
def test_the_retrieved_prior_preserves_the_class(retrieval_prior):
    """The issue's measure as written: class-prompt samples' colour x shape TV to the base, with vs without."""
    f = retrieval_prior["figures"]
    assert f["cd-retrieval-prior"]["class_tv_to_base"] <= f["cd-no-prior"]["class_tv_to_base"] - 0.2, f
