"""The diffusers configs of a single-file checkpoint, inferred from its tensor shapes over a reference config.

A single file holds weights, not configs. ``from_single_file`` needs a diffusers config
folder, and diffusers' own one (downloaded, keyed on full-size shapes) cannot fit a
checkpoint of another size. So every field the shapes determine is read from them:

- UNet: ``in_channels``/``out_channels``, ``block_out_channels``, ``layers_per_block``,
  down/up block types (which levels have cross-attention), transformer depth per level,
  ``cross_attention_dim``, ``use_linear_projection``, SDXL's added-conditioning sizes;
- VAE: channels per level, ``layers_per_block``, ``latent_channels``, mid-block attention;
- text encoders: width, depth, MLP size, vocabulary, context length, projection size.

Fields the weights cannot tell (attention head counts, sample size, scheduler, VAE scaling
factor, tokenizer padding) come from the header's ``pixelmill.config`` metadata when the
file was written by ``single_file_writer``, else from the family's reference config
(``reference_configs/``: Stable Diffusion 1.5, 2.1 768-v and SDXL base 1.0), with head
counts following the reference's rule (SD 1.x: 8 heads; SD 2.x/SDXL and every CLIP: 64
channels per head). A full-size checkpoint thus gets exactly the reference config.
Nothing here needs torch: shapes come from the safetensors header.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from pixelmill.models.single_file_writer import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_configs"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
CLIP_HEAD_WIDTH = 64
# diffusers' SD 2.x text encoder has 23 of OpenCLIP-H's 24 layers (SD 2 uses the penultimate one):
# its converter drops resblock 23 of ``cond_stage_model.model.``, so the config must not count it.
SD2_DROPPED_RESBLOCK = 23

Shapes = dict[str, tuple[int, ...]]


def _config_file(component: str) -> str:
    if component == "scheduler":
        return "scheduler/scheduler_config.json"
    if component.startswith("tokenizer"):
        return f"{component}/tokenizer_config.json"
    return f"{component}/config.json"


@cache
def _reference_text(family: str, relpath: str) -> str | None:
    path = REFERENCE_DIR / family / relpath
    return path.read_text() if path.is_file() else None


def reference_config(family: str, component: str) -> dict[str, Any] | None:
    """A copy of the family's shipped reference config of ``component`` (``model_index`` for the index)."""
    text = _reference_text(family, "model_index.json" if component == "model_index" else _config_file(component))
    return json.loads(text) if text is not None else None


