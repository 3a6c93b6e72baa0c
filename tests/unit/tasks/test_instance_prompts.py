"""A concept's ``instance_prompt_column`` (a training prompt per instance image) and
``class_prompt_column`` (a prompt per class image in the prior loss).

The config checks (no training), the trainer's refusals of bad rows, and a few steps on the
tiny models showing that each row's own prompt is what the training step encodes (and what
the text-embedding cache holds).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pixelmill.config import CampaignConfig
from pixelmill.config.base import ConfigError
from pixelmill.config.campaign import Concept
from pixelmill.samples import draw_concept_images, write_table_dataset
from pixelmill.tasks.train.data import TrainingDataError, prompt_key
from pixelmill.tasks.train.job import train_worker
from pixelmill.tasks.train.plan import check_campaign_inputs, plan_campaign

COLOURS = ("red", "blue", "red", "blue")


def _table(prompts) -> pa.Table:
    from pixelmill.datasets.images import IMAGE_TYPE, encode_image

    images = draw_concept_images(len(prompts), seed=0)
    return pa.table({"id": [f"r{i}" for i in range(len(prompts))],
                     "image": pa.array([encode_image(im) for im in images], IMAGE_TYPE),
                     "prompt": prompts})


def _dataset(tmp_path, name, prompts) -> str:
    return write_table_dataset(str(tmp_path / name), _table(prompts), "images", {"t": name})


def _campaign(model: str, tmp_path, instances: str, method: str = "lora", token: str = "sks",
              column: str | None = "prompt", **settings) -> CampaignConfig:
    base = dict(resolution=64, max_steps=2, train_batch_size=2, learning_rate=1e-3, checkpoint_every=100,
                center_crop=True, random_flip=False)
    base.update(settings)
    concept = {"instance_data": instances, "token": token, "class_word": "dog"}
    if column:
        concept["instance_prompt_column"] = column
    return CampaignConfig.model_validate({"output": str(tmp_path / "out"), "model": model,
                                          "concepts": {"dog": concept}, "defaults": base,
                                          "jobs": [{"method": method, "concepts": ["dog"]}],
                                          "eval": {"samples_per_prompt": 1, "steps": 2}})


# -- config (no model, no data) ---------------------------------------------------------------

def test_the_column_and_its_placeholders_in_the_config():
    c = Concept(instance_data="-", token="sks", class_word="dog", instance_prompt_column="caption")
    assert c.prompt_fields("lora") == {"token": "sks", "class": "dog", "subject": "sks dog"}
    assert c.prompt_fields("textual_inversion")["subject"] == "sks"
    # instance_prompt takes {subject} too, as the column's texts do
    one = Concept(instance_data="-", token="sks", class_word="dog", instance_prompt="a {subject} by {class}s")
    assert one.instance_text("dreambooth") == "a sks dog by dogs"
    with pytest.raises(ValueError, match=r"instance_prompt: cannot fill .*\{token\}, \{class\}, \{subject\}"):
        Concept(instance_data="-", instance_prompt="a {dog}").instance_text("lora")


@pytest.mark.parametrize("fields,message", [
    ({"instance_prompt_column": ""}, "empty column name"),
    ({"instance_prompt_column": "caption", "instance_prompt": "a {token}"}, "not both"),
    ({"instance_prompt_column": "image"}, "is the image_column"),
    ({"class_prompt_column": "caption"}, "class_prompt_column needs class_data: a dataset"),
    ({"class_prompt_column": "caption", "class_data": "retrieval"}, "class_prompt_column needs class_data"),
    ({"class_prompt_column": " ", "class_data": "x"}, "name the class_data column of prompts"),
])
def test_bad_column_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Concept(instance_data="-", **fields)


@pytest.mark.parametrize("method,why", [("textual_inversion", "prompt templates"),
                                        ("instruct_pix2pix", "instructions")])
def test_methods_that_do_not_train_on_instance_prompts_refuse_the_column(tmp_path, method, why):
    with pytest.raises(ConfigError, match=rf"{method} does not use instance_prompt_column .*{why}"):
        _campaign("m", tmp_path, "-", method=method).expand()


def test_the_column_changes_the_job_id_only_when_set(tmp_path):
    from pixelmill.config.campaign import _id_fields

    assert "instance_prompt_column" not in _id_fields(Concept(instance_data="-"))  # older campaigns keep their ids
    assert _id_fields(Concept(instance_data="-", instance_prompt_column="p"))["instance_prompt_column"] == "p"
    assert _id_fields(Concept(instance_data="-", class_data="c", class_prompt_column="q"))["class_prompt_column"] == "q"


# -- data checks: before training (preflight) and when the job loads its rows ---------------------

def test_missing_or_non_text_column_is_refused_before_training(tiny_models, tmp_path):
    good = _dataset(tmp_path, "good", [f"a {c} {{subject}}" for c in COLOURS])
    with pytest.raises(ValueError, match=r"has no column\(s\) \['caption'\]"):
        check_campaign_inputs(_campaign(tiny_models["img2img"], tmp_path, good, column="caption"))
    binary = write_table_dataset(str(tmp_path / "binary"), _table([b"x"] * 4), "images", {"t": "b"})
    with pytest.raises(ValueError, match=r"instance_prompt_column 'prompt' of .* holds binary, not text"):
        check_campaign_inputs(_campaign(tiny_models["img2img"], tmp_path, binary))
    with pytest.raises(TrainingDataError, match=r"row 'r0', instance_prompt_column 'prompt': expected text"):
        train_worker(plan_campaign(_campaign(tiny_models["img2img"], tmp_path, binary)).jobs[0].spec)
    check_campaign_inputs(_campaign(tiny_models["img2img"], tmp_path, good))


@pytest.mark.parametrize("prompts,message", [
    (["a {subject}", "  ", "a {subject}", "a {subject}"], r"row 'r1', .*: empty prompt"),
    (["a {subject}", "a {subject}", None, "a {subject}"], r"row 'r2', .*: expected text, got NoneType"),
    (["a {subject}", "a {colour} {subject}", "a {subject}", "a {subject}"], r"row 'r1', .*cannot fill"),
    (["a {subject}", "a {subject}", "a {subject}", "a red dog"], r"row 'r3', .*'a red dog' does not name the "
                                                                 r"concept; put \{subject\} or \{token\}"),
])
def test_bad_rows_fail_the_job_naming_the_row(tiny_models, tmp_path, prompts, message):
    url = _dataset(tmp_path, "bad", prompts)
    spec = plan_campaign(_campaign(tiny_models["img2img"], tmp_path, url)).jobs[0].spec
    with pytest.raises(TrainingDataError, match=message):
        train_worker(spec)


# -- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_each_row_trains_with_its_own_prompt(tiny_models, tmp_path, one_torch_thread, method):
    """The step encodes each sample's own formatted prompt, and the text cache holds one embedding per
    distinct row prompt (two colours: two prompts, plus the empty one)."""
    from pixelmill.tasks.train.job import _setup

    url = _dataset(tmp_path, "rows", [f"a photo of a {c} {{subject}}" for c in COLOURS])
    spec = plan_campaign(_campaign(tiny_models["img2img"], tmp_path, url, method=method, cache_latents=True,
                                   cache_text_embeddings=True, with_prior_preservation=False)).jobs[0].spec
    wanted = {f"r{i}": f"a photo of a {c} sks dog" for i, c in enumerate(COLOURS)}
    assert train_worker(spec)["artifacts"]
    from safetensors.torch import load_file

    cached = load_file(spec["cache"]["text"])
    assert {k for k in cached if "|" not in k} == {prompt_key(p) for p in set(wanted.values()) | {""}}

    _, data, trainer = _setup(spec, torch.device("cpu"))
    assert {x.id.split(":", 1)[1]: x.prompt for x in data.instance} == wanted
    seen: list[str] = []
    encode = trainer.encode_text
    trainer.encode_text = lambda prompts: (seen.extend(prompts), encode(prompts))[1]
    _, idx = trainer.schedule.batch(0)
    trainer.step(0)
    assert seen == [data.instance[i].prompt for i in idx] and set(seen) <= set(wanted.values())


def test_each_class_image_trains_with_its_own_prompt_in_the_prior(tiny_models, tmp_path, one_torch_thread):
    """class_prompt_column: the prior loss's samples carry their own rows' prompts ({class} filled in);
    a class dataset without the column is refused before training."""
    from pixelmill.tasks.train.job import _setup

    inst = _dataset(tmp_path, "inst", [f"a photo of a {c} {{subject}}" for c in COLOURS])
    klass = _dataset(tmp_path, "class", [f"a photo of a {c} {{class}}" for c in ("green", "red", "blue", "green")])
    cfg = _campaign(tiny_models["img2img"], tmp_path, inst, method="dreambooth", with_prior_preservation=True,
                    num_class_images=4)
    cfg.concepts["dog"] = cfg.concepts["dog"].model_copy(update={"class_data": klass, "class_prompt_column": "prompt"})
    check_campaign_inputs(cfg)
    spec = plan_campaign(cfg).jobs[0].spec
    _, data, trainer = _setup(spec, torch.device("cpu"))
    assert [x.prompt for x in data.klass] == [f"a photo of a {c} dog" for c in ("green", "red", "blue", "green")]
    seen: list[str] = []
    encode = trainer.encode_text
    trainer.encode_text = lambda prompts: (seen.extend(prompts), encode(prompts))[1]
    trainer.step(0)
    _, cidx = trainer.class_schedule.batch(0)
    assert [data.klass[i].prompt for i in cidx] == [p for p in seen if "sks" not in p]
    bad = cfg.model_copy(deep=True)
    bad.concepts["dog"].class_prompt_column = "caption"
    with pytest.raises(ValueError, match=r"has no class_prompt_column 'caption'"):
        check_campaign_inputs(bad)
