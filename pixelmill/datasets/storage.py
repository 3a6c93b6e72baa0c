"""Small fsspec helpers shared by the dataset reader, writer and importer.

Every function takes a URL (a local path, ``memory://…``, ``s3://…``, …) so the rest of
the package never branches on where data lives.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec import AbstractFileSystem


class StorageUnavailable(ValueError):
    """A storage URL whose filesystem package is missing (``s3://`` without s3fs, ...)."""


def resolve(url: str) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem and the filesystem-native path for a URL.

    Args:
        url: a local path or any fsspec URL.

    Raises:
        StorageUnavailable: the URL's protocol needs a package that is not installed.
    """
    # Remote listings are never cached: Ray workers live across runs, and a listing cached
    # in one would hide checkpoints, shards and records other processes wrote since.
    options = {"use_listings_cache": False} if is_remote(url) else {}
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **options)
    except ImportError as exc:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(str(url).split("://")[0], None)
        hint = f" (pip install 'pixelmill[{extra}]')" if extra else ""
        raise StorageUnavailable(f"cannot open {url}: {exc}{hint}") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        protocol = str(url).split("://")[0]
        raise StorageUnavailable(f"cannot open {url}: no filesystem is installed for {protocol}://") from None
    return fs, path


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-native path back into a URL (a plain path for local files).

    Args:
        fs: the filesystem ``path`` belongs to.
        path: a path as returned by :func:`resolve` or ``fs.find``.
    """
    if "file" in _protocols(fs):
        return path
    return fs.unstrip_protocol(path)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``, keeping the URL's protocol.

    Args:
        url: the base URL or local path.
        *parts: path components; leading and trailing slashes are ignored.
    """
    base = str(url)
    if not base.endswith("://"):
        base = base.rstrip("/") or "/"
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return base
    if base.endswith("/"):
        return base + tail
    return f"{base}/{tail}"


def exists(url: str) -> bool:
    """Whether a file or folder exists at ``url``."""
    fs, path = resolve(url)
    return bool(fs.exists(path))


def isdir(url: str) -> bool:
    """Whether ``url`` is an existing folder."""
    fs, path = resolve(url)
    return bool(fs.isdir(path))


def listdir(url: str) -> list[str]:
    """Sorted base names of the entries directly inside a folder; empty if it is missing.

    Args:
        url: the folder.
    """
    fs, path = resolve(url)
    if not fs.isdir(path):
        return []
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    return sorted(n for n in names if n)


def makedirs(url: str) -> None:
    """Create a folder and its parents if they do not exist."""
    fs, path = resolve(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Delete a file or a folder tree; a missing path is not an error."""
    fs, path = resolve(url)
    if fs.exists(path):
        fs.rm(path, recursive=fs.isdir(path))


def move(src: str, dst: str, last: tuple[str, ...] = ()) -> None:
    """Rename ``src`` to ``dst`` (both on the same filesystem), replacing ``dst``.

    On local disks this is an atomic ``rename``. Object stores copy then delete; a folder
    is copied file by file (fsspec's plain ``mv`` moves nothing of a folder on S3, its
    recursive one fails on the folder's own key), the files named in ``last`` after the
    others, so a marker such as a checkpoint's ``state.json`` never precedes its data.

    Args:
        src: the file or folder to move.
        dst: its new URL.
        last: base names of files (in a moved folder) to copy after all the others.
    """
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
    if "file" in _protocols(fs) or not fs.isdir(src_path):
        fs.mv(src_path, dst_path)
        return
    files = sorted(fs.find(src_path), key=lambda f: posixpath.basename(f) in last)
    for file in files:
        fs.copy(file, posixpath.join(dst_path, posixpath.relpath(file, src_path)))
    fs.rm(src_path, recursive=True)


def read_text(url: str) -> str:
    """Read a UTF-8 text file."""
    fs, path = resolve(url)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8")


def read_bytes(url: str) -> bytes:
    """Read a whole file as bytes."""
    fs, path = resolve(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_text_atomic(url: str, text: str) -> None:
    """Write a text file so that readers see either the old or the new content.

    The text goes to a hidden temporary name in the same folder and is then renamed over
    the target; in-memory filesystems are written directly, as their writes are already
    all-or-nothing.

    Args:
        url: the target file.
        text: its new content (UTF-8).
    """
    fs, path = resolve(url)
    data = text.encode("utf-8")
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if "memory" in _protocols(fs):
        fs.pipe_file(path, data)
        return
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file (parents created); use a temporary folder + :func:`move` for atomicity."""
    fs, path = resolve(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def sync_dir(local_dir: str, url: str, last: str = "job.json") -> None:
    """Make the folder at ``url`` match a local folder tree: upload every file, then remove
    remote files the local tree no longer has. ``last`` (a record naming the other files)
    is uploaded after all the others, so a reader never sees it ahead of them.

    Args:
        local_dir: the local folder (a missing one uploads nothing).
        url: the target folder.
        last: a top-level file name to upload last.
    """
    import os

    if not os.path.isdir(local_dir):
        return
    fs, path = resolve(url)
    wanted: list[str] = []
    for root, _dirs, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        wanted += [name if rel == "." else "/".join([*rel.split(os.sep), name]) for name in files]
    wanted.sort(key=lambda r: r == last)
    for rel in wanted:
        target = posixpath.join(path, rel)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)  # local disks need the folders
        with open(os.path.join(local_dir, *rel.split("/")), "rb") as f:
            fs.pipe_file(target, f.read())
    keep = {posixpath.join(path, rel) for rel in wanted}
    stale = [p for p in (fs.find(path) if fs.exists(path) else []) if p not in keep]
    if stale:
        fs.rm(stale)


def get_dir(url: str, local_dir: str) -> str:
    """Copy a folder tree at ``url`` to a local folder; returns ``local_dir``."""
    import os

    fs, path = resolve(url)
    for src in fs.find(path):
        rel = posixpath.relpath(src, path)
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with fs.open(src, "rb") as f, open(dst, "wb") as out:
            out.write(f.read())
    return local_dir


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url``, or None when it is not on the local disk."""
    fs, path = resolve(url)
    return path if "file" in _protocols(fs) else None


def is_remote(url: str) -> bool:
    """Whether ``url`` names object storage or another non-local filesystem (``s3://``, ``gs://``, ...).

    Plain paths and ``file://`` URLs are local; ``memory://`` is not (it lives in one process).
    """
    text = str(url)
    return "://" in text and not text.startswith("file://")


def cache_dir() -> str:
    """Where local copies of remote models and adapters go: ``$PIXELMILL_CACHE``, else
    ``$XDG_CACHE_HOME/pixelmill`` (``~/.cache/pixelmill``)."""
    import os

    if os.environ.get("PIXELMILL_CACHE"):
        return os.environ["PIXELMILL_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pixelmill")


def listing_signature(url: str) -> str:
    """A short hash of a remote file's or folder tree's names, sizes and ETags (or mtimes).

    It changes when any file is added, removed or rewritten, without reading contents:
    the key of :func:`local_copy`'s cache and a remote model's fingerprint.

    Raises:
        FileNotFoundError: nothing at ``url``.
    """
    import hashlib
    import json

    fs, path = resolve(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} does not exist")
    if fs.isdir(path):
        infos = fs.find(path, detail=True)
        base = path
    else:
        infos = {path: fs.info(path)}
        base = posixpath.dirname(path)
    items = sorted(
        (posixpath.relpath(p, base), info.get("size"),
         info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified"))
        for p, info in infos.items()
    )
    return hashlib.sha256(json.dumps([str(url), items], default=str).encode()).hexdigest()[:20]


def local_copy(url: str) -> str:
    """A local path holding the file or folder tree at ``url``.

    A local path comes back unchanged. A remote one is downloaded once into
    :func:`cache_dir` under a key that changes with its listing (see
    :func:`listing_signature`), so a rewritten adapter or model is fetched again and an
    unchanged one never is. For libraries that only read local files (diffusers'
    ``from_pretrained`` and ``load_lora_weights``, open_clip, PyAV).

    Raises:
        FileNotFoundError: nothing at ``url``.
    """
    import os
    import shutil

    local = local_path(url)
    if local is not None:
        return local
    fs, path = resolve(url)
    name = posixpath.basename(path.rstrip("/")) or "root"
    target = os.path.join(cache_dir(), "remote", listing_signature(url), name)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        if fs.isdir(path):
            get_dir(url, tmp)
        else:
            with fs.open(path, "rb") as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        try:
            os.replace(tmp, target)
        except OSError:
            if not os.path.exists(target):  # not another process's finished copy: a real error
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    return target
