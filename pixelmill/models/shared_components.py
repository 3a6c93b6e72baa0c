"""Toy models that ship only the components they changed, and borrow the rest from another toy model.

A toy model folder (``pixelmill/toy/models/NAME``) may hold a ``shared_components.json``,
``{"components": {"text_encoder": "sd", "tokenizer": "sd", "vae": "sd"}}``: those
components are the named toy model's, byte for byte (the toy InstructPix2Pix trains only
its UNet; its frozen text encoder, tokenizer and VAE are the toy SD's). The package then
carries them once. ``assembled_folder`` gives the complete diffusers folder every loader
expects: a folder in the temp directory whose files are symbolic links to the package's
files (copies where links cannot be made), built once per process set and reused;
``resolve_model_name`` returns it for ``toy:NAME``, so a ``model: toy:ip2p`` loads with the
normal loaders and fingerprints as the files it links.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

SHARED_COMPONENTS = "shared_components.json"


def shared_components(path: Path) -> dict[str, str] | None:
    """``{component: toy model name}`` of a toy folder with ``shared_components.json``, else None."""
    spec = path / SHARED_COMPONENTS
    if not spec.is_file():
        return None
    components = json.loads(spec.read_text())["components"]
    for name, other in components.items():
        if "/" in name or "/" in other or name.startswith(".") or other.startswith("."):
            raise ValueError(f"{spec}: bad entry {name!r}: {other!r}")
    return dict(components)


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a link to the file ``src``, or a folder of links to a folder's files (copies where links fail).

    Folders are real folders, one link per file, so ``rglob`` walks them (fingerprints, pickle checks)."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for item in sorted(src.iterdir()):
            _link(item, dst / item.name)
        return
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def assembled_folder(path: Path, models_dir: Path) -> Path:
    """The complete pipeline folder of the toy model at ``path`` (see the module docstring)."""
    components = shared_components(path)
    if components is None:
        return path
    own = sorted(p for p in path.iterdir() if p.name != SHARED_COMPONENTS and p.name not in components)
    sources = {name: models_dir / other / name for name, other in components.items()}
    for name, src in sources.items():
        if not src.is_dir():
            raise FileNotFoundError(f"{path / SHARED_COMPONENTS}: {name} comes from {src}, which is missing")
    key = hashlib.sha256(json.dumps([str(path.resolve()), [p.name for p in own],
                                     {k: str(v.resolve()) for k, v in sources.items()}]).encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    parent = Path(tempfile.gettempdir()) / f"pixelmill-toy-models-{uid}"
    parent.mkdir(mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and (parent.stat().st_uid != uid or parent.is_symlink()):
        # a shared temp folder: never load a model folder another user could have placed there
        raise PermissionError(f"{parent} is not this user's folder; set TMPDIR to a private folder")
    root = parent / f"{path.name}-{key}"
    if (root / "model_index.json").exists():
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for p in own:
        _link(p, tmp / p.name)
    for name, src in sources.items():
        _link(src, tmp / name)
    try:
        tmp.rename(root)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
