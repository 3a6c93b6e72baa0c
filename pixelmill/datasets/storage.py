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
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
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


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (both on the same filesystem), replacing ``dst``.

    On local disks this is an atomic ``rename``; object stores copy then delete.
    """
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
    fs.mv(src_path, dst_path)


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


def put_dir(local_dir: str, url: str) -> None:
    """Copy a local folder tree to ``url`` (replacing what is there)."""
    import os

    fs, path = resolve(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    for root, _dirs, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = path if rel == "." else posixpath.join(path, *rel.split(os.sep))
        fs.makedirs(target, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                fs.pipe_file(posixpath.join(target, name), f.read())


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
