"""Model fingerprints: a short provenance string that changes when weights or configs change.

Local folders are hashed by content (cached by path, size and mtime); hub ids by the
commit the local hub cache knows; remote folders (``s3://…``) by their listing (names,
sizes, ETags), so the driver never downloads a model to plan a run.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from pixelmill.models.loading import (
    _HUB_ID,
    HF_HUB_PREFIX,
    ModelNotFound,
    _is_remote,
    _local_path,
    looks_local,
    resolve_model_name,
)

_FINGERPRINT_SUFFIXES = {".safetensors", ".json", ".txt", ".model"}
_file_hash_cache: dict[tuple[str, int, int], str] = {}
_file_hash_lock = threading.Lock()


def _hash_file(path: Path, stat: os.stat_result) -> str:
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _file_hash_lock:
        cached = _file_hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _file_hash_lock:
        _file_hash_cache[key] = value
    return value


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a revision points at in the local hub cache, without network access."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = (
            Path(constants.HF_HUB_CACHE)
            / repo_folder_name(repo_id=repo_id, repo_type="model")
            / "refs"
            / (revision or "main")
        )
        return ref.read_text().strip() if ref.is_file() else None
    except (ImportError, OSError):
        return None


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """A short provenance string that changes when the model's weights or configs change.

    For a local folder (or file): the first 16 hex digits of a sha256 over the relative
    names, sizes and content hashes of its ``.safetensors``/``.json``/``.txt``/``.model``
    files. Content hashes are cached by path, size and mtime, so repeated calls only
    re-read files that changed. For a hub id: ``"<id>@<commit>"`` when the local hub
    cache knows the commit, else ``"<id>@<revision or main>"``.

    Args:
        model: A local path or a hub id (``hf-hub:`` prefix allowed).
        revision: Hub branch, tag or commit; ignored for local paths.

    Raises:
        ModelNotFound: A local-looking path that does not exist.
    """
    if _is_remote(model):  # names, sizes and ETags of the remote files: no download
        from pixelmill.datasets import storage

        try:
            return "remote:" + storage.listing_signature(model)[:16]
        except FileNotFoundError:
            raise ModelNotFound(f"model not found: {model}") from None
    model = resolve_model_name(model)
    if not looks_local(model):
        repo_id = model.removeprefix(HF_HUB_PREFIX)
        commit = _hub_commit(repo_id, revision) if _HUB_ID.match(repo_id) else None
        return f"{model}@{commit or revision or 'main'}"
    path = _local_path(model)
    if not path.exists():
        raise ModelNotFound(f"model path not found: {path} (from model name {model!r})")
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        root = path
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in _FINGERPRINT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        rel = file.relative_to(root).as_posix()
        digest.update(f"{rel}\0{stat.st_size}\0{_hash_file(file, stat)}\n".encode())
    return digest.hexdigest()[:16]
