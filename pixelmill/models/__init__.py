"""Where weights come from: loading by local path or hub id, offline tiny builders, the CLIP tokenizer.

Every other package asks this one for models; nothing else knows about hubs, folders,
dtypes or devices. Heavy libraries (diffusers, open_clip) are imported lazily inside the
functions, so importing ``pixelmill.models`` stays cheap on the driver.
"""

# Names resolve on first use (PEP 562): importing the package (e.g. ``pixelmill.models.loading``
# from a config's preflight) must not import torch on the driver.
_WHERE = {
    "resolve_device": "device", "resolve_dtype": "device",
    **dict.fromkeys(("ModelNotFound", "load_clip", "load_img2img_pipeline",
                     "load_instruct_pix2pix_pipeline", "load_text2img_pipeline", "looks_local",
                     "model_fingerprint", "safety_flags"), "loading"),
    **dict.fromkeys(("build_sd_unet_for_benchmark", "build_tiny_img2img_pipeline",
                     "build_tiny_instruct_pix2pix_pipeline", "build_tiny_sd_components", "save_tiny_clip",
                     "save_tiny_img2img", "save_tiny_instruct_pix2pix", "save_tiny_models"), "tiny"),
    "build_clip_tokenizer": "tokenizer",
    **dict.fromkeys(("ModelInfo", "UnsupportedFamily", "describe_model", "family_of_pipeline", "require_family"),
                    "family"),
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "ModelInfo",
    "ModelNotFound",
    "UnsupportedFamily",
    "build_clip_tokenizer",
    "build_sd_unet_for_benchmark",
    "build_tiny_img2img_pipeline",
    "build_tiny_instruct_pix2pix_pipeline",
    "build_tiny_sd_components",
    "describe_model",
    "family_of_pipeline",
    "load_clip",
    "load_img2img_pipeline",
    "load_instruct_pix2pix_pipeline",
    "load_text2img_pipeline",
    "looks_local",
    "model_fingerprint",
    "require_family",
    "resolve_device",
    "resolve_dtype",
    "safety_flags",
    "save_tiny_clip",
    "save_tiny_img2img",
    "save_tiny_instruct_pix2pix",
    "save_tiny_models",
]
