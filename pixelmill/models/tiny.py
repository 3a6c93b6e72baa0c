"""Offline random-weight models shaped like the real ones, for tests, demos and benchmarks.

No weights can be downloaded on our machines, so tests run the real loading and
inference code paths on tiny models built here in seconds: a Stable Diffusion img2img
pipeline, an InstructPix2Pix pipeline (8-channel UNet) and an open_clip CLIP. They are
written in the same on-disk layouts as hub checkpoints (diffusers ``model_index.json``
folders, open_clip's ``open_clip_config.json`` + safetensors), so ``loading.py`` loads
them exactly as it would load a downloaded model. Every builder is seeded and
deterministic, and leaves the caller's global torch RNG state untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pixelmill.models.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    MODEL_MAX_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
)

TINY_CROSS_ATTENTION_DIM = 32
TINY_CLIP_EMBED_DIM = 32
TINY_CLIP_IMAGE_SIZE = 64

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": TINY_CLIP_EMBED_DIM,
    "vision_cfg": {
        "image_size": TINY_CLIP_IMAGE_SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
    },
    "text_cfg": {
        "context_length": MODEL_MAX_LENGTH,
        "vocab_size": VOCAB_SIZE,
        "width": 32,
        "heads": 4,
        "layers": 2,
    },
}

_README = """\
Random-weight test models written by pixelmill.models.tiny (save_tiny_models).

They have the architecture and file layout of real checkpoints but RANDOM weights:
their outputs are noise. Use them only for tests, demos and plumbing checks.

  sd-img2img/        diffusers StableDiffusionImg2ImgPipeline (safetensors)
  instruct-pix2pix/  diffusers StableDiffusionInstructPix2PixPipeline, 8-channel UNet
  clip/              open_clip model: open_clip_config.json + open_clip_model.safetensors
"""


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet_config(in_channels: int = 4) -> dict[str, Any]:
    """The config of the tiny SD-shaped UNet (32×32 latents, cross-attention dim 32).

    Args:
        in_channels: 4 for text-to-image/img2img, 8 for InstructPix2Pix (noisy latents
            concatenated with the encoded input image).
    """
    return {
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
        "attention_head_dim": (2, 4),
        "norm_num_groups": 32,
    }


def sd_scheduler_config() -> dict[str, Any]:
    """The DDIM scheduler settings of Stable Diffusion 1.x checkpoints."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def build_tiny_sd_components(seed: int = 0, in_channels: int = 4, pretrained_vae: bool = True) -> dict[str, Any]:
    """Build the components of a random-weight Stable Diffusion 1.x-shaped pipeline.

    The result can be passed as ``**kwargs`` to ``StableDiffusionImg2ImgPipeline``,
    ``StableDiffusionPipeline`` or (with ``in_channels=8``)
    ``StableDiffusionInstructPix2PixPipeline``. Images are 64×64 by default (VAE
    downsamples by 2, UNet sample size 32). The tokenizer is the real SD tokenizer.

    Args:
        seed: Seeds weight initialisation; the same seed gives the same weights.
        in_channels: UNet input channels: 4 for SD, 8 for InstructPix2Pix.
        pretrained_vae: load the shipped tiny VAE weights (trained to reconstruct, see
            ``tiny_vae.py``) so edits keep the image; False for a random VAE.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_unet_config(in_channels))
    with _seeded(seed + 1):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
    if pretrained_vae:
        from pixelmill.models.tiny_vae import load_shipped_tiny_vae

        load_shipped_tiny_vae(vae)
    with _seeded(seed + 2):
        text_config = CLIPTextConfig(
            hidden_size=TINY_CROSS_ATTENTION_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=MODEL_MAX_LENGTH,
            projection_dim=TINY_CROSS_ATTENTION_DIM,
            layer_norm_eps=1e-5,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
        )
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": build_clip_tokenizer(),
        "scheduler": DDIMScheduler(**sd_scheduler_config()),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_img2img_pipeline(seed: int = 0) -> Any:
    """A random-weight ``StableDiffusionImg2ImgPipeline`` in memory (see ``build_tiny_sd_components``)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**build_tiny_sd_components(seed=seed, in_channels=4))


