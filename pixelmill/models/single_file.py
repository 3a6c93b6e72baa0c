"""Single-file checkpoints (``model: path/to/model.safetensors``): family detection and loading.

Model hubs ship Stable Diffusion as one ``.safetensors`` file in the original LDM/SGM key
layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` or
``conditioner.embedders.N.*``). pixelmill reads such a file in two steps:

**Detection** (``describe_single_file``, on the driver: reads the safetensors header only,
never weights, never ``torch.load``). The family comes from the key names:

==========  ======================================================================
family      keys
==========  ======================================================================
sd1         ``cond_stage_model.transformer.*`` (CLIP ViT-L, Hugging Face names)
sd2         ``cond_stage_model.model.*`` (OpenCLIP ViT-H)
sdxl        ``conditioner.embedders.0.transformer.*`` + ``conditioner.embedders.1.model.*``
==========  ======================================================================

(an SDXL refiner, an inpainting UNet or a file without UNet/VAE/text encoder is refused,
naming why). Shapes are never compared with full-size ones, so tiny checkpoints work too.

**Prediction type.** Weights cannot tell ``epsilon`` from ``v_prediction`` (SD 2.x 768-v
versus SD 2.x-base share every shape), so it is read, first match wins, from:

1. the header's ``pixelmill.config`` (written by ``single_file_writer``: the scheduler config);
2. the header's ``modelspec.prediction_type`` (``v``/``epsilon``, the Stability AI model
   spec), then ``modelspec.architecture`` ending in ``-v`` (``stable-diffusion-v2-768-v``),
   then kohya's ``ss_v_parameterization``, then a ``v_pred`` key in the state dict (the
   ComfyUI convention for v-prediction SDXL checkpoints);
3. a sidecar ``<name>.yaml`` next to the file (the LDM config that came with it, as in
   AUTOMATIC1111): ``model.params.parameterization: "v"`` means v-prediction, any other
   (or none) epsilon;
4. the family default: ``v_prediction`` for SD 2.x (what diffusers and the 768-px 2.0/2.1
   checkpoints assume), ``epsilon`` for SD 1.x and SDXL. An SD 2.x-*base* file without
   metadata needs a sidecar yaml or a ``modelspec.prediction_type`` header key.

**Loading** (``load_single_file_pipeline``, in the worker): diffusers' ``from_single_file``
of the right pipeline class with a local config folder (offline: ``from_single_file``
cannot fetch one), built from the shapes (``single_file_config``) and cached under
``storage.cache_dir()/single-file-configs/<hash>``, with the real CLIP tokenizer written
offline (``write_clip_tokenizer_files``). SDXL's second text encoder is converted here with
diffusers' own OpenCLIP converter, since ``from_single_file`` picks the wrong embedder
when both encoders have the same width.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixelmill.models.family import ALL_FAMILIES, FAMILIES, ModelInfo, UnsupportedFamily
from pixelmill.models.single_file_config import Shapes, infer_configs, reference_config
from pixelmill.models.single_file_writer import (
    PIXELMILL_CONFIG_KEY,
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
KINDS = ("img2img", "text2img", "instruct_pix2pix", "training")
PIPELINE_CLASSES = {  # (family is SDXL, kind) -> diffusers class
    (False, "img2img"): "StableDiffusionImg2ImgPipeline", (True, "img2img"): "StableDiffusionXLImg2ImgPipeline",
    (False, "text2img"): "StableDiffusionPipeline", (True, "text2img"): "StableDiffusionXLPipeline",
    (False, "training"): "StableDiffusionPipeline", (True, "training"): "StableDiffusionXLPipeline",
    (False, "instruct_pix2pix"): "StableDiffusionInstructPix2PixPipeline",
    (True, "instruct_pix2pix"): "StableDiffusionXLInstructPix2PixPipeline",
}


class SingleFileError(ValueError):
    """A file that is not a single-file checkpoint pixelmill can read (not safetensors, unknown layout)."""


def _open_binary(model: str):
    from pixelmill.datasets import storage

    if storage.is_remote(model):  # the header only: a ranged read, not a download
        fs, path = storage.resolve(model)
        return fs.open(path, "rb")
    from pixelmill.models.loading import _local_path

    return open(_local_path(model), "rb")


def read_header(model: str) -> tuple[Shapes, dict[str, str]]:
    """``(key → shape, metadata)`` of a ``.safetensors`` file, from its JSON header (no tensor is read).

    Raises:
        FileNotFoundError: no such file.
        SingleFileError: not a safetensors file.
    """
    with _open_binary(model) as fh:
        raw = fh.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not 2 <= size <= MAX_HEADER_BYTES:
            raise SingleFileError(f"{model} is not a safetensors file (no valid header)")
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SingleFileError(f"{model} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SingleFileError(f"{model} is not a safetensors file (its header is not a table)")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def detect_family(shapes: Shapes, name: str = "model") -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a single file's key names (see the module's table).

    Raises:
        UnsupportedFamily: a layout none of the families has, naming what was found.
    """
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if not has(UNET_PREFIX + "input_blocks.0.0."):
        other = ("an SD3/Flux-style transformer" if has(UNET_PREFIX) else "no UNet weights (model.diffusion_model.*)")
        raise UnsupportedFamily(f"{name}: pixelmill reads single-file UNet checkpoints of "
                                f"{', '.join(FAMILIES.values())}; this file has {other}")
    if not has(VAE_PREFIX):
        raise UnsupportedFamily(f"{name}: the file has no VAE weights ({VAE_PREFIX}*); a single file must hold "
                                "the whole pipeline (UNet, VAE, text encoders)")
    if has(SDXL_OPEN_CLIP_PREFIX) and has(SDXL_CLIP_PREFIX):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise UnsupportedFamily(f"{name}: an SDXL refiner is not supported; use an SDXL base checkpoint "
                                "(two text encoders)")
    elif has(SD2_OPEN_CLIP_PREFIX):
        family = "sd2"
    elif has(SD1_CLIP_PREFIX):
        family = "sd1"
    else:
        raise UnsupportedFamily(f"{name}: the file has no text encoder pixelmill knows ({SD1_CLIP_PREFIX}*, "
                                f"{SD2_OPEN_CLIP_PREFIX}* or {SDXL_CLIP_PREFIX}* + {SDXL_OPEN_CLIP_PREFIX}*)")
    in_channels = shapes[UNET_PREFIX + "input_blocks.0.0.weight"][1]
    if in_channels not in (4, 8):
        raise UnsupportedFamily(f"{name}: its UNet takes {in_channels} input channels; pixelmill supports 4 "
                                "(text-to-image, img2img) and 8 (InstructPix2Pix), not inpainting (9)")
    return family


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _sidecar_parameterization(model: str) -> str | None:
    from pixelmill.datasets import storage

    if storage.is_remote(model):
        return None
    from pixelmill.models.loading import _local_path

    path = _local_path(model)
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file():
            import yaml

            try:
                config = yaml.safe_load(sidecar.read_text()) or {}
            except yaml.YAMLError:
                return None
            params = ((config.get("model") or {}).get("params") or {}) if isinstance(config, dict) else {}
            return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    return None


