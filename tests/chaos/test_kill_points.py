"""``make chaos``: every example flow SIGKILLed at seeded points, rerun, and compared byte for byte.

For each golden case (``tests/golden``: the example configs of every flow, run small
through the real CLI, Ray and Prefect server), one uninterrupted run measures how long the
flow runs; then ``PIXELMILL_CHAOS_KILLS`` (default 10) runs are each killed at a seeded
point of that span, counted from the command's start so start-up is a kill point too
(SIGKILL to the CLI's whole process group), and run again. Every resumed
output must equal the golden record (same ids, same row bytes, same artifacts: reports and
timestamps aside, and a video's ``atlas_reused`` flag, which says the resumed run reused
the atlas its killed run had built). A kill point the run had already passed is counted as missed, not as a
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
    Expected,
    _run_and_collect,
    expected,
    golden,
    kill_delay_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

KILLS = int(os.environ.get("PIXELMILL_CHAOS_KILLS", "10"))


# Run provenance, not output: a resumed video job reuses the atlas its killed run had already
# built, and its metrics row says so (``atlas_reused``); an uninterrupted run has False there.
# A resumed training job counts the attempt its killed run made (``attempts`` in the results
# table). Every other column and every file must still match (the table's digest moves with it).
PROVENANCE = {"video": ("metrics.columns.atlas_reused",), "finetune": ("results.columns.attempts",)}


def output_differences(case: str, want: Expected, record) -> list[str]:
    """The differences from the case's expected record (less what this machine does not compare, see
    ``test_golden.Expected``), less its provenance columns (and the digest of a table they alone moved)."""
    differences = want.differences(case, record)
    ignored = PROVENANCE.get(CASES[case]["command"], ())
    own = [d for d in differences if not (ignored and d.startswith(ignored))]
    moved = {d.split(".columns.", 1)[0] for d in differences if ignored and d.startswith(ignored)}
    return [d for d in own if not any(d.startswith(f"{table}.digest") for table in moved)]


@pytest.mark.parametrize("case", ORDER)
def test_killed_at_seeded_points_resumes_to_the_same_output(case, golden, cluster, expected):  # noqa: F811
    cwd, norm = golden
    started = time.monotonic()
    proc, record, _ = _run_and_collect(case, cwd, cluster, norm)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not expected.differences(case, record), f"{case}: the uninterrupted run already differs"
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
        differences = output_differences(case, expected, record)
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


def one(case: str, record) -> Expected:
    """An ``Expected`` holding one case's record, compared exactly."""
    return Expected({case: record}, {}, {})


def test_only_the_provenance_column_and_its_digest_are_forgiven():
    expected_record = {"metrics": {"digest": "a", "columns": {"atlas_reused": "x", "psnr": "p"}}}
    reused = {"metrics": {"digest": "b", "columns": {"atlas_reused": "y", "psnr": "p"}}}
    assert output_differences("video-homography", one("video-homography", expected_record), reused) == []
    also_psnr = {"metrics": {"digest": "b", "columns": {"atlas_reused": "y", "psnr": "q"}}}
    moved = output_differences("video-homography", one("video-homography", expected_record), also_psnr)
    assert [d.split(":")[0] for d in moved] == ["metrics.columns.psnr"]
    assert output_differences("edit-sdedit", one("edit-sdedit", expected_record), reused)  # not forgiven outside video
    expected_results = {"results": {"digest": "a", "columns": {"attempts": "1", "loss": "l"}}}
    resumed = {"results": {"digest": "b", "columns": {"attempts": "2", "loss": "l"}}}
    assert output_differences("finetune", one("finetune", expected_results), resumed) == []
    # only the campaign's attempts are forgiven
    assert output_differences("video-homography", one("video-homography", expected_results), resumed)
