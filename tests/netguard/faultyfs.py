"""Test-only ``faulty://`` filesystem: the local disk, with storage faults on demand.

Registered with fsspec through the entry point next to this file (the folder is on the
``PYTHONPATH`` of every process the tests start, Ray workers included), so the CLI and its
workers open ``faulty:///tmp/.../out`` like any other URL; pixelmill treats it as remote
storage (it is not ``file``), which the tests want too.

Faults are set by a ``.faults.json`` file in any folder above the written path (the
nearest one wins), so every process sees the same faults without any environment::

    {"after": 3, "fault": "enospc"}   # the 4th and later writes fail: a full disk
    {"after": 0, "fault": "erofs"}    # every write fails: a read-only output
    {"after": 2, "fault": "partial"}  # the 3rd write stops half-way, then raises
    {"after": 2, "fault": "eio"}      # the 3rd write fails with an I/O error, later ones work

``after`` counts file writes (opens for writing) across all processes; the count is kept
in ``.faults.count`` beside the fault file, under a lock. Delete the fault file to end
the fault. Renames and deletes never fail (object stores have no partial rename either).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

FAULT_FILE = ".faults.json"
COUNT_FILE = ".faults.count"
ERRNOS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO, "partial": errno.EIO}


def _fault_file(path: str) -> str | None:
    folder = os.path.dirname(path)
    while True:
        candidate = os.path.join(folder, FAULT_FILE)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _spend(path: str) -> str | None:
    """Count one write of ``path``; returns the fault to inject, if any."""
    spec_file = _fault_file(path)
    if spec_file is None or os.path.basename(path) in (FAULT_FILE, COUNT_FILE):
        return None
    with open(spec_file) as f:
        spec = json.load(f)
    count_file = os.path.join(os.path.dirname(spec_file), COUNT_FILE)
    with open(count_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        done = int(f.read() or 0)
        f.seek(0)
        f.truncate()
        f.write(str(done + 1))
    fault = spec["fault"]
    if done < spec["after"]:
        return None
    if fault in ("eio", "partial") and done > spec["after"]:
        return None  # a one-off fault: later writes work
    return fault


def _raise(fault: str, path: str):
    code = ERRNOS[fault]
    raise OSError(code, os.strerror(code), path)


class _HalfWrittenFile(LocalFileOpener):
    """Keeps the first half of what is written, then fails on close."""

    def close(self):
        if self.closed:
            return
        pos = self.f.tell()
        super().close()
        with open(self.path, "r+b") as f:
            f.truncate(pos // 2)
        _raise("partial", self.path)

    def __exit__(self, exc_type, exc_value, traceback):
        self._incontext = False
        self.close()


class FaultyFileSystem(LocalFileSystem):
    protocol = "faulty"
    root_marker = "/"

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        if any(m in mode for m in "wax"):
            fault = _spend(path)
            if fault == "partial":
                if self.auto_mkdir:
                    self.makedirs(self._parent(path), exist_ok=True)
                return _HalfWrittenFile(path, mode, fs=self, **kwargs)
            if fault:
                _raise(fault, path)
        return super()._open(path, mode, block_size=block_size, **kwargs)

    def cp_file(self, path1, path2, **kwargs):
        fault = _spend(self._strip_protocol(path2))
        if fault:
            _raise("eio" if fault == "partial" else fault, self._strip_protocol(path2))
        return super().cp_file(path1, path2, **kwargs)
