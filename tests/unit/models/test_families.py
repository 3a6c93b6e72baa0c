"""Model families: detection from configs, and the sampling loops pixelmill writes itself on SD 1.x, 2.x v, SDXL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelmill.models.family import (
    UnsupportedFamily,
    describe_model,
    family_from_configs,
    family_of_pipeline,
    require_family,
)
from pixelmill.models.loading import ModelNotFound, load_img2img_pipeline, load_text2img_pipeline

STEPS = 6


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_models) -> dict[str, str]:
    from pixelmill.models.tiny_families import save_tiny_sd2v, save_tiny_sdxl, save_tiny_sdxl_instruct_pix2pix

    root = tmp_path_factory.mktemp("families")
    return {
        "sd1": tiny_models["img2img"],
        "sd2v": save_tiny_sd2v(root / "sd2v"),
        "sdxl": save_tiny_sdxl(root / "sdxl"),
        "sdxl-ip2p": save_tiny_sdxl_instruct_pix2pix(root / "sdxl-ip2p"),
    }


@pytest.fixture(scope="module")
def pipes(family_models) -> dict[str, object]:
    return {k: load_img2img_pipeline(family_models[k], device="cpu", dtype="float32") for k in ("sd1", "sd2v", "sdxl")}


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def test_family_is_read_from_the_checkpoint(family_models):
    expected = {"sd1": ("sd1", "epsilon", 4), "sd2v": ("sd2", "v_prediction", 4), "sdxl": ("sdxl", "epsilon", 4),
                "sdxl-ip2p": ("sdxl", "epsilon", 8)}
    for name, (family, prediction, channels) in expected.items():
        info = describe_model(family_models[name])
        assert (info.family, info.prediction_type, info.unet_in_channels) == (family, prediction, channels), name
        assert info.vae_force_upcast == (family == "sdxl")
    assert describe_model("toy:sd").family == "sd1"


def test_unknown_layouts_and_unsupported_combinations_are_clear_errors(tmp_path):
    with pytest.raises(UnsupportedFamily, match="has no UNet"):
        family_from_configs({"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}, None, name="flux")
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    with pytest.raises(UnsupportedFamily, match="refiner"):
        family_from_configs(refiner, {"addition_embed_type": "text_time", "cross_attention_dim": 1280})
    kandinsky = {"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    with pytest.raises(UnsupportedFamily, match="addition_embed_type='image'"):
        family_from_configs(kandinsky, {"addition_embed_type": "image", "cross_attention_dim": 768})
    info = family_from_configs({"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["t", "C"],
                                "text_encoder_2": ["t", "C"]}, {"addition_embed_type": "text_time"})
    with pytest.raises(UnsupportedFamily, match=r"dreambooth.*sdxl \(Stable Diffusion XL\).*'m'.*sd1.*sd2"):
        require_family(info, ("sd1", "sd2"), "dreambooth", "m")
    require_family(info, ("sdxl",), "lora")
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UnsupportedFamily, match="no UNet"):
        describe_model(str(folder))


def test_a_hub_id_missing_from_the_offline_cache_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="nobody/no-such-model.*HF_HUB_OFFLINE"):
        describe_model("nobody/no-such-model")


def test_loaded_pipelines_report_their_family(pipes):
    assert {k: family_of_pipeline(p).family for k, p in pipes.items()} == {"sd1": "sd1", "sd2v": "sd2",
                                                                           "sdxl": "sdxl"}


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_sdedit_steps_is_the_pipelines_own_img2img_at_each_rows_strength(pipes, family):
    """One sampler: the t0 search's loop gives, per row, what the img2img call at strength k/steps gives."""
    from pixelmill.tasks.edit.sdedit import sdedit_steps

    pipe, images = pipes[family], _images()
    prompts, ks, seeds = ["a cat", "a dog", "red"], [3, STEPS, 2], [1, 2, 3]
    outs, flags = sdedit_steps(pipe, images, prompts, ks, STEPS, 3.0, None, seeds)
    assert flags == [False] * 3
    for i in range(3):
        ref = pipe(prompt=[prompts[i]], image=[images[i]], strength=ks[i] / STEPS, num_inference_steps=STEPS,
                   guidance_scale=3.0, generator=[torch.Generator().manual_seed(seeds[i])]).images[0]
        assert _diff(ref, outs[i]) <= 1, (family, i)
    same, _ = sdedit_steps(pipe, images[:1], prompts[:1], [0], STEPS, 3.0, None, seeds[:1])
    assert _diff(same[0], images[0]) == 0


