"""Deployments end to end: `pixelmill deploy` against the session's Prefect server, runs started from
the Prefect API and executed by a real `prefect worker` process, a failed run notifying a webhook
receiver on 127.0.0.1 through a Prefect automation, and `pixelmill serve` firing an interval
schedule twice on a server whose scheduler loop is shortened (the second run finds nothing new)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.helpers.edit_inputs import sample_dataset
from tests.helpers.processes import interrupt_group

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).with_name("prefect"))
ROOT = Path(__file__).resolve().parents[2]


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST body (the notification's destination)."""

    def __init__(self):
        self.bodies: list[bytes] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                owner.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        return [json.loads(b) for b in self.bodies]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Ctx:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: api_url})
            self.settings.__enter__()
            self.client = get_client(sync_client=True).__enter__()
            return self.client

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Ctx()


def _edit_config(path: Path, images: str, model: str, output: str, **extra) -> Path:
    path.write_text(yaml.safe_dump(dict(input=images, output=output, model=model, prompt="a painting of {caption}",
                                        strength=0.5, steps=2, resolution=32, batch_size=2, **extra)))
    return path


def _logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return "\n".join(log.message for log in client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def _committed(output: str) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in Path(output).glob("part-*.parquet")}


def _deploy(args: list[str], cluster) -> dict[str, dict]:
    r = run_cli(["deploy", *args, "--json"], env_extra=cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    return {d["config"]: d for d in json.loads(r.stdout)}


def _work(pool: str, cluster, runs: int = 1) -> None:
    """A real worker process: polls the pool once, runs what it found, waits for those runs to end."""
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", pool, "--run-once", "--limit", str(runs)],
                            env={**os.environ, **cluster}, capture_output=True, text=True, timeout=400)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]


