"""A Ray worker killed mid-stage: the run still finishes, and every input id is in the output
or the rejects exactly once (Ray Data restarts the actor and retries its batch).

The killer finds the stage's actor among the processes of this test session's own Ray head
(never any other Ray on the machine) and SIGKILLs it once a shard has been committed, so
the kill lands in the middle of the stage. ``make test`` kills the bulk edit's actor;
``make sweep`` kills the pool embedder's and the pairs renderer's too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pixelmill.datasets import Dataset, account, read_manifest
from tests.helpers.edit_inputs import sample_dataset, sdedit_config

pytestmark = pytest.mark.slow


def _stage_actors(cluster: dict[str, str], needle: str) -> list[psutil.Process]:
    """Live worker processes of this session's Ray head whose title names ``needle``."""
    head = psutil.Process(int(cluster["PIXELMILL_TEST_RAY_HEAD_PID"]))
    found = []
    for p in head.children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def run_killing_one_worker(cluster: dict[str, str], args: list[str], manifest_dir: Path, needle: str,
                           timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``pixelmill ARGS``; once ``manifest_dir`` has a committed shard, SIGKILL one stage actor.

    Returns the finished process and the pid that was killed.
    """
    env = {**os.environ, **cluster}
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    killed = 0
    deadline = time.monotonic() + timeout
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            m = read_manifest(str(manifest_dir))
            actors = _stage_actors(cluster, needle) if m and m.shards and not m.complete else []
            if actors:
                killed = actors[0].pid
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), killed


def test_bulk_edit_survives_a_killed_actor(cluster, tmp_path, tiny_models):
    images, ids = sample_dataset(tmp_path, n=22, corrupt=2, seed=11, buckets=8)
    out = tmp_path / "out"
    cfg = sdedit_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out),
                        "an oil painting of {caption}")
    done, killed = run_killing_one_worker(cluster, ["edit", str(cfg), "--json"], out, "_StageActor")
    assert killed, "no stage actor was found to kill mid-run; the test proves nothing"
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows_out"] + summary["rejects"] == summary["rows_in"] == len(ids)
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    assert ds.rejects().num_rows == 2, "a row was rejected because its worker died"
