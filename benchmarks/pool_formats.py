"""Exact-scan rate of one pool stored each way pixelmill reads, against LAION's own layout, in one run.

The same ``--rows`` × ``--dim`` fp16 unit vectors (with a few rows per prompt planted above
the 0.85 threshold) are written to a temporary folder as:

* ``laion``: LAION's released layout (``text_emb/text_emb_0.npy`` + metadata Parquet), the baseline;
* ``laion+norms``: the same with ``pixelmill pool norms`` run on it (stored row norms);
* ``parquet-list``: a Parquet-layout pool with a ``list<float16>`` embedding column (what
  ``pixelmill pool build`` wrote before 2026-12-05);
* ``parquet-packed``: a Parquet-layout pool with the packed ``fixed_size_binary`` column that
  ``pixelmill pool build`` writes now (``embedding_array(packed=True)``), stored uncompressed.

Each is scanned whole by ``scan_pool`` (the code a Ray scan task runs on its ranges, in this
process; threads from ``OMP_NUM_THREADS``) with 1 and with 64 prompts, rounds alternating the
formats; each figure is the median over ``--reps`` rounds after a warm-up, and every scan must
find the same hits. The files are read through the page cache (the machine's memory holds
them), so the figures are read-and-decode rates, not disk rates. Prints rows/s and the ratio to
the ``laion`` layout.

    python benchmarks/pool_formats.py [--rows 500000 --dim 512 --reps 3 --row-group-rows N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_scan import make_pool  # noqa: E402 - the scan benchmark's planted pool, shared

THRESHOLD = 0.85
PROMPTS = (1, 64)


def write_pools(root: Path, x: np.ndarray, row_group_rows: int | None = None) -> dict[str, str]:
    """The four stores of ``x`` (see the module docstring); returns name → pool URL.

    ``row_group_rows``: rewrite the Parquet stores' files with row groups of this many rows (a
    pool written by ``pixelmill pool build`` has one per stage call, a few hundred rows).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelmill.datasets.pool import embedding_array, write_laion_layout, write_pool_parquet
    from pixelmill.datasets.writer import compression_of
    from pixelmill.tasks.retrieval.norms import write_pool_norms

    n = len(x)
    meta = pa.table({"id": [f"r{i}" for i in range(n)], "url": [f"http://127.0.0.1/{i}.png" for i in range(n)],
                     "caption": ["a caption"] * n})
    pools = {"laion": str(root / "laion"), "laion+norms": str(root / "laion-norms")}
    for url in pools.values():
        write_laion_layout(url, [(None, x, meta)])
    write_pool_norms(pools["laion+norms"])
    for name, packed in (("parquet-list", False), ("parquet-packed", True)):
        pools[name] = write_pool_parquet(str(root / name), meta.append_column(
            "text_emb", embedding_array(x, np.float16, packed=packed)))
        for f in Path(pools[name]).glob("part-*.parquet") if row_group_rows else ():
            table = pq.read_table(f)
            pq.write_table(table, f, row_group_size=row_group_rows, compression=compression_of(table.schema))
    return pools


def folder_bytes(url: str) -> int:
    return sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to write the pools (default: a temporary folder)")
    ap.add_argument("--row-group-rows", type=int, default=None,
                    help="rows per Parquet row group (default: one per file, as write_pool_parquet writes)")
    args = ap.parse_args(argv)

    from pixelmill.tasks.retrieval import normalize_queries, scan_pool

    rng = np.random.default_rng(1)
    queries = normalize_queries(rng.standard_normal((max(PROMPTS), args.dim), dtype=np.float32))
    root = Path(tempfile.mkdtemp(prefix="pixelmill-pool-formats-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        pools = write_pools(root, make_pool(args.rows, args.dim, queries, planted=3), args.row_group_rows)
        groups = f"row groups of {args.row_group_rows:,} rows" if args.row_group_rows else "one row group per file"
        print(f"pools: {args.rows:,} rows × {args.dim} fp16, written in {time.perf_counter() - t0:.1f}s under {root}; "
              f"Parquet {groups}; {os.cpu_count()} CPUs; threshold {THRESHOLD}")
        for name, url in pools.items():
            print(f"  {name:<15} {folder_bytes(url) / 2**20:8.1f} MiB")
        times: dict[tuple[str, int], list[float]] = {}
        hits: dict[int, set[int]] = {}
        for p in PROMPTS:
            q = queries[:p]
            for url in pools.values():  # warm-up: imports, page cache, compiled kernel
                found = sum(t.num_rows for t in scan_pool(url, q, THRESHOLD).candidates)
                hits.setdefault(p, set()).add(found)
            for _ in range(args.reps):
                for name, url in pools.items():
                    t1 = time.perf_counter()
                    scan_pool(url, q, THRESHOLD)
                    times.setdefault((name, p), []).append(time.perf_counter() - t1)
        if any(len(h) != 1 for h in hits.values()):
            raise SystemExit(f"the formats found different hits: {hits}")
        for p in PROMPTS:
            base = float(np.median(times[("laion", p)]))
            print(f"\n{p} prompt{'s' if p > 1 else ''} ({hits[p].pop()} hits; median of {args.reps}):")
            for name in pools:
                t = float(np.median(times[(name, p)]))
                print(f"  {name:<15} {args.rows / t / 1e6:8.3f} M rows/s   ratio to laion {base / t:5.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
