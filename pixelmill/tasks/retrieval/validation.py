"""Checking a pool before a scan: structure (widths, alignment) and, optionally, every vector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pixelmill.datasets.pool import (
    BAD_NONFINITE,
    BAD_ZERO,
    DEFAULT_BLOCK_ROWS,
    EMB_COLUMNS,
    LAYOUT_PARQUET,
    REJECT_ROWS_SCHEMA,
    VALIDATE_STAGE,
    Kind,
    Pool,
    PoolError,
)
from pixelmill.tasks.retrieval.kernel import bad_rows


@dataclass
class ValidationReport:
    """What :func:`validate` found.

    Args:
        url: the pool.
        kind: the embeddings checked.
        dim: their width.
        num_rows: rows checked.
        parts: number of parts.
        values_checked: whether every vector was read (NaN/Inf, zero and null rows).
        bad: rows that cannot be scored, as a table ``id, part, row, error, stage``.
        warnings: problems that do not stop a scan (e.g. a different CLIP model name).
    """

    url: str
    kind: str
    dim: int
    num_rows: int
    parts: int
    values_checked: bool
    bad: pa.Table = field(default_factory=lambda: REJECT_ROWS_SCHEMA.empty_table())
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no row was found bad."""
        return self.bad.num_rows == 0

    @property
    def bad_ids(self) -> list[str]:
        """Ids of the bad rows, in pool order."""
        return self.bad.column("id").to_pylist()

    def skip(self) -> dict[str, dict[int, str]]:
        """The bad rows by part: ``{part: {row: reason}}``, the form a scan's ``skip`` takes."""
        out: dict[str, dict[int, str]] = {}
        for part, row, err in zip(self.bad.column("part").to_pylist(), self.bad.column("row").to_pylist(),
                                  self.bad.column("error").to_pylist()):
            out.setdefault(part, {})[int(row)] = err
        return out

    def __str__(self) -> str:
        text = f"{self.url}: {self.num_rows} {self.kind} vectors of width {self.dim} in {self.parts} part(s)"
        if self.values_checked:
            text += f", {self.bad.num_rows} bad row(s)"
        return text


