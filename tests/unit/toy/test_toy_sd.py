"""The toy Stable Diffusion: its training method, and the shipped model (loaded, never trained here)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pixelmill.models.loading import resolve_model_name
from pixelmill.toy import train_sd, world

SHIPPED = train_sd.DEFAULT_OUT
needs_weights = pytest.mark.skipif(
    not (SHIPPED / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="the toy SD has not been trained yet (python -m pixelmill.toy.train_sd)",
)


def _tiny_parts():
    from pixelmill.models.tiny import build_tiny_sd_components

    c = build_tiny_sd_components(seed=0)
    return {k: c[k] for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler")}


def test_text_to_image_trains_the_whole_unet_and_drops_captions():
    from pixelmill.tasks.train.data import Sample
    from pixelmill.tasks.train.methods import make_method

    parts = _tiny_parts()
    method = make_method("text_to_image", parts, {"conditioning_dropout_prob": 0.1}, [])
    method.setup()
    names = set(method.trainable())
    assert names == {f"unet.{n}" for n, _ in parts["unet"].named_parameters()}
    assert method.text_is_fixed()
    prompts = [method.prompt(Sample(f"id{i}", "instance", "a red circle", b""), 0, 3) for i in range(2000)]
    dropped = prompts.count("") / len(prompts)
    assert 0.07 < dropped < 0.13 and set(prompts) == {"", "a red circle"}
    again = [method.prompt(Sample(f"id{i}", "instance", "a red circle", b""), 0, 3) for i in range(2000)]
    assert again == prompts  # drawn from (seed, step, id): a resumed run drops the same captions
    keep = make_method("text_to_image", _tiny_parts(), {"conditioning_dropout_prob": 0.0}, [])
    assert keep.prompt(Sample("x", "instance", "a blue star", b""), 0, 0) == "a blue star"


def test_text_to_image_steps_through_the_trainer_core():
    import io

    from pixelmill.tasks.train.core import Trainer
    from pixelmill.tasks.train.data import Sample, TrainingData
    from pixelmill.tasks.train.methods import make_method

    args = train_sd.parse_args(["--batch", "2", "--lr", "1e-3"])
    settings = train_sd.trainer_settings(args)
    parts = _tiny_parts()
    method = make_method("text_to_image", parts, settings, [])
    method.setup()
    samples = []
    for i in range(2):
        image, caption, _ = world.make_row(0, i, world.TRAIN_SHAPES)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        samples.append(Sample(f"row{i}", "instance", caption, buf.getvalue(), size=image.size))
    trainer = Trainer(method, TrainingData(instance=samples), settings)
    before = {k: p.detach().clone() for k, p in method.trainable().items()}
    log = trainer.step(0)
    assert torch.isfinite(torch.tensor(log.loss))
    assert any(not torch.equal(before[k], p) for k, p in method.trainable().items())


def test_eval_prompts_are_held_out_rows_of_training_shapes():
    items = train_sd.eval_prompts(50)
    assert len(items) == 50 and {s for _, _, s in items} <= set(world.TRAIN_SHAPES)
    for caption, color, shape in items:
        parsed = world.parse_caption(caption)
        assert (parsed["color"], parsed["shape"]) == (color, shape)


@needs_weights
def test_shipped_toy_sd_is_a_diffusers_pipeline_with_a_model_card():
    assert resolve_model_name("toy:sd") == str(SHIPPED)
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (SHIPPED / "MODEL_CARD.md").is_file()
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert metrics["prompts"] >= 200
    for part in ("unet", "vae", "text_encoder"):
        from safetensors import safe_open

        files = list((SHIPPED / part).glob("*.safetensors"))
        assert files
        with safe_open(str(files[0]), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}


@needs_weights
def test_toy_sd_generates_the_prompted_colour_and_shape_far_above_the_random_tiny_sd():
    from diffusers import StableDiffusionPipeline

    from pixelmill.models.loading import load_text2img_pipeline
    from pixelmill.models.tiny import build_tiny_sd_components

    torch.manual_seed(0)
    pipe = load_text2img_pipeline("toy:sd", device="cpu", dtype="float32")
    items = train_sd.eval_prompts(16)
    prompts = [p for p, _, _ in items]
    images = train_sd.generate(pipe, prompts, guidance=4.0, steps=20)
    assert all(img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) for img in images)
    trained = train_sd.agreement(images, items)
    tiny = StableDiffusionPipeline(**build_tiny_sd_components(seed=0))
    tiny.set_progress_bar_config(disable=True)
    control = train_sd.agreement(train_sd.generate(tiny, prompts, guidance=4.0, steps=10, size=64), items)
    # 16 prompts of the 200 the model card measures (colour 0.685, shape 0.615 there): fixed
    # seeds, so these are 0.50 / 0.56 / 0.31 against the control's 0.00 / 0.12 / 0.00
    assert trained["color"] >= control["color"] + 0.35, (trained, control)
    assert trained["shape"] >= control["shape"] + 0.3, (trained, control)
    assert trained["both"] >= 0.25, trained


@needs_weights
def test_toy_sd_loads_as_img2img_for_sdedit():
    from pixelmill.models.loading import load_img2img_pipeline

    pipe = load_img2img_pipeline("toy:sd", device="cpu", dtype="float32")
    image, _, _ = world.make_row(5, 0, world.TRAIN_SHAPES)
    out = pipe(prompt=["a green circle"], image=[image], strength=0.5, num_inference_steps=10,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(out, Image.Image) and out.size == image.size
