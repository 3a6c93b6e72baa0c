"""A local Hugging Face hub cache, in the real layout, holding a tiny pipeline (no network).

``models--{org}--{name}/refs/main`` holds the commit; ``snapshots/{commit}/`` the files
(``blobs/`` is optional: huggingface_hub resolves a snapshot's files as they are). With
``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``, ``hf_hub_download(...,
local_files_only)``, ``snapshot_download`` and diffusers' ``from_pretrained`` resolve the id.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_to_hub_cache(cache: str | Path, repo_id: str, folder: str | Path, ref: str = "main") -> str:
    """Copy a model folder into ``cache`` as ``repo_id`` at ``ref``; return its (made-up, stable) commit."""
    src = Path(folder)
    digest = hashlib.sha1()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(src)).encode())
            digest.update(p.read_bytes())
    commit = digest.hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit, dirs_exist_ok=True)
    return commit
