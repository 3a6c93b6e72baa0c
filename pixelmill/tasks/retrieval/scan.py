"""The exact pool scan: :class:`ExactScanner`, in this process or fanned over Ray tasks.

``scan_pool`` runs in this process; ``scan_pool_ray`` splits the pool's block ranges
across Ray tasks that each open the pool from its URL and read their own ranges (only
URLs, ranges and the small query matrix travel), then merges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pixelmill.datasets.pool import (
    BAD_NONFINITE,
    BAD_ZERO,
    DEFAULT_BLOCK_ROWS,
    REJECT_ROWS_SCHEMA,
    VALIDATE_STAGE,
    BlockRange,
    Pool,
    PoolError,
)
from pixelmill.tasks.retrieval.filters import CandidateFilters
from pixelmill.tasks.retrieval.kernel import SUB_ROWS, BlockHits, normalize_queries, scan_block_hits
from pixelmill.tasks.retrieval.results import (
    ScanResult,
    _attach_metadata,
    _HitAccumulator,
    _split_queries,
    merge_results,
)
from pixelmill.tasks.retrieval.validation import ValidationReport, as_skip

SCAN_STAGE = "pool_scan"
DEFAULT_COLUMNS = ("url", "caption")

Kind = Literal["text", "image"]


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
            hits = scan_block_hits(block.emb, q, threshold, mask, self.sub_rows, norms=block.norms)
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
