"""Campaign adapters in a bulk edit: they change the output, LoRA at scale 0 does not,
two learned concepts compose in one prompt, and bad adapter folders are refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pixelmill.config import CampaignConfig, EditConfig
from pixelmill.models.adapters import AdapterError, adapter_kind, apply_adapters
from pixelmill.samples import draw_concept_images, write_image_dataset
from pixelmill.tasks.edit import SDEditEditor
from pixelmill.tasks.train.job import run_job
from pixelmill.tasks.train.plan import plan_campaign

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("adapters")
    dog = write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0))
    cat = write_image_dataset(str(root / "cat"), draw_concept_images(4, seed=1, color=(40, 200, 40)))
    cfg = CampaignConfig.model_validate({
        "output": str(root / "out"), "model": tiny_models["img2img"],
        "concepts": {"dog": {"instance_data": dog, "token": "<dog1>", "class_word": "dog"},
                     "cat": {"instance_data": cat, "token": "<cat1>", "class_word": "cat"}},
        "defaults": {"resolution": 64, "max_steps": 4, "train_batch_size": 2, "learning_rate": 5e-2,
                     "with_prior_preservation": False},
        "jobs": [{"name": "lora", "method": "lora", "concepts": ["dog"]},
                 {"name": "ti-dog", "method": "textual_inversion", "concepts": ["dog"]},
                 {"name": "ti-cat", "method": "textual_inversion", "concepts": ["cat"]},
                 {"name": "cd", "method": "custom_diffusion", "concepts": ["dog", "cat"]}],
        "eval": {"prompts": [], "samples_per_prompt": 1},
    })
    out = {}
    for job in plan_campaign(cfg).jobs:
        run_job(job.spec)
        out[job.spec["name"]] = job.spec["dir"]
    return out


def _batch() -> pa.Table:
    rows = []
    for i, im in enumerate(draw_concept_images(2, seed=5, color=(200, 120, 40))):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        rows.append({"id": f"r{i}", "image": {"bytes": buf.getvalue(), "path": None}, "caption": "a thing",
                     "shard": "00000"})
    return pa.Table.from_pylist(rows)


def _edit(tiny_models, prompt="a photo of <dog1> dog", adapters=()) -> list[np.ndarray]:
    cfg = EditConfig(input="x", output="y", model=tiny_models["img2img"], prompt=prompt, strength=0.6, steps=4,
                     resolution=64, seed=3, adapters=list(adapters)).model_dump()
    stage = SDEditEditor(cfg)
    stage.setup()
    out = stage(_batch()).to_pylist()
    assert all(r["status"] == "ok" for r in out), [r["error"] for r in out]
    return [np.asarray(Image.open(io.BytesIO(r["edited_image"]["bytes"])), dtype=np.float32) for r in out]


def _differs(a, b, atol=1.0) -> bool:
    return any(np.abs(x - y).max() > atol for x, y in zip(a, b))


def test_lora_adapter_changes_the_edit_and_scale_zero_does_not(tiny_models, trained):
    base = _edit(tiny_models)
    with_lora = _edit(tiny_models, adapters=[{"path": trained["lora"], "scale": 1.0}])
    zero = _edit(tiny_models, adapters=[{"path": trained["lora"], "scale": 0.0}])
    assert _differs(with_lora, base)
    for a, b in zip(zero, base):
        assert np.abs(a - b).max() <= 1.0  # identical up to one 8-bit level of float noise


def test_two_textual_inversion_concepts_compose_in_one_prompt(tiny_models, trained):
    prompt = "a photo of <dog1> in the style of <cat1>"
    both = _edit(tiny_models, prompt, adapters=[{"path": trained["ti-dog"]}, {"path": trained["ti-cat"]}])
    assert _differs(both, _edit(tiny_models, "a photo of <dog1>", adapters=[{"path": trained["ti-dog"]}]))
    assert _differs(both, _edit(tiny_models, "in the style of <cat1>", adapters=[{"path": trained["ti-cat"]}]))


def test_custom_diffusion_adapter_loads_processors_and_tokens(tiny_models, trained):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_models["img2img"], use_safetensors=True)
    names = apply_adapters(pipe, [{"path": trained["cd"]}])
    assert names == ["custom_diffusion:" + Path(trained["cd"]).name]
    assert sum(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values()) == \
        len(pipe.unet.attn_processors)
    assert len(pipe.tokenizer.encode("<dog1> <cat1>", add_special_tokens=False)) == 2
    assert _differs(_edit(tiny_models, "a photo of <dog1> dog and <cat1> cat", adapters=[{"path": trained["cd"]}]),
                    _edit(tiny_models, "a photo of <dog1> dog and <cat1> cat", adapters=[{"path": trained["ti-dog"]},
                                                                                          {"path": trained["ti-cat"]}]))


def test_bad_adapter_folders_are_refused(tmp_path, trained):
    with pytest.raises(AdapterError, match="not a folder"):
        adapter_kind(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no learned_embeds.safetensors"):
        adapter_kind(str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="declared lora"):
        adapter_kind(trained["ti-dog"], "lora")
    assert adapter_kind(trained["lora"]) == "lora"
    assert adapter_kind(str(Path(trained["cd"]) / "artifacts")) == "custom_diffusion"


def test_adapter_content_is_part_of_the_output_hash(tiny_models, trained):
    a = EditConfig(input="x", output="y", model="m", prompt="p", adapters=[{"path": trained["lora"]}])
    b = EditConfig(input="x", output="y", model="m", prompt="p", adapters=[{"path": trained["lora"], "scale": 0.5}])
    c = EditConfig(input="x", output="y", model="m", prompt="p")
    assert a.output_affecting() != b.output_affecting()
    assert "adapters" not in c.output_affecting()
    assert len(a.output_affecting()["adapters"][0]["files"]) == 16
