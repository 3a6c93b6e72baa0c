"""Fault tests: a bulk edit killed mid-run resumes from its committed shards, losing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pixelmill.datasets import Dataset, account, read_manifest
from tests.helpers.edit_inputs import sample_dataset, sdedit_config

# A second case of "the CLI SIGKILLed mid-run" for the bulk edit (the golden cases kill every flow once
# under `make test`; tests/chaos/test_cancel.py stops an edit mid-run and resumes it): `make sweep`.
pytestmark = [pytest.mark.slow, pytest.mark.sweep]


def test_killed_run_resumes_and_accounts_for_every_row(cluster, tmp_path, tiny_models):
    images, ids = sample_dataset(tmp_path, n=30, corrupt=2, seed=5, buckets=8)
    out = tmp_path / "out"
    cfg = sdedit_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out),
                        "an oil painting of {caption}")
    env = dict(os.environ, **cluster)
    cmd = [sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    committed: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        m = read_manifest(str(out))
        committed = m.shard_names() if m else []
        if committed:
            break
        time.sleep(0.2)
    assert committed, "no shard was committed before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    m = read_manifest(str(out))
    assert not m.complete, "the run finished before it could be killed; the test proves nothing"
    # Killed mid-run: every data file a folder reader can see is a committed shard.
    assert {f.stem.removeprefix("part-") for f in out.glob("part-*.parquet")} == set(m.shard_names())
    assert len(m.shard_names()) < len(Dataset.open(images).shard_names())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["shards_skipped"]) >= set(committed)
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    assert ds.num_rows == 30 and ds.rejects().num_rows == 2