def test_deploy_registers_schedule_and_limit_and_a_failed_run_notifies(cluster, tiny_models, tmp_path):
    """(a) what `pixelmill deploy` registered, read back through the Prefect client; (d) a run started
    from the API fails on a `prefect worker` process and the automation POSTs to a receiver."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.deployments import run_deployment

    api = cluster["PREFECT_API_URL"]
    images, _ = sample_dataset(tmp_path / "in", n=1, corrupt=0, seed=3, buckets=1)
    doomed, _ = sample_dataset(tmp_path / "doomed", n=1, corrupt=0, seed=4, buckets=1)
    out = str(tmp_path / "out" / "edited")
    tag = uuid.uuid4().hex[:8]
    pool = f"test-pool-{tag}"
    good = _edit_config(tmp_path / "nightly.yaml", images, tiny_models["img2img"], out,
                        schedule={"cron": "0 2 * * *", "timezone": "Europe/Berlin"},
                        deployment={"name": f"nightly-{tag}", "tags": ["test"]})
    bad = _edit_config(tmp_path / "doomed.yaml", doomed, tiny_models["img2img"], str(tmp_path / "out" / "doomed"),
                       deployment={"name": f"doomed-{tag}", "collision_strategy": "cancel_new"})
    receiver = Receiver()
    try:
        # the webhook URL (a secret) from the environment; never printed whole
        listed = _deploy([str(good), str(bad), "--pool", pool, "--notify"], {**cluster, "PIXELMILL_NOTIFY_URL":
                                                                             receiver.url})
        assert receiver.url not in json.dumps(listed)
        assert listed[str(good)]["name"] == f"pixelmill-edit/nightly-{tag}"
        with _client(api) as client:
            dep = client.read_deployment_by_name(f"pixelmill-edit/nightly-{tag}")
            assert str(dep.id) == listed[str(good)]["id"]
            assert dep.entrypoint == "pixelmill.flows.deployed.edit" and dep.pull_steps == []
            assert dep.work_pool_name == pool and client.read_work_pool(pool).type == "process"
            [sched] = dep.schedules
            assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 2 * * *", "Europe/Berlin", True)
            assert dep.global_concurrency_limit.limit == 1
            assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
            assert {"pixelmill", "test"} <= set(dep.tags)
            config = dep.parameters["config"]  # the checked config itself, not a path on this machine
            assert (config["input"], config["output"], config["steps"]) == (images, out, 2)
            doomed_dep = client.read_deployment_by_name(f"pixelmill-edit/doomed-{tag}")
            assert doomed_dep.schedules == []
            assert doomed_dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
            automations = client.read_automations_by_name(f"pixelmill: notify when pixelmill-edit/doomed-{tag} fails")
            assert len(automations) == 1 and automations[0].enabled

        # the doomed config's input disappears after it was deployed: its run fails in preflight
        shutil.rmtree(doomed)
        with _client(api):
            bad_run = run_deployment(f"pixelmill-edit/doomed-{tag}", timeout=0)
        _work(pool, cluster)
        with _client(api) as client:
            state = client.read_flow_run(bad_run.id).state
            assert state.is_failed() and "does not exist" in (state.message or ""), state
        messages = receiver.wait(1, timeout=90)
        assert [m["flow_run_id"] for m in messages] == [str(bad_run.id)], messages
        assert messages[0]["deployment"] == f"doomed-{tag}" and messages[0]["state"] == "Failed"
        assert "does not exist" in messages[0]["message"]
        assert not Path(out).exists()  # the nightly deployment's schedule is at 02:00: nothing ran it
    finally:
        receiver.close()


def test_prefect_yaml_registers_with_prefect_deploy(cluster):
    """cluster/prefect.yaml as its users run it: `prefect deploy --all`, read back from the server."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from pixelmill.cli.deploy import ensure_pool
    from pixelmill.flows.deployed import FLOWS

    env = {**os.environ, **cluster}
    with _client(cluster["PREFECT_API_URL"]):
        ensure_pool("pixelmill")
    r = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file",
                        str(ROOT / "cluster" / "prefect.yaml")], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with _client(cluster["PREFECT_API_URL"]) as client:
        names = [f.name for f in FLOWS.values()]
        deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=names)))}
        wanted = {"pixelmill-edit/nightly", "pixelmill-retrieve/retrieve", "pixelmill-pairs/pairs",
                  "pixelmill-finetune/finetune", "pixelmill-video/video", "pixelmill-run/pipeline-ip2p"}
        assert wanted <= set(deps), sorted(deps)
        nightly = deps["pixelmill-edit/nightly"]
        assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
        assert nightly.parameters == {"config": "configs/edit-sdedit.yaml"}
        assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                       {"directory": "/home/ray/work"}}]
        for name in wanted:
            d = deps[name]
            assert d.work_pool_name == "pixelmill" and d.entrypoint.startswith("pixelmill.flows.deployed.")
            assert d.global_concurrency_limit.limit == 1
            assert d.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
            assert name == "pixelmill-edit/nightly" or not d.schedules


@pytest.mark.sweep
def test_deployed_edit_and_pipeline_started_from_the_api_complete_on_a_worker(cluster, tiny_models, tmp_path):
    """(b) `pixelmill deploy` of a bulk edit and of a chained pipeline (its step file inlined, the second
    step reading the first's output), runs started from the Prefect API, one `prefect worker` runs both."""
    from prefect.deployments import run_deployment

    from pixelmill.datasets import Dataset

    api = cluster["PREFECT_API_URL"]
    images, ids = sample_dataset(tmp_path / "in", n=3, corrupt=0, seed=3, buckets=1)
    out = str(tmp_path / "out" / "edited")
    tag = uuid.uuid4().hex[:8]
    pool = f"test-pool-{tag}"
    cfg = _edit_config(tmp_path / "nightly.yaml", images, tiny_models["img2img"], out,
                       schedule={"cron": "0 2 * * *"}, deployment={"name": f"nightly-{tag}"})
    (tmp_path / "steps").mkdir()
    base = _edit_config(tmp_path / "steps" / "base.yaml", images, tiny_models["img2img"], "unused")
    pipe = tmp_path / "steps" / "chain.yaml"
    pipe.write_text(yaml.safe_dump({
        "schedule": {"interval": 86400}, "deployment": {"name": f"chain-{tag}"},
        "steps": [{"name": "first", "uses": "edit", "config": base.name, "with": {"output": str(tmp_path / "p1")}},
                  {"name": "second", "uses": "edit", "config": base.name,
                   "with": {"input": "${steps.first.output}", "output": str(tmp_path / "p2"),
                            "image_column": "edited_image", "prompt": "a photo"}}]}))
    listed = _deploy([str(cfg), str(pipe), "--pool", pool], cluster)
    assert listed[str(pipe)]["name"] == f"pixelmill-run/chain-{tag}"
    with _client(api):
        runs = [run_deployment(f"pixelmill-edit/nightly-{tag}", timeout=0),
                run_deployment(f"pixelmill-run/chain-{tag}", timeout=0)]
    _work(pool, cluster, runs=2)
    with _client(api) as client:
        for run in runs:
            state = client.read_flow_run(run.id).state
            assert state.is_completed(), (state, _logs(client, run.id)[-3000:])
        assert "3 rows in -> 3 edited + 0 rejected" in _logs(client, runs[0].id)
        assert "pipeline: 2 step(s) done: first, second" in _logs(client, runs[1].id)
    assert sorted(Dataset.open(out).to_table(["id"])["id"].to_pylist()) == sorted(ids)
    for step in ("p1", "p2"):
        assert sorted(Dataset.open(str(tmp_path / step)).to_table(["id"])["id"].to_pylist()) == sorted(ids)