def build_tiny_instruct_pix2pix_pipeline(seed: int = 0) -> Any:
    """A random-weight ``StableDiffusionInstructPix2PixPipeline`` (8-channel UNet) in memory."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        **build_tiny_sd_components(seed=seed, in_channels=8)
    )


def build_tiny_safety_checker(flag_everything: bool = True, seed: int = 0) -> tuple[Any, Any]:
    """A tiny ``StableDiffusionSafetyChecker`` and its feature extractor.

    With ``flag_everything`` every concept threshold is far below any similarity, so
    every image is flagged: a test model for the ``nsfw`` reject path (the pipeline
    then returns a black image, which pixelmill must never count as a success).
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "vocab_size": VOCAB_SIZE},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=768,
    )
    with _seeded(seed + 3):
        checker = StableDiffusionSafetyChecker(config)
    if flag_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-10.0)
            checker.special_care_embeds_weights.fill_(-10.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor


def save_tiny_img2img(out_dir: str | Path, seed: int = 0, flagging_safety_checker: bool = False) -> str:
    """Write a random-weight SD img2img pipeline folder (safetensors) and return its path.

    Args:
        out_dir: Target folder; it gets ``model_index.json`` and one sub-folder per component.
        seed: Weight seed.
        flagging_safety_checker: include a safety checker that flags every image (tests).
    """
    pipe = build_tiny_img2img_pipeline(seed=seed)
    if flagging_safety_checker:
        from diffusers import StableDiffusionImg2ImgPipeline

        checker, extractor = build_tiny_safety_checker(True, seed)
        pipe = StableDiffusionImg2ImgPipeline(**{**pipe.components, "safety_checker": checker,
                                                 "feature_extractor": extractor,
                                                 "requires_safety_checker": True})
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def save_tiny_instruct_pix2pix(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight InstructPix2Pix pipeline folder (8-channel UNet) and return its path.

    Args:
        out_dir: Target folder; it gets ``model_index.json`` and one sub-folder per component.
        seed: Weight seed.
    """
    pipe = build_tiny_instruct_pix2pix_pipeline(seed=seed)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def tiny_clip_config() -> dict[str, Any]:
    """The ``open_clip_config.json`` content of the tiny CLIP (hub layout: model + preprocess)."""
    return {
        "model_cfg": json.loads(json.dumps(TINY_CLIP_MODEL_CFG)),
        "preprocess_cfg": {
            "size": TINY_CLIP_IMAGE_SIZE,
            "mean": list(OPENAI_CLIP_MEAN),
            "std": list(OPENAI_CLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight open_clip ViT CLIP folder and return its path.

    The folder holds ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``, the
    layout open_clip reads from hub repos and ``local-dir:`` folders) and
    ``open_clip_model.safetensors``. Vision: ViT, width 64, 2 layers, patch 16, 64 px;
    text: width 32, 2 layers, context 77, the SD/OpenAI vocabulary; embed dim 32.

    Args:
        out_dir: Target folder, created if missing.
        seed: Weight seed.
    """
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config()
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with _seeded(seed):
        model = CLIP(**config["model_cfg"])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return str(out)


def save_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Write every tiny model under ``out_dir`` and return their paths by role.

    Args:
        out_dir: Root folder; gets ``sd-img2img/``, ``instruct-pix2pix/``, ``clip/`` and
            a ``README.txt`` saying these are random-weight test models.
        seed: Weight seed shared by all models.

    Returns:
        ``{"img2img": ..., "instruct_pix2pix": ..., "clip": ...}`` folder paths.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "img2img": save_tiny_img2img(root / "sd-img2img", seed=seed),
        "instruct_pix2pix": save_tiny_instruct_pix2pix(root / "instruct-pix2pix", seed=seed),
        "clip": save_tiny_clip(root / "clip", seed=seed),
    }
    (root / "README.txt").write_text(_README)
    return paths


def build_sd_unet_for_benchmark(
    block_out_channels: Sequence[int] = (64, 128, 256),
    layers_per_block: int = 2,
    cross_attention_dim: int = 768,
    attention_head_dim: int | Sequence[int] = 8,
    sample_size: int = 64,
    in_channels: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Build a random-weight SD 1.x-shaped ``UNet2DConditionModel`` for speed benchmarks.

    Speed does not depend on the weights, so a config-built UNet measures what a
    checkpoint would. Every level but the last has cross-attention, as in SD 1.x; with
    ``block_out_channels=(320, 640, 1280, 1280)`` and the defaults this is the SD 1.5
    UNet (859.5M parameters).

    Args:
        block_out_channels: Channels per resolution level.
        layers_per_block: ResNet layers per level.
        cross_attention_dim: Text embedding width (768 for SD 1.x, 1024 for SD 2.x).
        attention_head_dim: Heads per level (diffusers' legacy name for SD configs).
        sample_size: Latent size (64 for 512-px images).
        in_channels: 4, or 8 for an InstructPix2Pix-shaped UNet.
        seed: Weight seed.
        dtype: Parameter dtype.
        device: Where to put it.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if n < 2:
        raise ValueError("block_out_channels needs at least two levels")
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(
                attention_head_dim
                if isinstance(attention_head_dim, int)
                else tuple(attention_head_dim)
            ),
        )
    return unet.to(device=device, dtype=dtype).eval()


def save_tiny_vit(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight tiny timm ViT folder (timm's hub layout) and return its path.

    ``config.json`` names the architecture (``vit_tiny_patch16_224``) with ``model_args``
    shrinking it (64 px, patch 8, width 32, 2 blocks, 2 heads, no head) and its
    ``pretrained_cfg`` (mean/std 0.5); ``model.safetensors`` holds the weights. It loads
    with ``pixelmill.models.vit.load_vit(folder)``, the stand-in for DINO in Text2Live's
    structure loss.

    Args:
        out_dir: Target folder, created if missing.
        seed: Weight seed.
    """
    import timm
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_args = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 64, 64]},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with _seeded(seed):
        model = timm.create_model(config["architecture"], pretrained=False, **model_args)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)
