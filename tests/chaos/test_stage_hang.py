"""A stage call that hangs: timed out, retried, then its rows rejected with the reason.

Through the real CLI (``pixelmill edit``, a tiny SDEdit model, the session's Ray head and
Prefect server): ``sdedit_hangs`` (tests/helpers/hang_edit.py, loaded through ``plugins:``)
never returns on the rows of one shard. With ``timeouts: {stall: 3, attempts: 2}`` the
watchdog ends the stage's worker twice (Ray Data restarts the actor and retries the
shard), the third call gives the shard's rows back as rejects naming the timeout without
running the stage, and the other shards are edited: every input id once, in the output or
the rejects.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from pixelmill.datasets import Dataset, account, read_manifest
from tests.conftest import run_cli
from tests.helpers.edit_inputs import sample_dataset

pytestmark = pytest.mark.slow


def _hang_config(path: Path, images: str, model: str, output: str, hang_ids: list[str], stall: float,
                 attempts: int, hang_setup_while: str | None = None, setup: float = 1800) -> Path:
    path.write_text(yaml.safe_dump(dict(
        plugins=["tests.helpers.hang_edit"], method="sdedit_hangs", input=images, output=output, model=model,
        prompt="an oil painting of {caption}", strength=0.5, steps=2, resolution=64, batch_size=1,
        sdedit_hangs={"hang_ids": hang_ids, "hang_setup_while": hang_setup_while},
        timeouts={"stall": stall, "attempts": attempts, "setup": setup},
        placement={"workers": 1, "gpus": 0},
    )))
    return path


def test_a_hung_shard_is_timed_out_retried_then_rejected_with_the_reason(cluster, tmp_path, tiny_models):
    images, ids = sample_dataset(tmp_path, n=7, corrupt=0, seed=5, buckets=3)
    source = Dataset.open(images)
    shards = {name: source.read_shard(name, ["id"])["id"].to_pylist() for name in source.shard_names()}
    hung = max(shards, key=lambda s: len(shards[s]))  # the largest shard: its first row edits, then it hangs
    hung_ids = shards[hung]
    assert len(hung_ids) >= 2 and len(hung_ids) < len(ids)
    out = tmp_path / "out"
    cfg = _hang_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out), hung_ids[1:],
                       stall=3, attempts=2)
    t0 = time.monotonic()
    done = run_cli(["edit", str(cfg), "--json"], env_extra=cluster, timeout=300)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == len(ids) == summary["rows_out"] + summary["rejects"]
    assert summary["rejects"] == len(hung_ids) and summary["rejected_by_reason"] == {"timed out": len(hung_ids)}

    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)
    rejects = ds.rejects().to_pylist()
    assert sorted(r["id"] for r in rejects) == sorted(hung_ids)  # the whole shard, its edited first row too
    for r in rejects:
        assert r["error"].startswith(f"timed out: edit of shard {hung} made no progress for stall_timeout=3 s"), r
        assert r["error"].endswith("; gave up after 2 attempt(s)"), r
        assert r["stage"] == "edit"
    edited = ds.to_table(["id", "edited_image", "method"])
    assert sorted(edited["id"].to_pylist()) == sorted(i for i in ids if i not in hung_ids)
    assert set(edited["method"].to_pylist()) == {"sdedit_hangs"} and all(edited["edited_image"].to_pylist())
    assert not (out / f"part-{hung}.parquet").exists() and ds.read_shard(hung).num_rows == 0
    print(f"hung-shard edit run: {elapsed:.1f} s")


@pytest.mark.sweep
def test_a_hung_setup_fails_the_run_naming_the_timeout_and_a_rerun_completes(cluster, tmp_path, tiny_models):
    images, ids = sample_dataset(tmp_path, n=4, corrupt=0, seed=6, buckets=2)
    out = tmp_path / "out"
    flag = tmp_path / "model-store-down"
    flag.touch()
    cfg = _hang_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out), [], stall=60, attempts=2,
                       hang_setup_while=str(flag), setup=8)
    t0 = time.monotonic()
    failed = run_cli(["edit", str(cfg), "--json"], env_extra=cluster, timeout=300)
    print(f"hung set-up run: {time.monotonic() - t0:.1f} s")
    assert failed.returncode == 1, failed.stderr[-4000:]
    assert ("pixelmill: error: edit failed: SetupTimedOut: timed out: the set-up of stage edit ran longer than "
            "timeout=8 s; gave up after 2 attempt(s)") in failed.stderr, failed.stderr[-3000:]
    m = read_manifest(str(out))
    assert m is None or not m.shards

    flag.unlink()  # the model store answers again
    data = yaml.safe_load(cfg.read_text())
    data["timeouts"]["setup"] = 1800  # not hashed: the same output; 8 s is tight for a loaded machine's real set-up
    cfg.write_text(yaml.safe_dump(data))
    done = run_cli(["edit", str(cfg), "--json"], env_extra=cluster, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = account(ids, Dataset.open(str(out)))
    assert report.ok and report.rejected == 0, str(report)
