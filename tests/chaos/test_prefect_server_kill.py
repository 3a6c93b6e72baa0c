"""The Prefect API server killed during a run: the run ends with a clear message (or carries
on), and a rerun against another server completes without duplicates.

The run's results live in its output (manifest and shards), not in Prefect, so losing the
server loses no work: the rerun skips every shard the killed run committed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pixelmill.datasets import Dataset, account, read_manifest
from tests.helpers.edit_inputs import sample_dataset, sdedit_config

pytestmark = pytest.mark.slow


def test_server_killed_mid_run_then_rerun_completes_without_duplicates(cluster, tmp_path, tiny_models):
    from pixelmill.runtime import PrefectServer

    images, ids = sample_dataset(tmp_path, n=19, corrupt=1, seed=21, buckets=8)
    out = tmp_path / "out"
    cfg = sdedit_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out),
                        "a pencil drawing of {caption}")
    cmd = [sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json"]

    server = PrefectServer(tmp_path / "server-home").start()
    # one retry, not Prefect's default five with back-off: the test waits for the failure, not the retries
    env = {**os.environ, "RAY_ADDRESS": cluster["RAY_ADDRESS"], "PREFECT_API_URL": server.api_url,
           "PREFECT_CLIENT_MAX_RETRIES": "1"}
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            m = read_manifest(str(out))
            if m and m.shards:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the server could be killed"
        committed = set(read_manifest(str(out)).shard_names())
        os.kill(server.proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.stop()
    if proc.returncode != 0:  # it may also carry on and finish; either way it must say what happened
        ours = re.findall(r"pixelmill: error: .*", stderr)
        assert ours, stderr[-3000:]
        assert ours[-1].startswith("pixelmill: error: edit failed: lost the Prefect API at " + server.api_url), ours
        assert "rerun the same command to resume" in stderr.split(ours[-1])[-1]

    env["PREFECT_API_URL"] = cluster["PREFECT_API_URL"]  # another server, one that knows nothing of the first run
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["shards_skipped"]) >= committed
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    assert ds.rejects().num_rows == 1
