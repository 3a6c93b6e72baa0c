"""Tiny random-weight SD 2.x (v-prediction) and SDXL pipelines, built offline like the SD 1.x ones.

They have the layouts that tell the families apart (see ``models/family.py``):

- **SD 2.x v**: linear projections in the UNet's transformers, an OpenCLIP-style text
  encoder (``gelu``), and a DDIM scheduler with ``prediction_type: v_prediction``, as
  ``stabilityai/stable-diffusion-2-1`` ships.
- **SDXL**: two text encoders (the second with a projection, whose pooled output joins
  the time ids in the UNet's ``text_time`` added conditioning), cross-attention over
  both encoders' hidden states concatenated, an Euler scheduler and a VAE marked
  ``force_upcast``, as ``stabilityai/stable-diffusion-xl-base-1.0`` ships.

Both reuse the tiny SD VAE (trained to reconstruct) and the real CLIP tokenizer, so
64-px images go in and come out. Seeded and deterministic; the global RNG is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelmill.models.tiny import TINY_CROSS_ATTENTION_DIM, _seeded, build_tiny_sd_components, sd_scheduler_config
from pixelmill.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

SDXL_TIME_EMBED_DIM = 8


def _text_config(hidden_act: str = "quick_gelu") -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TINY_CROSS_ATTENTION_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=TINY_CROSS_ATTENTION_DIM,
        layer_norm_eps=1e-5, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
        hidden_act=hidden_act,
    )


def build_tiny_sd2v_components(seed: int = 0, in_channels: int = 4) -> dict[str, Any]:
    """Components of a random-weight SD 2.x-shaped v-prediction pipeline (``StableDiffusion*Pipeline`` kwargs)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = build_tiny_sd_components(seed=seed, in_channels=in_channels)
    with _seeded(seed):
        parts["unet"] = UNet2DConditionModel(
            sample_size=32, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM, attention_head_dim=(2, 4), norm_num_groups=32,
            use_linear_projection=True, upcast_attention=True,
        ).eval()
    with _seeded(seed + 2):
        parts["text_encoder"] = CLIPTextModel(_text_config("gelu")).eval()
    parts["scheduler"] = DDIMScheduler(**{**sd_scheduler_config(), "prediction_type": "v_prediction"})
    return parts


def build_tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict[str, Any]:
    """Components of a random-weight SDXL-shaped pipeline (``StableDiffusionXL*Pipeline`` kwargs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = build_tiny_sd_components(seed=seed, in_channels=4)
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
            addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TINY_CROSS_ATTENTION_DIM,
            cross_attention_dim=2 * TINY_CROSS_ATTENTION_DIM,
        ).eval()
    vae = AutoencoderKL.from_config({**base["vae"].config, "force_upcast": True})
    vae.load_state_dict(base["vae"].state_dict())
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_text_config()).eval()
    with _seeded(seed + 4):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config("gelu")).eval()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    )
    return {"unet": unet, "vae": vae.eval(), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_clip_tokenizer(), "scheduler": scheduler}


def build_tiny_sd2v_img2img_pipeline(seed: int = 0) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**build_tiny_sd2v_components(seed))


def build_tiny_sdxl_img2img_pipeline(seed: int = 0) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(**build_tiny_sdxl_components(seed), requires_aesthetics_score=False)


def build_tiny_sdxl_instruct_pix2pix_pipeline(seed: int = 0) -> Any:
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    return StableDiffusionXLInstructPix2PixPipeline(**build_tiny_sdxl_components(seed, in_channels=8))


def save_tiny_sd2v(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight SD 2.x v-prediction img2img pipeline folder (safetensors); return its path."""
    build_tiny_sd2v_img2img_pipeline(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def save_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight SDXL img2img pipeline folder (safetensors); return its path."""
    build_tiny_sdxl_img2img_pipeline(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def save_tiny_sdxl_instruct_pix2pix(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight SDXL InstructPix2Pix pipeline folder (8-channel UNet); return its path."""
    build_tiny_sdxl_instruct_pix2pix_pipeline(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)
