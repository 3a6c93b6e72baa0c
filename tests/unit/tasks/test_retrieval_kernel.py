"""The exact scan's kernels: the compiled (fused) one and the eager one against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from pixelmill.tasks.retrieval import fused as fused_module
from pixelmill.tasks.retrieval import kernel, normalize_queries, scan_block_hits
from pixelmill.tasks.retrieval.fused import FUSED_MAX_QUERIES, compile_disabled, fused_kernel

DIM = 16


def tricky_block(dtype, rows: int = 3000, seed: int = 4):
    """Random rows plus rows exactly at cosine 0.6 and 0.8 to e0, hits, NaN/Inf/zero rows; queries e0 and two others."""
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((rows, DIM)) * rng.uniform(0.5, 2.0, (rows, 1))).astype(dtype)
    q = normalize_queries(np.vstack([np.eye(DIM)[0], rng.standard_normal((2, DIM))]))
    emb[10], emb[11] = 0, 0
    emb[10, :2] = (3, 4)  # cosine to e0 exactly 3/5 (fp16 and fp32 hold 3, 4 and the norm 5 exactly)
    emb[11, :2] = (4, 3)  # exactly 4/5
    emb[20:40] = (q[1] * 3 + 0.05 * rng.standard_normal((20, DIM))).astype(dtype)  # hits of query 1
    emb[50] = 0
    emb[60, 5] = np.nan
    emb[70, 2] = np.inf
    emb[80, 3] = -np.inf
    skip = np.zeros(rows, bool)
    skip[[25, 11]] = True
    return emb, q, skip


def reference(emb, q, threshold, skip):
    """(query, row, similarity) above the threshold in float64, row then query order; bad rows."""
    x = emb.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norms = np.linalg.norm(x, axis=1)
        sims = (x @ q.T.astype(np.float64)) / norms[:, None]
    good = np.isfinite(norms) & (norms > 0) & ~skip
    rows, queries = np.nonzero((sims > threshold) & good[:, None])
    return queries, rows, sims[rows, queries], np.nonzero(~np.isfinite(norms))[0], np.nonzero(norms == 0)[0]


def assert_matches(hits, want):
    queries, rows, sims, nonfinite, zero = want
    assert hits.row.tolist() == rows.tolist() and hits.query.tolist() == queries.tolist()
    np.testing.assert_allclose(hits.similarity, sims, atol=1e-6)
    assert hits.nonfinite.tolist() == nonfinite.tolist() and hits.zero.tolist() == zero.tolist()


def compiled_or_skip(dtype, num_queries: int = 3):
    if fused_kernel(DIM, num_queries, dtype) is None:
        pytest.skip(f"no compiled scan kernel here: {compile_disabled()}")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_compiled_kernel_equals_reference_and_eager_kernel(dtype):
    compiled_or_skip(dtype)
    emb, q, skip = tricky_block(dtype)
    for threshold in (0.6, 0.5999, 0.8, 0.3):
        want = reference(emb, q, threshold, skip)
        got = scan_block_hits(emb, q, threshold, skip, compiled=True, threads=2)
        assert_matches(got, want)
        eager = scan_block_hits(emb, q, threshold, skip, compiled=False, sub_rows=256, threads=1)
        assert_matches(eager, want)
    at_06 = scan_block_hits(emb, q, 0.6, compiled=True).row.tolist()
    assert 10 not in at_06 and 11 in at_06  # strictly above: the row at exactly 3/5 is out
    assert 10 in scan_block_hits(emb, q, 0.5999, compiled=True).row.tolist()
    assert scan_block_hits(emb, q, 0.3, skip, compiled=True).nonfinite.tolist() == [60, 70, 80]


def test_compiled_kernel_threads_and_task_sizes_agree(monkeypatch):
    compiled_or_skip(np.float16)
    emb, q, skip = tricky_block(np.float16, rows=20_000, seed=5)
    one = scan_block_hits(emb, q, 0.3, skip, compiled=True, threads=1)
    monkeypatch.setattr("pixelmill.tasks.retrieval.kernel.FUSED_TASK_ROWS", 999)  # many tasks, odd tails
    many = scan_block_hits(emb, q, 0.3, skip, compiled=True, threads=2)
    for name in ("query", "row", "similarity", "nonfinite", "zero"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name))
    assert len(one.row) > 100


@pytest.mark.parametrize("blas", ["numpy", "torch", "no-openblas"])
def test_eager_kernel_many_queries_negative_threshold_and_quiet_sub_blocks(blas, monkeypatch):
    if blas == "no-openblas":
        monkeypatch.setenv(kernel.SCAN_BLAS_ENV, "numpy")
        monkeypatch.setattr(kernel, "_OPENBLAS", False)  # as where numpy's BLAS is not a findable OpenBLAS
    else:
        monkeypatch.setenv(kernel.SCAN_BLAS_ENV, blas)
    rng = np.random.default_rng(6)
    emb, q3, skip = tricky_block(np.float16)
    q = normalize_queries(np.vstack([q3, rng.standard_normal((61, DIM))]))  # 64 queries: always eager
    for threshold in (0.8, 0.6, -0.2):  # at or below zero the no-hit bound is off: negative dots can pass
        assert_matches(scan_block_hits(emb, q, threshold, skip, sub_rows=128, threads=2),
                       reference(emb, q, threshold, skip))
    quiet = emb[100:].copy()  # unit rows far from every query: each sub-block is skipped by the bound
    quiet /= np.linalg.norm(quiet.astype(np.float32), axis=1, keepdims=True).astype(quiet.dtype)
    assert_matches(scan_block_hits(quiet, q, 0.99, sub_rows=128), reference(quiet, q, 0.99, np.zeros(len(quiet), bool)))


def test_compiling_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PIXELMILL_SCAN_COMPILE", "0")
    assert compile_disabled() == "PIXELMILL_SCAN_COMPILE=0"
    assert fused_kernel(DIM, 1, np.float16) is None
    emb, q, skip = tricky_block(np.float16)
    assert_matches(scan_block_hits(emb, q, 0.6, skip, compiled=True), reference(emb, q, 0.6, skip))
    assert FUSED_MAX_QUERIES < 64  # the 64-query test above runs the eager kernel


def test_a_failing_compiled_kernel_hands_over_to_the_eager_one(monkeypatch):
    monkeypatch.setattr(fused_module, "_disabled", None)  # restored after the test

    def broken(rows, queries):
        raise RuntimeError("recompile limit reached")

    monkeypatch.setattr("pixelmill.tasks.retrieval.kernel.fused_kernel", lambda *args, **kwargs: broken)
    emb, q, skip = tricky_block(np.float16)
    with pytest.warns(RuntimeWarning, match="compiled kernel unavailable"):
        got = scan_block_hits(emb, q, 0.6, skip, compiled=True, threads=1)
    assert_matches(got, reference(emb, q, 0.6, skip))
    assert compile_disabled() == "RuntimeError: recompile limit reached"


def test_blas_single_thread_holds_numpy_openblas_to_one_thread_and_restores_it():
    fns = kernel._numpy_openblas()
    if not fns:
        pytest.skip("numpy's BLAS is not an OpenBLAS found in this process")
    get, _ = fns
    before = get()
    with kernel.blas_single_thread() as held:
        assert held and get() == 1
    assert get() == before


def test_the_eager_product_follows_a_fixed_rule_and_the_override(monkeypatch):
    """MKL on Intel CPUs, numpy's OpenBLAS elsewhere; PIXELMILL_SCAN_BLAS overrides; a typo is named."""
    import torch

    emb, q3, _ = tricky_block(np.float16)
    q = normalize_queries(np.vstack([q3, np.eye(DIM)[1:5]]))  # 7 queries: the eager kernel
    monkeypatch.delenv(kernel.SCAN_BLAS_ENV, raising=False)
    for vendor, mkl, want in (("GenuineIntel", True, "torch"), ("AuthenticAMD", True, "numpy"),
                              ("GenuineIntel", False, "numpy")):
        monkeypatch.setattr(kernel, "_PRODUCT", None)
        monkeypatch.setattr(kernel, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda m=mkl: m)
        assert kernel.eager_product() == want
        block = kernel._Block.of(emb, q, np.float32(0.8), None, 128, False, numpy_blas=True)
        assert block.numpy_blas is (want == "numpy")
    monkeypatch.setenv(kernel.SCAN_BLAS_ENV, "numpy")
    assert kernel.eager_product() == "numpy"  # the override wins over the cached rule ("torch" last)
    monkeypatch.setenv(kernel.SCAN_BLAS_ENV, "mkl")
    with pytest.raises(ValueError, match="PIXELMILL_SCAN_BLAS='mkl': expected 'numpy' or 'torch'"):
        kernel.eager_product()


