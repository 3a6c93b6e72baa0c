"""faiss indices over a pool: build, search, and recall against the exact scan.

They trade exactness for speed on pools too large to scan per request. faiss is
imported on first use (the ``faiss`` extra).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.datasets.pool import DEFAULT_BLOCK_ROWS, REJECT_ROWS_SCHEMA, Pool, PoolError
from pixelmill.tasks.retrieval.filters import CandidateFilters
from pixelmill.tasks.retrieval.kernel import SUB_ROWS, normalize_queries, norms_of, torch_single_thread, upcast_into
from pixelmill.tasks.retrieval.results import (
    _HITS_SCHEMA,
    ScanResult,
    _attach_metadata,
    _split_queries,
    _top_per_query,
)
from pixelmill.tasks.retrieval.scan import Kind, _resolve_columns, scan_pool

INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("faiss indices need faiss-cpu: pip install 'pixelmill[faiss]'") from exc
    return faiss


def _unit_rows(emb: np.ndarray, buf_rows: int = SUB_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """fp32 unit copies of the scorable rows of a block, and their indices."""
    x = np.empty(emb.shape, np.float32)
    with torch_single_thread():
        for s in range(0, len(emb), buf_rows):
            upcast_into(emb[s:s + buf_rows], x[s:s + buf_rows])
        norms = norms_of(x) if len(x) else np.zeros(0, np.float32)
    good = np.nonzero(np.isfinite(norms) & (norms > 0))[0]
    x = x[good]
    x /= norms[good, None]
    return x, good


def _part_offsets(pool: Pool) -> list[dict[str, Any]]:
    out, offset = [], 0
    for p in pool.parts:
        out.append({"part": p.name, "offset": offset, "rows": p.rows})
        offset += p.rows
    return out


def build_index(
    pool_url: str,
    out_url: str,
    kind: Kind = "text",
    index_type: Literal["ivf", "hnsw"] = "ivf",
    nlist: int | None = None,
    nprobe: int | None = None,
    M: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
    train_size: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build a faiss inner-product index over a pool's normalised vectors.

    Labels are global row positions (part offset + row), listed in ``index.json`` so
    results map back to ``(part, row)`` and ids. Rows that cannot be normalised (NaN/Inf,
    zero) are left out and counted.

    - ``ivf``: ``IndexIVFFlat`` with ``METRIC_INNER_PRODUCT``; k-means trained on a
      uniform sample (``train_size``, default 256 points per list). ``nlist`` defaults
      to ``4·√rows`` (at most rows/39, faiss' minimum training points per list) and
      ``nprobe`` to ``nlist/8`` (at least 8).
    - ``hnsw``: ``IndexHNSWFlat(d, M, METRIC_INNER_PRODUCT)`` in an ``IndexIDMap``.

    Args:
        pool_url: the pool root.
        out_url: folder receiving ``index.faiss`` and ``index.json``.
        kind: ``text`` or ``image`` embeddings.
        index_type: ``ivf`` or ``hnsw``.
        nlist: IVF lists.
        nprobe: IVF lists visited per query (stored as the search default).
        M: HNSW neighbours per node.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (stored as the search default).
        train_size: IVF training sample size.
        block_rows: rows read at a time.
        seed: training sample seed.

    Returns:
        The ``index.json`` content.
    """
    faiss = _faiss()
    if index_type not in ("ivf", "hnsw"):
        raise ValueError(f"index_type must be 'ivf' or 'hnsw', got {index_type!r}")
    with Pool.open(pool_url) as pool:
        ranges = pool.block_ranges(kind, block_rows)
        dim = pool.dim_of(kind)
        n = sum(r.rows for r in ranges)
        if n == 0:
            raise PoolError(f"pool {pool_url} has no rows to index")
        parts = _part_offsets(pool)
        offsets = {p["part"]: p["offset"] for p in parts}
        params: dict[str, Any]
        if index_type == "ivf":
            nlist = int(nlist or max(1, min(int(4 * math.sqrt(n)), n // 39)))
            nprobe = int(nprobe or min(nlist, max(8, nlist // 8)))
            train_size = int(min(n, train_size or 256 * nlist))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.sort(np.random.default_rng(seed).choice(n, size=train_size, replace=False))
            train, base = [], 0
            for r in ranges:
                sel = sample[(sample >= base) & (sample < base + r.rows)] - base
                if len(sel):
                    x, _ = _unit_rows(np.asarray(pool.read_block(kind, r.part, r.start, r.stop).emb[sel]))
                    train.append(x)
                base += r.rows
            index.train(np.concatenate(train))
            index.nprobe = nprobe
            params = {"nlist": nlist, "nprobe": nprobe, "train_size": train_size, "seed": seed}
        else:
            index = faiss.IndexIDMap(faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT))
            hnsw = faiss.downcast_index(index.index)
            hnsw.hnsw.efConstruction = ef_construction
            hnsw.hnsw.efSearch = ef_search
            params = {"M": M, "ef_construction": ef_construction, "ef_search": ef_search}
        added = 0
        for r in ranges:
            x, good = _unit_rows(pool.read_block(kind, r.part, r.start, r.stop).emb)
            if len(x):
                index.add_with_ids(x, (good + r.start + offsets[r.part]).astype(np.int64))
                added += len(x)
        info = {
            "kind": kind, "type": index_type, "metric": "inner_product", "dim": dim,
            "params": params, "pool_url": str(pool_url), "clip_model": pool.clip_model,
            "rows": added, "excluded_rows": n - added, "parts": parts,
            "index_file": INDEX_FILE, "faiss_version": getattr(faiss, "__version__", "unknown"),
        }
    storage.makedirs(out_url)
    fs, target = storage.resolve(storage.join(out_url, INDEX_FILE))
    with tempfile.TemporaryDirectory(prefix="pixelmill-index-") as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, local)
        fs.put_file(local, target)
    storage.write_text_atomic(storage.join(out_url, INDEX_INFO), json.dumps(info, indent=2) + "\n")
    return info


def read_index_info(index_url: str) -> dict[str, Any]:
    """The ``index.json`` of an index folder."""
    path = storage.join(index_url, INDEX_INFO)
    if not storage.exists(path):
        raise FileNotFoundError(f"{index_url} has no {INDEX_INFO}: not a pixelmill index")
    return json.loads(storage.read_text(path))


def check_index_kind(index_url: str, kind: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index's ``index.json``, after checking it was built over ``kind`` embeddings.

    Raises:
        ValueError: the index holds the other kind (its scores would compare the prompt
            with image vectors where captions were asked for, or the reverse).
    """
    info = read_index_info(index_url) if info is None else info
    built = info.get("kind")
    if built != kind:
        raise ValueError(f"index {index_url} was built over {built} embeddings, but the search asks for {kind} "
                         f"embeddings: rebuild it with `pixelmill pool index --kind {kind}` or set embedding: "
                         f"{built}")
    return info


def _load_index(index_url: str, info: dict[str, Any]) -> Any:
    faiss = _faiss()
    fs, path = storage.resolve(storage.join(index_url, info.get("index_file", INDEX_FILE)))
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)):
        return faiss.read_index(path)
    with tempfile.TemporaryDirectory(prefix="pixelmill-index-") as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        fs.get_file(path, local)
        return faiss.read_index(local)


def search_index(
    index_url: str,
    queries: np.ndarray,
    threshold: float,
    k: int | None = 1000,
    columns: Sequence[str] | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    pool_url: str | None = None,
    kind: Kind | None = None,
    filters: CandidateFilters | Mapping[str, Any] | None = None,
    max_candidates: int | None = None,
) -> ScanResult:
    """Approximate threshold search with an index from :func:`build_index`.

    Filters and ``max_candidates`` act as in the exact scan (:class:`ExactScanner`): hits
    above the threshold that fail a metadata filter are dropped and counted in
    ``filtered``, then the best ``max_candidates`` per prompt are kept (``truncated``).

    Args:
        index_url: the index folder.
        queries: ``(P, d)`` query embeddings (normalised here).
        threshold: similarity a candidate must exceed (strictly, in fp32).
        k: top-k per prompt, then thresholded (``truncated`` flags prompts whose k
            results were all above the threshold); None runs a range search instead.
        columns: metadata returned with candidates (default ``url``, ``caption``).
        nprobe: IVF lists visited (default: the one stored at build time).
        ef_search: HNSW beam width (default: the one stored at build time).
        pool_url: the pool, when it moved since the index was built.
        kind: the embedding kind the caller means (``text``/``image``); an index built
            over the other kind is refused (ValueError). None: whatever the index holds.
        filters: metadata filters (:class:`CandidateFilters` or a dict of its fields).
        max_candidates: keep at most this many per prompt (None: all).
    """
    faiss = _faiss()
    info = read_index_info(index_url)
    if kind is not None:
        check_index_kind(index_url, kind, info)
    filters = CandidateFilters.coerce(filters)
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    q = normalize_queries(queries)
    if q.shape[1] != info["dim"]:
        raise PoolError(f"queries have width {q.shape[1]} but the index holds width {info['dim']}")
    index = _load_index(index_url, info)
    space = faiss.ParameterSpace()
    if info["type"] == "ivf":
        space.set_index_parameter(index, "nprobe", int(nprobe or info["params"]["nprobe"]))
    else:
        ef = int(ef_search or info["params"]["ef_search"])
        faiss.downcast_index(index.index).hnsw.efSearch = max(ef, k or 0)
    thr = np.float32(threshold)
    num_queries = len(q)
    truncated = [False] * num_queries
    if k is None:
        lims, dist, labels = index.range_search(q, float(thr))
        qi = np.repeat(np.arange(num_queries), np.diff(lims.astype(np.int64)))
    else:
        dist, labels = index.search(q, int(k))
        qi = np.repeat(np.arange(num_queries), labels.shape[1])
        dist, labels = dist.reshape(-1), labels.reshape(-1)
        above = (dist > thr) & (labels >= 0)
        truncated = above.reshape(num_queries, -1).all(axis=1).tolist()
    keep = (labels >= 0) & (dist.astype(np.float32) > thr)
    qi, labels, dist = qi[keep], labels[keep], dist[keep]
    parts = info["parts"]
    starts = np.array([p["offset"] for p in parts], np.int64)
    which = np.searchsorted(starts, labels, side="right") - 1
    part_names = np.array([p["part"] for p in parts], dtype=object)[which] if len(which) else np.zeros(0, object)
    rows = labels - starts[which] if len(which) else np.zeros(0, np.int64)
    filtered = np.zeros(num_queries, np.int64)
    with Pool.open(pool_url or info["pool_url"]) as pool:
        cols = _resolve_columns(pool, columns)
        filters.check(pool)
        if filters.active() and len(rows):
            keep = np.zeros(len(rows), bool)
            for part in dict.fromkeys(part_names.tolist()):
                sel = np.nonzero(part_names == part)[0]
                unique, inverse = np.unique(rows[sel], return_inverse=True)
                keep[sel] = filters.mask(pool.read_rows(part, unique, filters.columns()))[inverse]
            filtered = np.bincount(qi[~keep], minlength=num_queries)
            qi, labels, dist, part_names, rows = qi[keep], labels[keep], dist[keep], part_names[keep], rows[keep]
        ids: list[str] = [""] * len(rows)
        for part in dict.fromkeys(part_names.tolist()):
            sel = np.nonzero(part_names == part)[0]
            got = pool.read_rows(part, rows[sel], ["id"]).column("id").to_pylist()
            for j, i in enumerate(sel):
                ids[i] = got[j]
        hits = pa.table({
            "query": pa.array(qi, pa.int64()), "id": pa.array(ids, pa.string()),
            "part": pa.array(part_names.tolist(), pa.string()), "row": pa.array(rows, pa.int64()),
            "similarity": pa.array(dist.astype(np.float32).astype(np.float64), pa.float64()),
        }, schema=_HITS_SCHEMA)
        hits, cut = _top_per_query(hits, max_candidates)
        hits = _attach_metadata(pool, hits, cols)
    for i in cut:
        truncated[int(i)] = True
    return ScanResult(
        candidates=_split_queries(hits, num_queries),
        rejects=REJECT_ROWS_SCHEMA.empty_table(),
        scanned=0,
        filtered=filtered.tolist(),
        truncated=truncated,
        threshold=float(threshold),
        kind=info["kind"],
    )


def held_out_queries(
    pool_url: str,
    kind: Kind = "text",
    sample: int = 32,
    similarity: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Queries for a recall check that are not vectors of the pool, and the rows they came from.

    A pool vector used as its own query finds itself in any index, which inflates recall.
    Each query here starts from a row drawn uniformly (seeded) from the whole pool and is
    turned away from it in a random direction to cosine ``similarity``: it lies in the
    row's neighbourhood, like a prompt near a cluster, but is not in the index. The source
    row must then be left out of both hit lists (``measure_recall(..., exclude=ids)``), so
    only the neighbours an index has to find count.

    Args:
        pool_url: the pool.
        kind: ``text`` or ``image`` embeddings.
        sample: number of queries (fewer when the pool has fewer scorable rows).
        similarity: cosine between a query and its source row, in (0, 1).
        seed: row and direction seed.

    Returns:
        ``(queries (P, d) float32 unit vectors, source row ids)``.
    """
    if not 0.0 < similarity < 1.0:
        raise ValueError(f"similarity must lie in (0, 1), got {similarity}")
    rng = np.random.default_rng(seed)
    with Pool.open(pool_url) as pool:
        ranges = pool.block_ranges(kind, DEFAULT_BLOCK_ROWS)
        n = sum(r.rows for r in ranges)
        pick = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
        vectors, ids, base = [], [], 0
        for r in ranges:
            sel = pick[(pick >= base) & (pick < base + r.rows)] - base
            if len(sel):
                block = pool.read_block(kind, r.part, r.start, r.stop)
                x, good = _unit_rows(np.asarray(block.emb[sel]))
                vectors.append(x)
                ids += block.ids_at(sel[good])
            base += r.rows
        dim = pool.dim_of(kind)
    u = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    w = rng.standard_normal(u.shape)
    w -= (w * u).sum(axis=1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    q = similarity * u.astype(np.float64) + math.sqrt(1.0 - similarity**2) * w
    return q.astype(np.float32), ids


def measure_recall(
    pool_url: str,
    index_url: str,
    queries: np.ndarray,
    threshold: float,
    k: int | None = 1000,
    sample: int | None = 64,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
    exclude: Sequence[str | None] | None = None,
) -> float:
    """Fraction of the exact scan's hits above ``threshold`` that the index also finds.

    Args:
        pool_url: the pool the index was built from.
        index_url: the index folder.
        queries: ``(P, d)`` query embeddings.
        threshold: the similarity threshold.
        k: as in :func:`search_index` (None: range search).
        sample: score at most this many queries, drawn without replacement (None: all).
        seed: query sample seed.
        nprobe: IVF lists visited (default: the stored one).
        ef_search: HNSW beam width (default: the stored one).
        exclude: per query, a pool id counted in neither list (the row a
            :func:`held_out_queries` query was made from), or None.

    Returns:
        Recall in [0, 1]; NaN when the exact scan finds nothing above the threshold
        (there is nothing to recall, so no number would be honest).
    """
    q = normalize_queries(queries)
    skip = list(exclude) if exclude is not None else [None] * len(q)
    if len(skip) != len(q):
        raise ValueError(f"exclude has {len(skip)} entries for {len(q)} queries")
    if sample is not None and len(q) > sample:
        chosen = np.sort(np.random.default_rng(seed).choice(len(q), size=sample, replace=False))
        q, skip = q[chosen], [skip[i] for i in chosen]
    info = read_index_info(index_url)
    exact = scan_pool(pool_url, q, threshold, kind=info["kind"], columns=[])
    approx = search_index(index_url, q, threshold, k=k, columns=[], nprobe=nprobe, ef_search=ef_search,
                          pool_url=pool_url)
    found = total = 0
    for e, a, own in zip(exact.candidates, approx.candidates, skip):
        want = set(e.column("id").to_pylist()) - {own}
        total += len(want)
        found += len(want & set(a.column("id").to_pylist()))
    return found / total if total else float("nan")
