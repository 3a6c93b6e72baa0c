"""Loading models by name: a local folder or a hub id.

This module is the one place that knows where weights come from. Diffusion pipelines
load through diffusers' Auto pipelines, so SDXL and newer families work without new
code; CLIP loads through open_clip. Weights are read from safetensors only and remote
code is never trusted. A single ``.safetensors`` file (original checkpoint layout) loads
through ``single_file.py``. Names that look local but point nowhere fail early with
``ModelNotFound`` naming the path, before any hub lookup can muddy the error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixelmill.models.safe_weights import PICKLE_SUFFIXES, WHY, refuse_pickles

if TYPE_CHECKING:  # torch is imported where a model is loaded: preflight on the driver needs none of it
    import torch

MODEL_INDEX = "model_index.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFETENSORS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
TOY_PREFIX = "toy:"
TOY_MODELS_DIR = Path(__file__).resolve().parents[1] / "toy" / "models"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelNotFound(FileNotFoundError):
    """A model name that resolves to nothing loadable (missing folder, wrong layout, unknown id)."""


def resolve_model_name(model: str) -> str:
    """Turn a ``toy:NAME`` short name into the path of the toy model shipped in the package.

    ``toy:clip`` is ``pixelmill/toy/models/clip`` (and so on for every folder there);
    any other name comes back unchanged. A short name is a name, not a path:
    ``looks_local`` says False for it, so path handling leaves it alone until a loader
    resolves it.

    A model on object storage (``s3://bucket/models/sd``, any remote fsspec URL) comes back
    as the path of its local copy (``storage.local_copy``: downloaded once per content),
    since diffusers and open_clip load local folders only.

    Raises:
        ModelNotFound: an unknown toy name, or nothing at a remote URL.
    """
    if _is_remote(model):
        from pixelmill.datasets import storage

        try:
            return storage.local_copy(model)
        except FileNotFoundError:
            raise ModelNotFound(f"model not found: {model}") from None
    if not model.startswith(TOY_PREFIX):
        return model
    name = model[len(TOY_PREFIX):]
    path = TOY_MODELS_DIR / name
    if not name or "/" in name or name.startswith(".") or not path.is_dir():
        known = sorted(p.name for p in TOY_MODELS_DIR.iterdir() if p.is_dir()) if TOY_MODELS_DIR.is_dir() else []
        shipped = ", ".join(TOY_PREFIX + k for k in known) or "none"
        raise ModelNotFound(f"unknown toy model {model!r}; shipped: {shipped}")
    from pixelmill.models.shared_components import assembled_folder

    return str(assembled_folder(path, TOY_MODELS_DIR))  # the folder itself, unless it borrows components


def _is_remote(model: str) -> bool:
    from pixelmill.datasets.storage import is_remote

    return is_remote(model)


def looks_local(model: str) -> bool:
    """Whether a model name should be treated as a local path rather than a hub id.

    Local when it starts with ``/``, ``.`` or ``~``, exists on disk, its first path
    component exists on disk, or it cannot be a hub id (``org/name``) at all. ``hf-hub:``
    ids and ``toy:`` short names (see ``resolve_model_name``) are not local.

    Args:
        model: The model name as the user wrote it.
    """
    if model.startswith(LOCAL_DIR_PREFIX):
        return True
    if model.startswith((HF_HUB_PREFIX, TOY_PREFIX)):
        return False
    if model.startswith(("/", ".", "~")) or "\\" in model or (is_single_file(model) and "://" not in model):
        return True
    path = Path(model)
    if path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).exists()):
        return True
    return not _HUB_ID.match(model)


def is_single_file(model: str) -> bool:
    """Whether a model name is one single-file checkpoint (``path/to/model.safetensors``) rather than a folder."""
    return model.lower().endswith(".safetensors") and not model.startswith((HF_HUB_PREFIX, TOY_PREFIX))


def _local_path(model: str) -> Path:
    return Path(model.removeprefix(LOCAL_DIR_PREFIX)).expanduser().absolute()


def _offline_hint() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return " (HF_HUB_OFFLINE is set: only models already in the local hub cache can load)"
    return ""


def _pipeline_folder(model: str) -> Path:
    path = _local_path(model)
    if not path.exists():
        raise ModelNotFound(f"model folder not found: {path} (from model name {model!r})")
    if why := refuse_pickles(path):
        raise ModelNotFound(why)
    if not path.is_dir():
        raise ModelNotFound(f"model path is not a folder: {path}")
    if not (path / MODEL_INDEX).is_file():
        raise ModelNotFound(f"{path} is not a diffusers pipeline folder: it has no {MODEL_INDEX}")
    return path


def _read_model_index(model: str, revision: str | None) -> tuple[str, dict[str, Any], str | None]:
    """Return (name to pass to diffusers, model_index.json content, revision to pass with it).

    A hub id pinned to a commit (as ``models.hub`` pins a stage's actors) that is in this
    machine's hub cache loads from its snapshot folder: no hub request, no token.
    """
    model = resolve_model_name(model)
    if looks_local(model):
        path = _pipeline_folder(model)
        return str(path), json.loads((path / MODEL_INDEX).read_text()), None
    from pixelmill.models.hub import cached_snapshot, hub_repo, is_commit

    repo = hub_repo(model)
    if repo and is_commit(revision) and (snapshot := cached_snapshot(repo, revision)) is not None:
        if (snapshot / MODEL_INDEX).is_file():
            return str(snapshot), json.loads((snapshot / MODEL_INDEX).read_text()), None
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model, revision=revision)
    except OSError as exc:
        raise ModelNotFound(
            f"could not read {MODEL_INDEX} of hub model {model!r}"
            f"{'@' + revision if revision else ''}: {exc}{_offline_hint()}"
        ) from exc
    return model, dict(config), revision


def _single_file(model: str, kind: str, dtype: torch.dtype) -> Any:
    """A single-file checkpoint as a pipeline of ``kind`` (see ``single_file.load_single_file_pipeline``)."""
    import torch

    from pixelmill.models.single_file import describe_single_file, load_single_file_pipeline

    pipe = load_single_file_pipeline(resolve_model_name(model), kind, dtype)
    if dtype != torch.float32 and describe_single_file(model).vae_force_upcast:
        from pixelmill.models.components import keep_vae_fp32

        keep_vae_fp32(pipe.vae.to(torch.float32))  # as for folders (models/components.py)
    return pipe


def _finish(pipe: Any, device: torch.device) -> Any:
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=1)
def _dtype_kwarg() -> str:
    """The dtype keyword of ``from_pretrained``: ``dtype`` from diffusers 0.42 (where
    ``torch_dtype`` is deprecated), ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _from_pretrained(
    loader: Callable[..., Any], name: str, model: str, dtype: torch.dtype, revision: str | None,
    index: dict[str, Any] | None = None, safety_checker: bool = True,
) -> Any:
    from diffusers.utils import logging as diffusers_logging

    from pixelmill.models.components import load_kwargs

    diffusers_logging.disable_progress_bar()
    try:
        extra = load_kwargs(name, index, dtype, revision, safety_checker) if index is not None else {}
        return loader(
            name, **{_dtype_kwarg(): dtype}, use_safetensors=True, revision=revision, **extra
        )
    except OSError as exc:
        raise ModelNotFound(
            f"could not load model {model!r}{'@' + revision if revision else ''}: {exc}"
            f"{_offline_hint()}"
        ) from exc


def _is_instruct_pix2pix(class_name: str) -> bool:
    return "InstructPix2Pix" in class_name


def load_img2img_pipeline(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    safety_checker: bool = True,
) -> Any:
    """Load an image-to-image diffusion pipeline (SD 1.x/2.x, SDXL, …) from a folder or hub id.

    Loads through ``diffusers.AutoPipelineForImage2Image`` so any family diffusers maps
    to an img2img pipeline works; a text-to-image checkpoint yields its img2img variant.
    The pipeline's own safety checker, if it has one, is kept unless ``safety_checker`` is
    False (then it is not loaded at all). In half precision a family whose VAE needs fp32
    (SDXL) gets its VAE in fp32 (``models.components``).

    Args:
        model: A local diffusers folder (with ``model_index.json``) or a hub id.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, … (see ``resolve_device``).
        dtype: ``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"`` (see ``resolve_dtype``).
        revision: Hub branch, tag or commit; ignored for local folders.
        safety_checker: False: load without the checkpoint's safety checker.

    Raises:
        ModelNotFound: The folder is missing or not a pipeline, or the hub id cannot load.
        ValueError: The model is an InstructPix2Pix checkpoint (use
            ``load_instruct_pix2pix_pipeline``) or a family with no img2img pipeline.
    """
    from diffusers import AutoPipelineForImage2Image

    from pixelmill.models.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_single_file(model):
        return _finish(_single_file(model, "img2img", torch_dtype), dev)
    name, index, revision = _read_model_index(model, revision)
    class_name = str(index.get("_class_name", ""))
    if _is_instruct_pix2pix(class_name):
        raise ValueError(
            f"{model!r} is an InstructPix2Pix model ({class_name}); "
            "load it with load_instruct_pix2pix_pipeline"
        )
    pipe = _from_pretrained(
        AutoPipelineForImage2Image.from_pretrained, name, model, torch_dtype, revision, index, safety_checker
    )
    return _finish(pipe, dev)


def load_text2img_pipeline(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    safety_checker: bool = True,
) -> Any:
    """Load a text-to-image pipeline through ``diffusers.AutoPipelineForText2Image``.

    Args:
        model: A local diffusers folder or a hub id; an img2img checkpoint gives its
            text-to-image variant.
        device: See ``resolve_device``.
        dtype: See ``resolve_dtype``.
        revision: Hub branch, tag or commit; ignored for local folders.
        safety_checker: False: load without the checkpoint's safety checker.

    Raises:
        ModelNotFound: The folder is missing or not a pipeline, or the hub id cannot load.
    """
    from diffusers import AutoPipelineForText2Image

    from pixelmill.models.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_single_file(model):
        return _finish(_single_file(model, "text2img", torch_dtype), dev)
    name, index, revision = _read_model_index(model, revision)
    if _is_instruct_pix2pix(str(index.get("_class_name", ""))):
        raise ValueError(f"{model!r} is an InstructPix2Pix model; it has no text-to-image pipeline")
    pipe = _from_pretrained(
        AutoPipelineForText2Image.from_pretrained, name, model, torch_dtype, revision, index, safety_checker
    )
    return _finish(pipe, dev)


def _unet_in_channels(name: str, revision: str | None) -> int | None:
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(name, subfolder="unet", revision=revision)
    except OSError:
        return None
    return config.get("in_channels")


def load_instruct_pix2pix_pipeline(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    safety_checker: bool = True,
) -> Any:
    """Load an InstructPix2Pix pipeline (SD or SDXL based) from a folder or hub id.

    diffusers' ``AutoPipelineForImage2Image`` has no InstructPix2Pix mapping (it would
    fail, or load the 8-channel UNet into a plain img2img pipeline), so the class is
    taken from ``model_index.json``: an ``*InstructPix2Pix*`` class is used as is; a
    plain SD checkpoint whose UNet takes 8 input channels (as diffusers' InstructPix2Pix
    training script may save) loads as ``StableDiffusionInstructPix2PixPipeline``.

    Args:
        model: A local diffusers folder or a hub id (``timbrooks/instruct-pix2pix``).
        device: See ``resolve_device``.
        dtype: See ``resolve_dtype``.
        revision: Hub branch, tag or commit; ignored for local folders.
        safety_checker: False: load without the checkpoint's safety checker.

    Raises:
        ModelNotFound: The folder is missing or not a pipeline, or the hub id cannot load.
        ValueError: The checkpoint is not an InstructPix2Pix model.
    """
    import diffusers

    from pixelmill.models.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_single_file(model):
        return _finish(_single_file(model, "instruct_pix2pix", torch_dtype), dev)
    name, index, revision = _read_model_index(model, revision)
    class_name = str(index.get("_class_name", ""))
    if _is_instruct_pix2pix(class_name) and hasattr(diffusers, class_name):
        pipe_cls = getattr(diffusers, class_name)
    else:
        in_channels = _unet_in_channels(name, revision)
        if in_channels != 8:
            raise ValueError(
                f"{model!r} is not an InstructPix2Pix model: its pipeline is {class_name or 'unknown'} "
                f"and its UNet takes {in_channels} input channels (InstructPix2Pix needs 8)"
            )
        pipe_cls = diffusers.StableDiffusionInstructPix2PixPipeline
    pipe = _from_pretrained(pipe_cls.from_pretrained, name, model, torch_dtype, revision, index, safety_checker)
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.config.in_channels != 8:
        raise ValueError(
            f"{model!r} loaded as {type(pipe).__name__} but its UNet takes "
            f"{unet.config.in_channels} input channels (InstructPix2Pix needs 8)"
        )
    return _finish(pipe, dev)


_OPEN_CLIP_PRECISION = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _clip_folder(model: str) -> Path:
    path = _local_path(model)
    if not path.is_dir():
        raise ModelNotFound(f"CLIP model folder not found: {path} (from model name {model!r})")
    if not (path / OPEN_CLIP_CONFIG).is_file():
        raise ModelNotFound(f"{path} is not an open_clip model folder: it has no {OPEN_CLIP_CONFIG}")
    if not any((path / name).is_file() for name in OPEN_CLIP_SAFETENSORS):
        raise ModelNotFound(
            f"{path} has no safetensors weights (expected one of {', '.join(OPEN_CLIP_SAFETENSORS)}); "
            "pickled checkpoints are not loaded"
        )
    return path


def load_clip(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """Load an open_clip model with its eval preprocessing and tokenizer.

    Accepted names:

    - a local folder holding ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``,
      the hub layout) and ``open_clip_model.safetensors`` (``local-dir:`` prefix allowed);
    - ``hf-hub:org/name`` (or a bare ``org/name`` that is not an open_clip architecture);
    - ``ARCH/PRETRAINED`` such as ``ViT-L-14/laion2b_s32b_b82k``;
    - ``toy:clip``, the toy-world CLIP shipped in the package (``resolve_model_name``).

    Hub weights come from safetensors when the repo has them; a pickled checkpoint is
    only read with ``weights_only=True``.

    Args:
        model: The model name.
        device: See ``resolve_device``.
        dtype: ``"float32"`` (default: scores are compared against thresholds),
            ``"bfloat16"``/``"float16"`` on GPU, or ``"auto"``.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode, the PIL → tensor
        eval transform, and a callable mapping a list of strings to token ids.

    Raises:
        ModelNotFound: A missing or malformed local folder, or an unknown name.
    """
    import open_clip

    from pixelmill.models.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    precision = _OPEN_CLIP_PRECISION[str(resolve_dtype(dtype, dev))]
    model = resolve_model_name(model)
    if looks_local(model):
        folder = _clip_folder(model)
        name = f"{LOCAL_DIR_PREFIX}{folder}"
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, precision=precision, device=dev, weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    else:
        arch, _, tag = model.partition("/")
        try:
            if model.startswith(HF_HUB_PREFIX) or (tag and arch not in open_clip.list_models()):
                hub_name = model if model.startswith(HF_HUB_PREFIX) else HF_HUB_PREFIX + model
                clip, preprocess = open_clip.create_model_from_pretrained(
                    hub_name, precision=precision, device=dev, weights_only=True
                )
                tokenizer = open_clip.get_tokenizer(hub_name)
            elif tag:
                clip, preprocess = open_clip.create_model_from_pretrained(
                    arch, pretrained=tag, precision=precision, device=dev, weights_only=True
                )
                tokenizer = open_clip.get_tokenizer(arch)
            else:
                raise ModelNotFound(
                    f"CLIP model {model!r} names no weights: use a local folder, "
                    "'hf-hub:org/name', or 'ARCH/PRETRAINED' (e.g. 'ViT-L-14/laion2b_s32b_b82k')"
                )
        except RuntimeError as exc:
            raise ModelNotFound(f"could not load CLIP model {model!r}: {exc}{_offline_hint()}") from exc
    clip.eval()
    return clip, preprocess, tokenizer


def safety_flags(pipeline_output: Any) -> list[bool]:
    """Per-image NSFW flags of a diffusers pipeline output.

    A flagged image is blacked out by the safety checker and must be a reject, never
    a success. ``None`` (no safety checker) means nothing was flagged.

    Args:
        pipeline_output: A pipeline output object (``.images`` and
            ``.nsfw_content_detected``) or the ``(images, nsfw)`` tuple returned with
            ``return_dict=False``.
    """
    if isinstance(pipeline_output, tuple):
        images = pipeline_output[0]
        flags = pipeline_output[1] if len(pipeline_output) > 1 else None
    else:
        images = getattr(pipeline_output, "images", None)
        flags = getattr(pipeline_output, "nsfw_content_detected", None)
    count = len(images) if images is not None else 0
    if flags is None:
        return [False] * count
    if isinstance(flags, (bool, int)):
        return [bool(flags)] * count
    result = [bool(f) for f in _as_list(flags)]
    if count and len(result) != count:
        raise ValueError(f"pipeline output has {count} images but {len(result)} safety flags")
    return result


def _as_list(flags: Any) -> Sequence[Any]:
    import torch

    if isinstance(flags, torch.Tensor):
        return flags.flatten().tolist()
    return list(flags)


def check_model_reference(model: str, kind: str = "pipeline", revision: str | None = None) -> None:
    """Fail early, on the driver, when a local model name points at nothing loadable.

    A hub id (a ``pipeline``) must resolve: in the local hub cache, or on the hub when
    online (its configs are read: ``family.describe_model``); its weights are left to the
    workers (``models.hub`` fetches them once per node before a stage starts).

    Args:
        model: the model name as the user wrote it.
        kind: ``pipeline`` (a diffusers folder with ``model_index.json``), or anything
            else for a model that only has to exist (``clip``, ``folder``).
        revision: a hub id's branch, tag or commit (default: main).

    Raises:
        ModelNotFound: naming the path and what is missing.
    """
    if kind == "pipeline" and Path(model).suffix.lower() in PICKLE_SUFFIXES:
        raise ModelNotFound(f"{model} is a pickled checkpoint ({Path(model).suffix}); {WHY}")
    if _is_remote(model):  # checked where it lies, without downloading it
        from pixelmill.datasets import storage

        wanted = storage.join(model, MODEL_INDEX) if kind == "pipeline" and not is_single_file(model) else model
        if not storage.exists(wanted):
            raise ModelNotFound(f"model not found: {wanted}" if kind != "pipeline" else
                                f"{model} is not a diffusers pipeline folder: it has no {MODEL_INDEX}")
        return
    model = resolve_model_name(model)
    if not looks_local(model):
        if kind == "pipeline" and not is_single_file(model):
            from pixelmill.models.hub import check_hub_model

            check_hub_model(model, revision)
        return
    if kind == "pipeline" and is_single_file(model):
        from pixelmill.models.single_file import check_single_file

        check_single_file(_local_path(model))
        return
    if kind == "pipeline":
        _pipeline_folder(model)
        return
    path = _local_path(model)
    if not path.exists():
        raise ModelNotFound(f"model not found: {path} (from model name {model!r})")
    if why := refuse_pickles(path):
        raise ModelNotFound(why)


def load_training_components(model: str, revision: str | None = None) -> dict[str, Any]:
    """Load the parts of a Stable Diffusion pipeline (sd1, sd2, sdxl) a trainer needs, in fp32 on the CPU.

    Training keeps every weight in fp32 (mixed precision is autocast, never fp16
    weights: an fp16 VAE gives NaN losses and fp16 trainable weights break the grad
    scaler, two of the most reported fine-tuning bugs). The caller moves parts to its
    device. An InstructPix2Pix checkpoint loads with its 8-channel UNet.

    Returns:
        ``{"tokenizer", "text_encoder", "vae", "unet", "scheduler", "pipeline_class", "info"}`` (``info``:
        its ``family.ModelInfo``); SDXL adds ``tokenizer_2``, ``text_encoder_2`` and its pipeline's
        ``force_zeros_for_empty_prompt``.

    Raises:
        ModelNotFound: The folder is missing or not a pipeline.
        UnsupportedFamily: Not one of the families (``models/family.py``; a ValueError naming what it is).
    """
    import diffusers
    import torch

    if is_single_file(model):
        pipe = _single_file(model, "training", torch.float32)
    else:
        name, index, revision = _read_model_index(model, revision)
        class_name = str(index.get("_class_name", ""))
        cls = getattr(diffusers, class_name, None) if class_name else None
        if cls is None or not issubclass(cls, diffusers.DiffusionPipeline):
            cls = diffusers.DiffusionPipeline
        pipe = _from_pretrained(cls.from_pretrained, name, model, torch.float32, revision)
    from pixelmill.models.family import family_of_pipeline

    info = family_of_pipeline(pipe)
    names = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
    if info.family == "sdxl":
        names += ("tokenizer_2", "text_encoder_2")
    parts = {k: getattr(pipe, k) for k in names}
    parts["pipeline_class"] = type(pipe).__name__
    parts["info"] = info
    if info.family == "sdxl":
        parts["force_zeros_for_empty_prompt"] = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
    return parts


from pixelmill.models.fingerprint import model_fingerprint  # noqa: E402,F401  (re-exported; uses the helpers above)
