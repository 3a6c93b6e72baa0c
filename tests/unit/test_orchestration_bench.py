"""``benchmarks/orchestration.py`` at a tiny size: every figure printed, every row accounted for.

The figures mean nothing at this size (no timing is asserted); the full run is ``make bench``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    from tests.helpers.benchmarks import load_benchmark

    return load_benchmark("orchestration")


def test_buckets_leave_about_the_asked_shards_non_empty():
    import math

    bench = _bench()
    for rows, shards in ((4000, 1000), (200, 50), (4000, 8)):
        b = bench.buckets_for(rows, shards)
        assert b >= shards and b * (1 - math.exp(-rows / b)) >= shards
        assert (b - 1) * (1 - math.exp(-rows / (b - 1))) < shards or b == shards
    assert bench.buckets_for(10, 50) == 10  # never more buckets than rows


@pytest.mark.slow
def test_a_tiny_run_prints_every_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "orchestration.py"), "--rows", "24",
                           "--shards", "8", "--few", "2", "--rounds", "1", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = re.findall(r"^\s+(few\d*|many\d*)\s+(\d+) shards\s+wall", proc.stdout, re.M)
    assert [r[0] for r in runs] == ["few", "many"], proc.stdout
    shards = {name: int(n) for name, n in runs}
    assert shards["few"] < shards["many"]
    assert "orchestration overhead per extra shard:" in proc.stdout
    assert "Prefect database growth per run" in proc.stdout
