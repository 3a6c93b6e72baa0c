"""LAION-layout ``.npy`` embedding files: header parsing and row-range reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pixelmill.datasets import storage
from pixelmill.datasets.pool.base import PoolError


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int


def _read_npy_header(url: str, ndim: int = 2) -> _NpyHeader:
    """Shape, dtype and data offset of a float ``.npy`` file of ``ndim`` dimensions (2: embeddings, 1: norms)."""
    fs, path = storage.resolve(url)
    with fs.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise PoolError(f"{url} is not a readable .npy file: {exc}") from exc
        offset = f.tell()
    if dtype.hasobject or dtype.kind != "f":
        raise PoolError(f"{url} holds {dtype} values; embeddings must be float16 or float32")
    if len(shape) != ndim:
        what = "embeddings must be a 2-D (rows, dim) array" if ndim == 2 else f"expected {ndim} dimension(s)"
        raise PoolError(f"{url} has shape {shape}; {what}")
    return _NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran), offset)


def _is_local(url: str) -> bool:
    fs, _ = storage.resolve(url)
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


class _NpyReader:
    """Row ranges of one .npy file: a memory map for local files, ranged reads otherwise."""

    def __init__(self, url: str, header: _NpyHeader) -> None:
        self.url = url
        self.header = header
        self._array: np.ndarray | None = None
        fs, path = storage.resolve(url)
        if _is_local(url):
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif header.fortran:
            with fs.open(path, "rb") as f:
                self._array = np.load(f, allow_pickle=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return self._array[start:stop]
        rows, inner = self.header.shape[0], self.header.shape[1:]
        stop = min(stop, rows)
        if stop <= start:
            return np.empty((0, *inner), self.header.dtype)
        row_bytes = int(np.prod(inner, dtype=np.int64)) * self.header.dtype.itemsize
        fs, path = storage.resolve(self.url)
        with fs.open(path, "rb") as f:
            f.seek(self.header.offset + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        if len(data) != (stop - start) * row_bytes:
            raise PoolError(f"{self.url} is truncated: rows {start}:{stop} are not all there")
        return np.frombuffer(data, dtype=self.header.dtype).reshape(stop - start, *inner)
