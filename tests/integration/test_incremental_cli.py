"""Incremental bulk edits through the real CLI, real Ray and a real Prefect server.

A growing folder of raw image files is edited run after run: each run edits only the
files not yet processed (ids are SHA-256 content hashes), a retry re-edits rejects, two
overlapping ``pixelmill edit`` processes split the work by claims, a killed run's claim
is taken over, and ``pixelmill dataset compact`` merges the shards the runs appended.
The default suite runs the two-day case (two edit runs, about 80 s on 2 busy cores);
retries, overlapping processes and the killed run are ``sweep`` tests (the same paths run
in-process in ``tests/unit/flows/test_incremental.py`` and ``tests/unit/datasets/test_claims.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pixelmill.datasets import Dataset, read_manifest
from pixelmill.datasets.claims import OutputLock
from pixelmill.datasets.incremental import processed_table
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _files(folder: Path, n: int, corrupt: int, seed: int, prefix: str) -> dict[str, str]:
    """Draw images into ``folder`` under ``prefix``; their content ids by file name."""
    from pixelmill.samples import draw_sample_images

    tmp = folder.parent / f"draw-{prefix}"
    draw_sample_images(str(tmp), n=n, corrupt=corrupt, seed=seed, size=(48, 40))
    folder.mkdir(exist_ok=True)
    ids = {}
    for f in sorted(tmp.iterdir()):
        if f.suffix != ".txt":
            target = folder / f"{prefix}-{f.name}"
            target.write_bytes(f.read_bytes())
            ids[target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    return ids


def _config(path: Path, inp: Path, out: Path, model: str) -> Path:
    path.write_text(yaml.safe_dump(dict(
        input=str(inp), output=str(out), model=model, prompt="a watercolor painting", strength=0.5, steps=2,
        resolution=64, batch_size=2, placement={"workers": 1, "gpus": 0})))
    return path


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ids_once(out: Path) -> list[str]:
    ds = Dataset.open(str(out))
    ids = ds.to_table(["id"])["id"].to_pylist() + ds.rejects()["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the output or the rejects twice"
    return sorted(ids)


def _popen(cfg: Path, cluster: dict, log: Path) -> subprocess.Popen:
    """``pixelmill edit CFG --json`` in its own process group; stdout to ``log``.out, stderr to ``log``.err."""
    return subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json"],
                            env=dict(os.environ, **cluster), stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"), start_new_session=True)


def _two_days(cluster, tmp_path, tiny_models):
    """Run, add files, run again: the second run edits exactly the new files."""
    inp, out = tmp_path / "incoming", tmp_path / "out"
    first = _files(inp, n=3, corrupt=1, seed=1, prefix="day1")
    cfg = _config(tmp_path / "edit.yaml", inp, out, tiny_models["img2img"])
    s1 = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    assert (s1["rows_in"], s1["rows_out"], s1["rejects"]) == (4, 3, 1)
    assert _ids_once(out) == sorted(first.values())

    second = _files(inp, n=2, corrupt=0, seed=2, prefix="day2")
    s2 = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    assert (s2["rows_in"], s2["rows_out"], s2["rejects"], s2["rows_skipped"]) == (2, 2, 0, 4)
    new_shard = set(read_manifest(str(out)).shard_names()) - set(s1["shards_run"])
    new_ids = Dataset.open(str(out)).read_shard(new_shard.pop(), ["id"])["id"].to_pylist()
    assert sorted(new_ids) == sorted(second.values())  # the second run edited exactly the new files
    all_ids = sorted({*first.values(), *second.values()})
    assert _ids_once(out) == all_ids
    return cfg, out, all_ids


def _compact(out: Path, shards: int, ids: list[str]) -> None:
    assert len(read_manifest(str(out)).shard_names()) == shards
    done = run_cli(["dataset", "compact", str(out), "--rows", "100"])
    assert done.returncode == 0, done.stderr
    m = read_manifest(str(out))
    assert len(m.shard_names()) == 1 and m.num_rows == len(ids) - 1
    assert _ids_once(out) == ids
    assert processed_table(str(out)).num_rows == len(ids)


def test_growing_folder_edits_only_new_files_then_compacts(cluster, tmp_path, tiny_models):
    _, out, ids = _two_days(cluster, tmp_path, tiny_models)
    _compact(out, 2, ids)


@pytest.mark.sweep
def test_retry_rejects_then_compact_then_nothing_new(cluster, tmp_path, tiny_models):
    cfg, out, ids = _two_days(cluster, tmp_path, tiny_models)
    s3 = _summary(run_cli(["edit", str(cfg), "--json", "--retry-rejects"], cluster))
    assert (s3["rows_in"], s3["retried"], s3["rejects"]) == (1, 1, 1)  # undecodable again: one record still
    assert Dataset.open(str(out)).rejects().num_rows == 1
    _compact(out, 3, ids)
    again = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    assert again["rows_in"] == 0 and again["rows_skipped"] == 6


@pytest.mark.sweep
def test_overlapping_runs_split_the_work_by_claims(cluster, tmp_path, tiny_models):
    inp, out = tmp_path / "incoming", tmp_path / "out"
    ids = _files(inp, n=4, corrupt=0, seed=3, prefix="a")
    cfg = _config(tmp_path / "edit.yaml", inp, out, tiny_models["img2img"])
    # Hold the output's lock until both flows have started (planning is their next step):
    # the first to get the lock claims every id; the second plans while that run is live.
    lock = OutputLock(str(out), ttl=600).acquire()
    logs = [tmp_path / "a", tmp_path / "b"]
    procs = [_popen(cfg, cluster, log) for log in logs]
    deadline = time.monotonic() + 240
    while not all("Beginning flow run" in Path(f"{log}.err").read_text() for log in logs):
        ended = [Path(f"{log}.err").read_text()[-3000:] for p, log in zip(procs, logs) if p.poll() is not None]
        assert time.monotonic() < deadline and not ended, f"the runs did not start: {ended}"
        time.sleep(0.2)
    time.sleep(3)
    lock.release()
    results = []
    for p, log in zip(procs, logs):
        p.wait(timeout=600)
        assert p.returncode == 0, Path(f"{log}.err").read_text()[-4000:]
        results.append(json.loads(Path(f"{log}.out").read_text().strip().splitlines()[-1]))
    results.sort(key=lambda s: s["rows_in"])
    assert [s["rows_in"] for s in results] == [0, 4]
    assert results[0]["rows_claimed_elsewhere"] == 4  # the later planner left every id to the live run
    assert _ids_once(out) == sorted(ids.values())
    assert read_manifest(str(out)).complete


@pytest.mark.sweep
def test_killed_run_claim_is_taken_over(cluster, tmp_path, tiny_models):
    inp, out = tmp_path / "incoming", tmp_path / "out"
    ids = _files(inp, n=3, corrupt=0, seed=4, prefix="k")
    cfg = _config(tmp_path / "edit.yaml", inp, out, tiny_models["img2img"])
    proc = _popen(cfg, cluster, tmp_path / "killed")
    deadline = time.monotonic() + 240
    while not list((out / "__claims" / "runs").glob("*.json")):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never claimed its work"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((out / "__claims" / "runs").glob("*.json")), "the killed run's claim should be left behind"
    s = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    assert s["rows_claimed_elsewhere"] == 0 and s["rows_in"] + s["rows_skipped"] == 3
    assert _ids_once(out) == sorted(ids.values())
    assert not list((out / "__claims" / "runs").glob("*"))
    assert not (out / "__staging").exists() or not list((out / "__staging").iterdir())
