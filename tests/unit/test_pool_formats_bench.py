"""``benchmarks/pool_formats.py`` at a tiny size: every store written, scanned to the same hits, every figure printed.

The figures mean nothing at this size (no timing is asserted); the full run is ``make bench``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_prints_every_format_and_ratio(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pool_formats.py"), "--rows", "3000",
                           "--dim", "32", "--reps", "1", "--workdir", str(tmp_path), "--row-group-rows", "256"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = re.findall(r"^\s+(\S+)\s+([\d.]+) M rows/s\s+ratio to laion\s+([\d.]+)", proc.stdout, re.M)
    names = ["laion", "laion+norms", "parquet-list", "parquet-packed"]
    assert [r[0] for r in rates] == names * 2, proc.stdout
    assert all(float(r[1]) > 0 for r in rates) and float(rates[0][2]) == 1.0
    assert "1 prompt (3 hits" in proc.stdout and "64 prompts (192 hits" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the pools are removed
