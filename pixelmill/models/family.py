"""Model families: the one place that decides what a checkpoint is, and what each method supports.

A checkpoint's family is read from its own configs (``model_index.json``, the UNet's
and scheduler's ``config.json``), never taken from the user:

=======  ==========================================  =========================================
family   what it is                                  how it is told apart
=======  ==========================================  =========================================
sd1      Stable Diffusion 1.x (CLIP ViT-L text)      one text encoder, UNet without linear
                                                     projections in its transformers
sd2      Stable Diffusion 2.x (OpenCLIP ViT-H text)  one text encoder, ``use_linear_projection``
sdxl     Stable Diffusion XL base                    two text encoders, ``text_time`` added
                                                     conditioning (pooled text + time ids)
=======  ==========================================  =========================================

The prediction type (``epsilon`` or ``v_prediction``, SD 2.x 768-px checkpoints) comes
from the scheduler config and travels with the family in ``ModelInfo``: the sampling
loops pixelmill writes itself use the scheduler's own ``step`` so they follow it.

Each registered edit method, training method and the pairs renderer declares the
families it supports (``families=`` in its registration); ``require_family`` turns an
unsupported combination into one error naming both (the CLI exits 2 before any work).

Reading the configs needs no torch: preflight runs it on the driver. Hub ids are read
through ``huggingface_hub`` (the cache first; offline settings apply), so a hub id
that does not resolve fails here, before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FAMILIES: dict[str, str] = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
}
ALL_FAMILIES: tuple[str, ...] = tuple(FAMILIES)
SD_FAMILIES: tuple[str, ...] = ("sd1", "sd2")


class UnsupportedFamily(ValueError):
    """A checkpoint whose family a method does not support, or whose family cannot be told."""


@dataclass(frozen=True)
class ModelInfo:
    """What pixelmill knows about a checkpoint before loading its weights.

    Attributes:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        prediction_type: the scheduler's (``epsilon``, ``v_prediction`` or ``sample``).
        pipeline_class: ``_class_name`` of ``model_index.json`` (may be empty).
        unet_in_channels: 4, or 8 for InstructPix2Pix, 9 for inpainting.
        has_safety_checker: whether the checkpoint ships a safety checker.
        vae_force_upcast: the VAE must run in fp32 even when the rest is fp16.
    """

    family: str
    prediction_type: str
    pipeline_class: str
    unet_in_channels: int | None
    has_safety_checker: bool
    vae_force_upcast: bool

    @property
    def label(self) -> str:
        return FAMILIES[self.family]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_component(index: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists the component ``name`` (``[library, class]``, not ``[null, null]``)."""
    value = index.get(name)
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None


def family_from_configs(
    index: dict[str, Any],
    unet: dict[str, Any] | None,
    scheduler: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    name: str = "model",
) -> ModelInfo:
    """Decide a checkpoint's family from its configs (see the module's table).

    Args:
        index: ``model_index.json`` content.
        unet: the UNet's ``config.json`` (None when the checkpoint has no UNet).
        scheduler: the scheduler's config (prediction type; epsilon when missing).
        vae: the VAE's config (``force_upcast``).
        name: the model's name, for errors.

    Raises:
        UnsupportedFamily: no UNet, or a layout none of the families has (naming what was found).
    """
    class_name = str(index.get("_class_name", ""))
    if unet is None:
        raise UnsupportedFamily(
            f"{name}: pixelmill supports UNet-based Stable Diffusion checkpoints ({', '.join(ALL_FAMILIES)}); "
            f"this one ({class_name or 'unknown pipeline'}) has no UNet"
        )

    def has(component: str) -> bool:
        return has_component(index, component)

    added = unet.get("addition_embed_type")
    if has("text_encoder_2") and added == "text_time":
        if not has("text_encoder"):
            raise UnsupportedFamily(f"{name}: an SDXL refiner ({class_name}) is not supported; use an SDXL base "
                                    "checkpoint (two text encoders)")
        family = "sdxl"
    elif added is not None or unet.get("encoder_hid_dim_type") is not None or has("text_encoder_2"):
        raise UnsupportedFamily(
            f"{name}: {class_name or 'this pipeline'} is not a family pixelmill supports "
            f"({', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}); its UNet has "
            f"addition_embed_type={added!r}, encoder_hid_dim_type={unet.get('encoder_hid_dim_type')!r}"
        )
    elif not isinstance(unet.get("cross_attention_dim"), int) or not has("text_encoder"):
        raise UnsupportedFamily(f"{name}: {class_name or 'this pipeline'} has no single text cross-attention "
                                "(not a Stable Diffusion checkpoint)")
    else:
        family = "sd2" if unet.get("use_linear_projection") else "sd1"
    return ModelInfo(
        family=family,
        prediction_type=str((scheduler or {}).get("prediction_type") or "epsilon"),
        pipeline_class=class_name,
        unet_in_channels=unet.get("in_channels"),
        has_safety_checker=has("safety_checker"),
        # SDXL's VAE overflows in fp16 (diffusers marks it force_upcast; an fp16-fixed one says False).
        vae_force_upcast=family == "sdxl" and bool((vae or {}).get("force_upcast", True)),
    )


