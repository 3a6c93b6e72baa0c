"""Write a diffusers pipeline folder as one single-file checkpoint in the original (LDM/SGM) key layout.

diffusers reads single files (``from_single_file``) but ships no writer. This one turns an
SD 1.x, SD 2.x or SDXL pipeline folder into the ``.safetensors`` layout the model hubs
use, so tests build single files offline and users can convert their fine-tunes:

=====================  ==========================================================
component              original prefix
=====================  ==========================================================
UNet                   ``model.diffusion_model.`` (``input_blocks``/``middle_block``/``output_blocks``)
VAE                    ``first_stage_model.`` (``encoder.down.N.block.M``, mid attention as 1×1 convs)
SD 1.x text encoder    ``cond_stage_model.transformer.text_model.`` (Hugging Face CLIP names)
SD 2.x text encoder    ``cond_stage_model.model.`` (OpenCLIP: ``resblocks``, fused ``in_proj``)
SDXL text encoders     ``conditioner.embedders.0.transformer.text_model.`` and ``conditioner.embedders.1.model.``
=====================  ==========================================================

It is a key-renaming table plus the reshapes the original layout has (the VAE's mid-block
attention as 1×1 convolutions, OpenCLIP's fused q/k/v ``in_proj``, its ``text_projection``
stored transposed), the inverse of diffusers' own ``convert_ldm_*``/``convert_open_clip_*``.
It works on any tensor (``meta`` tensors too), so full-size layouts are checked without weights.

The header metadata records what weights cannot tell (see ``single_file.py``): the
standard ``modelspec.*`` keys (architecture, prediction type, resolution) and
``pixelmill.config``: the non-shape config fields (attention heads, scheduler, VAE scaling
factor, tokenizer padding) so the file loads back as exactly the folder it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sdxl": "stable-diffusion-xl-v1-base"}
PIXELMILL_CONFIG_KEY = "pixelmill.config"

# Config fields the weights cannot tell, carried in the header (``pixelmill.config``).
NON_SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "unet": ("attention_head_dim", "num_attention_heads", "sample_size", "upcast_attention", "norm_num_groups",
             "norm_eps", "act_fn"),
    "vae": ("scaling_factor", "shift_factor", "force_upcast", "sample_size", "norm_num_groups", "act_fn"),
    "text_encoder": ("num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                     "pad_token_id"),
    "tokenizer": ("pad_token", "model_max_length"),
}

# (diffusers name, original name) pairs
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
             ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))  # diffusers < 0.14 names
_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def _rename(rest: str, table) -> str:
    for diffusers_name, original_name in table:
        rest = rest.replace(diffusers_name, original_name)
    return rest


def unet_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM layout (no ``model.diffusion_model.`` prefix).

    Args:
        state: the diffusers state dict.
        config: the UNet's config (``layers_per_block`` places blocks in ``input_blocks``/``output_blocks``).
    """
    lpb = int(config["layers_per_block"])
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2])
        if parts[0] in _UNET_TOP:
            out[f"{_UNET_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = value
            continue
        if head in _UNET_TOP:
            out[f"{_UNET_TOP[head]}.{'.'.join(parts[2:])}"] = value
            continue
        kind = parts[0]
        if kind == "down_blocks":
            block, what = int(parts[1]), parts[2]
            if what == "downsamplers":  # down_blocks.B.downsamplers.0.conv.* -> input_blocks.I.0.op.*
                out[f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{'.'.join(parts[5:])}"] = value
                continue
            layer, rest = int(parts[3]), ".".join(parts[4:])
            index = 1 + block * (lpb + 1) + layer
            if what == "resnets":
                out[f"input_blocks.{index}.0.{_rename(rest, _RESNET)}"] = value
            else:
                out[f"input_blocks.{index}.1.{rest}"] = value
        elif kind == "up_blocks":
            block, what = int(parts[1]), parts[2]
            if what == "upsamplers":  # the upsampler follows the level's last layer (after its attention, if any)
                index = block * (lpb + 1) + lpb
                has_attn = any(k.startswith(f"up_blocks.{block}.attentions.") for k in state)
                out[f"output_blocks.{index}.{2 if has_attn else 1}.conv.{'.'.join(parts[5:])}"] = value
                continue
            layer, rest = int(parts[3]), ".".join(parts[4:])
            index = block * (lpb + 1) + layer
            if what == "resnets":
                out[f"output_blocks.{index}.0.{_rename(rest, _RESNET)}"] = value
            else:
                out[f"output_blocks.{index}.1.{rest}"] = value
        elif kind == "mid_block":
            what, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if what == "resnets":
                out[f"middle_block.{2 * layer}.{_rename(rest, _RESNET)}"] = value
            else:
                out[f"middle_block.{2 * layer + 1}.{rest}"] = value
        else:
            raise ValueError(f"UNet weight {key!r} has no place in the original layout")
    return out


def vae_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (without the ``first_stage_model.`` prefix)."""
    ups = {int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")}
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        if parts[1] in _VAE_TOP:
            out[f"{side}.{_VAE_TOP[parts[1]]}.{'.'.join(parts[2:])}"] = value
        elif parts[1] in ("conv_in", "conv_out"):
            out[key] = value
        elif parts[1] in ("down_blocks", "up_blocks"):
            level, what = int(parts[2]), parts[3]
            name, level = ("down", level) if parts[1] == "down_blocks" else ("up", n_up - 1 - level)
            if what == "resnets":
                out[f"{side}.{name}.{level}.block.{parts[4]}.{_rename('.'.join(parts[5:]), _VAE_RESNET)}"] = value
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if what == "downsamplers" else "upsample"
                out[f"{side}.{name}.{level}.{sampler}.{'.'.join(parts[5:])}"] = value
        elif parts[1] == "mid_block":
            what, layer, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if what == "resnets":
                out[f"{side}.mid.block_{layer + 1}.{_rename(rest, _VAE_RESNET)}"] = value
            else:
                rest = _rename(rest, _VAE_ATTN)
                if value.ndim == 2:  # linear -> 1x1 conv, as the original attention block is
                    value = value[:, :, None, None]
                out[f"{side}.mid.attn_{layer + 1}.{rest}"] = value
        else:
            raise ValueError(f"VAE weight {key!r} has no place in the original layout")
    return out


def _text_model_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face CLIP keys with the ``text_model.`` prefix (transformers >= 5.6 saves CLIPTextModel without it)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}


def clip_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """A ``CLIPTextModel`` state dict as SD 1.x / SDXL's first embedder store it (Hugging Face names)."""
    return {k: v for k, v in _text_model_keys(state).items() if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """A ``CLIPTextModel(WithProjection)`` state dict in OpenCLIP's layout (SD 2.x, SDXL's second embedder).

    q/k/v projections are fused into ``attn.in_proj_weight``/``in_proj_bias``; ``text_projection``
    (present only with a projection) is stored transposed, as OpenCLIP multiplies ``x @ proj``.
    """
    import torch

    state = _text_model_keys(state)
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            layer, rest = parts[3], ".".join(parts[4:])
            base = f"transformer.resblocks.{layer}."
            proj = next((p for p in ("q_proj", "k_proj", "v_proj") if rest.startswith(f"self_attn.{p}.")), None)
            if proj:
                fused.setdefault(f"{base}attn.in_proj_{rest.rsplit('.', 1)[1]}", {})[proj] = value
            else:
                out[base + _rename(rest, _OPEN_CLIP_LAYER)] = value
        else:
            raise ValueError(f"text encoder weight {key!r} has no place in OpenCLIP's layout")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]], dim=0)
    return out