def _sample(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (", …" if len(ids) > n else "")


def validate(
    pool: Pool | str,
    expected_dim: int | None,
    kind: Kind = "text",
    on_bad: Literal["error", "reject"] = "error",
    check_values: bool = True,
    clip_model: str | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> ValidationReport:
    """Check a pool before scanning it.

    Structural checks always run and always raise: the embedding width must equal the
    CLIP model's (``expected_dim``) in every part, every part must have its embeddings
    and metadata with equal row counts, and a Parquet-layout pool must be complete.
    With ``check_values``, every vector is read once and rows with NaN/Inf values, all
    zeros or null embeddings are found: ``on_bad="error"`` raises naming how many and
    the first ids; ``on_bad="reject"`` returns them in the report, for the scan to
    skip and record as rejects. (The scanner never scores such rows either, and
    reports any it meets, so ``check_values=False`` is a valid way to save a pass.)

    Args:
        pool: the pool or its URL.
        expected_dim: the CLIP model's embedding width (None: only require one width).
        kind: ``text`` or ``image`` embeddings.
        on_bad: ``error`` or ``reject`` for bad vectors.
        check_values: read every vector (one pass, as costly as a one-prompt scan).
        clip_model: the CLIP model the queries use; a different name recorded in the
            pool is reported as a warning (names can differ for the same weights).
        block_rows: rows read at a time.

    Raises:
        PoolError: a structural problem, or bad vectors with ``on_bad="error"``.
    """
    if on_bad not in ("error", "reject"):
        raise ValueError(f"on_bad must be 'error' or 'reject', got {on_bad!r}")
    pool = pool if isinstance(pool, Pool) else Pool.open(pool)
    pool._require_kind(kind)
    if pool.layout == LAYOUT_PARQUET and not pool.info.get("complete", True):
        raise PoolError(f"pool dataset {pool.url} is incomplete: its producer has not finished "
                        "(its manifest is not marked complete)")
    column = EMB_COLUMNS[kind]
    widths = {p.name: p.emb_dims[kind] for p in pool.parts if kind in p.emb_dims}
    reference = expected_dim if expected_dim is not None else next(iter(widths.values()), 0)
    wrong = {name: w for name, w in widths.items() if w != reference}
    if wrong:
        name, width = next(iter(wrong.items()))
        where = f"part {name}" if len(widths) > 1 else "the pool"
        if expected_dim is not None:
            model = f" ({clip_model})" if clip_model else ""
            raise PoolError(
                f"{column} width {width} in {where} of {pool.url} differs from the CLIP model's "
                f"embedding width {expected_dim}{model}"
                + (f"; {len(wrong)} of {len(widths)} parts differ" if len(wrong) > 1 else "")
            )
        raise PoolError(f"{column} widths differ between parts of {pool.url}: part {name} has {width}, "
                        f"others have {reference}")
    for part in pool.parts:
        error = pool.alignment_error(part, kind)
        if error:
            raise PoolError(f"{pool.url}: {error}")
    warnings = []
    if clip_model and pool.clip_model and clip_model != pool.clip_model:
        warnings.append(f"pool {pool.url} records CLIP model {pool.clip_model!r}, queries use {clip_model!r}")
    report = ValidationReport(pool.url, kind, reference, sum(p.rows for p in pool.parts), len(pool.parts),
                              check_values, warnings=warnings)
    if not check_values:
        return report

    cols: dict[str, list] = {"id": [], "part": [], "row": [], "error": []}
    counts = {BAD_NONFINITE: 0, BAD_ZERO: 0}
    for block in pool.iter_blocks(kind, block_rows):
        nonfinite, zero = bad_rows(block.emb, block.norms)
        for rows, reason in ((nonfinite, BAD_NONFINITE), (zero, BAD_ZERO)):
            if len(rows):
                counts[reason] += len(rows)
                cols["id"] += block.ids_at(rows)
                cols["part"] += [block.part] * len(rows)
                cols["row"] += (rows + block.start).tolist()
                cols["error"] += [reason] * len(rows)
    n = len(cols["id"])
    bad = pa.table({**cols, "stage": [VALIDATE_STAGE] * n}, schema=REJECT_ROWS_SCHEMA)
    report.bad = bad.sort_by([("part", "ascending"), ("row", "ascending")]) if n else bad
    if n and on_bad == "error":
        pieces = []
        for reason, label in ((BAD_NONFINITE, "with NaN/Inf values"), (BAD_ZERO, "all-zero or null")):
            if counts[reason]:
                ids = [i for i, e in zip(cols["id"], cols["error"]) if e == reason]
                pieces.append(f"{counts[reason]} {label} (first ids: {_sample(ids)})")
        raise PoolError(f"{pool.url}: {column} has bad vectors: {'; '.join(pieces)}; "
                        "use on_bad='reject' to skip them and record them as rejects")
    return report


def as_skip(skip: ValidationReport | Mapping[str, Any] | None) -> dict[str, dict[int, str]]:
    """Normalise a scan's ``skip`` argument to ``{part: {row: reason}}``.

    Args:
        skip: a :class:`ValidationReport`, ``{part: rows}``, ``{part: {row: reason}}``, or None.
    """
    if skip is None:
        return {}
    if isinstance(skip, ValidationReport):
        return skip.skip()
    out: dict[str, dict[int, str]] = {}
    for part, rows in skip.items():
        if isinstance(rows, Mapping):
            out[str(part)] = {int(r): str(e) for r, e in rows.items()}
        else:
            out[str(part)] = {int(r): "skipped" for r in np.asarray(rows).reshape(-1)}
    return out
