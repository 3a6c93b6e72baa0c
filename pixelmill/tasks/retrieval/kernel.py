"""Similarity kernels: torch-backed fp16→fp32 upcasting, row norms, and the exact block scan.

The exact scan reads every vector once for all prompts together. For up to
``FUSED_MAX_QUERIES`` prompts a compiled kernel (:mod:`~pixelmill.tasks.retrieval.fused`)
takes each row's dots and squared norm in one read of its fp16 values; otherwise (or
where it cannot compile) fp16 rows are upcast to fp32 in cache-sized sub-blocks for a
BLAS product (torch's MKL on Intel CPUs, else numpy's OpenBLAS where it can be held to one
thread; see :func:`eager_product`) and torch's row norms, or the norms stored beside the
pool (:func:`scan_norms`). Similarities are ``dot / ‖row‖`` in fp32 (queries
are unit vectors), compared strictly with the threshold rounded to fp32. torch is
imported lazily, on first use (see :func:`torch_module`).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixelmill.tasks.retrieval.fused import FUSED_MIN_ROWS, FUSED_TASK_ROWS, fused_kernel, kernel_failed

SUB_ROWS = 4096
# Sub-blocks per worker task: fewer hand-offs between threads, still several tasks per block.
TASK_SUB_BLOCKS = 2


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


_OPENBLAS: Any = None
_OPENBLAS_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                   ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                   ("openblas_get_num_threads", "openblas_set_num_threads"))


def _numpy_openblas() -> Any:
    """``(get, set)`` thread-count functions of the OpenBLAS numpy was built with, or False.

    Found among the libraries this process has loaded from numpy's own folders (numpy's
    wheels bundle it in ``numpy.libs``); another BLAS, or none found, gives False.
    """
    global _OPENBLAS
    if _OPENBLAS is None:
        _OPENBLAS = False
        try:
            blas = str(np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", ""))
            with open("/proc/self/maps") as f:  # Linux; elsewhere the eager product stays in torch
                paths = sorted({line.split()[-1] for line in f if "/" in line})
        except (OSError, KeyError, TypeError, ValueError):
            return _OPENBLAS
        paths = [p for p in paths if "openblas" in p.lower() and "numpy" in p.lower() and ".so" in p]
        if "openblas" not in blas.lower():
            return _OPENBLAS
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, put in _OPENBLAS_NAMES:
                if hasattr(lib, get) and hasattr(lib, put):
                    getter, setter = getattr(lib, get), getattr(lib, put)
                    getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                    _OPENBLAS = (getter, setter)
                    return _OPENBLAS
    return _OPENBLAS


_PRODUCT: str | None = None
SCAN_BLAS_ENV = "PIXELMILL_SCAN_BLAS"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def eager_product() -> str:
    """Which BLAS the eager kernel multiplies several queries in: ``"numpy"`` or ``"torch"``.

    A fixed rule, never a timing, so a machine's similarities are the same bits on every run:
    torch's where torch is built with MKL and the CPU is Intel's (MKL dispatches its fastest
    kernels there: on the 2-core Xeon here a 2048 × 512 × 64 sub-block takes 465-475 ns a row
    against 529-546 for numpy's OpenBLAS), numpy's OpenBLAS elsewhere (on the 2-core AMD EPYC
    716 ns against MKL's 925). ``PIXELMILL_SCAN_BLAS=numpy|torch`` overrides the rule.
    """
    global _PRODUCT
    choice = os.environ.get(SCAN_BLAS_ENV, "").strip().lower()
    if choice:
        if choice not in ("numpy", "torch"):
            raise ValueError(f"{SCAN_BLAS_ENV}={choice!r}: expected 'numpy' or 'torch'")
        return choice
    if _PRODUCT is None:
        torch = torch_module()
        mkl = bool(torch) and bool(torch.backends.mkl.is_available())
        _PRODUCT = "torch" if mkl and _cpu_vendor() == "GenuineIntel" else "numpy"
    return _PRODUCT


@contextmanager
def blas_single_thread() -> Iterator[bool]:
    """Run numpy's OpenBLAS single-threaded, restoring its thread count after.

    OpenBLAS's pool spins at barriers like torch's (see :func:`torch_single_thread`),
    and its thread count is process-wide. With it at one, the scan's own threads each
    run numpy's BLAS, which on the 2-core AMD EPYC here multiplies a 2048 × 512 fp32
    sub-block by 64 queries in 716 ns a row against 925 for torch's MKL (33 against 45
    for one query). Yields False, changing nothing, where numpy's BLAS is not an
    OpenBLAS this can find.
    """
    fns = _numpy_openblas()
    if not fns:
        yield False
        return
    get, put = fns
    previous = int(get())
    if previous != 1:
        put(1)
    try:
        yield True
    finally:
        if previous != 1:
            put(previous)


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


def scan_norms(emb: np.ndarray) -> np.ndarray:
    """Row norms exactly as the eager scan computes them (the same bits), for storing beside a pool.

    A pool prepared with ``pixelmill pool norms`` keeps these in ``norms/``; the scan then
    reads 4 bytes a row instead of taking each row's norm (see :func:`scan_block_hits`).
    Each row's bits do not depend on the rows computed with it.
    """
    norms = row_norms(emb)
    return np.sqrt(np.square(norms, out=norms), out=norms)


def bad_rows(emb: np.ndarray, norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows that can never be scored: non-finite values, and all-zero vectors.

    Args:
        emb: ``(rows, dim)`` vectors.
        norms: their stored norms (:func:`scan_norms`), used where a sample of them checks out.

    Returns:
        ``(nonfinite_rows, zero_rows)`` as sorted row indices.
    """
    if norms is None or not _norms_agree(emb, norms):
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


def _scratch(rows: int, dim: int, cols: int) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """This thread's fp32 scratch, reused across calls: ``(rows, dim)`` rows and ``(rows, cols)`` dots,
    as numpy arrays and (with torch) torch views of them."""
    bufs = getattr(_local, "scan_bufs", None)
    if bufs is None or bufs[0].shape[1] != dim or bufs[0].shape[0] < rows or bufs[1].shape[1] != cols:
        x, d = np.empty((rows, dim), np.float32), np.empty((rows, cols), np.float32)
        torch = torch_module()
        bufs = _local.scan_bufs = (x, d, *((torch.from_numpy(x), torch.from_numpy(d)) if torch else (None, None)))
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


@dataclass
class _Block:
    """One block as every worker thread reads it: native byte order, C order, and its torch view."""

    emb: np.ndarray
    emb_t: Any
    queries: np.ndarray
    queries_t: Any  # the (P, d) queries as a torch tensor
    threshold: np.float32
    skip_mask: np.ndarray | None
    sub_rows: int
    fused: Any  # the compiled kernel (see fused.py), or None for the eager one
    numpy_blas: bool  # the eager product runs in numpy's (single-threaded) OpenBLAS, else torch's
    queries_tc: np.ndarray  # the (d, P) transpose of the queries, C-contiguous
    norms: np.ndarray | None  # the rows' stored norms (see scan_norms), or None: computed as read
    # A sub-block has no hit when its largest dot is at most this × its smallest norm:
    # the threshold less a margin (1e-6, relative) that covers the rounding of fp32
    # division, so skipping never drops a row the comparison would keep. None for
    # thresholds <= 0, where negative dots can pass.
    no_hit_below: float | None = None

    @classmethod
    def of(cls, emb: np.ndarray, q: np.ndarray, thr: np.float32, skip_mask: np.ndarray | None,
           sub_rows: int, compiled: bool | None, numpy_blas: bool, norms: np.ndarray | None = None) -> _Block:
        if not emb.dtype.isnative:
            emb = emb.astype(emb.dtype.newbyteorder("="))
        emb = np.ascontiguousarray(emb)  # a no-op for row slices of a pool
        torch = torch_module()
        use_torch = bool(torch) and emb.dtype in (np.float16, np.float32)
        fused = None
        if use_torch and compiled is not False:
            # Auto: compile for a large block; once compiled, every block of that shape uses it.
            fused = fused_kernel(emb.shape[1], len(q), emb.dtype, build=bool(compiled) or len(emb) >= FUSED_MIN_ROWS)
        # torch.from_numpy warns once here for a read-only memory map (the caller filters it);
        # the workers only slice this view, which never warns.
        # The queries in torch's own (64-byte aligned) memory: MKL's rounding may follow alignment.
        return cls(emb, torch.from_numpy(emb) if use_torch else None, q,
                   torch.from_numpy(q).clone() if use_torch else None, thr, skip_mask, sub_rows, fused,
                   (numpy_blas and eager_product() == "numpy") or not use_torch, np.ascontiguousarray(q.T),
                   norms, float(thr) * (1 - 1e-6) if thr > 0 else None)


_Piece = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _score_rows(block: _Block, start: int, stop: int) -> _Piece:
    """Hits and unscorable rows among rows ``start:stop`` of a block, on the calling thread only.

    With the compiled kernel, one call reads the rows once for their dots and squared
    norms. Otherwise each ``sub_rows`` slice is upcast into this thread's fp32 scratch,
    which stays in cache for the dots with every query (a BLAS product on this thread:
    the caller holds ``torch_single_thread()`` and ``blas_single_thread()``) and the
    squared norms (``np.vecdot`` of each row with itself). Only hits and bad rows leave
    the thread.

    Returns:
        ``(query, row, similarity, nonfinite, zero)``, rows counted from the block's start.
    """
    out: tuple[list, ...] = ([], [], [], [], [])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # thread-local: set here
        scores = _fused_scores(block, start, stop) if block.fused is not None and stop - start >= 2 else None
        if scores is not None:
            _collect(*scores, start, block, out)
        else:
            for s in range(start, stop, block.sub_rows):
                _collect(*_eager_scores(block, s, min(s + block.sub_rows, stop)), s, block, out)
    return tuple(_cat(parts, dt) for parts, dt in zip(out, _PIECE_DTYPES))  # type: ignore[return-value]


_PIECE_DTYPES = (np.int64, np.int64, np.float32, np.int64, np.int64)


def _fused_scores(block: _Block, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Dots ``(stop - start, P)`` and row norms from the compiled kernel; None if it fails (then eager).

    The kernel takes the squared norms in the same read as the dots, so stored norms are not used.
    """
    torch = torch_module()
    try:
        with torch.inference_mode():
            dots, squares = block.fused(block.emb_t[start:stop], block.queries_t)
    except Exception as exc:  # noqa: BLE001 - e.g. dynamo's recompile limit: the eager kernel takes over
        kernel_failed(exc)
        return None
    squares = squares.numpy()
    return dots.numpy(), np.sqrt(squares, out=squares)


def _eager_scores(block: _Block, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Dots ``(e - s, P)`` (in this thread's scratch) and norms of rows ``s:e`` (the stored ones if given)."""
    emb, emb_t = block.emb, block.emb_t
    m = e - s
    buf, dbuf, buf_t, dbuf_t = _scratch(block.sub_rows, emb.shape[1], len(block.queries))
    dots = dbuf[:m]
    if emb.dtype == np.float32:
        x_t, x = (emb_t[s:e], None) if emb_t is not None else (None, emb[s:e])
    elif emb_t is not None:
        x_t = buf_t[:m]
        x_t.copy_(emb_t[s:e])  # torch's vectorised upcast (numpy's is scalar code)
    else:
        x_t, x = None, buf[:m]
        np.copyto(x, emb[s:e], casting="unsafe")
    if x_t is not None:
        x = x_t.numpy()
    # The same operations as the scan before the compiled kernel, so its similarities are
    # reproduced bit for bit (the golden tests compare them so): a per-row dot for one
    # query, numpy's product for several, torch's norm.
    if len(block.queries) == 1:
        dots[:, 0] = np.vecdot(x, block.queries[0])
    elif block.numpy_blas:
        np.matmul(x, block.queries_tc, out=dots)
    else:
        torch_module().mm(x_t, block.queries_t.T, out=dbuf_t[:m])
    if block.norms is not None:
        return dots, block.norms[s:e]
    if x_t is None:
        squares = np.vecdot(x, x)
        return dots, np.sqrt(squares, out=squares)
    norms = torch_module().linalg.vector_norm(x_t, dim=1).numpy()
    return dots, np.sqrt(np.square(norms, out=norms), out=norms)  # as scan_norms, so stored norms match


def _collect(sims: np.ndarray, norms: np.ndarray, s: int, block: _Block, out: tuple[list, ...]) -> None:
    """Turn C-contiguous dots into cosines in place; append the hits and bad rows of rows ``s:`` to ``out``."""
    qs, rs, ss, nonfinite, zero = out
    lo, hi = norms.min(), norms.max()
    scorable = lo > 0 and hi < np.inf
    if scorable and block.no_hit_below is not None and float(sims.max()) <= block.no_hit_below * float(lo):
        return  # even the largest dot over the smallest norm stays under the threshold
    sims /= norms[:, None]
    if not scorable:
        nonfinite.append(np.nonzero(~np.isfinite(norms))[0] + s)
        zero.append(np.nonzero(norms == 0)[0] + s)
        sims[~(np.isfinite(norms) & (norms > 0))] = -np.inf
    if block.skip_mask is not None:
        skipped = block.skip_mask[s:s + len(norms)]
        if skipped.any():
            sims[skipped] = -np.inf
    flat = np.flatnonzero(sims > block.threshold)  # far faster than a 2-D nonzero; same row-major order
    if len(flat):
        r, qi = np.divmod(flat, sims.shape[1])
        qs.append(qi)
        rs.append(r + s)
        ss.append(sims.reshape(-1)[flat])


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


NORM_CHECK_STRIDE = 256
_norm_warning = threading.Event()


def _norms_agree(emb: np.ndarray, norms: np.ndarray) -> bool:
    """Whether stored norms match a sample of rows (every ``NORM_CHECK_STRIDE``-th) bit for bit; warns once if not.

    Raises:
        ValueError: ``norms`` is not one fp32 value per row.
    """
    if norms.shape != (len(emb),) or norms.dtype != np.float32:
        raise ValueError(f"norms must be {len(emb)} float32 values, one per row; got {norms.dtype} {norms.shape}")
    if not len(emb):
        return True
    sample = np.ascontiguousarray(emb[::NORM_CHECK_STRIDE])
    if not sample.dtype.isnative:
        sample = sample.astype(sample.dtype.newbyteorder("="))
    fresh = scan_norms(sample)
    if np.array_equal(fresh.view(np.uint32), np.ascontiguousarray(norms[::NORM_CHECK_STRIDE]).view(np.uint32)):
        return True
    if not _norm_warning.is_set():
        _norm_warning.set()
        warnings.warn("pixelmill scan: stored row norms do not match the embeddings (written for other data or "
                      "by another torch version); computing them instead. Rerun `pixelmill pool norms POOL`.",
                      RuntimeWarning, stacklevel=3)
    return False


def scan_block_hits(
    emb_block: np.ndarray,
    queries: np.ndarray,
    threshold: float,
    skip_mask: np.ndarray | None = None,
    sub_rows: int = SUB_ROWS,
    threads: int | None = None,
    compiled: bool | None = None,
    norms: np.ndarray | None = None,
) -> BlockHits:
    """Array form of :func:`scan_block`, also naming the rows that could not be scored.

    The block is cut into runs of ``sub_rows * TASK_SUB_BLOCKS`` rows (``FUSED_TASK_ROWS``
    for the compiled kernel, whose every call costs ~60-80 µs) that ``threads`` Python
    threads take in turn (:func:`_score_rows`), each single-threaded in torch
    and BLAS: torch's OpenMP workers and OpenBLAS's pool spin at barriers, and when
    another process holds a core they stall (measured on 2 cores: 14 M vectors/s quiet,
    1.4 M beside one busy process), while plain threads degrade with the share of CPU
    they get. Results do not depend on the number of threads.

    Args:
        emb_block: ``(n, d)`` fp16 or fp32 rows, not necessarily normalised.
        queries: ``(P, d)`` unit fp32 queries (see :func:`normalize_queries`).
        threshold: keep similarities strictly above this (compared in fp32).
        skip_mask: ``(n,)`` booleans; True rows are never hits.
        sub_rows: rows upcast and scored at a time by the eager kernel; their fp32 copy
            (8 MB at 4096 × 512) stays in cache between the upcast, the product and the
            norms. BLAS rounds a row's dots differently at other sub-block sizes, so the
            default keeps the earlier scan's similarities bit for bit.
        threads: threads to spread the block over (default: torch's thread count, which
            follows ``OMP_NUM_THREADS``, so one in a one-CPU Ray task).
        compiled: use the compiled kernel of :mod:`~pixelmill.tasks.retrieval.fused` (up
            to ``FUSED_MAX_QUERIES`` queries) where it is available: None compiles it for a
            block of at least ``FUSED_MIN_ROWS`` rows and then uses it for every block of
            that shape, True compiles it for any block, False never uses it. Hits agree
            with the eager kernel's to fp32 rounding.
        norms: ``(n,)`` stored row norms (:func:`scan_norms`, written by ``pixelmill pool
            norms``): the eager kernel reads them instead of taking each row's norm (about
            75 ns a row of 512 dims here, an eighth of a 64-prompt scan). Every
            ``NORM_CHECK_STRIDE``-th row's norm is recomputed first; if any differs in a bit
            the stored norms are ignored for this block (warning once), so results never
            depend on whether they were given.
    """
    n = len(emb_block)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or (n and (emb_block.ndim != 2 or emb_block.shape[1] != q.shape[1])):
        raise ValueError(f"queries of shape {q.shape} do not match embeddings of shape {emb_block.shape}")
    if skip_mask is not None and len(skip_mask) != n:
        raise ValueError(f"skip_mask has {len(skip_mask)} entries for {n} rows")
    sub_rows = max(1, int(sub_rows))
    if norms is not None and not _norms_agree(emb_block, norms):
        norms = None
    torch = torch_module()
    workers = max(1, threads if threads is not None else (torch.get_num_threads() if torch else 1))
    with torch_single_thread(), blas_single_thread() as numpy_blas, warnings.catch_warnings():
        # torch warns that read-only memory maps are not writable; they are never written.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        block = _Block.of(emb_block, q, np.float32(threshold), skip_mask, sub_rows, compiled, numpy_blas,
                          norms) if n else None
        step = FUSED_TASK_ROWS if block is not None and block.fused is not None else sub_rows * TASK_SUB_BLOCKS
        starts = list(range(0, n, step))
        if workers > 1 and len(starts) > 1:
            pieces = list(_executor(workers).map(lambda s: _score_rows(block, s, min(s + step, n)), starts))
        else:
            pieces = [_score_rows(block, s, min(s + step, n)) for s in starts]
    return BlockHits(*(_cat([p[i] for p in pieces], dt) for i, dt in enumerate(_PIECE_DTYPES)))


def scan_block(
    emb_block: np.ndarray,
    queries: np.ndarray,
    threshold: float,
    skip_mask: np.ndarray | None = None,
    sub_rows: int = SUB_ROWS,
    threads: int | None = None,
    compiled: bool | None = None,
    norms: np.ndarray | None = None,
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
        threads: threads to spread the block over (default: torch's thread count).
        compiled: use the compiled kernel (None: for large blocks; see :func:`scan_block_hits`).
        norms: the rows' stored norms (see :func:`scan_block_hits`), or None.

    Returns:
        ``(query_idx, row_idx_in_block, similarity)`` for every hit, ordered by row then
        query.
    """
    h = scan_block_hits(emb_block, queries, threshold, skip_mask, sub_rows, threads, compiled, norms)
    return list(zip(h.query.tolist(), h.row.tolist(), h.similarity.astype(np.float64).tolist()))
