"""Single-file ``.safetensors`` checkpoints: writer, header-only detection, shape-inferred configs, loading."""

from __future__ import annotations

import json
import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from pixelmill.models.family import UnsupportedFamily, describe_model
from pixelmill.models.loading import (
    ModelNotFound,
    check_model_reference,
    load_img2img_pipeline,
    load_instruct_pix2pix_pipeline,
    load_text2img_pipeline,
    load_training_components,
)
from pixelmill.models.single_file import detect_family, prediction_type, read_header
from pixelmill.models.single_file_config import infer_configs, reference_config
from pixelmill.models.single_file_writer import PIXELMILL_CONFIG_KEY, pipeline_to_original, write_single_file

FAMILIES = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread) -> dict[str, tuple[str, str]]:
    """``{family: (folder, single file)}`` for the tiny sd1, sd2 (v-prediction), sdxl and InstructPix2Pix models."""
    from pixelmill.models.tiny import save_tiny_img2img, save_tiny_instruct_pix2pix
    from pixelmill.models.tiny_families import save_tiny_sd2v, save_tiny_sdxl

    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for name, save in (("sd1", save_tiny_img2img), ("sd2", save_tiny_sd2v), ("sdxl", save_tiny_sdxl),
                       ("ip2p", save_tiny_instruct_pix2pix)):
        folder = save(root / name)
        out[name] = (folder, write_single_file(folder, root / "files" / f"{name}.safetensors"))
    return out


def _header_only(path, shapes: dict, metadata: dict | None = None) -> str:
    """A file with a safetensors header and no tensor data: enough for everything that reads headers only."""
    header = {k: {"dtype": "F32", "shape": list(v), "data_offsets": [0, 0]} for k, v in shapes.items()}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return str(path)


def _full_size_shapes(family: str, hub_extras: bool = True) -> tuple[dict[str, tuple[int, ...]], dict]:
    """``(key -> shape header, diffusers state dicts)`` of a full-size ``family`` checkpoint (reference configs).

    The models are built on the meta device (no weights), then written in the original layout.
    ``hub_extras`` adds what hub files carry beyond diffusers' components (SD 2's 24th OpenCLIP
    layer and text projection, SD 1's position ids, EMA weights) that must not change the config.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        states = {"unet": UNet2DConditionModel.from_config(reference_config(family, "unet")).state_dict(),
                  "vae": AutoencoderKL.from_config(reference_config(family, "vae")).state_dict(),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**reference_config(family, "text_encoder")))
                  .state_dict()}
        if family == "sdxl":
            config = CLIPTextConfig(**reference_config(family, "text_encoder_2"))
            states["text_encoder_2"] = CLIPTextModelWithProjection(config).state_dict()
    written = pipeline_to_original(family, states, reference_config(family, "unet"))
    shapes = {k: tuple(v.shape) for k, v in written.items()}
    if hub_extras:
        shapes["model_ema.decay"] = ()
        shapes["model_ema.diffusion_modelinput_blocks00weight"] = (320, 4, 3, 3)
        if family == "sd1":
            shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
        if family == "sd2":
            for key, shape in list(shapes.items()):
                if key.startswith("cond_stage_model.model.transformer.resblocks.22."):
                    shapes[key.replace("resblocks.22.", "resblocks.23.")] = shape
            shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
    return shapes, states


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_size_header_infers_the_reference_config(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    shapes, states = _full_size_shapes(family)
    assert detect_family(shapes) == family
    ptype, source = prediction_type(family, shapes, {})
    assert (ptype, source) == (FAMILIES[family], f"{family} default")
    configs = infer_configs(shapes, family, ptype)
    for component, config in configs.items():
        assert config == reference_config(family, component), component

    # the writer's full-size layout is the one diffusers' own converters read back, shape for shape
    written = pipeline_to_original(family, states, reference_config(family, "unet"))
    for component, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        back = convert(written, reference_config(family, component))
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in states[component].items()}


def test_reference_configs_are_the_real_models():
    """The shipped configs build models of the published sizes (parameters, millions)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    expected = {"sd1": 859.52, "sd2": 865.91, "sdxl": 2567.46}
    for family, millions in expected.items():
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(reference_config(family, "unet"))
        assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_describe_single_file(tiny, family):
    info = describe_model(tiny[family][1])
    assert (info.family, info.prediction_type, info.unet_in_channels) == (family, FAMILIES[family], 4)
    assert info.vae_force_upcast == (family == "sdxl")
    _, metadata = read_header(tiny[family][1])
    assert metadata["modelspec.prediction_type"] == {"epsilon": "epsilon", "v_prediction": "v"}[FAMILIES[family]]
    assert json.loads(metadata[PIXELMILL_CONFIG_KEY])["scheduler"]["prediction_type"] == FAMILIES[family]


