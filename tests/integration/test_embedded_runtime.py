"""The embedded runtime as a user meets it: no ``PREFECT_API_URL``, no ``RAY_ADDRESS``.

Every flow command runs once through the real CLI in a subprocess and starts its own Ray
and Prefect server: its runs must be recorded in that server's database (read back
through the API of a server reopened on it), never on Prefect's temporary server; Prefect's
logs must be flushed before the server stops; the command's summary is the last line it
prints. A command killed with SIGKILL takes its server and its Ray with it. A server the
user started (``pixelmill server``) is reused by commands, never stopped by them, and its
UI calls the API on the port it was given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pixelmill.datasets import Dataset
from pixelmill.runtime import PrefectServer, free_port
from tests.helpers.http_server import serve_directory
from tests.helpers.processes import interrupt_group

pytestmark = pytest.mark.slow

# What a command must never print: Prefect's temporary server, logs sent after the server
# stopped, events a Ray worker could not send.
FORBIDDEN = ("Starting temporary server", "Error logging to API", "All connection attempts failed",
             "failed to process item")


def user_env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell has it: no cluster, unbuffered (output in the order written)."""
    drop = {"RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL", "PIXELMILL_RUNTIME_ID",
            "PIXELMILL_TEST_PREFECT_PID"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    # Logs wait in Prefect's queue until the command flushes them (default: sent every 2 s,
    # which makes a command that stops its server before flushing fail only now and then).
    env["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "60"
    env.update(extra)
    return env


def run_user(args: list[str], home: Path, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """``pixelmill ARGS --home HOME``, stdout and stderr as one stream; checks it ended cleanly."""
    proc = subprocess.run([sys.executable, "-m", "pixelmill.cli", *args, "--home", str(home)],
                          env=user_env(**(env or {})), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    for bad in FORBIDDEN:
        assert bad not in out, f"{bad!r} in the output of {args[0]}:\n{out[-6000:]}"
    return out


def last_line(out: str) -> str:
    return out.rstrip().splitlines()[-1]


def api(url: str, path: str, body: dict | None = None):
    """One call to a Prefect server's REST API (POST with a JSON body, GET without)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def runs_at(url: str) -> list[dict]:
    """Every flow run a server holds: flow name, state, parent flow run, task run names."""
    flows = {f["id"]: f["name"] for f in api(url, "/flows/filter", {})}
    runs = api(url, "/flow_runs/filter", {})
    tasks = api(url, "/task_runs/filter", {})
    by_id = {r["id"]: r for r in runs}
    parent_of = {}
    for t in tasks:
        for r in runs:
            if r.get("parent_task_run_id") == t["id"]:
                parent_of[r["id"]] = t["flow_run_id"]

    def last_logs(run_id: str) -> list[str]:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 50}
        return [x["message"] for x in api(url, "/logs/filter", body) if not x.get("task_run_id")]

    return [{"id": r["id"], "flow": flows.get(r["flow_id"]), "state": r["state_type"],
             "parent": by_id.get(parent_of.get(r["id"]), {}).get("id"),
             "tasks": sorted(t["name"].rsplit("-", 1)[0] for t in tasks if t["flow_run_id"] == r["id"]),
             "logs": last_logs(r["id"])}
            for r in runs]


def recorded_runs(home: Path) -> list[dict]:
    """The runs in ``home``'s database, read through the API of a server reopened on it."""
    server = PrefectServer(home).start()
    try:
        return runs_at(server.api_url)
    finally:
        server.stop()


def assert_recorded(home: Path, flow: str, min_tasks: int = 1) -> list[dict]:
    runs = recorded_runs(home)
    mine = [r for r in runs if r["flow"] == flow]
    assert len(mine) == 1, runs
    assert mine[0]["state"] == "COMPLETED" and len(mine[0]["tasks"]) >= min_tasks, mine
    # its last log, written as the flow ended, reached the server before it stopped
    assert any(m.startswith("Finished in state Completed") for m in mine[0]["logs"]), mine[0]["logs"]
    return runs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Four small images."""
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    root = tmp_path_factory.mktemp("images")
    draw_sample_images(str(root / "files"), n=4, seed=2)
    import_folder(str(root / "files"), str(root / "images"))
    return str(root / "images")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_models):
    """A sample pool served on 127.0.0.1, built with `pixelmill pool build` on its own embedded runtime."""
    from pixelmill.samples import write_sample_pool_source

    root = tmp_path_factory.mktemp("pool")
    with serve_directory(str(root)) as srv:
        write_sample_pool_source(str(root / "files"), srv.base_url + "/files", str(root / "src"), per_subject=4)
        home = root / "home"
        out = run_user(["pool", "build", str(root / "src"), "--clip", tiny_models["clip"], "--out",
                        str(root / "pool")], home, root)
        assert last_line(out).startswith("pool: 16 rows embedded"), out[-3000:]
        assert_recorded(home, "pool-build")
        yield str(root / "pool")


@pytest.mark.sweep  # same code path as edit/run; `make sweep` runs it
def test_retrieve_records_its_runs_in_its_own_database(tmp_path, pool):
    cfg = tmp_path / "retrieve.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        prompts=["a photo of a dog"], pool=pool, output=str(tmp_path / "out"), num_images=2, threshold=0.85,
        resolution=64, download=dict(allow_loopback=True, timeout=5, retries=0),
    )))
    home = tmp_path / "home"
    out = run_user(["retrieve", str(cfg), "--json"], home, tmp_path)
    summary = json.loads(last_line(out))
    assert [p["downloaded"] for p in summary["prompts"].values()] == [2]
    assert_recorded(home, "retrieve", min_tasks=2)


@pytest.mark.sweep  # same code path as edit/retrieve/run; `make sweep` runs it
def test_finetune_and_its_retrieval_subflow_record_their_runs_in_its_own_database(tmp_path, pool, tiny_models):
    from pixelmill.samples import draw_concept_images, write_image_dataset

    write_image_dataset(str(tmp_path / "dog"), draw_concept_images(2, seed=0))
    cfg = tmp_path / "campaign.yaml"
    cfg.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "model": tiny_models["img2img"], "clip_model": tiny_models["clip"],
        "retrieve": {"prompts": ["a photo of a dog"], "pool": pool, "num_images": 2, "threshold": 0.85,
                     "resolution": 64, "download": {"allow_loopback": True, "timeout": 5, "retries": 0}},
        "concepts": {"dog": {"instance_data": str(tmp_path / "dog"), "token": "<dog1>", "class_word": "dog",
                             "class_data": "retrieval"}},
        "defaults": {"resolution": 64, "max_steps": 2, "train_batch_size": 1, "checkpoint_every": 2},
        "jobs": [{"name": "dog-ti", "method": "textual_inversion", "concepts": ["dog"]}],
        "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 2},
    }))
    home = tmp_path / "home"
    out = run_user(["finetune", str(cfg), "--json"], home, tmp_path)
    summary = json.loads(last_line(out))
    assert summary["ran"] == ["dog-ti"] and not summary["failed"]
    assert Dataset.open(str(tmp_path / "out" / "retrieval" / "images")).num_rows == 2
    runs = assert_recorded(home, "finetune")
    parent = next(r for r in runs if r["flow"] == "finetune")
    retrieval = [r for r in runs if r["flow"] == "retrieve"]
    assert len(retrieval) == 1 and retrieval[0]["state"] == "COMPLETED" and retrieval[0]["tasks"], runs
    assert retrieval[0]["parent"] == parent["id"]


@pytest.mark.sweep  # same code path as edit/retrieve/run; `make sweep` runs it
def test_video_records_its_runs_in_its_own_database(tmp_path, tiny_models):
    from pixelmill.datasets.videos import write_video_dataset
    from pixelmill.tasks.video.io import encode_video
    from pixelmill.tasks.video.synthetic import synthetic_pan

    encode_video(synthetic_pan(frames=4, size=(48, 32), shift=(2.0, 1.0)).frames, 24, tmp_path / "clips" / "pan.mp4")
    write_video_dataset(str(tmp_path / "videos"), [("pan", "../clips/pan.mp4")])
    cfg = tmp_path / "video.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": str(tmp_path / "videos"), "output": str(tmp_path / "out"), "atlas": {"method": "homography"},
        "edit": {"method": "sdedit", "model": tiny_models["img2img"], "prompt": "a watercolor painting",
                 "strength": 0.5, "steps": 2, "guidance_scale": 1.0},
        "cpus_per_job": 1,
    }))
    home = tmp_path / "home"
    out = run_user(["video", str(cfg)], home, tmp_path)
    assert "1 edited" in out and last_line(out).startswith("report:"), out[-3000:]
    assert_recorded(home, "video")


def test_run_records_the_pipeline_and_its_steps_and_writes_its_api_key_nowhere(tmp_path, images, tiny_models):
    """A pipeline of two steps (instruction pairs from an OpenAI-compatible writer, then an
    InstructPix2Pix bulk edit), run on the embedded runtime with Prefect auth on: the embedded
    server then refuses anonymous calls, and the command's client and its local Ray's workers
    (which run the stage tasks) must send the auth string. The pipeline and its steps are
    recorded as parent and child flow runs in the command's own database.

    Also the planted-key check (security): the writer reads a distinctive key from
    ``$OPENAI_API_KEY`` (only there: the config holds none) and sends it to a loopback server
    that accepts nothing else; afterwards no output file, no file in the home (the Prefect
    database with its flow-run parameters, task runs, logs and artifacts; the server's log),
    no file of Ray's session folder (every worker's and service's log) and nothing the
    command printed holds the key."""
    import secrets
    import shutil
    import tempfile

    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter
    from tests.helpers.leaks import find_secret, regular_files
    from tests.helpers.llm_server import FakeLLMServer, echo

    w = DatasetWriter(str(tmp_path / "captions"), "captions", 1, {"test": 1}).open()
    sw = w.shard("00000")
    sw.write(pa.table({"id": ["c0", "c1", "c2"], "caption": ["a red car on a street", "a cat on a chair",
                                                            "a bowl of apples"]}))
    sw.commit()
    w.finish()
    key = f"sk-planted-{secrets.token_hex(16)}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="pms"))  # short: Ray's socket paths must fit in 107 bytes
    home = tmp_path / "home"
    try:
        with FakeLLMServer(api_key=key, handler=echo()) as server:
            path = tmp_path / "pipeline.yaml"
            path.write_text(yaml.safe_dump({"steps": [
                {"name": "pairs", "uses": "pairs",
                 "with": dict(input=str(tmp_path / "captions"), output=str(tmp_path / "pairs"), seed=4,
                              text=dict(writer="openai",
                                        options=dict(base_url=server.base_url, model="fake-llm", retries=0)),
                              images=dict(model=tiny_models["img2img"], clip_model=tiny_models["clip"],
                                          samples_per_caption=1, steps=2, height=64, width=64, min_direction=-1.0,
                                          min_image_caption=-1.0, min_image_similarity=-1.0))},
                {"name": "ip2p", "uses": "edit",
                 "with": {"input": images, "output": str(tmp_path / "edited"), "method": "instruct_pix2pix",
                          "model": tiny_models["instruct_pix2pix"], "instruction": "make it snowy", "steps": 2,
                          "resolution": 64}},
            ]}))
            out = run_user(["run", str(path), "--limit", "2", "--json"], home, tmp_path,
                           env={"PREFECT_SERVER_API_AUTH_STRING": "pm:s3cret", "OPENAI_API_KEY": key,
                                "RAY_TMPDIR": str(ray_tmp)})
            used = [r.headers.get("authorization") for r in server.requests]
        summaries = json.loads(last_line(out))
        assert summaries["pairs"]["captions"] == 2 and summaries["pairs"]["text_rejects"] == 0
        assert summaries["ip2p"]["rows_out"] == 2 and summaries["ip2p"]["worker"]["node_id"]
        assert Dataset.open(str(tmp_path / "edited")).num_rows == 2
        assert used and set(used) == {f"Bearer {key}"}  # the key was really read and sent
        roots = {"outputs": tmp_path / "pairs", "pixelmill home": home, "Ray session": ray_tmp}
        names = {p.name for root in roots.values() for p in regular_files(root)}
        assert {"_manifest.json", "prefect.db"} <= names  # the search covers manifests and Prefect's records
        assert any(n.startswith("worker-") for n in names), sorted(names)  # ... and Ray's worker logs
        assert find_secret(key, roots, {"config": path.read_text(), "the command's output": out}) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    runs = assert_recorded(home, "pipeline", min_tasks=0)
    top = next(r for r in runs if r["flow"] == "pipeline")
    steps = {r["flow"]: r for r in runs if r["parent"] == top["id"]}
    assert sorted(steps) == ["bulk-edit", "pairs"] and all(r["state"] == "COMPLETED" for r in steps.values()), runs
    assert steps["bulk-edit"]["tasks"] == ["commit-manifest", "edit-shards"]
    assert len(steps["pairs"]["tasks"]) >= 2


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.2)
    return [p for p in procs if not _gone(p)]


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


def _kill_started(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    """End what a test started, if still running: its command and that command's processes (only those)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass


def _listening(p: psutil.Process) -> list:
    try:
        return [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_sigkill_ends_the_embedded_server_and_the_local_ray(tmp_path, tiny_models):
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(tmp_path / "files"), n=8, seed=3)
    import_folder(str(tmp_path / "files"), str(tmp_path / "images"))
    cfg = tmp_path / "edit.yaml"
    cfg.write_text(yaml.safe_dump(dict(input=str(tmp_path / "images"), output=str(tmp_path / "out"),
                                       model=tiny_models["img2img"], prompt="a painting", strength=1.0, steps=50,
                                       resolution=64, batch_size=1)))
    log = open(tmp_path / "cli.log", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "edit", str(cfg), "--home", str(tmp_path / "home")],
                           env=user_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        server, url = None, None
        while time.monotonic() < deadline and cli.poll() is None:
            kids = psutil.Process(cli.pid).children()
            server = server or next((k for k in kids if "server start" in " ".join(k.cmdline())), None)
            if server is not None:
                cmd = server.cmdline()
                url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/api"
                try:
                    if api(url, "/flow_runs/filter", {}):  # the flow has started, so its Ray is up
                        break
                except OSError:
                    pass
            time.sleep(0.5)
        assert cli.poll() is None and server is not None, (tmp_path / "cli.log").read_text()[-4000:]
        tree = psutil.Process(cli.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in tree), _describe(tree)
        # what a command starts for itself (Prefect server, Ray's GCS, raylet, agents, workers; no
        # Ray dashboard) listens on loopback only
        listening = [(c.laddr.ip, c.laddr.port, p.name()) for p in [psutil.Process(cli.pid), *tree]
                     for c in _listening(p)]
        assert listening and all(_loopback(ip) for ip, _, _ in listening), listening

        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        assert not _wait_gone([server], 10), f"the embedded server outlived its command: {_describe([server])}"
        left = _wait_gone(tree, 20)
        assert not left, f"processes the command started outlived it: {_describe(left)}"
    finally:
        _kill_started(cli, tree)
        log.close()


@pytest.fixture(scope="module")
def user_server(tmp_path_factory):
    """`pixelmill server --port P` (P not 4200) on its own home, as a user starts it."""
    root = tmp_path_factory.mktemp("user-server")
    port = free_port()
    while port == 4200:
        port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "server", "--home", str(root / "home"),
                             "--port", str(port)], env=user_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            try:
                if api(url + "/api", "/health") is True:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(1)  # the command records the server once it answers
        server = psutil.Process(proc.pid).children()[0]
        yield {"root": root, "home": root / "home", "url": url, "port": port, "proc": proc, "server": server}
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.terminate()  # a service manager's stop (SIGINT may arrive ignored: see the --ray test)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for p in _wait_gone(tree, 10):
            p.kill()
        log.close()


def test_user_server_ui_calls_the_api_on_its_own_port(user_server):
    settings = None
    for path in ("/ui-settings", "/api/ui-settings"):
        try:
            settings = api(user_server["url"], path)
            break
        except OSError:
            continue
    assert settings is not None
    assert settings["api_url"] == f"http://127.0.0.1:{user_server['port']}/api"


def test_a_command_reuses_the_server_the_user_started_and_leaves_it_running(user_server, tmp_path, images,
                                                                           tiny_models):
    cfg = tmp_path / "edit.yaml"
    cfg.write_text(yaml.safe_dump(dict(input=images, output=str(tmp_path / "out"), model=tiny_models["img2img"],
                                       prompt="a painting", strength=0.5, steps=2, resolution=64)))
    api_url = user_server["url"] + "/api"
    before = {r["id"] for r in runs_at(api_url)}
    # where each command's Ray would keep its session (a short path: Ray's socket paths have a length limit)
    ray_dirs = [Path(tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp")) for _ in range(2)]
    try:
        out = run_user(["edit", str(cfg), "--json", "--limit", "2"], user_server["home"], tmp_path,
                       env={"RAY_TMPDIR": str(ray_dirs[0])})
        assert json.loads(last_line(out))["rows_out"] == 2
        assert list(ray_dirs[0].glob("ray/session_*")), "the probe: a run with work starts Ray under RAY_TMPDIR"
        # the rerun finds nothing to do: recorded all the same, and Ray is never started
        out = run_user(["edit", str(cfg), "--json", "--limit", "2"], user_server["home"], tmp_path,
                       env={"RAY_TMPDIR": str(ray_dirs[1])})
        rerun = json.loads(last_line(out))
        assert rerun["shards_run"] == [] and rerun["rows_skipped"] == 2
        assert not list(ray_dirs[1].glob("ray/session_*")), "a run with nothing to do started Ray"
    finally:
        for d in ray_dirs:
            shutil.rmtree(d, ignore_errors=True)
    new = [r for r in runs_at(api_url) if r["id"] not in before]  # recorded live, by the user's server
    assert [(r["flow"], r["state"]) for r in new] == [("bulk-edit", "COMPLETED")] * 2
    assert not (user_server["home"] / "prefect-server.log").exists(), "the command started a server of its own"
    assert user_server["proc"].poll() is None and user_server["server"].is_running()
    assert api(api_url, "/health") is True


def test_a_server_with_ray_hosts_the_ray_its_homes_commands_join_and_ends_it(tmp_path, images, tiny_models):
    """`pixelmill server --ray`: a command of its home joins the server's Ray (no Ray of its own is
    started: nothing under the command's RAY_TMPDIR), and a service manager's stop (SIGTERM, which
    ray.init also handles) ends the server and its Ray cleanly."""
    home, port = tmp_path / "home", free_port()
    dirs = [Path(tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp")) for _ in range(2)]  # server's, command's
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "server", "--ray", "--ray-cpus", "2",
                             "--home", str(home), "--port", str(port)],
                            env=user_env(RAY_TMPDIR=str(dirs[0])), cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            # as a terminal starts it: a suite started in the background by a script (CI)
                            # hands its children SIGINT ignored, and Python then never raises Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while "ray_address" not in ((home / "server.json").read_text() if (home / "server.json").exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        cfg = tmp_path / "edit.yaml"
        cfg.write_text(yaml.safe_dump(dict(input=images, output=str(tmp_path / "out"), model=tiny_models["img2img"],
                                           prompt="a painting", strength=0.5, steps=2, resolution=64)))
        out = run_user(["edit", str(cfg), "--json", "--limit", "2"], home, tmp_path, env={"RAY_TMPDIR": str(dirs[1])})
        summary = json.loads(last_line(out))
        assert summary["rows_out"] == 2 and summary["worker"]["node_id"] in summary["nodes"]
        assert list(dirs[0].glob("ray/session_*")), "the server started no Ray under its RAY_TMPDIR"
        assert not list(dirs[1].glob("ray/session_*")), "the command started a Ray of its own"
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in tree), _describe(tree)
        proc.terminate()  # SIGTERM: systemd's or docker's stop, `kill`
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log_tail = (tmp_path / "server.log").read_text()[-3000:]
            raise AssertionError(f"SIGTERM did not end the server:\n{log_tail}") from None
        log.flush()
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]  # not Ray's exit(15)
        assert "SIGTERM received" not in (tmp_path / "server.log").read_text()  # nor its stack dump
        left = _wait_gone(tree, 30)
        assert not left, f"the server's Ray outlived it: {_describe(left)}"
        assert not (home / "server.json").exists()
    finally:
        _kill_started(proc, tree)
        log.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


ENTER_RUNTIME = """
import sys
from pathlib import Path
from pixelmill.runtime import Runtime
with Runtime(home=Path(sys.argv[1]), lazy_ray=True) as rt:
    print(rt.prefect_api_url, flush=True)
"""


def _lock_held(path: Path) -> bool:
    import fcntl

    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_commands_started_together_on_a_new_home_each_get_a_server(tmp_path):
    """Two commands started at once on a new home: one server at a time sets up its database
    (run together, the second server's migrations failed on the first's tables)."""
    from pixelmill.server_boot import READY_FILE, prefect_version

    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, "-c", ENTER_RUNTIME, str(home)], env=user_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    urls = [o.strip().splitlines()[-1] for o in outs]
    assert all(u.startswith("http://127.0.0.1:") for u in urls) and urls[0] != urls[1], urls
    assert (home / READY_FILE).read_text().strip() == prefect_version()
    assert "already exists" not in (home / "prefect-server.log").read_text()


def test_a_command_started_while_the_users_server_boots_waits_for_it_and_uses_it(tmp_path):
    home, port = tmp_path / "home", free_port()
    server = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "server", "--home", str(home), "--port",
                               str(port)], env=user_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal
    try:
        deadline = time.monotonic() + 60
        while not _lock_held(home / "server-start.lock"):  # `pixelmill server` is booting
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run([sys.executable, "-c", ENTER_RUNTIME, str(home)], env=user_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == f"http://127.0.0.1:{port}/api"
        assert not (home / "prefect-server.log").exists(), "the command started a server of its own"
        prefect = psutil.Process(server.pid).children()
        server.send_signal(signal.SIGINT)  # Ctrl-C to the command alone: it stops its Prefect server itself
        assert server.wait(timeout=30) == 0
        assert not _wait_gone(prefect, 15) and not (home / "server.json").exists()
    finally:
        if server.poll() is None:
            interrupt_group(server, timeout=5)


RUN_A_FLOW = """
import sys
from pathlib import Path
from prefect import flow
from pixelmill.runtime import Runtime

@flow
def noop():
    return 1

with Runtime(home=Path(sys.argv[1]), lazy_ray=True):
    noop()
"""


def test_a_new_home_starts_from_the_database_the_first_one_set_up_without_its_runs(tmp_path):
    """The first server of this Prefect version to set up a database leaves a copy with no runs;
    a new home starts from that copy (no migrations to run) and records its own runs."""
    import sqlite3

    from pixelmill.server_boot import READY_FILE, prefect_version

    env = user_env(PIXELMILL_CACHE=str(tmp_path / "cache"))
    template = tmp_path / "cache" / "prefect-db" / f"{prefect_version()}.sqlite"

    def run_flow(home: Path) -> None:
        out = subprocess.run([sys.executable, "-c", RUN_A_FLOW, str(home)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (home / READY_FILE).read_text().strip() == prefect_version()

    def runs(db: Path) -> int:
        with sqlite3.connect(db) as c:
            return c.execute("SELECT count(*) FROM flow_run").fetchone()[0]

    run_flow(tmp_path / "first")
    assert template.is_file() and runs(template) == 0 and runs(tmp_path / "first" / "prefect.db") == 1
    c = sqlite3.connect(template)  # a table no Prefect has: marks what was seeded from the copy
    c.execute("CREATE TABLE seeded_from_template (x INTEGER)")
    c.commit()
    c.close()
    run_flow(tmp_path / "second")
    assert runs(tmp_path / "second" / "prefect.db") == 1 and runs(tmp_path / "first" / "prefect.db") == 1
    assert runs(template) == 0
    with sqlite3.connect(tmp_path / "second" / "prefect.db") as c:
        assert c.execute("SELECT name FROM sqlite_master WHERE name = 'seeded_from_template'").fetchall()
