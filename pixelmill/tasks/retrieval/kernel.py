"""Similarity kernels: torch-backed fp16→fp32 upcasting, row norms, and the exact block scan.

The exact scan reads every vector once for all prompts together (``block @ queries.T``),
upcasting fp16 storage to fp32 in cache-sized sub-blocks; similarities are ``dot / ‖row‖``
in fp32 (queries are unit vectors), compared strictly with the threshold rounded to fp32.
torch is imported lazily, on first use (see :func:`torch_module`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

SUB_ROWS = 4096


_TORCH: Any = None


def torch_module() -> Any:
    """torch when importable (its fp16→fp32 copy is vectorised; numpy's is ~20× slower), else False."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch

            _TORCH = torch
        except ImportError:  # pragma: no cover - torch is a core dependency
            _TORCH = False
    return _TORCH


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch's CPU kernels on the calling thread only, restoring the setting after.

    torch's OpenMP workers spin at barriers: beside another thread pool (numpy's
    OpenBLAS, faiss) or another busy process they stall (measured on 2 cores: 0.3 M
    instead of 11 M vectors/s for upcast + BLAS product; 1.4 M instead of 14 M beside
    one busy process). Single-threaded torch degrades gracefully instead.
    """
    torch = torch_module()
    previous = torch.get_num_threads() if torch else 1
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def upcast_into(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy fp16 (or fp32) rows into a preallocated fp32 buffer; returns ``out[:len(src)]``.

    numpy's float16 cast is scalar code (about 0.7 G values/s); torch's copy is
    vectorised (F16C/AVX-512), so it is used when available.

    Args:
        src: ``(rows, dim)`` vectors, any float dtype and byte order.
        out: ``(>= rows, dim)`` C-contiguous float32 buffer.
    """
    dst = out[: len(src)]
    torch = torch_module()
    if torch and src.dtype.isnative and src.dtype in (np.float16, np.float32):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memory maps: we never write to them
            torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src, casting="unsafe")
    return dst


def norms_of(x32: np.ndarray) -> np.ndarray:
    """Row L2 norms of a C-contiguous float32 block (torch's reduction when available)."""
    torch = torch_module()
    if torch:
        return torch.linalg.vector_norm(torch.from_numpy(x32), dim=1).numpy()
    return np.sqrt(np.einsum("ij,ij->i", x32, x32))


def row_norms(emb: np.ndarray, sub_rows: int = 4096) -> np.ndarray:
    """L2 norms of the rows of an embedding block, computed in fp32.

    Args:
        emb: ``(rows, dim)`` fp16 or fp32 vectors.
        sub_rows: rows upcast at a time (bounds the temporary fp32 copy).
    """
    out = np.empty(len(emb), np.float32)
    buf = np.empty((min(sub_rows, len(emb)), emb.shape[1] if emb.ndim == 2 else 0), np.float32)
    with torch_single_thread():
        for s in range(0, len(emb), sub_rows):
            x = upcast_into(emb[s:s + sub_rows], buf)
            out[s:s + len(x)] = norms_of(x)
    return out


def bad_rows(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that can never be scored: non-finite values, and all-zero vectors.

    Returns:
        ``(nonfinite_rows, zero_rows)`` as sorted row indices.
    """
    norms = row_norms(emb)
    return np.nonzero(~np.isfinite(norms))[0], np.nonzero(norms == 0)[0]


# ------------------------------------------------------------------------------ queries


def normalize_queries(queries: np.ndarray) -> np.ndarray:
    """Queries as a C-contiguous ``(P, d)`` float32 array of unit vectors.

    Args:
        queries: ``(P, d)`` or ``(d,)`` vectors.

    Raises:
        ValueError: empty, non-finite or zero queries.
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"queries must be a non-empty (prompts, dim) array, got shape {q.shape}")
    norms = np.linalg.norm(q, axis=1)
    bad = np.nonzero(~np.isfinite(norms) | (norms == 0))[0]
    if len(bad):
        raise ValueError(f"query {int(bad[0])} is zero or not finite")
    return np.ascontiguousarray(q / norms[:, None], dtype=np.float32)


# ------------------------------------------------------------------------------ kernel

_local = threading.local()


