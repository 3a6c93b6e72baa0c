"""A compiled scan kernel: dots with a few queries and squared row norms in one read of fp16 rows.

torch's eager CPU kernels need three passes over each sub-block to score it: the
fp16→fp32 upcast (from memory), the product with the queries and the squared norms
(both from cache). torch.compile (inductor) fuses ``x.float()``, the products and the
squares into one loop that converts fp16 in registers and reads each row once.
Measured on the 2-core AMD EPYC (AVX2) build machine, 512 dims, one thread, CPU time
per row of a whole scan step (scores, norms, threshold): 107 ns compiled against 198
eager at 1 query, 205 against 311 at 2, 288 against 323 at 4, but 464 against 325 at
8, where the eager kernel's BLAS product wins (eager figures with ``np.vecdot`` norms;
torch's norm, which the eager kernel uses so as to reproduce the earlier scan's
similarities bit for bit, adds about 20 ns). A plain fp32 matrix-vector product, which
reads twice the bytes, costs about 140. So queries up to ``FUSED_MAX_QUERIES`` use it;
its similarities differ from the eager kernel's by fp32 rounding (a few 1e-7).

Compiling needs inductor's C++ toolchain and takes seconds (about 11 s for the first
kernel in a process with a cold inductor cache, 2 s for the next; inductor's on-disk
cache shortens later processes). Any failure turns the compiled kernel off for the
process with one warning, and the eager kernel, which gives the same results to fp32
rounding, does the work. ``PIXELMILL_SCAN_COMPILE=0`` turns it off from the start.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

# Above this many queries the eager kernel's BLAS product does better (see above).
FUSED_MAX_QUERIES = 4
# Blocks with fewer rows are scanned eagerly, so small pools never pay for a compile.
FUSED_MIN_ROWS = 32_768
# Rows per call: a call costs ~60-80 µs besides the work (dynamo's guards, the wrapper).
FUSED_TASK_ROWS = 32_768
# Distinct (width, queries, dtype) kernels per process; dynamo recompiles the one
# function for each, and stops (falling back to Python) after 8.
_MAX_KERNELS = 4

_KERNELS: dict[tuple[int, int, str], Any] = {}
_LOCK = threading.Lock()
_disabled: str | None = None


def _dots_and_squares(x: Any, q: Any) -> tuple[Any, Any]:
    """``(rows, P)`` dots with the queries and ``(rows,)`` squared norms, both fp32."""
    x = x.float()
    return (x[:, None, :] * q[None, :, :]).sum(-1), (x * x).sum(1)


def compile_disabled() -> str | None:
    """Why this process scans without the compiled kernel, or None while it may use it."""
    if os.environ.get("PIXELMILL_SCAN_COMPILE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "PIXELMILL_SCAN_COMPILE=0"
    return _disabled


def fused_kernel(dim: int, num_queries: int, dtype: np.dtype, build: bool = True) -> Any:
    """The compiled kernel for rows of this width and dtype and this many queries, or None.

    The first call for a shape compiles it (rows are a dynamic dimension, so one kernel
    serves every block size of at least 2 rows) and runs it once on the calling thread,
    single-threaded like the scan's workers. Call it as ``kernel(rows, queries)``
    with a C-contiguous ``(n, dim)`` torch tensor of that dtype (n >= 2) and the
    ``(num_queries, dim)`` fp32 queries, inside ``torch.inference_mode()`` on a thread
    whose torch runs single-threaded.

    Args:
        dim: embedding width.
        num_queries: queries scored at once (at most ``FUSED_MAX_QUERIES``).
        dtype: the rows' dtype (float16 or float32).
        build: compile it if it is not compiled yet (False: only return one already built).
    """
    dtype = np.dtype(dtype)
    if compile_disabled() or num_queries > FUSED_MAX_QUERIES or dtype not in (np.float16, np.float32):
        return None
    key = (int(dim), int(num_queries), dtype.str)
    with _LOCK:
        if key in _KERNELS or _disabled or not build:
            return _KERNELS.get(key)
        if len(_KERNELS) >= _MAX_KERNELS:
            return None
        from pixelmill.tasks.retrieval.kernel import torch_module, torch_single_thread

        torch = torch_module()
        if not torch:
            return None
        try:
            # cpp_wrapper: the call releases the GIL, so the scan's threads run it side by side.
            kernel = torch.compile(_dots_and_squares, fullgraph=True,
                                   options={"cpp_wrapper": True, "compile_threads": 1})
            probe = torch.ones((8, dim), dtype=torch.float16 if dtype == np.float16 else torch.float32)
            torch._dynamo.mark_dynamic(probe, 0)
            queries = torch.ones((num_queries, dim), dtype=torch.float32)
            with torch_single_thread(), torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inductor's notes about CUDA and the like
                dots, squares = kernel(probe, queries)
            if not (float(dots[0, 0]) == dim and float(squares[-1]) == dim):
                raise RuntimeError(f"probe gave {float(dots[0, 0])} and {float(squares[-1])}, not {dim}")
        except Exception as exc:  # noqa: BLE001 - any failure means: scan eagerly
            _turn_off(exc)
            return None
        _KERNELS[key] = kernel
        return kernel


def kernel_failed(exc: BaseException) -> None:
    """A compiled kernel raised during a scan: turn compiled kernels off for this process, warning once."""
    with _LOCK:
        _turn_off(exc)


def _turn_off(exc: BaseException) -> None:
    global _disabled
    if _disabled:
        return
    _disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    warnings.warn(f"pixelmill scan: compiled kernel unavailable ({_disabled}); using the eager kernel",
                  RuntimeWarning, stacklevel=3)
