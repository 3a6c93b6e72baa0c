"""Scan and search results: per-prompt candidate tables, top-k pruning, metadata joins, merging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pixelmill.datasets.pool import Pool

HIT_COLUMNS = ("id", "part", "row", "similarity")


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
