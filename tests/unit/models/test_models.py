"""Unit tests for pixelmill.models: offline tokenizer, tiny models, loading, device rules."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelmill.models import (
    ModelNotFound,
    build_clip_tokenizer,
    build_sd_unet_for_benchmark,
    build_tiny_sd_components,
    load_clip,
    load_img2img_pipeline,
    load_instruct_pix2pix_pipeline,
    looks_local,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    safety_flags,
    save_tiny_models,
)
from pixelmill.models.tiny import TINY_CLIP_EMBED_DIM
from pixelmill.models.tokenizer import write_clip_tokenizer_files

TOKENIZER_TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   leading and trailing   whitespace\t\n ",
    "Hello, world!!! What's up?",
    "it's, they're, we've, I'm, you'll, he'd",
    "turn the sky into a starry night (van gogh style) -- 4k, hdr; #art @user",
    "price: $1,299.99 on 2024-05-17 at 10:30pm, 3x zoom, 50% off",
    "0123456789 9876543210",
    "naïve café résumé Über straße",
    "東京タワー の 夜景, 北京, 서울",
    "emoji: 🚀🔥😀 and symbols ©®™ ∑∫√ ≈ ≠",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم",
    "snake_case_words and kebab-case-words and CamelCaseWords",
    "a"*300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "quotes \"double\" and 'single' and `back`",
    "make it look like a watercolor painting, with soft pastel colors",
    " ".join(f"word{i}" for i in range(120)),
    "an astronaut riding a horse on mars, highly detailed, trending on artstation " * 4,
    "tabs\tand\nnewlines\r\nmixed",
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def img2img_pipe(tiny_models: dict[str, str]):
    return load_img2img_pipeline(tiny_models["img2img"], device="cpu")


@pytest.fixture(scope="session")
def ip2p_pipe(tiny_models: dict[str, str]):
    return load_instruct_pix2pix_pipeline(tiny_models["instruct_pix2pix"], device="cpu")


def _input_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _meaningful(ids: list[int], eot: int = 49407) -> list[int]:
    return ids[: ids.index(eot) + 1]


def test_tokenizer_matches_open_clip_token_for_token() -> None:
    import open_clip

    tok = build_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")
    ours = tok(TOKENIZER_TEXTS, padding="max_length", truncation=True, max_length=77).input_ids
    theirs = reference(TOKENIZER_TEXTS).tolist()
    for text, a, b in zip(TOKENIZER_TEXTS, ours, theirs):
        assert len(a) == 77
        assert _meaningful(a) == _meaningful(b), text
    assert open_clip.tokenize(TOKENIZER_TEXTS[:3]).tolist() == theirs[:3]
    truncated = ours[TOKENIZER_TEXTS.index("a" * 300)]
    assert truncated[0] == 49406 and truncated[-1] == 49407


def test_tokenizer_vocab_and_special_tokens() -> None:
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert tok.convert_ids_to_tokens([0, 256, 49405]) == ["!", "!</w>", tok.convert_ids_to_tokens(49405)]
    assert tok.decode(tok("a red bicycle").input_ids, skip_special_tokens=True) == "a red bicycle"
    tok.model_max_length = 10
    assert build_clip_tokenizer().model_max_length == 77


def test_tokenizer_files_load_as_the_same_tokenizer(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path)
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    from_files = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    built = build_clip_tokenizer()
    assert from_files.get_vocab() == built.get_vocab()
    assert from_files(TOKENIZER_TEXTS).input_ids == built(TOKENIZER_TEXTS).input_ids

    built.save_pretrained(str(tmp_path / "saved"))
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert reloaded(TOKENIZER_TEXTS).input_ids == built(TOKENIZER_TEXTS).input_ids
    assert reloaded.model_max_length == 77


def test_resolve_device_and_dtype_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", cpu)
    assert resolve_device("cpu") == cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    assert resolve_dtype("auto", "auto") == torch.float32
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    assert resolve_device("auto") == cuda
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_dtype("float32", cuda) == torch.float32


def test_tiny_builders_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_sd_components(seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_tiny_sd_components(seed=7)
    c = build_tiny_sd_components(seed=8)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (x[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        # The VAE is the shipped, trained one whatever the seed; the rest follow the seed.
        assert all(torch.equal(sa[k], sc[k]) for k in sa) == (name == "vae"), name
    random_vae = build_tiny_sd_components(seed=7, pretrained_vae=False)["vae"].state_dict()
    assert not all(torch.equal(random_vae[k], a["vae"].state_dict()[k]) for k in random_vae)
    text_cfg = a["text_encoder"].config
    assert (text_cfg.bos_token_id, text_cfg.eos_token_id, text_cfg.pad_token_id) == (49406, 49407, 49407)
    assert a["unet"].config.cross_attention_dim == text_cfg.hidden_size == 32
    sched = a["scheduler"].config
    assert (sched.beta_schedule, sched.steps_offset, sched.clip_sample) == ("scaled_linear", 1, False)


def test_saved_tiny_models_are_safetensors_only(tiny_models: dict[str, str]) -> None:
    root = Path(tiny_models["img2img"]).parent
    assert "random" in (root / "README.txt").read_text().lower()
    assert set(tiny_models) == {"img2img", "instruct_pix2pix", "clip"}
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    for key in ("img2img", "instruct_pix2pix"):
        folder = Path(tiny_models[key])
        for component in ("unet", "vae", "text_encoder"):
            assert list((folder / component).glob("*.safetensors")), (key, component)
    assert (Path(tiny_models["clip"]) / "open_clip_model.safetensors").is_file()
    assert (Path(tiny_models["clip"]) / "open_clip_config.json").is_file()


def test_img2img_loads_and_runs(img2img_pipe) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = img2img_pipe
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe._progress_bar_config.get("disable") is True
    assert pipe.unet.config.in_channels == 4
    kwargs = dict(image=_input_image(), num_inference_steps=2, strength=0.8, guidance_scale=5.0)
    out = pipe("a watercolor cat", generator=torch.Generator().manual_seed(0), **kwargs)
    again = pipe("a watercolor cat", generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(out.images) == 1 and isinstance(out.images[0], Image.Image)
    assert out.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    assert safety_flags(out) == [False]


def test_instruct_pix2pix_loads_and_runs(ip2p_pipe) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = ip2p_pipe
    assert isinstance(pipe, StableDiffusionInstructPix2PixPipeline)
    assert pipe.unet.config.in_channels == 8
    out = pipe(
        ["make it snowy", "turn it into a sketch"],
        image=[_input_image(), _input_image()],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    assert safety_flags(out) == [False, False]


def test_explicit_dtype_reaches_the_pipeline(tiny_models: dict[str, str]) -> None:
    pipe = load_img2img_pipeline(tiny_models["img2img"], device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        load_img2img_pipeline(tiny_models["img2img"], device="cpu", dtype="float16")


def test_unknown_hub_id_raises_model_not_found() -> None:
    with pytest.raises(ModelNotFound, match="pixelmill-test/does-not-exist"):
        load_img2img_pipeline("pixelmill-test/does-not-exist", device="cpu")


def test_loaders_refuse_the_wrong_kind_of_pipeline(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="load_instruct_pix2pix_pipeline"):
        load_img2img_pipeline(tiny_models["instruct_pix2pix"], device="cpu")
    with pytest.raises(ValueError, match="not an InstructPix2Pix model"):
        load_instruct_pix2pix_pipeline(tiny_models["img2img"], device="cpu")


def test_missing_or_malformed_model_paths_raise_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound, match=str(missing)):
        load_img2img_pipeline(str(missing), device="cpu")
    with pytest.raises(ModelNotFound, match="no-such-model"):
        load_instruct_pix2pix_pipeline(str(missing), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        load_img2img_pipeline(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ModelNotFound, match="open_clip_config.json"):
        load_clip(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ModelNotFound, match=str(missing)):
        load_clip(str(missing), device="cpu")
    with pytest.raises(ModelNotFound):
        model_fingerprint(str(missing))
    assert issubclass(ModelNotFound, FileNotFoundError)


def test_looks_local() -> None:
    assert looks_local("/models/sd")
    assert looks_local("./sd")
    assert looks_local("~/sd")
    assert looks_local("local-dir:/x")
    assert looks_local("a/b/c")
    assert not looks_local("runwayml/stable-diffusion-v1-5")
    assert not looks_local("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K")


def test_load_clip_encodes_to_embed_dim(tiny_models: dict[str, str]) -> None:
    model, preprocess, tokenizer = load_clip(tiny_models["clip"], device="cpu")
    assert not model.training
    pixels = preprocess(_input_image(80))
    assert pixels.shape == (3, 64, 64)
    tokens = tokenizer(["a cat", "a dog"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        image_emb = model.encode_image(pixels.unsqueeze(0), normalize=True)
        text_emb = model.encode_text(tokens, normalize=True)
    assert image_emb.shape == (1, TINY_CLIP_EMBED_DIM)
    assert text_emb.shape == (2, TINY_CLIP_EMBED_DIM)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(text_emb[0], text_emb[1])

    again, _, _ = load_clip("local-dir:" + tiny_models["clip"], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_load_clip_refuses_pickle_only_folder(tiny_models: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    shutil.copy(Path(tiny_models["clip"]) / "open_clip_config.json", folder)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFound, match="safetensors"):
        load_clip(str(folder), device="cpu")


def test_model_fingerprint(tiny_models: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(tiny_models["clip"], folder)
    first = model_fingerprint(str(folder))
    assert len(first) == 16 and int(first, 16) >= 0
    assert model_fingerprint(str(folder)) == first
    assert model_fingerprint(tiny_models["clip"]) == first
    config = folder / "open_clip_config.json"
    config.write_text(config.read_text().replace('"bicubic"', '"bilinear"'))
    changed = model_fingerprint(str(folder))
    assert changed != first
    (folder / "notes.md").write_text("ignored: not a weight or config file")
    assert model_fingerprint(str(folder)) == changed
    assert model_fingerprint(tiny_models["img2img"]) != model_fingerprint(tiny_models["instruct_pix2pix"])

    assert model_fingerprint("runwayml/stable-diffusion-v1-5", revision="fp16").startswith(
        "runwayml/stable-diffusion-v1-5@"
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint("org/model", revision=commit) == f"org/model@{commit}"


def test_family_of_loaded_pipelines(img2img_pipe, ip2p_pipe) -> None:
    from pixelmill.models.family import UnsupportedFamily, family_of_pipeline

    assert family_of_pipeline(img2img_pipe).family == "sd1"
    assert family_of_pipeline(ip2p_pipe).unet_in_channels == 8

    class FluxLikePipeline:
        transformer = object()
        vae = object()
        scheduler = object()

    with pytest.raises(UnsupportedFamily, match="FluxLikePipeline.*no UNet"):
        family_of_pipeline(FluxLikePipeline())


def test_safety_flags() -> None:
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    images = [Image.new("RGB", (8, 8))] * 3
    unchecked = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
    assert safety_flags(unchecked) == [False] * 3
    flagged = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=[False, True, False])
    assert safety_flags(flagged) == [False, True, False]
    assert safety_flags((images, [True, False, None])) == [True, False, False]
    with pytest.raises(ValueError, match="3 images but 2"):
        safety_flags((images, [True, False]))


def test_benchmark_unet_is_sd_shaped() -> None:
    unet = build_sd_unet_for_benchmark(block_out_channels=(32, 64), attention_head_dim=4, sample_size=16)
    assert unet.config.cross_attention_dim == 768
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 77, 768)).sample
    assert out.shape == (1, 4, 16, 16)


def test_shipped_tiny_vae_reconstructs_images() -> None:
    """The tiny pipelines keep the image (so faithfulness and the t0 search mean something)."""
    from pixelmill.models.tiny_vae import SHIPPED_TINY_VAE, _synthetic_batch

    assert SHIPPED_TINY_VAE.is_file()
    x = _synthetic_batch(torch.Generator().manual_seed(99), 4, 64)
    for pretrained, bound in ((True, lambda e: e < 0.1), (False, lambda e: e > 0.2)):
        vae = build_tiny_sd_components(pretrained_vae=pretrained)["vae"]
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        err = float(((rec - x) / 2).pow(2).mean().sqrt())
        assert bound(err), (pretrained, err)
