"""``make chaos``: every example flow SIGKILLed at seeded points, rerun, and compared byte for byte.

For each golden case (``tests/golden``: the example configs of every flow, run small
through the real CLI, Ray and Prefect server), one uninterrupted run measures how long the
flow runs; then ``PIXELMILL_CHAOS_KILLS`` (default 10) runs are each killed at a seeded
point of that span, counted from the command's start so start-up is a kill point too
(SIGKILL to the CLI's whole process group), and run again. Every resumed
output must equal the golden record (same ids, same row bytes, same artifacts: reports and
timestamps aside). A kill point the run had already passed is counted as missed, not as a
pass. The tally per flow is appended to ``$PIXELMILL_CHAOS_REPORT`` (JSON lines) for the
README's reliability table.

``make test`` keeps one kill per flow: the golden test kills one case of each flow once.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.golden.test_golden import (  # noqa: F401 - fixtures used by name
    CASES,
    ORDER,
    _run_and_collect,
    diff_paths,
    expected,
    golden,
    kill_delay_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

KILLS = int(os.environ.get("PIXELMILL_CHAOS_KILLS", "10"))


@pytest.mark.parametrize("case", ORDER)
def test_killed_at_seeded_points_resumes_to_the_same_output(case, golden, cluster, expected):  # noqa: F811
    cwd, norm = golden
    started = time.monotonic()
    proc, record, _ = _run_and_collect(case, cwd, cluster, norm)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not diff_paths(expected[case], record), f"{case}: the uninterrupted run already differs"
    span = time.monotonic() - started
    tally = {"case": case, "command": CASES[case]["command"], "kills": 0, "mid_run": 0, "identical": 0,
             "missed": 0, "span_s": round(span, 1), "points": []}
    failures = []
    for seed in range(1, KILLS + 1):
        delay = kill_delay_for(case, seed, max_delay=span)
        proc, record, kill = _run_and_collect(case, cwd, cluster, norm, delay, from_start=True)
        tally["kills"] += 1
        if not kill["killed"]:
            tally["missed"] += 1
            continue
        tally["mid_run"] += 1
        tally["points"].append(kill["after"])
        if proc.returncode != 0:
            failures.append(f"seed {seed} (killed at {kill['after']} s): rerun failed: {proc.stderr[-1500:]}")
            continue
        differences = diff_paths(expected[case], record)
        if differences:
            failures.append(f"seed {seed} (killed at {kill['after']} s): " + "; ".join(differences[:5]))
        else:
            tally["identical"] += 1
    report = os.environ.get("PIXELMILL_CHAOS_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(tally) + "\n")
    assert not failures, f"{case}: resumed outputs differ:\n" + "\n".join(failures)
    assert tally["mid_run"] >= KILLS // 2, f"{case}: most kill points missed the run: {tally}"


def test_cases_cover_every_flow():
    assert {c["command"] for c in CASES.values()} == {"edit", "pairs", "retrieve", "finetune", "video"}