def _torch_buffers(rows: int, dim: int) -> tuple[Any, Any]:
    """Per-thread fp32 scratch (rows × dim) and norms (rows), reused across calls."""
    torch = torch_module()
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].shape[1] != dim or bufs[0].shape[0] < rows:
        bufs = _local.bufs = (torch.empty((rows, dim), dtype=torch.float32),
                              torch.empty(rows, dtype=torch.float32))
    return bufs


@dataclass
class BlockHits:
    """Rows of one block above the threshold, and rows that could not be scored.

    Args:
        query: query index of each hit.
        row: row index within the block of each hit.
        similarity: cosine similarity of each hit (fp32).
        nonfinite: rows with NaN/Inf values.
        zero: all-zero rows.
    """

    query: np.ndarray
    row: np.ndarray
    similarity: np.ndarray
    nonfinite: np.ndarray
    zero: np.ndarray


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(workers: int) -> ThreadPoolExecutor:
    pool = _EXECUTORS.get(workers)
    if pool is None:
        pool = _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="pixelmill-scan")
    return pool


def _upcast(src: np.ndarray, buf: Any) -> Any:
    """The fp32 torch view of ``src``: zero-copy for C-contiguous fp32, else copied into ``buf``."""
    torch = torch_module()
    if src.dtype == np.float32 and src.flags.c_contiguous:
        return torch.from_numpy(src)
    x = buf[: len(src)]
    if not src.dtype.isnative:
        src = src.astype(src.dtype.newbyteorder("="))
    x.copy_(torch.from_numpy(np.ascontiguousarray(src)))
    return x


