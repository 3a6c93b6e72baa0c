"""Where weights come from: loading by local path or hub id, offline tiny builders, the CLIP tokenizer.

Every other package asks this one for models; nothing else knows about hubs, folders,
dtypes or devices. Heavy libraries (diffusers, open_clip) are imported lazily inside the
functions, so importing ``pixelmill.models`` stays cheap on the driver.
"""

from pixelmill.models.device import resolve_device, resolve_dtype
from pixelmill.models.loading import (
    ModelNotFound,
    is_sd_shaped,
    load_clip,
    load_img2img_pipeline,
    load_instruct_pix2pix_pipeline,
    load_text2img_pipeline,
    looks_local,
    model_fingerprint,
    require_sd_shaped,
    safety_flags,
)
from pixelmill.models.tiny import (
    build_sd_unet_for_benchmark,
    build_tiny_img2img_pipeline,
    build_tiny_instruct_pix2pix_pipeline,
    build_tiny_sd_components,
    save_tiny_clip,
    save_tiny_img2img,
    save_tiny_instruct_pix2pix,
    save_tiny_models,
)
from pixelmill.models.tokenizer import build_clip_tokenizer

__all__ = [
    "ModelNotFound",
    "build_clip_tokenizer",
    "build_sd_unet_for_benchmark",
    "build_tiny_img2img_pipeline",
    "build_tiny_instruct_pix2pix_pipeline",
    "build_tiny_sd_components",
    "is_sd_shaped",
    "load_clip",
    "load_img2img_pipeline",
    "load_instruct_pix2pix_pipeline",
    "load_text2img_pipeline",
    "looks_local",
    "model_fingerprint",
    "require_sd_shaped",
    "resolve_device",
    "resolve_dtype",
    "safety_flags",
    "save_tiny_clip",
    "save_tiny_img2img",
    "save_tiny_instruct_pix2pix",
    "save_tiny_models",
]
