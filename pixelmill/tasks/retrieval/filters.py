"""Metadata filters applied to rows above the similarity threshold (LAION's columns)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixelmill.datasets.pool import Pool, PoolError


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
