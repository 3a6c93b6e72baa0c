"""Timeouts: the watchdog itself, and a training job that stops making progress.

The job test runs a real job (tiny LoRA) in its own process, whose steps stop after two:
the watchdog records why on the job and ends the process; the job then resumes from its
last checkpoint and finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixelmill.tasks.watchdog import EXIT_TIMED_OUT, Watchdog


def _expire_log(**kw):
    seen: list = []
    dog = Watchdog(on_expire=lambda r: seen.append(("expire", r)), exit=lambda c: seen.append(("exit", c)),
                   poll=0.02, what="job x", **kw)
    return dog, seen


def _wait(seen, n=2, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_stall_records_the_reason_then_ends_the_process():
    dog, seen = _expire_log(stall=0.3, total=None)
    with dog:
        dog.beat("last finished step 3 of 10")
        _wait(seen)
    assert seen == [("expire", "timed out: job x made no progress for stall_timeout=0.3 s "
                               "(last finished step 3 of 10)"), ("exit", EXIT_TIMED_OUT)]


def test_beats_keep_it_alive_and_the_stall_counts_from_the_first_beat():
    dog, seen = _expire_log(stall=0.3, total=None)
    with dog:
        time.sleep(0.6)  # set-up before the first step is not a stall
        for _ in range(8):
            dog.beat()
            time.sleep(0.1)
        dog.disarm_stall()  # evaluation: no beats, no stall
        time.sleep(0.6)
    assert seen == []


def test_the_total_applies_even_while_beating():
    dog, seen = _expire_log(stall=10, total=0.4)
    with dog:
        deadline = time.monotonic() + 3
        while len(seen) < 2 and time.monotonic() < deadline:
            dog.beat()
            time.sleep(0.05)
    assert seen[0][1].startswith("timed out: job x ran longer than timeout=0.4 s") and seen[1] == ("exit", 75)


def test_off_by_default_starts_no_thread():
    dog, seen = _expire_log(stall=None, total=None)
    with dog:
        assert dog._thread is None


@pytest.mark.usefixtures("one_torch_thread")
def test_a_hung_job_is_ended_recorded_and_resumes_from_its_checkpoint(tiny_models, tmp_path):
    import tests.helpers.hang_method  # noqa: F401 - registers lora_hangs here too
    from pixelmill.config import CampaignConfig
    from pixelmill.samples import draw_concept_images, write_image_dataset
    from pixelmill.tasks.train.job import run_job
    from pixelmill.tasks.train.plan import plan_campaign

    def spec(method: str) -> dict:
        cfg = CampaignConfig.model_validate({
            "output": str(tmp_path / "out"), "model": tiny_models["img2img"],
            "concepts": {"dog": {"instance_data": str(tmp_path / "dog"), "token": "<dog1>", "class_word": "dog"}},
            "defaults": {"resolution": 64, "max_steps": 4, "train_batch_size": 2, "checkpoint_every": 1},
            "jobs": [{"name": "dog", "method": method, "concepts": ["dog"]}],
            "eval": {"prompts": [], "samples_per_prompt": 1},
            "timeouts": {"stall": 3},
        })
        return plan_campaign(cfg).jobs[0].spec

    write_image_dataset(str(tmp_path / "dog"), draw_concept_images(2, seed=0))
    hanging = spec("lora_hangs")
    (tmp_path / "spec.json").write_text(json.dumps(hanging))
    code = "import sys, tests.helpers.hang_method; from pixelmill.tasks.train.job import main; main([sys.argv[1]])"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.json")], cwd=Path(__file__).parents[3],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_TIMED_OUT, proc.stderr[-3000:]
    rec = json.loads((Path(hanging["dir"]) / "job.json").read_text())
    assert rec["status"] == "failed" and rec["timed_out"] is True
    assert rec["error"].startswith("timed out: job dog made no progress for stall_timeout=3 s "
                                   "(last finished step 1 of 4)"), rec["error"]
    assert "rerun the campaign to resume it" in rec["error"]
    assert "made no progress" in proc.stderr  # logged where the worker's log goes
    assert time.monotonic() - t0 < 200

    # the same job without the hang (same folder): resumes from the step-1 checkpoint and finishes
    resumed = run_job({**hanging, "method": "lora"})
    assert resumed["status"] == "finished" and resumed["start_step"] == 1 and resumed["error"] is None