def _read_json(read: Any, relpath: str) -> dict[str, Any] | None:
    from pixelmill.models.loading import ModelNotFound

    try:
        text = read(relpath)
    except ModelNotFound:  # a FileNotFoundError too, but the model's, not an optional file's
        raise
    except FileNotFoundError:
        return None
    return json.loads(text) if text is not None else None


def describe_model(model: str, revision: str | None = None) -> ModelInfo:
    """The ``ModelInfo`` of a model name (local folder, ``toy:``, storage URL, hub id, single file).

    Reads configs only (no torch, no weights). A hub id is looked up through the hub
    cache first and downloaded (configs only) when online; offline and not cached, or
    unknown, it fails with ``ModelNotFound`` naming it.

    Raises:
        ModelNotFound: nothing loadable under that name.
        UnsupportedFamily: see ``family_from_configs``.
    """
    from pixelmill.models import loading

    if loading.is_single_file(model):
        from pixelmill.models.single_file import describe_single_file

        return describe_single_file(model)
    if loading._is_remote(model):
        from pixelmill.datasets import storage

        def read(rel: str) -> str:
            return storage.read_text(storage.join(model, rel))
    else:
        resolved = loading.resolve_model_name(model)
        if loading.looks_local(resolved):
            folder = loading._pipeline_folder(resolved)

            def read(rel: str) -> str:
                path = Path(folder) / rel
                if not path.is_file():
                    raise FileNotFoundError(path)
                return path.read_text()
        else:
            read = _hub_reader(resolved.removeprefix(loading.HF_HUB_PREFIX), revision)
    index = _read_json(read, loading.MODEL_INDEX)
    if index is None:
        raise loading.ModelNotFound(f"{model} is not a diffusers pipeline folder: it has no {loading.MODEL_INDEX}")
    sched = _read_json(read, "scheduler/scheduler_config.json")
    return family_from_configs(index, _read_json(read, "unet/config.json"), sched,
                               _read_json(read, "vae/config.json"), name=model)


def _hub_reader(repo_id: str, revision: str | None):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pixelmill.models.loading import ModelNotFound, _offline_hint

    def read(rel: str) -> str:
        try:
            path = hf_hub_download(repo_id, rel, revision=revision)
        except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
            if rel != "model_index.json":  # the pipeline is there (its index was read); this part is not
                raise FileNotFoundError(rel) from None
            if not isinstance(exc, LocalEntryNotFoundError):
                raise ModelNotFound(f"hub model {repo_id!r} has no model_index.json: "
                                    "not a diffusers pipeline") from None
            raise ModelNotFound(f"hub model {repo_id!r}{'@' + revision if revision else ''} is not in the "
                                f"local hub cache and could not be downloaded{_offline_hint()}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - unknown repo, no access, no network: all name the id
            if rel != "model_index.json" and "404" in str(exc):
                raise FileNotFoundError(rel) from None
            raise ModelNotFound(f"could not resolve hub model {repo_id!r}{'@' + revision if revision else ''}: "
                                f"{type(exc).__name__}: {exc}{_offline_hint()}") from None
        return Path(path).read_text()

    return read


def family_of_pipeline(pipe: Any) -> ModelInfo:
    """The ``ModelInfo`` of a loaded diffusers pipeline (from its components' configs)."""
    index = {"_class_name": type(pipe).__name__}
    for name in ("text_encoder", "text_encoder_2", "safety_checker"):
        component = getattr(pipe, name, None)
        index[name] = [None, None] if component is None else ["loaded", type(component).__name__]
    def config(name: str) -> dict[str, Any] | None:
        value = getattr(getattr(pipe, name, None), "config", None)
        return dict(value) if value is not None else None

    return family_from_configs(index, config("unet"), config("scheduler"), config("vae"), name=type(pipe).__name__)


def require_family(info: ModelInfo, families: tuple[str, ...] | list[str], what: str, model: str = "") -> None:
    """Raise ``UnsupportedFamily`` unless ``info.family`` is one of ``families``.

    Args:
        info: the checkpoint's ``ModelInfo``.
        families: what the method declared.
        what: the method or stage asking (``"edit method 'sdedit' with strength: auto"``).
        model: the model's name, for the message.
    """
    if info.family not in families:
        supported = ", ".join(f"{f} ({FAMILIES[f]})" for f in families)
        raise UnsupportedFamily(
            f"{what} does not support {info.family} ({info.label}) checkpoints"
            f"{' such as ' + repr(model) if model else ''}; it supports {supported}"
        )
