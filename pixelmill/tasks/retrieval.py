"""Regularization retrieval, pool side: embed prompts, scan a pool, build and query faiss indices.

Custom Diffusion keeps pool rows whose caption's CLIP text embedding has cosine
similarity above 0.85 to the class prompt. The exact scan here reads every vector once
for all prompts together (``block @ queries.T``), upcasting fp16 storage to fp32 in
cache-sized sub-blocks: numpy's own fp16 arithmetic is ~50× slower than fp32 BLAS, and
a whole-block fp32 copy would double the memory traffic. torch does the upcast (its
copy is vectorised, numpy's cast is not), single-threaded per caller; one-prompt scans
spread sub-blocks over a few Python threads (see ``_scores_torch``). Similarities are computed in
fp32 as ``dot / ‖row‖`` (queries are unit vectors) and compared strictly with the
threshold rounded to fp32, so a row exactly at the threshold is never a candidate.

Rows that can never be scored (NaN/Inf values, all-zero or null vectors) are never
matched, and the scan reports them as rejects; rows a :class:`ValidationReport` lists
are skipped and reported the same way.

``scan_pool`` runs in this process; ``scan_pool_ray`` splits the pool's block ranges
across Ray tasks that each open the pool from its URL and read their own ranges (only
URLs, ranges and the small query matrix travel), then merges. faiss indices
(``build_index``, ``search_index``, ``measure_recall``) trade exactness for speed on
pools too large to scan per request.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixelmill.datasets import storage
from pixelmill.datasets.pool import (
    BAD_NONFINITE,
    BAD_ZERO,
    DEFAULT_BLOCK_ROWS,
    REJECT_ROWS_SCHEMA,
    VALIDATE_STAGE,
    BlockRange,
    Pool,
    PoolError,
    ValidationReport,
    as_skip,
    embedding_array,
    norms_of,
    torch_module,
    torch_single_thread,
    upcast_into,
)
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, Stage

SUB_ROWS = 4096
SCAN_STAGE = "pool_scan"
DEFAULT_COLUMNS = ("url", "caption")
HIT_COLUMNS = ("id", "part", "row", "similarity")
INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"

Kind = Literal["text", "image"]

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


def _encode_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[s:s + batch_size]).to(device)
            emb = model.encode_text(tokens).float()
            out.append((emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def embed_prompts(prompts: list[str], clip_model: str, device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """CLIP text embeddings of prompts, L2-normalised fp32, one row per prompt.

    Uses the same tokenizer, model and normalisation as :class:`PoolEmbedder`, so a
    prompt equal to a pool caption scores 1.0 against it (up to the pool's fp16 storage).

    Args:
        prompts: the class prompts.
        clip_model: local folder or open_clip name (see ``models.loading.load_clip``).
        device: torch device (``cpu``, ``cuda``, ``auto``).
        batch_size: prompts encoded at a time.

    Raises:
        ValueError: no prompts, or an empty prompt.
    """
    from pixelmill.models.loading import load_clip

    if not prompts:
        raise ValueError("no prompts to embed")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty")
    model, _, tokenizer = load_clip(clip_model, device=device)
    return _encode_texts(model, tokenizer, list(prompts), batch_size)


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


# ----------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class CandidateFilters:
    """Metadata filters applied to rows above the threshold (LAION's columns).

    A row whose filter column is null fails that filter: an unknown NSFW score is not a
    low one. Setting a filter on a pool without its column is an error.

    Args:
        max_punsafe: keep rows with ``punsafe <= max_punsafe``.
        max_pwatermark: keep rows with ``pwatermark <= max_pwatermark``.
        min_width: keep rows with ``width >= min_width``.
        min_height: keep rows with ``height >= min_height``.
        max_aspect: keep rows with ``max(w/h, h/w) <= max_aspect``.
    """

    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_width: int | None = None
    min_height: int | None = None
    max_aspect: float | None = None

    COLUMNS: ClassVar[dict[str, tuple[str, ...]]] = {
        "max_punsafe": ("punsafe",),
        "max_pwatermark": ("pwatermark",),
        "min_width": ("width",),
        "min_height": ("height",),
        "max_aspect": ("width", "height"),
    }

    @classmethod
    def coerce(cls, value: CandidateFilters | Mapping[str, Any] | None) -> CandidateFilters:
        """Filters from a dict (e.g. a config section), an instance, or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.COLUMNS)
        if unknown:
            raise ValueError(f"unknown filter(s) {', '.join(sorted(unknown))}; known: {', '.join(cls.COLUMNS)}")
        return cls(**{k: v for k, v in value.items() if v is not None})

    def active(self) -> dict[str, float]:
        """The filters that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def columns(self) -> list[str]:
        """Metadata columns the set filters read."""
        return list(dict.fromkeys(c for k in self.active() for c in self.COLUMNS[k]))

    def check(self, pool: Pool) -> None:
        """Raise :class:`PoolError` when a set filter's column is missing from the pool."""
        for name, value in self.active().items():
            for column in self.COLUMNS[name]:
                if column not in pool.metadata_columns:
                    raise PoolError(
                        f"filter {name}={value} needs metadata column {column!r}, which pool {pool.url} "
                        f"lacks (it has: {', '.join(pool.metadata_columns)})"
                    )

    def mask(self, meta: pa.Table) -> np.ndarray:
        """Booleans, True where a row passes every set filter."""
        keep = np.ones(meta.num_rows, bool)

        def col(name: str) -> pa.ChunkedArray:
            return pc.cast(meta.column(name), pa.float64())

        def apply(cond: pa.ChunkedArray | pa.Array) -> None:
            keep[:] &= pc.fill_null(cond, False).to_numpy(zero_copy_only=False)

        a = self.active()
        if "max_punsafe" in a:
            apply(pc.less_equal(col("punsafe"), a["max_punsafe"]))
        if "max_pwatermark" in a:
            apply(pc.less_equal(col("pwatermark"), a["max_pwatermark"]))
        if "min_width" in a:
            apply(pc.greater_equal(col("width"), a["min_width"]))
        if "min_height" in a:
            apply(pc.greater_equal(col("height"), a["min_height"]))
        if "max_aspect" in a:
            w, h = col("width"), col("height")
            ratio = pc.max_element_wise(pc.divide(w, h), pc.divide(h, w))
            apply(pc.and_(pc.and_(pc.greater(w, 0), pc.greater(h, 0)), pc.less_equal(ratio, a["max_aspect"])))
        return keep


# ------------------------------------------------------------------------------ results

_HITS_SCHEMA = pa.schema([("query", pa.int64()), ("id", pa.string()), ("part", pa.string()),
                          ("row", pa.int64()), ("similarity", pa.float64())])
_SORT = [("query", "ascending"), ("similarity", "descending"), ("id", "ascending")]


@dataclass
class ScanResult:
    """Candidates of a scan or an index search, one table per prompt.

    Args:
        candidates: per prompt, rows ``id, part, row, similarity`` plus the requested
            metadata columns, sorted by similarity (descending), ties by id.
        rejects: pool rows that could not be scored (``id, part, row, error, stage``).
        scanned: rows scored.
        filtered: per prompt, rows above the threshold removed by the metadata filters.
        truncated: per prompt, whether more rows were above the threshold than kept
            (``max_candidates``, or ``k`` for an index search).
        threshold: the threshold used.
        kind: ``text`` or ``image``.
    """

    candidates: list[pa.Table]
    rejects: pa.Table
    scanned: int
    filtered: list[int]
    truncated: list[bool]
    threshold: float
    kind: str

    @property
    def counts(self) -> list[int]:
        """Candidates kept per prompt."""
        return [t.num_rows for t in self.candidates]

    def to_table(self) -> pa.Table:
        """All candidates in one table, with the prompt index in a leading ``query`` column."""
        tables = [t.add_column(0, "query", pa.array([i] * t.num_rows, pa.int64()))
                  for i, t in enumerate(self.candidates)]
        return pa.concat_tables(tables) if tables else _HITS_SCHEMA.empty_table()


def _top_per_query(hits: pa.Table, k: int | None) -> tuple[pa.Table, np.ndarray]:
    """Sort hits by (query, -similarity, id) and keep the first ``k`` of each query.

    Returns:
        ``(kept, queries_that_lost_rows)``.
    """
    hits = hits.sort_by(_SORT)
    if k is None or hits.num_rows == 0:
        return hits, np.zeros(0, np.int64)
    q = hits.column("query").to_numpy()
    first = np.searchsorted(q, q, side="left")
    rank = np.arange(len(q)) - first
    keep = rank < k
    return hits.filter(pa.array(keep)), np.unique(q[~keep])


class _HitAccumulator:
    """Collects hits block by block, pruning to the top ``k`` per query when it grows."""

    def __init__(self, num_queries: int, k: int | None) -> None:
        self.k = k
        self.truncated = np.zeros(num_queries, bool)
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.prune_at = max(1_000_000, 4 * num_queries * (k or 0))

    def add(self, query: np.ndarray, ids: list[str], part: str, rows: np.ndarray, sims: np.ndarray) -> None:
        if not len(query):
            return
        self.tables.append(pa.table({
            "query": pa.array(query, pa.int64()), "id": pa.array(ids, pa.string()),
            "part": pa.array([part] * len(query), pa.string()), "row": pa.array(rows, pa.int64()),
            "similarity": pa.array(sims.astype(np.float64), pa.float64()),
        }, schema=_HITS_SCHEMA))
        self.rows += len(query)
        if self.k is not None and self.rows > self.prune_at:
            self.tables = [self.result()]
            self.rows = self.tables[0].num_rows

    def result(self) -> pa.Table:
        hits = pa.concat_tables(self.tables) if self.tables else _HITS_SCHEMA.empty_table()
        hits, lost = _top_per_query(hits, self.k)
        self.truncated[lost] = True
        return hits


def _attach_metadata(pool: Pool, hits: pa.Table, columns: list[str]) -> pa.Table:
    """Append metadata columns to hits, reading each part's needed rows once."""
    extra = [c for c in columns if c not in HIT_COLUMNS and c != "query"]
    if not extra:
        return hits
    first_part = pool.parts[0].name if pool.parts else None
    if hits.num_rows == 0:
        empty = pool.read_rows(first_part, [], extra) if first_part is not None else pa.table({})
        return pa.table(list(hits.columns) + list(empty.columns), names=hits.column_names + extra)
    parts = np.asarray(hits.column("part").to_pylist(), dtype=object)
    rows = hits.column("row").to_numpy()
    pos = np.zeros(len(rows), np.int64)
    tables, offset = [], 0
    for part in dict.fromkeys(parts.tolist()):
        sel = np.nonzero(parts == part)[0]
        unique, inverse = np.unique(rows[sel], return_inverse=True)
        tables.append(pool.read_rows(part, unique, extra))
        pos[sel] = offset + inverse
        offset += len(unique)
    meta = pa.concat_tables(tables).take(pa.array(pos, pa.int64()))
    return pa.table(list(hits.columns) + list(meta.columns), names=hits.column_names + extra)


def _split_queries(hits: pa.Table, num_queries: int) -> list[pa.Table]:
    q = hits.column("query").to_numpy() if hits.num_rows else np.zeros(0, np.int64)
    bounds = np.searchsorted(q, np.arange(num_queries + 1), side="left")
    body = hits.drop_columns(["query"])
    return [body.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(num_queries)]


def merge_results(results: Sequence[ScanResult], max_candidates: int | None = None) -> ScanResult:
    """Merge partial scans of disjoint row ranges into one result (same prompts, same order).

    Args:
        results: partial results, e.g. one per Ray task.
        max_candidates: keep at most this many per prompt (None: all).
    """
    if not results:
        raise ValueError("nothing to merge")
    num_queries = len(results[0].candidates)
    candidates, truncated = [], []
    for i in range(num_queries):
        table = pa.concat_tables([r.candidates[i] for r in results])
        table = table.sort_by(_SORT[1:])
        cut = max_candidates is not None and table.num_rows > max_candidates
        candidates.append(table.slice(0, max_candidates) if cut else table)
        truncated.append(cut or any(r.truncated[i] for r in results))
    rejects = pa.concat_tables([r.rejects for r in results]).sort_by([("part", "ascending"), ("row", "ascending")])
    return ScanResult(
        candidates=candidates,
        rejects=rejects,
        scanned=sum(r.scanned for r in results),
        filtered=[sum(r.filtered[i] for r in results) for i in range(num_queries)],
        truncated=truncated,
        threshold=results[0].threshold,
        kind=results[0].kind,
    )


# ----------------------------------------------------------------------------- scanner


def _resolve_columns(pool: Pool, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return [c for c in DEFAULT_COLUMNS if c in pool.metadata_columns]
    reserved = [c for c in columns if c in ("part", "row", "similarity", "query")]
    if reserved:
        raise PoolError(f"metadata column name(s) {', '.join(reserved)} clash with candidate columns")
    pool._check_columns(columns)
    return [c for c in dict.fromkeys(columns) if c != "id"]


class ExactScanner:
    """Exact threshold scan of a whole pool for many prompts at once.

    Every vector is read once per scan whatever the number of prompts. Rows above the
    threshold are filtered on metadata, kept per prompt (best ``max_candidates``,
    sorted by similarity then id) and joined with the requested metadata columns.

    Args:
        pool: the pool, or its URL.
        kind: ``text`` (caption embeddings, Custom Diffusion's choice) or ``image``.
        filters: metadata filters (:class:`CandidateFilters` or a dict of its fields).
        columns: metadata columns returned with candidates (default: ``url`` and
            ``caption`` where present).
        max_candidates: keep at most this many per prompt (None: all).
        block_rows: rows read per block.
        sub_rows: rows upcast and multiplied at a time.
    """

    def __init__(
        self,
        pool: Pool | str,
        kind: Kind = "text",
        filters: CandidateFilters | Mapping[str, Any] | None = None,
        columns: Sequence[str] | None = None,
        max_candidates: int | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        sub_rows: int = SUB_ROWS,
    ) -> None:
        self.pool = pool if isinstance(pool, Pool) else Pool.open(pool)
        self.pool._require_kind(kind)
        self.kind = kind
        self.filters = CandidateFilters.coerce(filters)
        self.filters.check(self.pool)
        self.columns = _resolve_columns(self.pool, columns)
        if max_candidates is not None and max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
        self.max_candidates = max_candidates
        self.block_rows = block_rows
        self.sub_rows = sub_rows

    def scan(
        self,
        queries: np.ndarray,
        threshold: float,
        skip: ValidationReport | Mapping[str, Any] | None = None,
        ranges: Sequence[BlockRange] | None = None,
    ) -> ScanResult:
        """Scan the pool (or some of its ranges).

        Args:
            queries: ``(P, d)`` query embeddings (normalised here).
            threshold: similarity a candidate must exceed (strictly).
            skip: rows not to score, recorded as rejects: a :class:`ValidationReport`
                from ``validate(..., on_bad="reject")`` or ``{part: rows}``.
            ranges: only these block ranges (a Ray task's share).

        Raises:
            PoolError: the query width differs from the pool's.
        """
        q = normalize_queries(queries)
        dim = self.pool.dim_of(self.kind)
        if q.shape[1] != dim:
            raise PoolError(f"queries have width {q.shape[1]} but the pool's {self.kind} embeddings have {dim}")
        skip_map = as_skip(skip)
        ranges = list(ranges) if ranges is not None else self.pool.block_ranges(self.kind, self.block_rows)
        num_queries = len(q)
        acc = _HitAccumulator(num_queries, self.max_candidates)
        filtered = np.zeros(num_queries, np.int64)
        rejects: dict[str, list] = {"id": [], "part": [], "row": [], "error": [], "stage": []}
        scanned = 0
        filter_cols = self.filters.columns()
        for r in ranges:
            block = self.pool.read_block(self.kind, r.part, r.start, r.stop)
            mask, skipped = self._skip_mask(skip_map.get(r.part), r.start, len(block))
            hits = scan_block_hits(block.emb, q, threshold, mask, self.sub_rows)
            self._record_rejects(rejects, block, skipped, skip_map.get(r.part), hits)
            unscored = np.union1d(np.union1d(hits.nonfinite, hits.zero), skipped)
            scanned += len(block) - len(unscored)
            qi, rows, sims = hits.query, hits.row, hits.similarity
            if len(qi) and filter_cols:
                unique = np.unique(rows)
                passed = unique[self.filters.mask(self.pool.read_rows(r.part, unique + r.start, filter_cols))]
                keep = np.isin(rows, passed)
                filtered += np.bincount(qi[~keep], minlength=num_queries)
                qi, rows, sims = qi[keep], rows[keep], sims[keep]
            if len(qi):
                acc.add(qi, block.ids_at(rows), r.part, rows + r.start, sims)
        hits_table = _attach_metadata(self.pool, acc.result(), self.columns)
        n = len(rejects["id"])
        reject_table = pa.table(rejects, schema=REJECT_ROWS_SCHEMA) if n else REJECT_ROWS_SCHEMA.empty_table()
        return ScanResult(
            candidates=_split_queries(hits_table, num_queries),
            rejects=reject_table,
            scanned=int(scanned),
            filtered=filtered.tolist(),
            truncated=acc.truncated.tolist(),
            threshold=float(threshold),
            kind=self.kind,
        )

    @staticmethod
    def _skip_mask(part_skip: dict[int, str] | None, start: int, n: int) -> tuple[np.ndarray | None, np.ndarray]:
        if not part_skip:
            return None, np.zeros(0, np.int64)
        rows = np.fromiter(part_skip, np.int64, len(part_skip)) - start
        rows = np.sort(rows[(rows >= 0) & (rows < n)])
        if not len(rows):
            return None, rows
        mask = np.zeros(n, bool)
        mask[rows] = True
        return mask, rows

    @staticmethod
    def _record_rejects(out: dict[str, list], block: Any, skipped: np.ndarray,
                        part_skip: dict[int, str] | None, hits: BlockHits) -> None:
        groups = [(skipped, [part_skip[int(r) + block.start] for r in skipped] if len(skipped) else [],
                   VALIDATE_STAGE)]
        for rows, reason in ((hits.nonfinite, BAD_NONFINITE), (hits.zero, BAD_ZERO)):
            rows = np.setdiff1d(rows, skipped)
            groups.append((rows, [reason] * len(rows), SCAN_STAGE))
        for rows, errors, stage in groups:
            if len(rows):
                out["id"] += block.ids_at(rows)
                out["part"] += [block.part] * len(rows)
                out["row"] += (rows + block.start).tolist()
                out["error"] += errors
                out["stage"] += [stage] * len(rows)


def scan_pool(
    pool_url: str,
    queries: np.ndarray,
    threshold: float,
    kind: Kind = "text",
    filters: CandidateFilters | Mapping[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    columns: Sequence[str] | None = None,
    max_candidates: int | None = None,
    skip: ValidationReport | Mapping[str, Any] | None = None,
) -> ScanResult:
    """Exact threshold scan of a pool in this process (see :class:`ExactScanner`).

    Args:
        pool_url: the pool root (any fsspec URL).
        queries: ``(P, d)`` query embeddings, e.g. from :func:`embed_prompts`.
        threshold: similarity a candidate must exceed (0.85 in Custom Diffusion).
        kind: ``text`` or ``image`` embeddings.
        filters: metadata filters.
        block_rows: rows read per block.
        columns: metadata returned with candidates (default ``url``, ``caption``).
        max_candidates: keep at most this many per prompt (None: all).
        skip: rows not to score (a reject-mode :class:`ValidationReport`).
    """
    with Pool.open(pool_url) as pool:
        scanner = ExactScanner(pool, kind, filters, columns, max_candidates, block_rows)
        return scanner.scan(queries, threshold, skip)


def _scan_task(
    pool_url: str,
    ranges: list[tuple[str, int, int]],
    queries: np.ndarray,
    threshold: float,
    kind: str,
    filters: dict[str, Any],
    columns: list[str],
    max_candidates: int | None,
    skip: dict[str, dict[int, str]],
    sub_rows: int,
) -> ScanResult:
    """One Ray task's share: open the pool from its URL and scan the given ranges."""
    parts = list(dict.fromkeys(r[0] for r in ranges))
    with Pool.open(pool_url, parts=parts) as pool:
        scanner = ExactScanner(pool, kind, filters, columns, max_candidates,  # type: ignore[arg-type]
                               sub_rows=sub_rows)
        return scanner.scan(queries, threshold, skip, [BlockRange(*r) for r in ranges])


def _split_ranges(ranges: list[BlockRange], num_tasks: int) -> list[list[BlockRange]]:
    """Contiguous groups of ranges with about equal row totals."""
    total = sum(r.rows for r in ranges)
    target = total / max(num_tasks, 1)
    groups: list[list[BlockRange]] = [[]]
    acc = 0
    for r in ranges:
        if groups[-1] and acc + r.rows / 2 > target * len(groups) and len(groups) < num_tasks:
            groups.append([])
        groups[-1].append(r)
        acc += r.rows
    return [g for g in groups if g]


def scan_pool_ray(
    pool_url: str,
    queries: np.ndarray,
    threshold: float,
    kind: Kind = "text",
    filters: CandidateFilters | Mapping[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    columns: Sequence[str] | None = None,
    max_candidates: int | None = None,
    skip: ValidationReport | Mapping[str, Any] | None = None,
    num_tasks: int | None = None,
    task_cpus: float = 1.0,
) -> ScanResult:
    """Exact threshold scan split across Ray tasks; same result as :func:`scan_pool`.

    The driver opens the pool only to plan block ranges (file headers and footers) and
    to check columns and filters before any task starts. Each task gets the pool URL and
    a contiguous run of ranges, reads them itself, and returns its best candidates
    with their metadata; the driver merges. Connect to Ray first (``ray.init``).

    Args:
        pool_url: the pool root; every worker must be able to read it.
        queries: ``(P, d)`` query embeddings.
        threshold: similarity a candidate must exceed (strictly).
        kind: ``text`` or ``image`` embeddings.
        filters: metadata filters.
        block_rows: rows read per block (a task gets whole blocks).
        columns: metadata returned with candidates.
        max_candidates: keep at most this many per prompt (None: all).
        skip: rows not to score (a reject-mode :class:`ValidationReport`).
        num_tasks: how many tasks (default: twice the cluster's CPUs, at most one per block).
        task_cpus: CPUs each task claims (the scan uses one core's worth of bandwidth
            per task; BLAS and torch in the task follow Ray's ``OMP_NUM_THREADS``).
    """
    import ray

    raw = np.ascontiguousarray(queries, dtype=np.float32)
    q = normalize_queries(raw)
    with Pool.open(pool_url) as pool:
        scanner = ExactScanner(pool, kind, filters, columns, max_candidates, block_rows)
        dim = pool.dim_of(kind)
        if q.shape[1] != dim:
            raise PoolError(f"queries have width {q.shape[1]} but the pool's {kind} embeddings have {dim}")
        ranges = pool.block_ranges(kind, block_rows)
        resolved_columns = scanner.columns
    if not ranges:
        return scan_pool(pool_url, raw, threshold, kind, filters, block_rows, columns, max_candidates, skip)
    if num_tasks is None:
        num_tasks = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = _split_ranges(ranges, max(1, min(num_tasks, len(ranges))))
    skip_map = as_skip(skip)
    remote = ray.remote(num_cpus=task_cpus)(_scan_task)
    q_ref = ray.put(raw)  # tasks normalise exactly as a local scan does
    refs = []
    for group in groups:
        parts = {r.part for r in group}
        refs.append(remote.remote(
            str(pool_url), [(r.part, r.start, r.stop) for r in group], q_ref, float(threshold), kind,
            scanner.filters.active(), resolved_columns, max_candidates,
            {p: rows for p, rows in skip_map.items() if p in parts}, scanner.sub_rows,
        ))
    return merge_results(ray.get(refs), max_candidates)


# ------------------------------------------------------------------------------- faiss


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
) -> ScanResult:
    """Approximate threshold search with an index from :func:`build_index`.

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
    """
    faiss = _faiss()
    info = read_index_info(index_url)
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
    with Pool.open(pool_url or info["pool_url"]) as pool:
        cols = _resolve_columns(pool, columns)
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
        }, schema=_HITS_SCHEMA).sort_by(_SORT)
        hits = _attach_metadata(pool, hits, cols)
    return ScanResult(
        candidates=_split_queries(hits, num_queries),
        rejects=REJECT_ROWS_SCHEMA.empty_table(),
        scanned=0,
        filtered=[0] * num_queries,
        truncated=truncated,
        threshold=float(threshold),
        kind=info["kind"],
    )


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

    Returns:
        Recall in [0, 1]; NaN when the exact scan finds nothing above the threshold
        (there is nothing to recall, so no number would be honest).
    """
    q = normalize_queries(queries)
    if sample is not None and len(q) > sample:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), size=sample, replace=False))]
    info = read_index_info(index_url)
    exact = scan_pool(pool_url, q, threshold, kind=info["kind"], columns=[])
    approx = search_index(index_url, q, threshold, k=k, columns=[], nprobe=nprobe, ef_search=ef_search,
                          pool_url=pool_url)
    found = total = 0
    for e, a in zip(exact.candidates, approx.candidates):
        want = set(e.column("id").to_pylist())
        total += len(want)
        found += len(want & set(a.column("id").to_pylist()))
    return found / total if total else float("nan")


# ------------------------------------------------------------------------- pool builder


class PoolEmbedder(Stage):
    """Adds CLIP embeddings of captions and/or images to rows, building a Parquet-layout pool.

    Config keys:

    - ``clip_model``: local folder or open_clip name.
    - ``caption_column`` / ``image_column``: what to embed (either may be None, not
      both); they become ``text_emb`` / ``img_emb`` (``list<float16>``, L2-normalised).
    - ``device`` (``auto``), ``batch_size`` (64), ``resolution`` (512: long side after
      safe decoding, before CLIP's own resize and crop), ``max_pixels`` (50 M).

    Every row comes back with ``status``; a missing caption or an image that cannot be
    decoded (or is too large) makes the row a reject with ``error`` and ``stage``, never
    a failed batch.

    Args:
        config: the keys above.
        resources: CPUs/GPUs per worker.
    """

    name = "pool_embed"

    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        if not config.get("caption_column") and not config.get("image_column"):
            raise ValueError("PoolEmbedder needs a caption_column or an image_column (or both)")
        if not config.get("clip_model"):
            raise ValueError("PoolEmbedder needs clip_model")
        self.model: Any = None

    def setup(self) -> None:
        from pixelmill.models.loading import load_clip

        self.model, self.preprocess, self.tokenizer = load_clip(
            self.config["clip_model"], device=self.config.get("device", "auto"),
            dtype=self.config.get("dtype", "float32"),
        )
        self.device = next(self.model.parameters()).device

    def _images(self, images: list[Any]) -> np.ndarray:
        import torch

        with torch.no_grad():
            px = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            px = px.to(next(self.model.parameters()).dtype)
            emb = self.model.encode_image(px).float()
            return (emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()

    def _embed_isolating_failures(self, fn: Any, items: list[Any]) -> list[np.ndarray | str]:
        """Embed a batch; if it fails, retry row by row so one bad row cannot sink the batch."""
        try:
            return list(fn(items))
        except Exception as exc:  # noqa: BLE001 - isolate, then report per row
            if len(items) == 1:
                return [f"embed_failed: {type(exc).__name__}: {exc}"[:500]]
        return [self._embed_isolating_failures(fn, [x])[0] for x in items]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pixelmill.datasets.images import ImageError, normalize_image

        if self.model is None:
            self.setup()
        c = self.config
        cap_col, img_col = c.get("caption_column"), c.get("image_column")
        bs = int(c.get("batch_size", 64))
        n = batch.num_rows
        errors: list[str | None] = [None] * n
        texts: dict[int, str] = {}
        images: dict[int, Any] = {}
        cap_values = batch.column(cap_col).to_pylist() if cap_col else [None] * n
        img_values = batch.column(img_col).to_pylist() if img_col else [None] * n
        for i in range(n):
            if cap_col:
                text = cap_values[i]
                if not isinstance(text, str) or not text.strip():
                    errors[i] = f"missing caption in column {cap_col!r}"
                    continue
                texts[i] = text
            if img_col:
                raw = img_values[i]
                data = raw.get("bytes") if isinstance(raw, dict) else raw
                if raw is not None and isinstance(raw, dict) and data is None and raw.get("path"):
                    try:
                        data = storage.read_bytes(raw["path"])
                    except (OSError, ValueError) as exc:
                        errors[i] = f"unreadable: {exc}"
                        continue
                try:
                    images[i] = normalize_image(data or b"", int(c.get("resolution", 512)),
                                                int(c.get("max_pixels", 50_000_000)))
                except ImageError as exc:
                    errors[i] = str(exc)
        text_emb: dict[int, np.ndarray] = {}
        img_emb: dict[int, np.ndarray] = {}
        for wanted, store, fn in (
            (texts, text_emb, lambda xs: _encode_texts(self.model, self.tokenizer, xs, len(xs))),
            (images, img_emb, self._images),
        ):
            keys = [i for i in wanted if errors[i] is None]
            for s in range(0, len(keys), bs):
                chunk = keys[s:s + bs]
                for i, res in zip(chunk, self._embed_isolating_failures(fn, [wanted[i] for i in chunk])):
                    if isinstance(res, str):
                        errors[i] = res
                    else:
                        store[i] = res
        ok = [e is None for e in errors]
        out = batch.drop_columns([x for x in ("text_emb", "img_emb", "status", "error", "stage")
                                  if x in batch.column_names])
        for column, store, wanted in (("text_emb", text_emb, cap_col), ("img_emb", img_emb, img_col)):
            if wanted:
                out = out.append_column(column, _emb_column(store, ok, n))
        out = out.append_column("status", pa.array([STATUS_OK if k else STATUS_REJECT for k in ok], pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        return out.append_column("stage", pa.array([None if k else self.name for k in ok], pa.string()))


def _emb_column(store: dict[int, np.ndarray], ok: list[bool], n: int) -> pa.Array:
    """A ``list<float16>`` column with the embeddings of ok rows and nulls elsewhere."""
    rows = [i for i in range(n) if ok[i] and i in store]
    if not rows:
        return pa.nulls(n, pa.list_(pa.float16()))
    dense = embedding_array(np.stack([store[i] for i in rows]))
    if len(rows) == n:
        return dense
    index = np.full(n, -1, np.int64)
    index[rows] = np.arange(len(rows))
    return dense.take(pa.array(index, mask=index < 0))