def test_prediction_type_sources(tiny, tmp_path):
    shapes, _ = read_header(tiny["sd2"][1])
    cases = [
        ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
        ({"modelspec.prediction_type": "v"}, "v_prediction"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction"),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, "v_prediction"),  # no answer: the sd2 default
        ({"ss_v_parameterization": "True"}, "v_prediction"),
        ({}, "v_prediction"),
    ]
    for metadata, expected in cases:
        assert prediction_type("sd2", shapes, metadata)[0] == expected, metadata
    assert prediction_type("sd1", shapes, {})[0] == "epsilon"
    assert prediction_type("sdxl", {**shapes, "v_pred": ()}, {}) == ("v_prediction", "v_pred key")
    # no metadata: the LDM sidecar yaml next to the file decides (SD 2.x-base: no parameterization)
    bare = _header_only(tmp_path / "v2-base.safetensors", shapes)
    assert describe_model(bare).prediction_type == "v_prediction"
    (tmp_path / "v2-base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert describe_model(bare).prediction_type == "epsilon"
    (tmp_path / "v2-base.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert describe_model(bare).prediction_type == "v_prediction"


def test_unsupported_layouts_are_named(tiny, tmp_path):
    shapes, _ = read_header(tiny["sdxl"][1])
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in shapes.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(UnsupportedFamily, match="refiner"):
        detect_family(refiner)
    no_vae = {k: v for k, v in shapes.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(UnsupportedFamily, match="no VAE"):
        detect_family(no_vae)
    inpaint = {**shapes, "model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}
    with pytest.raises(UnsupportedFamily, match="9"):
        detect_family(inpaint)
    with pytest.raises(UnsupportedFamily, match="transformer"):
        detect_family({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UnsupportedFamily, match="not a safetensors file"):
        describe_model(str(junk))


def test_check_model_reference(tiny, tmp_path):
    check_model_reference(tiny["sd1"][1])
    with pytest.raises(ModelNotFound, match="model file not found"):
        check_model_reference(str(tmp_path / "missing.safetensors"))
    for suffix in (".ckpt", ".bin", ".pt"):
        pickled = tmp_path / f"model{suffix}"
        pickled.write_bytes(b"\x80\x04pickle")
        with pytest.raises(ModelNotFound, match="pickled checkpoint.*only .safetensors"):
            check_model_reference(str(pickled))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelNotFound, match="not a safetensors file"):
        check_model_reference(str(junk))
    shapes, _ = read_header(tiny["sd1"][1])
    unet_only = _header_only(tmp_path / "unet.safetensors",
                             {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")})
    with pytest.raises(ModelNotFound, match="no VAE"):
        check_model_reference(unet_only)


def _state_dicts_equal(a, b) -> None:
    for name in COMPONENTS:
        ca, cb = getattr(a, name, None), getattr(b, name, None)
        assert (ca is None) == (cb is None), name
        if ca is None:
            continue
        sa, sb = ca.state_dict(), cb.state_dict()
        assert set(sa) == set(sb), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_file_edits_like_its_folder(tiny, family):
    folder, file = tiny[family]
    a = load_img2img_pipeline(folder, device="cpu", dtype="float32")
    b = load_img2img_pipeline(file, device="cpu", dtype="float32")
    assert type(a) is type(b) and type(a.scheduler) is type(b.scheduler)
    assert b.scheduler.config.prediction_type == FAMILIES[family]
    _state_dicts_equal(a, b)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    outs = []
    for pipe in (a, b):
        out = pipe(prompt="a red cat", image=image, strength=0.6, num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(7))
        outs.append(out.images)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_single_file_text2img_instruct_pix2pix_and_training(tiny):
    text2img = load_text2img_pipeline(tiny["sd1"][1], device="cpu", dtype="float32")
    assert type(text2img).__name__ == "StableDiffusionPipeline"
    assert text2img.unet.config.sample_size == 32  # the writer's modelspec/pixelmill.config resolution

    folder, file = tiny["ip2p"]
    info = describe_model(file)
    assert (info.unet_in_channels, info.pipeline_class) == (8, "StableDiffusionInstructPix2PixPipeline")
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        load_img2img_pipeline(file, device="cpu")
    with pytest.raises(ValueError, match="not an InstructPix2Pix model"):
        load_instruct_pix2pix_pipeline(tiny["sd1"][1], device="cpu")
    ip2p = load_instruct_pix2pix_pipeline(file, device="cpu", dtype="float32")
    assert type(ip2p).__name__ == "StableDiffusionInstructPix2PixPipeline"
    _state_dicts_equal(load_instruct_pix2pix_pipeline(folder, device="cpu", dtype="float32"), ip2p)

    parts = load_training_components(tiny["sd2"][1])
    ref = load_training_components(tiny["sd2"][0])
    assert parts["pipeline_class"] == "StableDiffusionPipeline"  # the folder names its own (img2img) class
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        assert parts[name].dtype == torch.float32
        for key, value in ref[name].state_dict().items():
            assert torch.equal(parts[name].state_dict()[key], value), f"{name}.{key}"
    xl = load_training_components(tiny["sdxl"][1])  # SDXL trains too (LoRA, TI, InstructPix2Pix)
    assert xl["info"].family == "sdxl" and xl["text_encoder_2"] is not None and xl["tokenizer_2"] is not None


def test_half_precision_file_loads_in_the_asked_dtype(tiny, tmp_path):
    half = write_single_file(tiny["sd1"][0], tmp_path / "half.safetensors", dtype=torch.float16)
    pipe = load_img2img_pipeline(half, device="cpu", dtype="float32")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32


def test_single_file_on_object_storage(tiny, s3_server):
    """On S3 the driver reads the header only (a ranged read); the worker loads its local copy."""
    from pixelmill.datasets import storage

    folder, file = tiny["sd1"]
    url = s3_server.url("unit", "models", "tiny-sd1.safetensors")
    with open(file, "rb") as fh:
        storage.write_bytes(url, fh.read())
    check_model_reference(url)
    assert describe_model(url).family == "sd1"
    with pytest.raises(ModelNotFound):
        check_model_reference(s3_server.url("unit", "models", "absent.safetensors"))
    pipe = load_img2img_pipeline(url, device="cpu", dtype="float32")
    _state_dicts_equal(load_img2img_pipeline(folder, device="cpu", dtype="float32"), pipe)
