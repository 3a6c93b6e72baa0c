"""Loading timm Vision Transformers from local safetensors weights.

Text2Live's structure loss compares self-similarities of ViT tokens (the paper uses
DINO); any timm ``VisionTransformer`` works. Weights come from a local safetensors file
only: no pickled checkpoints and no hub downloads (our machines have no network), so a
model is either a local folder in timm's hub layout or an architecture name plus a
weights file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pixelmill.models.device import resolve_device, resolve_dtype
from pixelmill.models.loading import LOCAL_DIR_PREFIX, ModelNotFound, looks_local

VIT_CONFIG = "config.json"
VIT_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ViTPreprocess:
    """How a ViT wants its input: square ``size`` pixels, normalised by ``mean``/``std``."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Resize a batch of RGB images in [0, 1] (N, 3, H, W) and normalise it (differentiable)."""
        x = torch.nn.functional.interpolate(images, size=self.size, mode="bilinear", align_corners=False,
                                            antialias=True)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def _resolve(model: str, weights: str | None) -> tuple[str, dict[str, Any], Path]:
    """Return (architecture, config.json content or {}, weights file)."""
    import timm

    if looks_local(model):
        folder = Path(model.removeprefix(LOCAL_DIR_PREFIX)).expanduser().absolute()
        if not folder.is_dir():
            raise ModelNotFound(f"ViT folder not found: {folder} (from model name {model!r})")
        if not (folder / VIT_CONFIG).is_file():
            raise ModelNotFound(f"{folder} is not a timm model folder: it has no {VIT_CONFIG}")
        config = json.loads((folder / VIT_CONFIG).read_text())
        arch = config.get("architecture")
        if not arch:
            raise ModelNotFound(f"{folder / VIT_CONFIG} names no `architecture`")
        path = Path(weights).expanduser().absolute() if weights else folder / VIT_WEIGHTS
    else:
        arch, config = model, {}
        if not timm.is_model(arch):
            raise ModelNotFound(
                f"{model!r} is neither a local timm model folder nor a timm architecture name "
                "(hub downloads are not supported: save the weights locally)"
            )
        if not weights:
            raise ModelNotFound(
                f"ViT architecture {model!r} needs a local safetensors weights file "
                "(structure_weights); weights are never downloaded"
            )
        path = Path(weights).expanduser().absolute()
    if path.suffix != ".safetensors":
        raise ModelNotFound(f"{path}: only .safetensors weights are loaded (no pickled checkpoints)")
    if not path.is_file():
        raise ModelNotFound(f"ViT weights not found: {path}")
    return arch, config, path


def load_vit(
    model: str,
    weights: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
) -> tuple[torch.nn.Module, ViTPreprocess]:
    """Load a timm Vision Transformer (frozen, eval mode) and its input preprocessing.

    Accepted names:

    - a local folder in timm's hub layout: ``config.json`` (``architecture``, optional
      ``model_args`` passed to ``timm.create_model`` and ``pretrained_cfg`` with
      ``mean``/``std``) and ``model.safetensors`` (``weights`` may name another file);
    - a timm architecture name (``vit_small_patch16_224``) with ``weights`` a local
      ``.safetensors`` file in timm's key layout (DINO's ViT weights as timm ships them).

    The classifier head is dropped (only tokens are used); other keys must match exactly.

    Args:
        model: the folder or architecture name.
        weights: local ``.safetensors`` file (required with an architecture name).
        device: see ``resolve_device``.
        dtype: parameter dtype (``float32`` default).

    Returns:
        ``(model, preprocess)``: ``model.forward_features`` gives (N, tokens, dim) with
        ``model.num_prefix_tokens`` class/register tokens first.

    Raises:
        ModelNotFound: a missing folder or file, pickled weights, or a hub name.
        ValueError: the model is not a token-producing ViT, or the weights do not fit it.
    """
    import timm
    from safetensors.torch import load_file

    arch, config, path = _resolve(model, weights)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    args = dict(config.get("model_args") or {})
    args["num_classes"] = 0
    vit = timm.create_model(arch, pretrained=False, **args)
    if not (hasattr(vit, "forward_features") and hasattr(vit, "num_prefix_tokens")
            and hasattr(vit, "patch_embed")):
        raise ValueError(f"{arch!r} is not a timm Vision Transformer (needs patch tokens from forward_features)")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, vit)
    except (ImportError, TypeError):
        pass
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"weights {path} do not fit {arch!r}: {str(e)[:500]}") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not fit {arch!r}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    vit = vit.to(device=dev, dtype=torch_dtype).eval().requires_grad_(False)
    cfg = {**(vit.pretrained_cfg or {}), **(config.get("pretrained_cfg") or {})}
    img_size = tuple(int(s) for s in vit.patch_embed.img_size)
    mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    return vit, ViTPreprocess(size=img_size, mean=mean, std=std)  # type: ignore[arg-type]
