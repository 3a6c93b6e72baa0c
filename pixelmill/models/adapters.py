"""Campaign adapters applied to a pipeline on the worker, with diffusers' own loaders.

A bulk-edit or pairs config names adapters by folder: a fine-tuning job's
``artifacts/`` folder (or the job folder itself). The kind is read from the files:
``learned_embeds.safetensors`` (Textual Inversion), ``pytorch_lora_weights.safetensors``
(LoRA, with a ``scale``; an SDXL one holds ``clip_l`` and ``clip_g``, one embedding per text
encoder, and its token is in ``tokens.json``), ``pytorch_custom_diffusion_weights.safetensors`` plus one
``<token>.safetensors`` per modifier token (Custom Diffusion). Several Textual
Inversion and LoRA adapters compose ("a photo of <A> in the style of <B>"); Custom
Diffusion replaces the cross-attention processors, so one such adapter per pipeline
(train several concepts jointly instead).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TI_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
CD_FILE = "pytorch_custom_diffusion_weights.safetensors"
KINDS = ("textual_inversion", "lora", "custom_diffusion")


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message names it."""


def adapter_folder(path: str) -> Path:
    """The folder holding the adapter files (a job folder's ``artifacts/`` is found too).

    An adapter on object storage (``s3://…``, any remote fsspec URL) is downloaded to the
    local cache first (once per content, ``storage.local_copy``): diffusers' loaders read
    local files only.
    """
    from pixelmill.datasets import storage

    if storage.is_remote(path):
        try:
            path = storage.local_copy(path)
        except FileNotFoundError:
            raise AdapterError(f"adapter {path}: not found") from None
    p = Path(path).expanduser()
    if (p / "artifacts").is_dir() and not any((p / f).exists() for f in (TI_FILE, LORA_FILE, CD_FILE)):
        p = p / "artifacts"
    if not p.is_dir():
        raise AdapterError(f"adapter {path}: not a folder")
    return p


def adapter_kind(path: str, kind: str = "auto") -> str:
    """The adapter's kind from its files (or check the declared one)."""
    p = adapter_folder(path)
    found = [k for k, f in (("custom_diffusion", CD_FILE), ("lora", LORA_FILE), ("textual_inversion", TI_FILE))
             if (p / f).exists()]
    if kind != "auto":
        if kind not in found:
            raise AdapterError(f"adapter {path}: declared {kind} but the folder has no "
                               f"{dict(zip(KINDS, (TI_FILE, LORA_FILE, CD_FILE)))[kind]}")
        return kind
    if not found:
        raise AdapterError(f"adapter {path}: no {TI_FILE}, {LORA_FILE} or {CD_FILE} in {p}")
    return found[0]


def adapter_fingerprint(path: str) -> str:
    """A hash of the adapter's files, so an output made with other weights is not reused."""
    p = adapter_folder(path)
    h = hashlib.sha256()
    for f in sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def apply_adapters(pipe: Any, adapters: list[dict[str, Any]]) -> list[str]:
    """Load every adapter into ``pipe``; returns a description per adapter (for the output rows).

    Raises:
        AdapterError: unknown files, two Custom Diffusion adapters, or weights diffusers
            did not actually apply (its ``load_attn_procs`` can silently do nothing).
    """
    loras: list[tuple[str, float]] = []
    described = []
    cd_seen = False
    for i, a in enumerate(adapters):
        path, kind = str(adapter_folder(a["path"])), adapter_kind(a["path"], a.get("kind", "auto"))
        if kind == "textual_inversion":
            _load_textual_inversion(pipe, Path(path))
        elif kind == "lora":
            name = f"adapter{i}"
            pipe.load_lora_weights(path, weight_name=LORA_FILE, adapter_name=name)
            loras.append((name, float(a.get("scale", 1.0))))
        else:
            if cd_seen:
                raise AdapterError("only one custom_diffusion adapter per pipeline: train the concepts jointly "
                                   "in one job instead")
            cd_seen = True
            _load_custom_diffusion(pipe, Path(path))
        described.append(f"{kind}:{Path(a['path']).name}" + (f"@{a.get('scale', 1.0)}" if kind == "lora" else ""))
    if loras:
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
    return described


def _load_textual_inversion(pipe: Any, folder: Path) -> None:
    """One embedding file; an SDXL one (``clip_l``/``clip_g``) as diffusers documents: once per text encoder."""
    from safetensors import safe_open

    with safe_open(str(folder / TI_FILE), "pt") as f:
        keys = set(f.keys())
    if keys != {"clip_l", "clip_g"}:
        pipe.load_textual_inversion(str(folder), weight_name=TI_FILE)
        return
    from safetensors.torch import load_file

    if getattr(pipe, "text_encoder_2", None) is None:
        raise AdapterError(f"adapter {folder}: an SDXL Textual Inversion (clip_l, clip_g) needs an SDXL pipeline")
    tokens_file = folder / "tokens.json"
    if not tokens_file.exists():
        raise AdapterError(f"adapter {folder}: an SDXL Textual Inversion needs tokens.json naming its token")
    (token,) = json.loads(tokens_file.read_text())
    state = load_file(str(folder / TI_FILE))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def _load_custom_diffusion(pipe: Any, folder: Path) -> None:
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    pipe.unet.load_attn_procs(str(folder), weight_name=CD_FILE, _pipeline=pipe)
    if not any(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values()):
        raise AdapterError(f"adapter {folder}: diffusers did not apply the Custom Diffusion weights")
    tokens_file = folder / "tokens.json"
    tokens = json.loads(tokens_file.read_text()) if tokens_file.exists() else [
        f.stem for f in sorted(folder.glob("*.safetensors")) if f.name != CD_FILE]
    for token in tokens:
        pipe.load_textual_inversion(str(folder), weight_name=f"{token}.safetensors")