def pipeline_to_original(family: str, states: dict[str, dict[str, Any]],
                         unet_config: dict[str, Any]) -> dict[str, Any]:
    """Every component of a pipeline in the original single-file layout, prefixes included.

    Args:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        states: ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}`` diffusers/transformers state dicts.
        unet_config: the UNet's config.
    """
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(states["unet"], unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(states["vae"]).items()})
    if family == "sd1":
        out.update({SD1_CLIP_PREFIX + k: v for k, v in clip_to_original(states["text_encoder"]).items()})
    elif family == "sd2":
        out.update({SD2_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_original(states["text_encoder"]).items()})
    elif family == "sdxl":
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in clip_to_original(states["text_encoder"]).items()})
        out.update({SDXL_OPEN_CLIP_PREFIX + k: v
                    for k, v in open_clip_to_original(states["text_encoder_2"]).items()})
    else:
        raise ValueError(f"no single-file layout for family {family!r}")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _component_state(folder: Path) -> dict[str, Any]:
    """The weights of one component folder (one ``.safetensors`` file or a sharded index), never a pickle."""
    from safetensors.torch import load_file

    for name in ("diffusion_pytorch_model", "model"):
        if (folder / f"{name}.safetensors").is_file():
            return load_file(str(folder / f"{name}.safetensors"))
        index = _read_json(folder / f"{name}.safetensors.index.json")
        if index is not None:
            state: dict[str, Any] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
    raise FileNotFoundError(f"{folder} has no safetensors weights")


