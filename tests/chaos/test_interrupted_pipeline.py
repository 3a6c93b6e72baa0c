"""A pipeline killed in its second step resumes there: the first step is skipped whole,
the second resumes at its committed shards, and every row is accounted for once."""

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


def test_killed_pipeline_skips_the_finished_step_and_resumes_the_unfinished_one(cluster, tmp_path, tiny_models):
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=24, seed=11)
    import_folder(str(tmp_path / "files"), str(tmp_path / "images"), num_buckets=8)
    ids = Dataset.open(str(tmp_path / "images")).to_table(["id"])["id"].to_pylist()
    edit = dict(model=tiny_models["img2img"], prompt="an oil painting of {caption}", strength=0.5, steps=4,
                resolution=64, batch_size=2, placement={"workers": 1})
    first, second = tmp_path / "first", tmp_path / "second"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"steps": [
        {"name": "first", "uses": "edit", "with": {**edit, "input": str(tmp_path / "images"), "output": str(first)}},
        {"name": "second", "uses": "edit", "with": {**edit, "input": "${steps.first.output}", "output": str(second),
                                                     "image_column": "edited_image",  # an edit's output column
                                                     "prompt": "a watercolor of {caption}"}},
    ]}))
    env = dict(os.environ, **cluster)
    cmd = [sys.executable, "-m", "pixelmill.cli", "run", str(pipeline), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 400
    committed: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        m = read_manifest(str(second))
        committed = m.shard_names() if m else []
        if committed:
            break
        time.sleep(0.1)
    assert committed, f"the second step committed no shard before the deadline (rc {proc.poll()})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Dataset.open(str(first)).complete
    m = read_manifest(str(second))
    assert not m.complete, "the pipeline finished before it could be killed; the test proves nothing"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["first"]["shards_run"] == []  # the finished step: every shard skipped
    assert len(summary["first"]["shards_skipped"]) == len(Dataset.open(str(first)).shard_names())
    assert set(summary["second"]["shards_skipped"]) >= set(committed)
    assert not set(summary["second"]["shards_run"]) & set(committed)
    report = account(ids, Dataset.open(str(first)))
    assert report.ok, str(report)
    first_ids = Dataset.open(str(first)).to_table(["id"])["id"].to_pylist()
    report = account(first_ids, Dataset.open(str(second)))
    assert report.ok and report.outputs == len(ids), str(report)