def prediction_type(family: str, shapes: Shapes, metadata: dict[str, str], model: str = "") -> tuple[str, str]:
    """``(prediction type, where it came from)`` of a single file (see the module docstring for the order)."""
    carried = _carried(metadata)
    if (carried.get("scheduler") or {}).get("prediction_type"):
        return str(carried["scheduler"]["prediction_type"]), PIXELMILL_CONFIG_KEY
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "modelspec.prediction_type"
    if spec in ("epsilon", "eps"):
        return "epsilon", "modelspec.prediction_type"
    if metadata.get("modelspec.architecture", "").strip().lower().endswith("-v"):
        return "v_prediction", "modelspec.architecture"
    if _truthy(metadata.get("ss_v_parameterization")):
        return "v_prediction", "ss_v_parameterization"
    if "v_pred" in shapes:
        return "v_prediction", "v_pred key"
    if model and (found := _sidecar_parameterization(model)):
        return found, "sidecar yaml"
    return ("v_prediction" if family == "sd2" else "epsilon"), f"{family} default"


def _carried(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(PIXELMILL_CONFIG_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _resolution(metadata: dict[str, str]) -> int | None:
    text = metadata.get("modelspec.resolution", "")
    try:
        return max(int(p) for p in text.lower().split("x")) if text else None
    except ValueError:
        return None


def single_file_configs(model: str, shapes: Shapes | None = None,
                        metadata: dict[str, str] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """``(family, component configs)`` of a single file (``single_file_config.infer_configs``)."""
    if shapes is None or metadata is None:
        shapes, metadata = read_header(model)
    family = detect_family(shapes, model)
    ptype, _ = prediction_type(family, shapes, metadata, model)
    try:
        configs = infer_configs(shapes, family, ptype, _carried(metadata), _resolution(metadata))
    except (KeyError, StopIteration, ValueError) as exc:
        raise SingleFileError(f"{model}: its {FAMILIES[family]} weights are incomplete or laid out unlike the "
                              f"original checkpoints: {type(exc).__name__}: {exc}") from None
    return family, configs


def describe_single_file(model: str) -> ModelInfo:
    """The ``ModelInfo`` of a single-file checkpoint, from its header alone (no torch, no weights).

    Family from the key names, prediction type as the module docstring says; the pipeline
    class is the one the img2img loader uses (the InstructPix2Pix one for an 8-channel UNet).

    Raises:
        ModelNotFound: no such file.
        UnsupportedFamily: not a safetensors file, or a layout none of the families has.
    """
    from pixelmill.models.loading import ModelNotFound

    name = model
    try:
        shapes, metadata = read_header(name)
    except FileNotFoundError:
        raise ModelNotFound(f"model file not found: {model}") from None
    except SingleFileError as exc:
        raise UnsupportedFamily(str(exc)) from None
    family = detect_family(shapes, model)
    ptype, _ = prediction_type(family, shapes, metadata, name)
    in_channels = shapes[UNET_PREFIX + "input_blocks.0.0.weight"][1]
    vae = _carried(metadata).get("vae", {})
    return ModelInfo(
        family=family,
        prediction_type=ptype,
        pipeline_class=PIPELINE_CLASSES[(family == "sdxl", "instruct_pix2pix" if in_channels == 8 else "text2img")],
        unet_in_channels=in_channels,
        has_safety_checker=False,
        vae_force_upcast=family == "sdxl" and bool(vae.get("force_upcast", True)),
    )


def check_single_file(path: Path) -> None:
    """Preflight of a local single file: it exists, is safetensors and has a family pixelmill supports.

    Raises:
        ModelNotFound: naming the path and what is wrong.
    """
    from pixelmill.models.loading import ModelNotFound

    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}" if not path.exists() else
                            f"{path} is a folder, not a single-file checkpoint")
    try:
        shapes, metadata = read_header(str(path))
        single_file_configs(str(path), shapes, metadata)
    except (SingleFileError, UnsupportedFamily) as exc:
        raise ModelNotFound(str(exc)) from None


def config_folder(model: str, pipeline_class: str) -> Path:
    """A local diffusers config folder (no weights) for ``from_single_file`` of ``model``, cached by content.

    Holds ``model_index.json`` naming ``pipeline_class``, each component's inferred config and
    the CLIP tokenizer files (written offline).
    """
    from pixelmill.datasets import storage
    from pixelmill.models.tokenizer import write_clip_tokenizer_files

    family, configs = single_file_configs(model)
    index = reference_config(family, "model_index")
    index["_class_name"] = pipeline_class
    index["scheduler"] = ["diffusers", configs["scheduler"].get("_class_name", index["scheduler"][1])]
    files = {"model_index.json": index}
    for component, config in configs.items():
        if component == "scheduler":
            files["scheduler/scheduler_config.json"] = config
        elif component.startswith("tokenizer"):
            files[f"{component}/tokenizer_config.json"] = config
            special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
            files[f"{component}/special_tokens_map.json"] = special
        else:
            files[f"{component}/config.json"] = config
    text = json.dumps(files, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    target = Path(storage.cache_dir()) / "single-file-configs" / key
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(f"{key}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        for rel, content in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2, sort_keys=True))
        for tok in ("tokenizer", "tokenizer_2"):
            if tok in configs:
                write_clip_tokenizer_files(tmp / tok)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not another worker's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _open_clip_text_encoder(model: str, folder: Path, dtype: torch.dtype) -> Any:
    """SDXL's second text encoder (``conditioner.embedders.1.model.``), converted with diffusers' own converter."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with safe_open(model, "pt") as fh:
        checkpoint = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(SDXL_OPEN_CLIP_PREFIX)}
    config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder_2")
    with init_empty_weights():
        encoder = CLIPTextModelWithProjection(config)
    state = convert_open_clip_checkpoint(encoder, checkpoint, prefix=SDXL_OPEN_CLIP_PREFIX)
    if not hasattr(encoder, "text_model"):  # pragma: no cover - flattened in some transformers versions
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.to(dtype).eval()


def _require_all_weights(pipe: Any, model: str) -> None:
    import torch

    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [n for n, p in component.named_parameters() if p.is_meta]
            if missing:
                raise SingleFileError(f"{model}: the file has no weights for {name} ({', '.join(missing[:3])}"
                                      f"{', …' if len(missing) > 3 else ''})")


def load_single_file_pipeline(model: str, kind: str, dtype: torch.dtype) -> Any:
    """Load a single-file checkpoint as a diffusers pipeline (on the CPU, in ``dtype``).

    Args:
        model: the ``.safetensors`` path (``resolve_model_name`` already applied).
        kind: ``img2img``, ``text2img``, ``instruct_pix2pix`` or ``training`` (see ``PIPELINE_CLASSES``).
        dtype: the torch dtype of every component.

    Raises:
        ModelNotFound: no such file.
        ValueError: the UNet's input channels do not fit ``kind`` (as for folders), or the
            file's layout is not one pixelmill reads (``SingleFileError``, ``UnsupportedFamily``).
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from pixelmill.models.loading import ModelNotFound, _dtype_kwarg, _local_path

    if kind not in KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; one of {', '.join(KINDS)}")
    path = _local_path(model)
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path} (from model name {model!r})")
    if path.suffix.lower() != ".safetensors":
        raise ModelNotFound(f"{path} is not a .safetensors file; pixelmill loads only safetensors weights")
    info = describe_single_file(str(path))
    if info.unet_in_channels == 8 and kind in ("img2img", "text2img"):
        raise ValueError(f"{model!r} is an InstructPix2Pix model (its UNet takes 8 input channels); "
                         + ("load it with load_instruct_pix2pix_pipeline" if kind == "img2img" else
                            "it has no text-to-image pipeline"))
    if kind == "instruct_pix2pix" and info.unet_in_channels != 8:
        raise ValueError(f"{model!r} is not an InstructPix2Pix model: its UNet takes {info.unet_in_channels} "
                         "input channels (InstructPix2Pix needs 8)")
    if kind == "training" and info.unet_in_channels == 8:
        kind = "instruct_pix2pix"
    class_name = PIPELINE_CLASSES[(info.family == "sdxl", kind)]
    folder = config_folder(str(path), class_name)
    extra: dict[str, Any] = {}
    if info.family == "sdxl":
        extra["text_encoder_2"] = _open_clip_text_encoder(str(path), folder, dtype)
    diffusers_logging.disable_progress_bar()
    pipe = getattr(diffusers, class_name).from_single_file(
        str(path), config=str(folder), local_files_only=True, **{_dtype_kwarg(): dtype}, **extra)
    _require_all_weights(pipe, model)
    return pipe


__all__ = ["ALL_FAMILIES", "SingleFileError", "check_single_file", "config_folder", "describe_single_file",
           "detect_family", "load_single_file_pipeline", "prediction_type", "read_header", "single_file_configs"]