def modelspec_metadata(family: str, prediction_type: str, resolution: int | None, title: str) -> dict[str, str]:
    """The Stability AI ``modelspec`` header keys other tools read (architecture, prediction type, resolution)."""
    arch = MODELSPEC_ARCHITECTURE[family]
    if family == "sd2" and prediction_type == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
            else "https://github.com/Stability-AI/stablediffusion",
            "modelspec.title": title,
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else prediction_type}
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


def write_single_file(folder: str | Path, out_path: str | Path, dtype: Any = None) -> str:
    """Write the diffusers pipeline ``folder`` (SD 1.x, SD 2.x or SDXL) as one original-layout ``.safetensors``.

    Args:
        folder: a diffusers pipeline folder with safetensors weights.
        out_path: the file to write (``.safetensors``); its folder is created.
        dtype: cast every tensor to this torch dtype (e.g. ``torch.float16``); None keeps them.

    Returns:
        The path written.

    Raises:
        UnsupportedFamily: the folder is not SD 1.x/2.x/SDXL.
        FileNotFoundError: a component has no safetensors weights.
    """
    from safetensors.torch import save_file

    from pixelmill.models.family import family_from_configs

    root = Path(folder)
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: a single-file checkpoint is written as .safetensors")
    index = _read_json(root / "model_index.json")
    if index is None:
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: it has no model_index.json")
    configs = {name: _read_json(root / name / "config.json")
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json") or {}
    info = family_from_configs(index, configs["unet"], scheduler, configs["vae"], name=str(root))
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if info.family == "sdxl" else [])
    states = {name: _component_state(root / name) for name in names}
    tensors = pipeline_to_original(info.family, states, configs["unet"])
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}

    carried: dict[str, Any] = {"scheduler": scheduler}
    for name in names:
        fields = NON_SHAPE_FIELDS["text_encoder" if name.startswith("text_encoder") else name]
        carried[name] = {f: configs[name][f] for f in fields if f in configs[name]}
    for name in ("tokenizer", "tokenizer_2"):
        tok = _read_json(root / name / "tokenizer_config.json")
        if tok is not None:
            carried[name] = {f: tok[f] for f in NON_SHAPE_FIELDS["tokenizer"] if isinstance(tok.get(f), (str, int))}
    vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    sample = configs["unet"].get("sample_size")
    resolution = int(sample) * vae_scale if isinstance(sample, int) else None
    metadata = {"format": "pt", PIXELMILL_CONFIG_KEY: json.dumps(carried, sort_keys=True),
                **modelspec_metadata(info.family, info.prediction_type, resolution, root.name)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return str(out)
