"""Regularization retrieval, pool side: exact scans (local and Ray), filters, faiss indices, embedding."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pixelmill.datasets import storage
from pixelmill.datasets.images import IMAGE_TYPE, encode_image
from pixelmill.datasets.pool import (
    BAD_NONFINITE,
    BAD_ZERO,
    PoolError,
    embedding_array,
    embedding_matrix,
    write_laion_layout,
    write_pool_parquet,
)
from pixelmill.tasks.retrieval import (
    CandidateFilters,
    ExactScanner,
    PoolEmbedder,
    build_index,
    embed_prompts,
    held_out_queries,
    measure_recall,
    merge_results,
    normalize_queries,
    scan_block,
    scan_block_hits,
    scan_pool,
    scan_pool_ray,
    search_index,
    validate,
)

DIM = 16


def pool_parts(seed: int = 0, sizes=(300, 411, 89), dim: int = DIM, dtype=np.float16, ids: bool = True):
    """Parts whose rows cluster around 4 directions, so thresholds near 0.8 select a few dozen rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((4, dim))
    parts = []
    for i, n in enumerate(sizes):
        txt = centers[rng.integers(0, 4, n)] + 0.6 * rng.standard_normal((n, dim))
        txt *= rng.uniform(0.5, 2.0, (n, 1))  # stored rows need not be unit vectors
        img = rng.standard_normal((n, dim))
        cols = {
            "url": [f"https://x/{i}/{r}" for r in range(n)],
            "caption": [f"c{i}-{r}" for r in range(n)],
            "punsafe": rng.random(n),
            "pwatermark": rng.random(n),
            "width": rng.integers(100, 1200, n),
            "height": rng.integers(100, 1200, n),
        }
        if ids:
            cols = {"id": [f"id{i}-{r:04d}" for r in range(n)], **cols}
        parts.append((img.astype(dtype), txt.astype(dtype), pa.table(cols)))
    return parts, centers


