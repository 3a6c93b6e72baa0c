"""Hub ids on a Ray cluster: one download per node, before a stage's actors start.

A stage whose model is a hub id (``org/name``, ``hf-hub:org/name``) would otherwise have
every actor download the weights (or race for the same cache files). ``prefetch_on_nodes``
runs one task per alive Ray node (``NodeAffinitySchedulingStrategy``, not soft) that calls
``huggingface_hub.snapshot_download`` for the files a pipeline loads (safetensors weights,
configs, tokenizer files: never pickled weights) into that node's hub cache. When
``HF_HOME`` / ``HF_HUB_CACHE`` is on storage the nodes share, the first task downloads and
the others find the files there. The commit the revision resolved to is then handed to the
actors (``revision`` in the stage config): a commit is immutable, so an actor loads the
snapshot folder from its node's cache without asking the hub again (no token, no network).

``HF_TOKEN`` is a credential: it never goes into Ray's runtime environment (Ray logs and
shows those), configs, manifests or reports. The driver's token reaches the download tasks
as an argument; actors need none, as they load from the cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# What a diffusers pipeline loads: safetensors weights, every config (model_index.json,
# config.json, scheduler_config.json, tokenizer_config.json, tokenizer.json, ...), and the
# tokenizers' text and sentencepiece files. Pickled weights (.bin, .ckpt, .pt) are never fetched.
ALLOW_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.json", "*.txt", "*.model")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_repo(model: str | None) -> str | None:
    """The hub repo id a model name refers to (``hf-hub:`` prefix removed), or None for anything else
    (a local folder or file, a ``toy:`` name, an object-storage URL)."""
    from pixelmill.models import loading

    if not model or loading._is_remote(model) or loading.is_single_file(model):
        return None
    resolved = loading.resolve_model_name(model)
    if loading.looks_local(resolved):
        return None
    repo = resolved.removeprefix(loading.HF_HUB_PREFIX)
    return repo if loading._HUB_ID.match(repo) and "/" in repo else None


def is_commit(revision: str | None) -> bool:
    return bool(revision) and bool(_COMMIT.match(revision))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` at ``revision`` in this machine's hub cache, or None.

    No network: a branch or tag resolves through the cache's ``refs/``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                   local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return Path(folder)


def download_snapshot(repo_id: str, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Download (or find in the cache) the files a pipeline loads; runs on one node.

    Returns ``{"node": node id or None, "commit": the snapshot's commit, "path": its folder}``.
    """
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                               token=token or None)
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: no node id
        pass
    return {"node": node, "commit": Path(folder).name, "path": folder}


def _download_task(repo_id: str, revision: str | None, token: str | None) -> dict[str, Any]:
    return download_snapshot(repo_id, revision, token)


def prefetch_on_nodes(repo_id: str, revision: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Fill every alive Ray node's hub cache with ``repo_id``'s pipeline files, one task per node.

    Call on the driver, Ray connected, before a stage's actors start.

    Returns:
        ``{"commit": the commit every node has, "nodes": {node id: snapshot folder}}``.

    Raises:
        ModelNotFound: a node could not download or find the model (naming the id and the node).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pixelmill.models.loading import ModelNotFound, _offline_hint

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    remote = ray.remote(num_cpus=0, max_retries=1)(_download_task)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {node: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                                 name=f"hub-download:{repo_id}").remote(repo_id, revision, token)
            for node in nodes}
    done: dict[str, Any] = {}
    commits = set()
    for node, ref in refs.items():
        try:
            got = ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise ModelNotFound(f"hub model {repo_id!r}{'@' + revision if revision else ''} could not be fetched "
                                f"on node {node}: {type(cause).__name__}: {str(cause)[:500]}{_offline_hint()}"
                                ) from None
        done[node] = got["path"]
        commits.add(got["commit"])
    if len(commits) > 1:  # a branch moved while the nodes fetched: pin the newest fetch everywhere
        raise ModelNotFound(f"hub model {repo_id!r}: the nodes resolved {revision or 'main'} to different commits "
                            f"({', '.join(sorted(commits))}); set `revision` to a commit")
    return {"commit": next(iter(commits)) if commits else None, "nodes": done}


def prefetch_stage_model(config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Prefetch a stage config's hub ``model`` on every node; return the config pinned to the commit, and a note.

    A config whose model is no hub id comes back unchanged (with no note).
    """
    repo = hub_repo(config.get("model"))
    if repo is None:
        return config, None
    revision = config.get("revision")
    got = prefetch_on_nodes(repo, revision)
    note = (f"hub model {repo}@{got['commit']}: in the hub cache of {len(got['nodes'])} node(s), "
            "loaded from there by every worker")
    return {**config, "revision": got["commit"]}, note


def check_hub_model(model: str, revision: str | None = None) -> None:
    """Fail unless a hub id resolves (its configs are in the local hub cache, or on the hub when online).

    Raises:
        ModelNotFound: naming the id (and that the hub is offline, when it is).
    """
    from pixelmill.models.family import UnsupportedFamily, describe_model

    try:
        describe_model(model, revision)
    except UnsupportedFamily:
        pass  # it resolves; whether a method supports its family is the method's check