def test_v_prediction_is_followed_where_an_epsilon_loop_would_be_wrong(pipes):
    """The SD 2.x v checkpoint's loop matches its pipeline; reading its output as epsilon would not."""
    import copy

    from diffusers import DDIMScheduler

    from pixelmill.tasks.edit.sdedit import sdedit_steps

    pipe, images = pipes["sd2v"], _images(1)
    ref = pipe(prompt=["a cat"], image=images, strength=1.0, num_inference_steps=STEPS, guidance_scale=1.0,
               generator=[torch.Generator().manual_seed(5)]).images[0]
    v_out, _ = sdedit_steps(pipe, images, ["a cat"], [STEPS], STEPS, 1.0, None, [5])
    as_epsilon = copy.copy(pipe)
    as_epsilon.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "epsilon"})
    eps_out, _ = sdedit_steps(as_epsilon, images, ["a cat"], [STEPS], STEPS, 1.0, None, [5])
    assert _diff(ref, v_out[0]) <= 1
    assert _diff(ref, eps_out[0]) > 20


def test_masked_sdedit_on_sdxl_keeps_every_pixel_outside_the_mask(pipes):
    from pixelmill.tasks.edit.sdedit import sdedit_steps

    images = _images(2)
    masks = [np.zeros((64, 64), bool) for _ in images]
    masks[0][16:48, 16:48] = True
    masks[1][:, :20] = True
    outs, _ = sdedit_steps(pipes["sdxl"], images, ["a cat", "a dog"], [STEPS, 3], STEPS, 3.0, None, [1, 2],
                           masks=masks)
    for out, image, mask in zip(outs, images, masks):
        a, b = np.asarray(out), np.asarray(image)
        assert (a[~mask] == b[~mask]).all()
        assert (a[mask] != b[mask]).any()


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_prompt_to_prompt_renders_on_every_family(family_models, family):
    from pixelmill.tasks.p2p import render_pairs

    pipe = load_text2img_pipeline(family_models[family], device="cpu", dtype="float32")
    pairs = render_pairs(pipe, ["a cat", "a red circle"], ["a cat", "a green circle"], [3, 4], [1.0, 0.5],
                         [5.0, 7.5], 3, 64, 64, cross_replace=True)
    (src0, edit0), (src1, edit1) = pairs
    assert _diff(src0, edit0) == 0  # same prompt, all steps shared: the same image
    assert _diff(src1, edit1) > 0
    alone = render_pairs(pipe, ["a red circle"], ["a green circle"], [4], [0.5], [7.5], 3, 64, 64, cross_replace=True)
    assert _diff(alone[0][1], edit1) <= 1  # a pair's result does not depend on its batch


def test_sdxl_instruct_pix2pix_loads_by_its_own_class(family_models):
    from pixelmill.models.loading import load_instruct_pix2pix_pipeline

    pipe = load_instruct_pix2pix_pipeline(family_models["sdxl-ip2p"], device="cpu", dtype="float32")
    assert type(pipe).__name__ == "StableDiffusionXLInstructPix2PixPipeline"
    assert family_of_pipeline(pipe).family == "sdxl"


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                       "DPMSolverMultistepScheduler"])
def test_sdedit_steps_follows_any_scheduler_the_checkpoint_ships(pipes, scheduler):
    """Stateful (PNDM, multistep), stochastic (ancestral), second-order (Heun) samplers: the pipeline's result."""
    import copy

    import diffusers

    from pixelmill.tasks.edit.sdedit import sdedit_steps

    pipe = copy.copy(pipes["sd1"])
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    images, prompts, ks, seeds = _images(2), ["a cat", "red"], [3, STEPS], [1, 2]
    outs, _ = sdedit_steps(pipe, images, prompts, ks, STEPS, 3.0, None, seeds)
    for i in range(2):
        ref = pipe(prompt=[prompts[i]], image=[images[i]], strength=ks[i] / STEPS, num_inference_steps=STEPS,
                   guidance_scale=3.0, generator=[torch.Generator().manual_seed(seeds[i])]).images[0]
        assert _diff(ref, outs[i]) <= 1, (scheduler, i)


def test_auto_batch_measures_every_family_with_inputs_its_unet_takes(pipes):
    """``batch_size: auto``'s memory probe builds inputs each family's UNet accepts (SDXL: pooled text, time ids)."""
    from pixelmill.models.speed import dummy_unet_inputs

    for family, pipe in pipes.items():
        out = pipe.unet(**dummy_unet_inputs(pipe.unet, 3, 8, 77, torch.device("cpu")), return_dict=False)[0]
        assert out.shape == (3, 4, 8, 8), family