def _under(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _heads(channels: int, width: int) -> int:
    return channels // width if channels >= width and channels % width == 0 else 1


def infer_unet_config(shapes: Shapes, family: str, carried: dict[str, Any] | None = None,
                      pooled_dim: int | None = None) -> dict[str, Any]:
    """The UNet config of a single file (see the module docstring).

    Args:
        shapes: the whole file's key → shape.
        family: ``sd1``, ``sd2`` or ``sdxl``.
        carried: the non-shape fields the writer recorded, if any.
        pooled_dim: SDXL's pooled text width (the second encoder's projection size).
    """
    ref = reference_config(family, "unet")
    s = _under(shapes, UNET_PREFIX)
    cfg = copy.deepcopy(ref)
    ch0, in_ch = s["input_blocks.0.0.weight"][:2]
    n_inputs = len(_indices(s, r"input_blocks\.(\d+)\."))
    n_down = sum(f"input_blocks.{i}.0.op.weight" in s for i in range(n_inputs))
    levels = n_down + 1
    lpb, rem = divmod(n_inputs - 1 - n_down, levels)
    if rem or lpb < 1:
        raise ValueError(f"UNet input blocks ({n_inputs}) do not form {levels} levels of equal depth")
    out, down_types, depths, heads_src = [], [], [], []
    for b in range(levels):
        i = 1 + b * (lpb + 1)
        out.append(s[f"input_blocks.{i}.0.out_layers.3.weight"][0])
        attn = f"input_blocks.{i}.1.proj_in.weight" in s
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(len(_indices(s, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) if attn else 1)
        heads_src.append(out[-1])
    up_types = ["CrossAttnUpBlock2D" if f"output_blocks.{u * (lpb + 1)}.1.proj_in.weight" in s else "UpBlock2D"
                for u in range(levels)]
    proj_in = next(v for k, v in s.items() if k.endswith(".proj_in.weight"))
    to_k = next(v for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    mid_depth = len(_indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if not mid_depth:
        raise ValueError("the UNet's middle block has no cross-attention transformer")
    if depths[-1] != mid_depth and down_types[-1] == "DownBlock2D":
        depths[-1] = mid_depth  # diffusers takes the middle block's depth from the last level
    cfg.update({
        "in_channels": in_ch, "out_channels": s["out.2.weight"][0], "block_out_channels": out,
        "layers_per_block": lpb, "down_block_types": down_types, "up_block_types": up_types,
        "cross_attention_dim": to_k[1],
    })
    if len(proj_in) == 2 or "use_linear_projection" in ref:
        cfg["use_linear_projection"] = len(proj_in) == 2
    if out[0] != ch0:
        raise ValueError(f"UNet conv_in has {ch0} channels but its first level {out[0]}")
    if "transformer_layers_per_block" in ref or set(depths) != {1}:
        cfg["transformer_layers_per_block"] = depths
    ref_heads = ref["attention_head_dim"]
    if isinstance(ref_heads, int):  # SD 1.x: a fixed number of heads at every level
        cfg["attention_head_dim"] = ref_heads if all(c % ref_heads == 0 for c in out) else 1
    else:  # SD 2.x, SDXL: a fixed head width (64)
        width = ref["block_out_channels"][0] // ref_heads[0]
        cfg["attention_head_dim"] = [_heads(c, width) for c in out]
    if "label_emb.0.0.weight" in s:
        adm = s["label_emb.0.0.weight"][1]
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = adm
        if pooled_dim is not None:
            cfg["addition_time_embed_dim"] = (adm - pooled_dim) // 6
    elif cfg.get("addition_embed_type"):
        raise ValueError("an SDXL UNet needs its added-conditioning weights (label_emb)")
    cfg.update((carried or {}).get("unet", {}))
    return cfg


def infer_vae_config(shapes: Shapes, family: str, carried: dict[str, Any] | None = None) -> dict[str, Any]:
    """The VAE config of a single file (``first_stage_model.``)."""
    cfg = reference_config(family, "vae")
    s = _under(shapes, VAE_PREFIX)
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError(f"no VAE weights ({VAE_PREFIX}encoder.down.*)")
    cfg.update({
        "in_channels": s["encoder.conv_in.weight"][1], "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["decoder.conv_in.weight"][1],
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    })
    if not any(k.startswith("encoder.mid.attn_1.") for k in s):
        cfg["mid_block_add_attention"] = False
    if "quant_conv.weight" not in s:
        cfg["use_quant_conv"] = False
    if "post_quant_conv.weight" not in s:
        cfg["use_post_quant_conv"] = False
    cfg.update((carried or {}).get("vae", {}))
    return cfg


def infer_text_config(shapes: Shapes, family: str, component: str, prefix: str,
                      carried: dict[str, Any] | None = None) -> dict[str, Any]:
    """A CLIP text encoder's config from Hugging Face (``…transformer.``) or OpenCLIP (``…model.``) weights."""
    cfg = reference_config(family, component)
    s = _under(shapes, prefix)
    if prefix.endswith(".model."):  # OpenCLIP
        vocab, hidden = s["token_embedding.weight"]
        layers = _indices(s, r"transformer\.resblocks\.(\d+)\.")
        if prefix == SD2_OPEN_CLIP_PREFIX:
            layers = [i for i in layers if i != SD2_DROPPED_RESBLOCK]
        fields = {"max_position_embeddings": s["positional_embedding"][0],
                  "intermediate_size": s["transformer.resblocks.0.mlp.c_fc.weight"][0]}
        if "text_projection" in s and component == "text_encoder_2":
            fields["projection_dim"] = s["text_projection"][1]
    else:
        s = _under(s, "text_model.")
        vocab, hidden = s["embeddings.token_embedding.weight"]
        layers = _indices(s, r"encoder\.layers\.(\d+)\.")
        fields = {"max_position_embeddings": s["embeddings.position_embedding.weight"][0],
                  "intermediate_size": s["encoder.layers.0.mlp.fc1.weight"][0]}
    cfg.update(fields, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
               num_attention_heads=_heads(hidden, CLIP_HEAD_WIDTH))
    cfg.update((carried or {}).get(component, {}))
    return cfg


TEXT_PREFIXES = {"sd1": {"text_encoder": SD1_CLIP_PREFIX}, "sd2": {"text_encoder": SD2_OPEN_CLIP_PREFIX},
                 "sdxl": {"text_encoder": SDXL_CLIP_PREFIX, "text_encoder_2": SDXL_OPEN_CLIP_PREFIX}}


def infer_configs(shapes: Shapes, family: str, prediction_type: str, carried: dict[str, Any] | None = None,
                  resolution: int | None = None) -> dict[str, dict[str, Any]]:
    """Every component config of a single file, by component name (``unet``, ``vae``, ``text_encoder``, …).

    Args:
        shapes: key → shape of the whole file.
        family: its family (``single_file.detect_family``).
        prediction_type: the scheduler's (``single_file.prediction_type``).
        carried: the header's ``pixelmill.config``, if any.
        resolution: the native image size (``modelspec.resolution``), for the UNet's ``sample_size``
            when ``carried`` does not give it.
    """
    carried = carried or {}
    configs: dict[str, dict[str, Any]] = {}
    for component, prefix in TEXT_PREFIXES[family].items():
        configs[component] = infer_text_config(shapes, family, component, prefix, carried)
    pooled = configs["text_encoder_2"]["projection_dim"] if "text_encoder_2" in configs else None
    configs["unet"] = infer_unet_config(shapes, family, carried, pooled)
    configs["vae"] = infer_vae_config(shapes, family, carried)
    if resolution and "sample_size" not in carried.get("unet", {}):
        configs["unet"]["sample_size"] = resolution // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    for tok in ("tokenizer", "tokenizer_2"):
        ref = reference_config(family, tok)
        if ref is not None:
            configs[tok] = {**ref, **carried.get(tok, {})}
    scheduler = carried.get("scheduler") or reference_config(family, "scheduler")
    configs["scheduler"] = {**scheduler, "prediction_type": prediction_type}
    return configs