@pytest.mark.sweep
def test_serve_fires_an_interval_schedule_twice_and_the_rerun_finds_nothing_new(cluster, tiny_models, tmp_path):
    """(c) `pixelmill serve` on a server whose scheduler loop runs every 2 s (60 s by default), with
    the scheduler, late-runs, cancellation-cleanup and repossessor (frees slots of crashed runs) on."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    from pixelmill.datasets import Dataset
    from pixelmill.runtime import PrefectServer

    server = PrefectServer(tmp_path / "prefect", env={
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
    }).start()
    images, ids = sample_dataset(tmp_path / "in", n=2, corrupt=0, seed=6, buckets=1)
    out = str(tmp_path / "out")
    cfg = _edit_config(tmp_path / "hourly.yaml", images, tiny_models["img2img"], out,
                       schedule={"interval": 15}, deployment={"name": "every-15s"})
    env = {**os.environ, "RAY_ADDRESS": cluster["RAY_ADDRESS"], "PREFECT_API_URL": server.api_url,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "serve", str(cfg)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        done = []
        first_commit = None
        deadline = time.monotonic() + 300
        with _client(server.api_url) as client:
            while len(done) < 2:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(2)
                try:
                    dep = client.read_deployment_by_name("pixelmill-edit/every-15s")
                except Exception:  # noqa: BLE001 - not registered yet
                    continue
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                    flow_run_filter=FlowRunFilter(), sort=FlowRunSort.EXPECTED_START_TIME_ASC)
                assert not [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()], \
                    [(r.name, r.state) for r in runs]
                done = [r for r in runs if r.state and r.state.is_completed()]
                if len(done) == 1 and first_commit is None:
                    first_commit = _committed(out)
            first, second = done[:2]
            assert first.auto_scheduled and second.auto_scheduled  # fired by the schedule, not by hand
            # concurrency limit 1: the runs never overlapped (a firing during the first run waited)
            assert second.start_time >= first.end_time, (first.start_time, first.end_time, second.start_time)
            waited = {st.name for st in client.read_flow_run_states(second.id)}
            if second.expected_start_time < first.end_time:  # it fell due while the first one worked
                assert "AwaitingConcurrencySlot" in waited, waited
            assert "2 rows in -> 2 edited" in _logs(client, first.id)
            assert "nothing new: 1 shard(s) already committed" in _logs(client, second.id)
        assert first_commit and _committed(out) == first_commit  # the second run rewrote nothing
        assert sorted(Dataset.open(out).to_table(["id"])["id"].to_pylist()) == sorted(ids)
        # a service manager's stop (SIGTERM): serve ends cleanly and pauses its schedule
        proc.terminate()
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        with _client(server.api_url) as client:
            dep = client.read_deployment_by_name("pixelmill-edit/every-15s")
            assert dep.paused or not any(s.active for s in dep.schedules), dep
    finally:
        interrupt_group(proc)
        log.close()
        server.stop()