def queries_near(centers: np.ndarray, seed: int = 1, p: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = centers[np.arange(p) % len(centers)] + 0.3 * rng.standard_normal((p, centers.shape[1]))
    return normalize_queries(q)


def brute_force(parts, queries: np.ndarray, threshold: float, keep=None):
    """Reference: per query, [(id, part, row, sim)] above the threshold, sorted by -sim then id."""
    out = []
    for q in queries:
        rows = []
        for p, (_, txt, meta) in enumerate(parts):
            x = txt.astype(np.float64)
            sims = (x @ q.astype(np.float64)) / np.linalg.norm(x, axis=1)
            ids = meta.column("id").to_pylist() if "id" in meta.column_names else [f"{p}:{r}" for r in range(len(x))]
            for r in np.nonzero(sims > threshold)[0]:
                if keep is None or keep(meta, r):
                    rows.append((ids[r], str(p), int(r), float(sims[r])))
        out.append(sorted(rows, key=lambda t: (-t[3], t[0])))
    return out


def as_rows(table: pa.Table):
    return list(zip(table.column("id").to_pylist(), table.column("part").to_pylist(),
                    table.column("row").to_pylist(), table.column("similarity").to_pylist()))


def assert_same(got: pa.Table, want: list) -> None:
    rows = as_rows(got)
    assert [r[:3] for r in rows] == [w[:3] for w in want]
    np.testing.assert_allclose([r[3] for r in rows], [w[3] for w in want], atol=1e-5)


def margin_ok(parts, queries, threshold) -> bool:
    """No similarity within 1e-5 of the threshold, so fp32 and fp64 agree on every row."""
    sims = np.concatenate([
        (t.astype(np.float64) @ queries.T.astype(np.float64)) / np.linalg.norm(t.astype(np.float64), axis=1)[:, None]
        for _, t, _ in parts])
    return float(np.min(np.abs(sims - threshold))) > 1e-5


# ------------------------------------------------------------------------- exact scans


def test_exact_scan_equals_brute_force(tmp_path):
    parts, centers = pool_parts()
    q = queries_near(centers)
    assert margin_ok(parts, q, 0.8)
    url = write_laion_layout(str(tmp_path), parts)
    res = scan_pool(url, q, 0.8, block_rows=128)
    want = brute_force(parts, q, 0.8)
    assert all(len(w) >= 10 for w in want)  # the test scores real hit lists
    for got, w in zip(res.candidates, want):
        assert_same(got, w)
        assert got.column_names == ["id", "part", "row", "similarity", "url", "caption"]
        assert got.column("url").to_pylist() == [f"https://x/{p}/{r}" for _, p, r, _ in w]
    assert res.scanned == 800 and res.rejects.num_rows == 0 and res.filtered == [0] * 6


def test_laion_and_parquet_layouts_give_the_same_scan(tmp_path):
    parts, centers = pool_parts(seed=5)
    q = queries_near(centers, p=4)
    laion = scan_pool(write_laion_layout(str(tmp_path / "laion"), parts), q, 0.75, block_rows=100)
    table = pa.concat_tables([m.append_column("text_emb", embedding_array(t)) for _, t, m in parts])
    pq_pool = write_pool_parquet(str(tmp_path / "pq"), table, rows_per_shard=1000)
    parquet = scan_pool(pq_pool, q, 0.75, block_rows=100)
    for a, b in zip(laion.candidates, parquet.candidates):
        assert a.num_rows > 0
        # same rows, ids and similarities; parts are named differently (0/1/2 vs one shard)
        assert a.column("id").to_pylist() == b.column("id").to_pylist()
        assert a.column("caption").to_pylist() == b.column("caption").to_pylist()
        np.testing.assert_allclose(a.column("similarity").to_numpy(), b.column("similarity").to_numpy(), atol=1e-6)


def test_threshold_is_strict():
    block = np.zeros((3, DIM), np.float16)
    block[0, :2] = (3, 4)  # cosine to e0 is exactly 3/5
    block[1, :2] = (4, 3)  # 4/5
    block[2, 1] = 1  # orthogonal
    e0 = np.zeros((1, DIM), np.float32)
    e0[0, 0] = 1
    assert [r for _, r, _ in scan_block(block, e0, 0.6)] == [1]
    assert [(r, s) for _, r, s in scan_block(block, e0, 0.5999)] == [(0, pytest.approx(0.6)), (1, pytest.approx(0.8))]
    assert scan_block(block, e0, 0.8) == []


def test_threaded_one_prompt_scan_equals_sequential_and_reference():
    rng = np.random.default_rng(9)
    emb = rng.standard_normal((10_000, DIM)).astype(np.float16)
    emb[[2500, 9001]] = 0
    emb[7777, 3] = np.inf
    q = normalize_queries(emb[42:43].astype(np.float32))
    skip = np.zeros(len(emb), bool)
    skip[[43, 5000]] = True
    threaded = scan_block_hits(emb, q, 0.5, skip, sub_rows=1000, threads=2)
    sequential = scan_block_hits(emb, q, 0.5, skip, sub_rows=1000, threads=1)
    for name in ("query", "row", "similarity", "nonfinite", "zero"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(sequential, name))
    x = emb.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sims = (x @ q[0].astype(np.float64)) / np.linalg.norm(x, axis=1)
    want = np.nonzero((sims > 0.5) & ~skip & np.isfinite(sims))[0]
    assert len(want) > 100 and 42 in want.tolist()
    np.testing.assert_array_equal(threaded.row, want)
    np.testing.assert_allclose(threaded.similarity, sims[want], atol=1e-5)
    assert threaded.nonfinite.tolist() == [7777] and threaded.zero.tolist() == [2500, 9001]


def test_many_prompts_in_one_pass_equal_one_at_a_time(tmp_path):
    parts, centers = pool_parts(seed=2)
    q = queries_near(centers, p=9)
    assert margin_ok(parts, q, 0.7)  # one query uses a dot, several a gemm: sims agree to an ulp, not bitwise
    url = write_laion_layout(str(tmp_path), parts)
    together = scan_pool(url, q, 0.7)
    for i in range(len(q)):
        alone = scan_pool(url, q[i:i + 1], 0.7)
        assert together.candidates[i].num_rows > 0
        assert_same(together.candidates[i], as_rows(alone.candidates[0]))
    emb = parts[0][1]
    hits = scan_block(emb, q, 0.7, sub_rows=64)
    for i in range(len(q)):
        one = scan_block(emb, q[i:i + 1], 0.7)
        assert [r for qi, r, _ in hits if qi == i] == [r for _, r, _ in one]
        np.testing.assert_allclose([s for qi, _, s in hits if qi == i], [s for _, _, s in one], atol=1e-6)


def test_a_pool_with_stored_norms_scans_to_the_same_table_bit_for_bit(tmp_path):
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    parts, centers = pool_parts(seed=3)
    q = queries_near(centers, p=9)  # several prompts: the eager kernel, which reads stored norms
    url = write_laion_layout(str(tmp_path), parts)
    before = scan_pool(url, q, 0.7, block_rows=128)
    assert write_pool_norms(url).written == {"text": ["0", "1", "2"], "image": ["0", "1", "2"]}
    after = scan_pool(url, q, 0.7, block_rows=128)
    assert sum(t.num_rows for t in after.candidates) > 0
    assert [t.equals(u) for t, u in zip(before.candidates, after.candidates)] == [True] * len(q)
    assert after.scanned == before.scanned


def test_max_candidates_keeps_the_best_and_says_so(tmp_path):
    parts, centers = pool_parts()
    q = queries_near(centers, p=3)
    url = write_laion_layout(str(tmp_path), parts)
    full = scan_pool(url, q, 0.7)
    top = scan_pool(url, q, 0.7, max_candidates=5, columns=["url"])
    for f, t in zip(full.candidates, top.candidates):
        assert f.num_rows > 5
        assert as_rows(t) == as_rows(f)[:5]
    assert top.truncated == [True] * 3 and full.truncated == [False] * 3


def test_scanning_ranges_separately_then_merging_equals_one_scan(tmp_path):
    parts, centers = pool_parts(seed=8)
    q = queries_near(centers, p=3)
    scanner = ExactScanner(write_laion_layout(str(tmp_path), parts), max_candidates=20, block_rows=64)
    ranges = scanner.pool.block_ranges("text", 64)
    assert len(ranges) == 5 + 7 + 2
    whole = scanner.scan(q, 0.7)
    pieces = [scanner.scan(q, 0.7, ranges=ranges[i::3]) for i in range(3)]  # interleaved shares
    merged = merge_results(pieces, max_candidates=20)
    assert [a.equals(b) for a, b in zip(whole.candidates, merged.candidates)] == [True] * 3
    assert merged.truncated == whole.truncated == [True] * 3
    assert sum(p.scanned for p in pieces) == whole.scanned == 800


def test_filters_drop_rows_and_count_them(tmp_path):
    parts, centers = pool_parts(seed=7)
    q = queries_near(centers, p=4)
    url = write_laion_layout(str(tmp_path), parts)
    filters = {"max_punsafe": 0.5, "max_pwatermark": 0.8, "min_width": 300, "min_height": 200, "max_aspect": 2.0}

    def keep(meta, r):
        w, h = meta["width"][r].as_py(), meta["height"][r].as_py()
        return (meta["punsafe"][r].as_py() <= 0.5 and meta["pwatermark"][r].as_py() <= 0.8
                and w >= 300 and h >= 200 and max(w / h, h / w) <= 2.0)

    res = scan_pool(url, q, 0.7, filters=filters)
    want, everything = brute_force(parts, q, 0.7, keep), brute_force(parts, q, 0.7)
    for got, w, e, dropped in zip(res.candidates, want, everything, res.filtered):
        assert 0 < len(w) < len(e)
        assert_same(got, w)
        assert dropped == len(e) - len(w)


def test_filter_on_a_missing_column_or_null_value(tmp_path):
    parts, centers = pool_parts()
    no_wm = [(i, t, m.drop_columns(["pwatermark"])) for i, t, m in parts]
    url = write_laion_layout(str(tmp_path / "a"), no_wm)
    with pytest.raises(PoolError, match="filter max_pwatermark=0.5 needs metadata column 'pwatermark'"):
        scan_pool(url, queries_near(centers), 0.8, filters={"max_pwatermark": 0.5})
    with pytest.raises(ValueError, match="unknown filter"):
        CandidateFilters.coerce({"max_nsfw": 0.1})
    meta = pa.table({"punsafe": pa.array([0.1, None, 0.9], pa.float64())})
    assert CandidateFilters(max_punsafe=0.5).mask(meta).tolist() == [True, False, False]


def test_rejected_rows_are_skipped_and_recorded(tmp_path):
    parts, centers = pool_parts()
    q = queries_near(centers, p=4)
    txt = parts[1][1].copy()
    hits = brute_force(parts, q, 0.7)
    victim = next(h for hs in hits for h in hs if h[1] == "1")[2]  # a row that would be a candidate
    txt[victim, 3] = np.nan
    txt[7] = 0
    parts[1] = (parts[1][0], txt, parts[1][2])
    url = write_laion_layout(str(tmp_path), parts)
    report = validate(url, DIM, on_bad="reject")
    assert sorted(report.bad_ids) == sorted([f"id1-{victim:04d}", "id1-0007"])

    for skip in (report, None):  # with the report, or found by the scan itself
        res = scan_pool(url, q, 0.7, skip=skip)
        got_ids = {i for c in res.candidates for i in c.column("id").to_pylist()}
        assert f"id1-{victim:04d}" not in got_ids
        assert res.rejects.sort_by("row").to_pydict()["id"] == sorted(["id1-0007", f"id1-{victim:04d}"])
        reasons = dict(zip(res.rejects.column("id").to_pylist(), res.rejects.column("error").to_pylist()))
        assert reasons == {f"id1-{victim:04d}": BAD_NONFINITE, "id1-0007": BAD_ZERO}
        assert set(res.rejects.column("stage").to_pylist()) == {"pool_validate" if skip else "pool_scan"}
        assert res.scanned == 800 - 2


def test_query_width_and_kind_are_checked(tmp_path):
    parts, _ = pool_parts()
    url = write_laion_layout(str(tmp_path), [(None, t, m) for _, t, m in parts])
    with pytest.raises(PoolError, match="queries have width 4 but the pool's text embeddings have 16"):
        scan_pool(url, np.ones((1, 4), np.float32), 0.5)
    with pytest.raises(PoolError, match="no image embeddings"):
        scan_pool(url, np.ones((1, DIM), np.float32), 0.5, kind="image")


def test_memory_pool_scans_image_embeddings(tmp_path):
    parts, _ = pool_parts(ids=False)
    url = f"memory://scan-{uuid.uuid4().hex}"
    try:
        write_laion_layout(url, parts)
        img = np.concatenate([p[0] for p in parts]).astype(np.float64)
        q = normalize_queries(img[[5, 420]])
        res = scan_pool(url, q, 0.6, kind="image", block_rows=64)
        ref = [[(f"{p}:{r}", str(p), r) for p in range(3) for r in range(len(parts[p][0]))] for _ in q]
        sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ q.T.astype(np.float64)
        for qi, got in enumerate(res.candidates):
            above = [i for i in range(len(img)) if sims[i, qi] > 0.6]
            order = sorted(above, key=lambda i: (-sims[i, qi], ref[qi][i][0]))
            assert got.column("id").to_pylist() == [ref[qi][i][0] for i in order]
            assert got.column("id")[0].as_py() == ("0:5" if qi == 0 else "1:120")  # the row itself, similarity 1
    finally:
        storage.remove(url)


# ---------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cpu2():
    """A local 2-CPU Ray on 127.0.0.1 for this module (reused if one is already connected)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_scan_equals_local_scan(ray_cpu2, tmp_path):
    parts, centers = pool_parts(seed=4, sizes=(300, 411, 89, 250))
    q = queries_near(centers, p=5)
    url = write_laion_layout(str(tmp_path), parts)
    skip = {"2": {10: "manual"}}
    local = scan_pool(url, q, 0.72, block_rows=100, filters={"max_punsafe": 0.7}, max_candidates=12, skip=skip)
    distributed = scan_pool_ray(url, q, 0.72, block_rows=100, filters={"max_punsafe": 0.7}, max_candidates=12,
                                skip=skip, num_tasks=4)
    for a, b in zip(local.candidates, distributed.candidates):
        assert a.num_rows > 0
        assert a.equals(b)
    assert distributed.filtered == local.filtered and distributed.truncated == local.truncated
    assert distributed.scanned == local.scanned == 1049
    assert distributed.rejects.column("id").to_pylist() == local.rejects.column("id").to_pylist() == ["id2-0010"]


# -------------------------------------------------------------------------------- faiss


@pytest.fixture(scope="module")
def clustered_pool(tmp_path_factory):
    """20k × 64 fp16 vectors in 50 clusters, and 20 queries near cluster centres (~300 rows above 0.8 each)."""
    rng = np.random.default_rng(11)
    dim, n = 64, 20_000
    centers = rng.standard_normal((50, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, 50, n)] + 0.08 * rng.standard_normal((n, dim))
    parts = []
    for i, (s, e) in enumerate(((0, 8000), (8000, 20_000))):
        meta = pa.table({"url": [f"u{i}/{r}" for r in range(e - s)], "caption": [f"c{r}" for r in range(e - s)]})
        parts.append((None, x[s:e].astype(np.float16), meta))
    url = write_laion_layout(str(tmp_path_factory.mktemp("clustered")), parts)
    q = normalize_queries(centers[:20] + 0.03 * rng.standard_normal((20, dim)))
    return url, q


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_faiss_index_recall_and_mapping(clustered_pool, tmp_path, index_type):
    url, q = clustered_pool
    out = str(tmp_path / index_type)
    info = build_index(url, out, index_type=index_type, M=16)
    assert info["rows"] == 20_000 and info["parts"] == [{"part": "0", "offset": 0, "rows": 8000},
                                                        {"part": "1", "offset": 8000, "rows": 12000}]
    assert measure_recall(url, out, q, threshold=0.8, k=2000) >= 0.9  # top-k, then threshold
    assert measure_recall(url, out, q, threshold=0.8, k=None) >= 0.9  # range search
    # the measure is not vacuous: starving the search (1 list of 512, or a beam of 4) loses hits
    assert measure_recall(url, out, q, threshold=0.8, k=None, nprobe=1, ef_search=4) < 0.7
    exact = scan_pool(url, q[:3], 0.8)
    approx = search_index(out, q[:3], 0.8, k=2000)
    for e, a in zip(exact.candidates, approx.candidates):
        assert a.num_rows > 50
        sims = a.column("similarity").to_numpy()
        assert (sims > 0.8).all() and (np.diff(sims) <= 0).all()
        # every index hit maps back to the right row: same id, url and similarity as the exact scan
        by_id = {i: (u, s) for i, u, s in zip(e.column("id").to_pylist(), e.column("url").to_pylist(),
                                              e.column("similarity").to_pylist())}
        for i, u, s in zip(a.column("id").to_pylist(), a.column("url").to_pylist(), sims):
            assert by_id[i][0] == u and by_id[i][1] == pytest.approx(s, abs=1e-5)


def test_range_search_and_tiny_k(clustered_pool, tmp_path):
    url, q = clustered_pool
    out = str(tmp_path / "ivf")
    build_index(url, out, index_type="ivf", nlist=64, nprobe=16)
    ranged = search_index(out, q[:2], 0.8, k=None)
    topk = search_index(out, q[:2], 0.8, k=10)
    assert all(t.num_rows == 10 for t in topk.candidates) and topk.truncated == [True, True]
    for r, t in zip(ranged.candidates, topk.candidates):
        assert r.num_rows > 10 and as_rows(t) == as_rows(r)[:10]


def test_pool_index_report_counts_vectors_and_measures_recall_on_held_out_queries(clustered_pool, tmp_path):
    from pixelmill.tasks.regularization import build_index_and_report

    url, _ = clustered_pool
    out = str(tmp_path / "ivf")
    report = build_index_and_report(url, out, index_type="ivf", nprobe=4, threshold=0.8)
    assert "20000 vectors" in report and "?" not in report
    recall = float(report.split("recall vs the exact scan above 0.8:")[1].split()[0])
    assert "32 held-out queries" in report
    q, sources = held_out_queries(url, "text", sample=32)
    assert len(sources) == 32 and {s.split(":")[0] for s in sources} == {"0", "1"}  # drawn from the whole pool
    # no query is a vector of the pool: nothing is that close, and its source row is at the set cosine
    assert scan_pool(url, q, 0.99).counts == [0] * 32
    near = scan_pool(url, q, 0.9)
    for t, src in zip(near.candidates, sources):
        sims = dict(zip(t.column("id").to_pylist(), t.column("similarity").to_pylist()))
        assert sims[src] == pytest.approx(0.95, abs=2e-3)
    assert recall == pytest.approx(measure_recall(url, out, q, 0.8, sample=None, exclude=sources), abs=5e-4)
    assert 0.0 < recall < 1.0  # nprobe=4 of 512 lists misses neighbours, which held-out queries show


def test_pool_index_report_does_not_let_queries_find_themselves(tmp_path):
    """Isolated vectors: no row has a neighbour above the threshold, so there is no recall to report
    (pool vectors as their own queries would report 1.000)."""
    from pixelmill.tasks.regularization import build_index_and_report

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype(np.float16)
    url = write_laion_layout(str(tmp_path / "pool"),
                             [(None, x, pa.table({"url": [f"u{i}" for i in range(2000)]}))])
    report = build_index_and_report(url, str(tmp_path / "hnsw"), index_type="hnsw", threshold=0.85)
    assert "2000 vectors" in report
    assert "not measurable" in report and "1.000" not in report


FILTERS = {"max_punsafe": 0.5, "max_pwatermark": 0.8, "min_width": 300, "min_height": 200, "max_aspect": 2.0}


def test_index_search_applies_filters_and_max_candidates_like_the_exact_scan(tmp_path):
    parts, centers = pool_parts(seed=7)
    q = queries_near(centers, p=4)
    assert margin_ok(parts, q, 0.7)
    url = write_laion_layout(str(tmp_path / "pool"), parts)
    out = str(tmp_path / "ivf")
    build_index(url, out, index_type="ivf", nlist=4, nprobe=4)  # every list visited: the search is exhaustive
    for max_candidates in (None, 5):
        exact = scan_pool(url, q, 0.7, filters=FILTERS, max_candidates=max_candidates)
        approx = search_index(out, q, 0.7, k=None, filters=FILTERS, max_candidates=max_candidates)
        unfiltered = search_index(out, q, 0.7, k=None)
        for e, a, u in zip(exact.candidates, approx.candidates, unfiltered.candidates):
            assert 0 < e.num_rows < u.num_rows
            assert [r[:3] for r in as_rows(a)] == [r[:3] for r in as_rows(e)]
            np.testing.assert_allclose(a.column("similarity").to_numpy(), e.column("similarity").to_numpy(),
                                       atol=1e-5)
            assert a.column("url").to_pylist() == e.column("url").to_pylist()
        assert approx.filtered == exact.filtered and min(approx.filtered) > 0
        assert approx.truncated == exact.truncated == [max_candidates is not None] * 4
    with pytest.raises(PoolError, match="needs metadata column 'pwatermark'"):
        no_wm = write_laion_layout(str(tmp_path / "nowm"), [(i, t, m.drop_columns(["pwatermark"]))
                                                             for i, t, m in parts])
        search_index(out, q, 0.7, k=None, filters={"max_pwatermark": 0.5}, pool_url=no_wm)


def test_index_built_for_another_embedding_kind_is_refused(tmp_path):
    parts, centers = pool_parts(seed=7)
    url = write_laion_layout(str(tmp_path / "pool"), parts)
    out = str(tmp_path / "image-index")
    build_index(url, out, kind="image", index_type="ivf", nlist=4, nprobe=4)
    q = queries_near(centers, p=2)
    with pytest.raises(ValueError, match="built over image embeddings, but the search asks for text"):
        search_index(out, q, 0.7, k=None, kind="text")
    assert len(search_index(out, q, 0.0, k=None, kind="image").candidates) == 2


def _clip_pool(tmp_path, clip: str, prompt: str, n: int = 240, seed: int = 3) -> str:
    """A LAION-layout pool in the tiny CLIP's width whose text vectors scatter around ``prompt``'s embedding."""
    rng = np.random.default_rng(seed)
    center = embed_prompts([prompt], clip)[0].astype(np.float64)
    txt = center + rng.uniform(0.0, 1.5, (n, 1)) * rng.standard_normal((n, len(center))) / np.sqrt(len(center))
    img = rng.standard_normal((n, len(center)))
    meta = pa.table({"id": [f"r{i:04d}" for i in range(n)], "url": [f"https://x/{i}.png" for i in range(n)],
                     "caption": [f"c{i}" for i in range(n)], "punsafe": rng.random(n),
                     "width": rng.integers(100, 1200, n), "height": rng.integers(100, 1200, n)})
    return write_laion_layout(str(tmp_path / "pool"), [(img.astype(np.float16), txt.astype(np.float16), meta)],
                              clip_model=clip)


def test_retrieval_with_an_index_honours_filters_max_candidates_and_embedding(tiny_models, tmp_path):
    from pixelmill.config import RetrieveConfig
    from pixelmill.datasets import Dataset
    from pixelmill.tasks.regularization import check_retrieve_inputs, write_candidates

    clip, prompt = tiny_models["clip"], "a photo of a dog"
    url = _clip_pool(tmp_path, clip, prompt)
    build_index(url, str(tmp_path / "text-index"), kind="text", index_type="ivf", nlist=2, nprobe=2)
    build_index(url, str(tmp_path / "image-index"), kind="image", index_type="ivf", nlist=2, nprobe=2)
    filters = {"max_punsafe": 0.5, "min_width": 300}
    cfg = RetrieveConfig(prompts=[prompt], pool=url, output=str(tmp_path / "out"), threshold=0.7,
                         clip_model=clip, index=str(tmp_path / "text-index"), index_k=1000, filters=filters,
                         max_candidates=8)
    cfg = check_retrieve_inputs(cfg)
    counts = write_candidates(cfg, {"p0": prompt}, str(tmp_path / "cands"), ("candidates", 1))
    exact = scan_pool(url, embed_prompts([prompt], clip), 0.7, filters=filters, max_candidates=8)
    everything = scan_pool(url, embed_prompts([prompt], clip), 0.7)
    assert everything.candidates[0].num_rows > 8 + exact.filtered[0] and exact.filtered[0] > 0
    got = Dataset.open(str(tmp_path / "cands")).read_shard("p0").sort_by("candidate_rank")
    assert counts == {"p0": 8}
    assert got.column("pool_id").to_pylist() == exact.candidates[0].column("id").to_pylist()

    image_index = cfg.model_copy(update={"index": str(tmp_path / "image-index")})
    with pytest.raises(ValueError, match="index: .* built over image embeddings, but the search asks for text"):
        check_retrieve_inputs(image_index)
    with pytest.raises(ValueError, match="built over image embeddings"):
        write_candidates(image_index, {"p0": prompt}, str(tmp_path / "cands2"), ("candidates", 1))


def test_preflight_suggests_stored_norms_only_where_they_would_speed_the_scan(tiny_models, tmp_path, capsys):
    from pixelmill.config import RetrieveConfig
    from pixelmill.tasks.regularization import check_retrieve_inputs
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    clip = tiny_models["clip"]
    url = _clip_pool(tmp_path, clip, "a photo of a dog")
    many = RetrieveConfig(prompts=[f"a photo of a {w}" for w in "dog cat cow fox owl".split()], pool=url,
                          output=str(tmp_path / "out"), clip_model=clip)
    check_retrieve_inputs(many)
    assert f"1 of 1 pool part(s) have no stored row norms; `pixelmill pool norms {url}`" in capsys.readouterr().out
    check_retrieve_inputs(many.model_copy(update={"prompts": many.prompts[:4]}))  # the compiled kernel's range
    write_pool_norms(url, kinds=["text"])
    check_retrieve_inputs(many)
    assert "norms" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- embedding


def test_pool_embedder_embeds_captions_and_images_and_rejects_bad_rows(tiny_models, tmp_path):
    clip = tiny_models["clip"]
    captions = ["a photo of a dog", "a red car", None, "a cat"]
    images = [encode_image(Image.new("RGB", (40, 30), (200, 10, 10))),
              encode_image(Image.new("RGB", (64, 64), "blue")),
              encode_image(Image.new("RGB", (8, 8), "green")),
              {"bytes": b"not an image", "path": None}]
    batch = pa.table({"id": ["a", "b", "c", "d"], "caption": captions,
                      "image": pa.array(images, IMAGE_TYPE), "shard": ["00000"] * 4})
    stage = PoolEmbedder({"clip_model": clip, "caption_column": "caption", "image_column": "image",
                          "device": "cpu", "batch_size": 2})
    stage.setup()
    out = stage(batch)
    assert out.column("status").to_pylist() == ["ok", "ok", "reject", "reject"]
    assert out.column("error")[2].as_py() == "missing caption in column 'caption'"
    assert out.column("error")[3].as_py().startswith("undecodable")
    assert out.column("stage").to_pylist() == [None, None, "pool_embed", "pool_embed"]
    assert out.schema.field("text_emb").type == pa.binary(2 * 32)  # packed float16 (embedding_array)
    assert out.column("text_emb")[3].as_py() is None and out.column("img_emb")[3].as_py() is None
    text = np.array([np.frombuffer(v, "<f2") for v in out.column("text_emb").to_pylist()[:2]], np.float32)
    img = np.array([np.frombuffer(v, "<f2") for v in out.column("img_emb").to_pylist()[:2]], np.float32)
    assert embedding_matrix(out.column("img_emb"))[1].tolist() == [False, False, True, True]
    assert text.shape == img.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    assert not np.allclose(img[0], img[1], atol=1e-2)  # different images, different embeddings
    prompts = embed_prompts(["a photo of a dog", "a red car"], clip, device="cpu")
    assert prompts.dtype == np.float32
    np.testing.assert_allclose(text, prompts, atol=2e-3)  # the same text model and normalisation

    # the stage's output is a Parquet-layout pool, and a caption finds itself
    ok = out.filter(pc.equal(out.column("status"), "ok"))
    rows = ok.drop_columns(["image", "status", "error", "stage", "shard"])
    url = write_pool_parquet(str(tmp_path / "pool"), rows, clip_model=clip)
    validate(url, expected_dim=prompts.shape[1], kind="image")
    res = scan_pool(url, prompts, 0.99)
    assert [t.column("id").to_pylist() for t in res.candidates] == [["a"], ["b"]]


def test_embed_prompts_refuses_empty_prompts(tiny_models):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        embed_prompts(["a dog", "  "], tiny_models["clip"])


def test_downloads_are_stored_as_jpeg_95_by_default_or_png_and_exported_under_their_format(tmp_path):
    """img2dataset's default (JPEG at quality 95, not PIL's 75), or lossless PNG when asked; the
    storage choice is in the output hash only when it is not the default (hashes made before it hold)."""
    import io
    from pathlib import Path

    from pixelmill.config import RetrieveConfig
    from pixelmill.datasets import DatasetWriter
    from pixelmill.tasks.regularization import IMAGE_SCHEMA, export_custom_diffusion

    base = dict(prompts=["a photo of a dog"], pool=str(tmp_path / "pool"), output=str(tmp_path / "out"))
    default, png = RetrieveConfig(**base), RetrieveConfig(**base, image_format="png")
    assert "image_format" not in default.output_affecting()
    assert png.output_affecting()["image_format"] == "png"
    assert RetrieveConfig(**base, image_quality=80).output_affecting()["image_quality"] == 80
    with pytest.raises(ValueError):
        RetrieveConfig(**base, image_format="gif")

    img = Image.new("RGB", (16, 16), (200, 30, 120))
    jpeg95 = encode_image(img, format="JPEG", quality=95)["bytes"]
    assert Image.open(io.BytesIO(jpeg95)).quantization != Image.open(
        io.BytesIO(encode_image(img, format="JPEG")["bytes"])).quantization  # 95 is not PIL's default

    for fmt, cell in (("jpg", {"bytes": jpeg95, "path": None}), ("png", encode_image(img))):
        url = str(tmp_path / f"images-{fmt}")
        writer = DatasetWriter(url, "regularization_images", 1, {}).open()
        shard = writer.shard("p0")
        rows = [{name: None for name in IMAGE_SCHEMA.names} | {
            "id": f"p0-{i:04d}", "parent_id": "p0", "image": cell, "caption": "a dog", "url": f"http://x/{i}",
            "rank": i} for i in range(2)]
        shard.write(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
        shard.commit(input_rows=1)
        folder = export_custom_diffusion(url, str(tmp_path / f"real-{fmt}"), {"p0": "a photo of a dog"}, 2)
        files = sorted(p.name for p in (Path(folder["a photo of a dog"]) / "images").iterdir())
        assert files == [f"0.{fmt}", f"1.{fmt}"]


def test_a_shard_published_before_a_kill_but_not_recorded_is_replaced_by_the_rerun(tmp_path):
    """The retrieval flow owns its images output (prompts download side by side in other processes,
    which publish their shards and leave the manifest to it): killed after a task published a shard
    and before the flow recorded it, the rerun opens the output and redoes that prompt."""
    from pixelmill.config import RetrieveConfig
    from pixelmill.datasets import Dataset, DatasetWriter, read_manifest
    from pixelmill.flows.retrieve import IMAGES, open_images_output

    cfg = RetrieveConfig.model_validate({"prompts": ["a dog"], "pool": str(tmp_path / "pool"),
                                         "output": str(tmp_path / "out"), "num_images": 1})
    url = str(tmp_path / "out" / "images")
    open_images_output(url, cfg)
    assert read_manifest(url) is not None and read_manifest(url).shards == []
    task = DatasetWriter(url, *IMAGES, cfg.output_affecting()).open(owner=False).shard("p0")
    task.reject(pa.table({"id": ["p0"], "error": ["no candidate"], "stage": ["download"]}))
    task.commit(input_rows=1, record=False)  # ...and the flow is killed here
    rerun = open_images_output(url, cfg)  # no "part files but no manifest" refusal
    assert rerun.committed == set()
    rerun.finish()
    assert not (tmp_path / "out" / "images" / "part-p0.parquet").exists()
    assert Dataset.open(url).complete
