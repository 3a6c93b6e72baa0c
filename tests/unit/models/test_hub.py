"""Hub ids from a local hub cache (real layout, offline), the safety checker setting, dtype ``auto``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.helpers.hub_cache import add_to_hub_cache


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_models):
    """A hub cache holding the tiny img2img pipeline as ``tiny-org/tiny-sd``, made the process's cache."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hub")
    commit = add_to_hub_cache(cache, "tiny-org/tiny-sd", tiny_models["img2img"])
    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    yield {"cache": cache, "commit": commit}
    mp.undo()


def test_hub_repo_names_hub_ids_only(tiny_models):
    from pixelmill.models.hub import hub_repo

    assert hub_repo("org/name") == "org/name" and hub_repo("hf-hub:org/name") == "org/name"
    for other in (None, "", tiny_models["img2img"], "./org/name", "toy:sd", "s3://bucket/model", "model.safetensors",
                  "justaname"):
        assert hub_repo(other) is None, other


def test_preflight_resolves_a_cached_hub_id_and_names_a_missing_one(hub_cache):
    from pixelmill.config.preflight import PreflightError, check_model_path
    from pixelmill.models.loading import ModelNotFound, check_model_reference

    check_model_reference("tiny-org/tiny-sd")
    check_model_reference("hf-hub:tiny-org/tiny-sd")
    with pytest.raises(ModelNotFound, match="tiny-org/not-there.*HF_HUB_OFFLINE"):
        check_model_reference("tiny-org/not-there")
    with pytest.raises(PreflightError, match="^model: .*'tiny-org/not-there'"):
        check_model_path("model", "tiny-org/not-there", "pipeline")
    check_model_reference("tiny-org/tiny-sd", revision=hub_cache["commit"])
    with pytest.raises(ModelNotFound, match="tiny-org/tiny-sd'@v9"):  # a revision the cache does not have
        check_model_reference("tiny-org/tiny-sd", revision="v9")


def test_snapshot_download_finds_the_cache_offline(hub_cache):
    from pixelmill.models.hub import cached_snapshot, download_snapshot

    got = download_snapshot("tiny-org/tiny-sd")
    assert got["commit"] == hub_cache["commit"] and (cached_snapshot("tiny-org/tiny-sd") / "model_index.json").is_file()
    assert cached_snapshot("tiny-org/tiny-sd", hub_cache["commit"]).name == hub_cache["commit"]
    assert cached_snapshot("tiny-org/not-there") is None


def test_a_hub_id_pinned_to_a_commit_loads_from_its_snapshot(hub_cache):
    from pixelmill.models.loading import _read_model_index, load_img2img_pipeline, model_fingerprint

    name, index, revision = _read_model_index("tiny-org/tiny-sd", hub_cache["commit"])
    assert name.endswith(hub_cache["commit"]) and revision is None and index["_class_name"]
    pipe = load_img2img_pipeline("tiny-org/tiny-sd", device="cpu", dtype="float32", revision=hub_cache["commit"])
    assert pipe.unet is not None
    assert load_img2img_pipeline("tiny-org/tiny-sd", device="cpu", dtype="float32").unet is not None  # by branch
    assert model_fingerprint("tiny-org/tiny-sd") == f"tiny-org/tiny-sd@{hub_cache['commit']}"


@pytest.mark.parametrize(("kind", "bf16", "want"), [
    ("cuda", True, "bfloat16"),   # Ampere and newer
    ("cuda", False, "float16"),   # Volta, Turing
    ("mps", False, "float16"),    # another GPU
    ("xpu", True, "float16"),
    ("cpu", False, "float32"),
    ("cpu", True, "float32"),     # a CPU with bf16 instructions still gets fp32
])
def test_dtype_auto_table(kind, bf16, want):
    from pixelmill.models.device import auto_dtype_name

    assert auto_dtype_name(kind, bf16) == want


@pytest.mark.parametrize(("dtype", "upcast", "want"), [
    ("bfloat16", True, "float32"), ("float16", True, "float32"), ("float16", False, "float16"),
    ("float32", True, "float32"), ("bfloat16", False, "bfloat16"),
])
def test_vae_dtype_table(dtype, upcast, want):
    from pixelmill.models.device import vae_dtype_name

    assert vae_dtype_name(dtype, upcast) == want


def test_resolve_dtype_auto_on_cpu_is_fp32():
    from pixelmill.models.device import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32


def test_sdxl_in_half_precision_keeps_its_vae_in_fp32(tmp_path, one_torch_thread):
    from pixelmill.models.family import describe_model
    from pixelmill.models.loading import load_img2img_pipeline
    from pixelmill.models.tiny import save_tiny_img2img
    from pixelmill.models.tiny_families import save_tiny_sdxl

    path = save_tiny_sdxl(tmp_path / "sdxl")
    assert describe_model(path).vae_force_upcast
    pipe = load_img2img_pipeline(path, device="cpu", dtype="bfloat16")
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype) == (torch.bfloat16,) * 3
    assert pipe.vae.dtype == torch.float32
    out = pipe(prompt=["a red barn"], image=[Image.new("RGB", (64, 64), (120, 30, 30))], strength=0.5,
               num_inference_steps=2, generator=[torch.Generator().manual_seed(0)])
    assert out.images[0].size == (64, 64) and pipe.vae.dtype == torch.float32  # still fp32 after a call
    sd = load_img2img_pipeline(save_tiny_img2img(tmp_path / "sd"), device="cpu", dtype="bfloat16")
    assert sd.vae.dtype == torch.bfloat16  # SD 1.x: its VAE is fine in half precision


def test_safety_checker_off_loads_without_it(tmp_path):
    from pixelmill.models.loading import load_img2img_pipeline
    from pixelmill.models.tiny import save_tiny_img2img

    path = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    assert load_img2img_pipeline(path, device="cpu", dtype="float32").safety_checker is not None
    off = load_img2img_pipeline(path, device="cpu", dtype="float32", safety_checker=False)
    assert off.safety_checker is None and off.config.requires_safety_checker is False


def test_safety_checker_setting_parses_yaml_booleans_and_keeps_old_hashes(tiny_models):
    import yaml

    from pixelmill.config import EditConfig

    base = dict(input="in", output="out", model=tiny_models["img2img"], prompt="a painting")
    for text, want in (("on", "on"), ("off", "off"), ("'off'", "off")):
        assert EditConfig(**base, **yaml.safe_load(f"safety_checker: {text}")).safety_checker == want
    default = EditConfig(**base).output_affecting()
    assert EditConfig(**base).safety_checker is None  # left out: on
    assert "safety_checker" not in default and "revision" not in default  # hashes of existing outputs unchanged
    assert EditConfig(**base, safety_checker="on").output_affecting() == default  # the same outputs
    assert EditConfig(**base, safety_checker="off").output_affecting()["safety_checker"] == "off"
    with pytest.raises(ValueError):
        EditConfig(**base, safety_checker="maybe")