def _single_query_scores(src: np.ndarray, q0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dots and norms of one sub-block against one query, on the calling thread only.

    Runs inside the caller's ``torch_single_thread()``: torch's thread count is
    process-wide, so the workers' torch calls are single-threaded too.
    """
    torch = torch_module()
    buf, _ = _torch_buffers(len(src), src.shape[1])
    with torch.inference_mode():
        x = _upcast(src, buf)
        norms = torch.linalg.vector_norm(x, dim=1).numpy()
        return np.vecdot(x.numpy(), q0), norms


def _scores_torch(emb: np.ndarray, q: np.ndarray, sub_rows: int,
                  workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(offset, dots, norms)`` per sub-block.

    torch does the upcast and the norms (numpy's fp16 cast is scalar code), always on
    one thread per caller: torch's OpenMP workers spin at barriers, and when another
    process or numpy's OpenBLAS pool holds a core they stall (measured on 2 cores: 14 M
    vectors/s quiet, 1.4 M beside one busy process). Instead:

    - one query (memory-bound): sub-blocks go to ``workers`` Python threads, each doing
      upcast, norms and ``np.vecdot`` (a per-row dot that never wakes the BLAS pool)
      single-threaded: 15.5 M vectors/s quiet, 7-9 M beside one busy process;
    - several queries (compute-bound): OpenBLAS's threaded gemm does the product,
      degrading under load no worse than bare BLAS.
    """
    n, dim = emb.shape
    if len(q) == 1:
        chunks = (emb[s:s + sub_rows] for s in range(0, n, sub_rows))
        if workers > 1 and n > sub_rows:
            results = _executor(workers).map(_single_query_scores, chunks, [q[0]] * ((n + sub_rows - 1) // sub_rows))
        else:
            results = (_single_query_scores(c, q[0]) for c in chunks)
        for i, (dots, norms) in enumerate(results):
            yield i * sub_rows, dots, norms
        return
    torch = torch_module()
    buf, nbuf = _torch_buffers(min(sub_rows, n), dim)
    qt = np.ascontiguousarray(q.T)
    with torch.inference_mode():
        for s in range(0, n, sub_rows):
            x = _upcast(emb[s:s + sub_rows], buf)
            norms = nbuf[: len(x)]
            torch.linalg.vector_norm(x, dim=1, out=norms)
            yield s, x.numpy() @ qt, norms.numpy()


def _scores_numpy(emb: np.ndarray, q: np.ndarray,
                  sub_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The same as :func:`_scores_torch` without torch (numpy's fp16 cast is ~20× slower)."""
    qv = q[0] if len(q) == 1 else np.ascontiguousarray(q.T)
    for s in range(0, len(emb), sub_rows):
        x = np.asarray(emb[s:s + sub_rows], dtype=np.float32)
        yield s, x @ qv, np.sqrt(np.einsum("ij,ij->i", x, x))


def scan_block_hits(
    emb_block: np.ndarray,
    queries: np.ndarray,
    threshold: float,
    skip_mask: np.ndarray | None = None,
    sub_rows: int = SUB_ROWS,
    threads: int | None = None,
) -> BlockHits:
    """Array form of :func:`scan_block`, also naming the rows that could not be scored.

    Args:
        emb_block: ``(n, d)`` fp16 or fp32 rows, not necessarily normalised.
        queries: ``(P, d)`` unit fp32 queries (see :func:`normalize_queries`).
        threshold: keep similarities strictly above this (compared in fp32).
        skip_mask: ``(n,)`` booleans; True rows are never hits.
        sub_rows: rows upcast and multiplied at a time; 4096 × 512 fp32 is 8 MB, which
            stays in the last-level cache between the upcast and the product.
        threads: threads for a one-query scan (default: torch's thread count, which
            follows ``OMP_NUM_THREADS``, so one in a one-CPU Ray task).
    """
    n = len(emb_block)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or (n and (emb_block.ndim != 2 or emb_block.shape[1] != q.shape[1])):
        raise ValueError(f"queries of shape {q.shape} do not match embeddings of shape {emb_block.shape}")
    if skip_mask is not None and len(skip_mask) != n:
        raise ValueError(f"skip_mask has {len(skip_mask)} entries for {n} rows")
    thr = np.float32(threshold)
    qs, rs, ss, nonfinite, zero = [], [], [], [], []
    torch = torch_module()
    if torch:
        workers = max(1, threads if threads is not None else torch.get_num_threads())
        scores = _scores_torch(emb_block, q, sub_rows, workers) if n else iter(())
    else:
        scores = _scores_numpy(emb_block, q, sub_rows)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"), torch_single_thread(), \
            warnings.catch_warnings():
        # torch warns that read-only memory maps are not writable; they are never written.
        # Filters are process-wide, so this covers the worker threads too (they only run
        # while this block is active).
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        for s, dots, norms in scores:
            sims = dots.reshape(len(norms), -1)
            sims /= norms[:, None]
            lo, hi = norms.min(), norms.max()
            if not (lo > 0 and hi < np.inf):
                nonfinite.append(np.nonzero(~np.isfinite(norms))[0] + s)
                zero.append(np.nonzero(norms == 0)[0] + s)
                sims[~(np.isfinite(norms) & (norms > 0))] = -np.inf
            if skip_mask is not None:
                skipped = skip_mask[s:s + len(norms)]
                if skipped.any():
                    sims[skipped] = -np.inf
            r, qi = np.nonzero(sims > thr)
            if len(r):
                qs.append(qi)
                rs.append(r + s)
                ss.append(sims[r, qi])

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return BlockHits(cat(qs, np.int64), cat(rs, np.int64), cat(ss, np.float32),
                     cat(nonfinite, np.int64), cat(zero, np.int64))


def scan_block(
    emb_block: np.ndarray,
    queries: np.ndarray,
    threshold: float,
    skip_mask: np.ndarray | None = None,
    sub_rows: int = SUB_ROWS,
    threads: int | None = None,
) -> list[tuple[int, int, float]]:
    """Rows of a block whose cosine similarity to a query is strictly above ``threshold``.

    All queries are scored in one read of the block. fp16 rows are upcast to fp32 a
    sub-block at a time, rows are normalised (cosine), and rows with NaN/Inf or zero
    vectors never match.

    Args:
        emb_block: ``(n, d)`` fp16 or fp32 rows, as stored.
        queries: ``(P, d)`` unit fp32 queries.
        threshold: the similarity a hit must exceed (strictly, in fp32).
        skip_mask: ``(n,)`` booleans; True rows are never hits.
        sub_rows: rows upcast at a time.
        threads: threads for a one-query scan (default: torch's thread count).

    Returns:
        ``(query_idx, row_idx_in_block, similarity)`` for every hit, ordered by row then
        query.
    """
    h = scan_block_hits(emb_block, queries, threshold, skip_mask, sub_rows, threads)
    return list(zip(h.query.tolist(), h.row.tolist(), h.similarity.astype(np.float64).tolist()))
