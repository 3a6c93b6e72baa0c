"""What a diffusion pipeline is loaded with, besides its weights: its safety checker and its VAE's precision.

- ``safety_checker: off`` loads the pipeline without its checker (``safety_checker=None``
  at load: the checker's weights are never read), for checkpoints that ship one; a
  checkpoint without one has nothing to turn off.
- In half precision (``dtype: auto`` on a GPU, ``float16``, ``bfloat16``) a family whose
  VAE overflows there (SDXL: ``ModelInfo.vae_force_upcast``) gets its VAE loaded in fp32
  and kept there, while the UNet and text encoders run in the half dtype. diffusers' SDXL
  pipelines would cast a fp32 VAE back to the pipeline's dtype after encoding
  (``force_upcast``) and feed it half-precision latents, so the loaded VAE says
  ``force_upcast: False`` (it is upcast already) and casts what it is given to fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixelmill.models.family import has_component

if TYPE_CHECKING:
    import torch


def vae_force_upcast(name: str, revision: str | None = None) -> bool:
    """Whether the checkpoint's family needs its VAE in fp32 (``ModelInfo.vae_force_upcast``).

    A checkpoint of no family pixelmill knows (no UNet, ...) is left as diffusers loads it: False.
    """
    from pixelmill.models.family import UnsupportedFamily, describe_model

    try:
        return describe_model(name, revision).vae_force_upcast
    except UnsupportedFamily:
        return False


def _to_fp32(module: Any, args: tuple) -> tuple:
    import torch

    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def keep_vae_fp32(vae: Any) -> Any:
    """Make a fp32 VAE stay fp32 inside a half-precision pipeline (see the module docstring)."""
    import torch

    if vae.dtype != torch.float32:
        vae.to(torch.float32)
    if getattr(vae.config, "force_upcast", False):
        vae.register_to_config(force_upcast=False)
    for part in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        module = getattr(vae, part, None)
        if module is not None:
            module.register_forward_pre_hook(_to_fp32)
    vae.pixelmill_fp32 = True
    return vae


def load_kwargs(name: str, index: dict[str, Any], dtype: torch.dtype, revision: str | None,
                safety_checker: bool = True) -> dict[str, Any]:
    """Extra ``from_pretrained`` keywords: no safety checker (when off and shipped), a fp32 VAE (when needed)."""
    import torch

    kwargs: dict[str, Any] = {}
    if not safety_checker and has_component(index, "safety_checker"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if dtype != torch.float32 and has_component(index, "vae") and vae_force_upcast(name, revision):
        from diffusers import AutoencoderKL

        from pixelmill.models.loading import _dtype_kwarg

        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", use_safetensors=True, revision=revision,
                                            **{_dtype_kwarg(): torch.float32})
        kwargs["vae"] = keep_vae_fp32(vae)
    return kwargs


def safety_note(model: str, setting: str | None, revision: str | None = None) -> str | None:
    """A summary note when ``safety_checker: on``, set in the config, meets a checkpoint that ships none."""
    if setting != "on":
        return None
    from pixelmill.models.family import UnsupportedFamily, describe_model
    from pixelmill.models.loading import ModelNotFound

    try:
        info = describe_model(model, revision)
    except (ModelNotFound, UnsupportedFamily, OSError, ImportError):
        return None
    if info.has_safety_checker:
        return None
    return f"safety_checker: on, but {model} ships no safety checker: no image was checked"