@pytest.mark.parametrize("blas", ["numpy", "torch"])
def test_either_product_gives_the_same_bits_run_after_run_and_at_any_thread_count(blas, monkeypatch):
    monkeypatch.setenv(kernel.SCAN_BLAS_ENV, blas)
    rng = np.random.default_rng(9)
    emb = rng.standard_normal((20_000, 64)).astype(np.float16)
    q = normalize_queries(rng.standard_normal((16, 64)))
    runs = [scan_block_hits(emb, q, 0.3, threads=t, compiled=False) for t in (1, 2, 2)]
    assert len(runs[0].row) > 10
    for other in runs[1:]:
        assert other.row.tolist() == runs[0].row.tolist() and other.query.tolist() == runs[0].query.tolist()
        assert other.similarity.tobytes() == runs[0].similarity.tobytes()


def test_stored_norms_give_the_same_bits_and_stale_ones_are_caught(monkeypatch):
    monkeypatch.setattr(kernel, "NORM_CHECK_STRIDE", 7)
    rng = np.random.default_rng(8)
    emb, q3, skip = tricky_block(np.float16)
    q = normalize_queries(np.vstack([q3, rng.standard_normal((61, DIM))]))  # 64 queries: the eager kernel
    norms = kernel.scan_norms(emb)
    assert norms.dtype == np.float32 and norms.shape == (len(emb),)
    for threshold in (0.8, -0.2):
        plain = scan_block_hits(emb, q, threshold, skip, sub_rows=128, threads=2)
        stored = scan_block_hits(emb, q, threshold, skip, sub_rows=128, threads=2, norms=norms)
        for field in ("query", "row", "similarity", "nonfinite", "zero"):
            assert getattr(stored, field).tobytes() == getattr(plain, field).tobytes(), field
    np.testing.assert_array_equal(kernel.bad_rows(emb, norms)[0], plain.nonfinite)

    # They are read, not recomputed: a tiny norm in an unsampled row (200) makes that row a hit.
    tampered = norms.copy()
    tampered[200] = 1e-9
    assert 200 in scan_block_hits(emb, q, 0.8, skip, sub_rows=128, norms=tampered).row
    # A wrong norm in a sampled row too: all ignored (with one warning), the results are the computed ones.
    stale = tampered
    stale[14] *= 2
    monkeypatch.setattr(kernel, "_norm_warning", kernel.threading.Event())
    with pytest.warns(RuntimeWarning, match="stored row norms do not match"):
        hits = scan_block_hits(emb, q, 0.8, skip, sub_rows=128, norms=stale)
    assert hits.similarity.tobytes() == scan_block_hits(emb, q, 0.8, skip, sub_rows=128).similarity.tobytes()
    assert 200 not in hits.row
    with pytest.raises(ValueError, match="one per row"):
        scan_block_hits(emb, q, 0.8, norms=norms[:-1])
