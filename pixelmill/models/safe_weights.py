"""Only safetensors load: pickled checkpoints are refused, before anything starts, saying why.

A ``.bin``/``.ckpt``/``.pt``/``.pth``/``.pkl`` checkpoint is a Python pickle: loading one
runs whatever code its author put in it. pixelmill reads weights from ``.safetensors``
files only (diffusers and transformers with ``use_safetensors=True``, open_clip with
``weights_only=True`` for hub files, never ``trust_remote_code``), and the preflight
checks here say so by name instead of letting a worker fail later with a library's
"no file found" message.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})

WHY = ("pixelmill loads only .safetensors weights: a pickled checkpoint can run arbitrary code when loaded. "
       "Convert it to safetensors (e.g. diffusers' `save_pretrained(..., safe_serialization=True)`)")


def pickled_only(folder: Path) -> list[Path]:
    """The pickled weight files of ``folder`` (not recursive) when it has no safetensors file, else []."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return []
    return sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)


def refuse_pickles(path: Path, components: list[str] | None = None) -> str | None:
    """Why ``path`` (a weight file, or a model folder and its component subfolders) cannot load, or None.

    Args:
        path: a file or folder as the user named it.
        components: subfolders to check too (default: every subfolder, as a diffusers
            pipeline's ``unet``, ``vae``, …).
    """
    if path.is_file():
        return f"{path} is a pickled checkpoint; {WHY}" if path.suffix in PICKLE_SUFFIXES else None
    if components is None:
        components = [p.name for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    for folder in [path] + [path / c for c in components]:
        found = pickled_only(folder)
        if found:
            names = ", ".join(str(p.relative_to(path)) for p in found[:3])
            return f"{path}: weights only as pickled checkpoint(s) ({names}); {WHY}"
    return None
