"""Stopping a run: cancelled in the Prefect UI (through its API), or Ctrl-C on the CLI.

Either way the command ends saying what stopped it, its flow run is ``Cancelled`` (not
``Crashed``), no Ray actor or task of the run is left working, and a rerun resumes: the
committed shards are skipped and every input id ends up in the output or the rejects once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pixelmill.datasets import Dataset, account, read_manifest
from tests.helpers.edit_inputs import sample_dataset, sdedit_config

pytestmark = pytest.mark.slow


def _our_runs(api_url: str, before: set) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return [r for r in await client.read_flow_runs(limit=200) if r.id not in before]

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def _cancel(api_url: str, run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    async def go():
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Cancelling(), force=True)

    with temporary_settings({PREFECT_API_URL: api_url}):
        asyncio.run(go())


def _stage_actors(head_pid: int) -> list:
    """The cluster's processes running a stage actor (Ray titles a worker after its actor)."""
    import psutil

    found = []
    for p in psutil.Process(head_pid).children(recursive=True):
        try:
            if "_StageActor" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _gone_within(head_pid: int, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while (left := _stage_actors(head_pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _start(cmd, env):
    """The command as a terminal starts it: its own process group, SIGINT at its default (a test
    run started in the background by a script inherits SIGINT ignored)."""
    return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill_group(proc) -> None:
    """End what the test started, if it is still running (its own process group only)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_first_commit(proc, out, timeout=300) -> set[str]:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        m = read_manifest(str(out))
        if m and m.shards:
            return set(m.shard_names())
        time.sleep(0.1)
    raise AssertionError(f"no shard committed (rc={proc.poll()}): {proc.stderr.read()[-3000:] if proc.poll() else ''}")


def _edit_run(cluster, tmp_path, tiny_models, seed: int):
    """A 16-file edit (one corrupt) held mid-run: once a shard is committed, its actor's next
    call waits while ``hold`` exists (``tests/helpers/hang_edit.py``), so a stop always lands
    mid-run, however loaded the machine (timing alone once let the last shard commit first).
    Returns ids, output, command, env, API URL, the flow runs the server held before, and ``hold``
    (remove it before the rerun: the config, and so its hash, is the same)."""
    import yaml

    images, ids = sample_dataset(tmp_path, n=15, corrupt=1, seed=seed, buckets=8)
    out = tmp_path / "out"
    hold = tmp_path / "hold"
    hold.touch()
    cfg = sdedit_config(tmp_path / "edit.yaml", images, tiny_models["img2img"], str(out),
                        "an oil painting of {caption}", steps=12)
    doc = yaml.safe_load(cfg.read_text())
    doc.update(plugins=["tests.helpers.hang_edit"], method="sdedit_hangs", placement={"workers": 1, "gpus": 0},
               sdedit_hangs={"hang_while": str(hold)})
    cfg.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--json"]
    api_url = cluster["PREFECT_API_URL"]
    return ids, out, cmd, {**os.environ, **cluster}, api_url, {r.id for r in _our_runs(api_url, set())}, hold


def _wait_held(proc, hold, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    reached = hold.with_name(hold.name + ".reached")
    while proc.poll() is None and not reached.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reached.exists(), f"the run never reached its hold (rc={proc.poll()})"


def test_cancel_in_the_prefect_ui_stops_the_run_and_a_rerun_resumes(cluster, tmp_path, tiny_models):
    ids, out, cmd, env, api_url, before, hold = _edit_run(cluster, tmp_path, tiny_models, seed=31)

    # "Cancel" on the flow run in the UI (the same API call the UI makes)
    proc = _start(cmd, env)
    try:
        _wait_first_commit(proc, out)
        _wait_held(proc, hold)
        (run,) = [r for r in _our_runs(api_url, before) if r.state and r.state.is_running()]
        assert any(t.startswith("pixelmill-cli-") for t in run.tags)
        head = int(cluster["PIXELMILL_TEST_RAY_HEAD_PID"])
        assert _stage_actors(head), "no stage actor found working (the check below would prove nothing)"
        t0 = time.monotonic()
        _cancel(api_url, run.id)
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, stderr[-4000:]
    assert f"pixelmill: edit cancelled through the Prefect API (flow run {run.name})" in stderr, stderr[-3000:]
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr.split("pixelmill: edit")[-1]
    assert took < 60, took
    assert not _gone_within(head, 30), "stage actors of the cancelled run are still alive"
    states = {r.id: r.state for r in _our_runs(api_url, before)}
    assert states[run.id].is_cancelled(), states[run.id]
    first = read_manifest(str(out))
    assert first is not None and not first.complete
    claims = out / "__claims" / "runs"  # its claim on the rows it had not edited is released
    assert not (claims.is_dir() and list(claims.glob("*.json"))), sorted(claims.iterdir())

    # a rerun resumes: committed shards skipped, every id once
    hold.unlink()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["shards_skipped"]) >= set(first.shard_names())
    ds = Dataset.open(str(out))
    assert ds.complete
    report = account(ids, ds)
    assert report.ok, str(report)


@pytest.mark.sweep  # the same unwinding as a cancel from the UI (which interrupts the command the same way)
def test_ctrl_c_stops_the_run_marks_it_cancelled_and_a_rerun_resumes(cluster, tmp_path, tiny_models):
    ids, out, cmd, env, api_url, before, hold = _edit_run(cluster, tmp_path, tiny_models, seed=32)
    proc = _start(cmd, env)
    try:
        first = _wait_first_commit(proc, out)
        _wait_held(proc, hold)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
        _, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, stderr[-4000:]
    assert "pixelmill: edit interrupted (Ctrl-C)" in stderr, stderr[-3000:]
    (run,) = _our_runs(api_url, before)
    assert run.state.is_cancelled(), run.state
    assert not _gone_within(int(cluster["PIXELMILL_TEST_RAY_HEAD_PID"]), 30)

    hold.unlink()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert set(json.loads(done.stdout.strip().splitlines()[-1])["shards_skipped"]) >= first
    report = account(ids, Dataset.open(str(out)))
    assert report.ok, str(report)


def test_sigterm_stops_the_run_as_ctrl_c_does_with_status_143(cluster, tmp_path, tiny_models):
    """A service manager's stop or ``kill`` (SIGTERM to the command's process) unwinds as Ctrl-C does:
    before, Ray's handler (put in by ray.init) ended the command with status 15, its run ``Crashed``."""
    _, out, cmd, env, api_url, before, hold = _edit_run(cluster, tmp_path, tiny_models, seed=33)
    proc = _start(cmd, env)
    try:
        _wait_first_commit(proc, out)
        _wait_held(proc, hold)
        os.kill(proc.pid, signal.SIGTERM)  # the process only, as `kill PID` or Kubernetes sends it
        _, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, stderr[-4000:]
    assert "pixelmill: edit stopped (SIGTERM)" in stderr, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    (run,) = _our_runs(api_url, before)
    assert run.state.is_cancelled(), run.state
    assert "stopped (SIGTERM)" in run.state.message
    assert not _gone_within(int(cluster["PIXELMILL_TEST_RAY_HEAD_PID"]), 30)


def test_a_cancel_arriving_as_the_work_returns_is_honoured_not_left_cancelling(cluster):
    """The watcher polls; a cancel set between its last poll and the end of the work must not
    leave the flow run ``Cancelling`` behind a command that says it succeeded."""
    from prefect import flow
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pixelmill.cli.cancel import RunCancelled, cancellable

    api_url = cluster["PREFECT_API_URL"]
    seen = {}

    @flow(name="cancel-race")
    def work():
        run = get_run_context().flow_run
        seen["id"], seen["name"] = run.id, run.name
        _cancel(api_url, run.id)  # "Cancel" clicked while the flow is finishing
        return 1

    with temporary_settings({PREFECT_API_URL: api_url}):
        with pytest.raises(RunCancelled, match="cancelled through the Prefect API"):
            with cancellable("edit", poll=3600):  # the watcher never polls in time: the end check must see it
                work()
    state = {r.id: r.state for r in _our_runs(api_url, set())}[seen["id"]]
    assert state.is_cancelled(), state


_IGNORING_SIGINT = """
import sys, time
from prefect import flow
from pixelmill.cli.cancel import RunCancelled, cancellable

@flow(name="cancel-while-ignoring-sigint")
def work():
    print("started", flush=True)
    while True:  # a long stage: the main thread waits in Python
        time.sleep(0.2)

try:
    with cancellable("edit", poll=0.5):
        work()
except RunCancelled as e:
    print(f"stopped: {e}", flush=True)
    sys.exit(130)
"""


def test_a_cancel_reaches_a_command_started_with_sigint_ignored(cluster):
    """A command started in the background by a script (``cmd &`` in a non-interactive shell, as
    CI runners and cron wrappers do) starts with SIGINT ignored, where Python never turns SIGINT
    into KeyboardInterrupt: the watcher's own interrupt must still stop it (it once did nothing,
    and the run sat in ``Cancelling`` until the server gave up on it)."""
    before = {r.id for r in _our_runs(cluster["PREFECT_API_URL"], set())}
    proc = subprocess.Popen([sys.executable, "-c", _IGNORING_SIGINT], env={**os.environ, **cluster}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()[-3000:] if proc.poll() else ""
        (run,) = [r for r in _our_runs(cluster["PREFECT_API_URL"], before) if r.state and r.state.is_running()]
        _cancel(cluster["PREFECT_API_URL"], run.id)
        out, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err[-3000:]
    assert f"stopped: edit cancelled through the Prefect API (flow run {run.name})" in out
    state = {r.id: r.state for r in _our_runs(cluster["PREFECT_API_URL"], before)}[run.id]
    assert state.is_cancelled(), state
