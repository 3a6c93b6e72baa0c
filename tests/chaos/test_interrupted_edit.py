"""Fault tests: a bulk edit killed mid-run resumes from its committed shards, losing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pixelmill.datasets import Dataset, account, read_manifest

pytestmark = pytest.mark.slow


def test_killed_run_resumes_and_accounts_for_every_row(cluster, tmp_path, tiny_models):
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=30, corrupt=2, seed=5)
    import_folder(str(tmp_path / "files"), str(tmp_path / "images"), num_buckets=8)
    ids = Dataset.open(str(tmp_path / "images")).to_table(["id"])["id"].to_pylist()
    out = tmp_path / "out"
    cfg = tmp_path / "edit.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        input=str(tmp_path / "images"), output=str(out), model=tiny_models["img2img"],
        prompt="an oil painting of {caption}", strength=0.5, steps=6, resolution=64, batch_size=2,
    )))
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
    assert len(m.shard_names()) < len(Dataset.open(str(tmp_path / "images")).shard_names())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["shards_skipped"]) >= set(committed)
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    assert ds.num_rows == 30 and ds.rejects().num_rows == 2
