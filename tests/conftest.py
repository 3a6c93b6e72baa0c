"""Shared fixtures: network guard, offline env, one Ray + Prefect runtime for the session."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).parent / "netguard"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "DO_NOT_TRACK": "1",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETGUARD)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: E402,F401  (installs the guard in this process too)

from tests.helpers.s3_server import S3Server, isolate_aws_env  # noqa: E402

# AWS settings come from files under this folder, never from the developer's own setup.
# Set before any Ray node starts, so nodes and their workers read the same files: the
# ``s3_server`` fixture writes them (the "credentials file the nodes read").
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="pixelmill-session-"))
isolate_aws_env(_SESSION_DIR / "aws")
# local copies of remote models and adapters (storage.local_copy), never the user's ~/.cache
os.environ.setdefault("PIXELMILL_CACHE", str(_SESSION_DIR / "cache"))
# The Ray clusters the tests start use token authentication (RAY_AUTH_MODE above), and `ray start`
# refuses to start without a token: on a fresh machine there is no ~/.ray/auth_token. The session
# makes its own (as Ray's generator does), never reading or writing the user's.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _token = _SESSION_DIR / "ray_auth_token"
    _token.write_text(secrets.token_hex(32))
    _token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token)
atexit.register(shutil.rmtree, _SESSION_DIR, True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and one thread cannot be oversubscribed by a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random-weight pipelines saved to disk, named by path like real checkpoints."""
    from pixelmill.models.tiny import save_tiny_models

    return save_tiny_models(str(tmp_path_factory.mktemp("models")))


def _stop_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM ``proc`` (``ray start --block`` then stops what it started), then kill what is left of its tree.

    Only this process and its children: ``ray stop --force`` would end every Ray on the
    machine, other people's included.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A Ray head (127.0.0.1, 2 CPUs) and a Prefect API server shared by all CLI subprocesses.

    Yields the environment a CLI subprocess needs to join them. The head runs as
    ``ray start --block`` so that it, and only it, is stopped at the end (by process id).
    """
    from pixelmill.runtime import PrefectServer, free_port

    home = tmp_path_factory.mktemp("runtime")
    ray_tmp = Path(tempfile.mkdtemp(prefix="pmt"))  # short: Ray's socket paths must fit in 107 bytes
    server = PrefectServer(home).start()
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    log = open(home / "ray-start.log", "wb")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},  # stop at once when told
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while b"--block" not in (home / "ray-start.log").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed:\n" + (home / "ray-start.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "PREFECT_API_URL": server.api_url,
               "PIXELMILL_TEST_PREFECT_PID": str(server.proc.pid), "PIXELMILL_TEST_RAY_HEAD_PID": str(head.pid),
               # where the head's session logs and the server's database are (the secrets sweep reads them)
               "PIXELMILL_TEST_RAY_TMP": str(ray_tmp), "PIXELMILL_TEST_PREFECT_HOME": str(home)}
    finally:
        _stop_tree(head)
        log.close()
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with bucket ``pixelmill-test``, for the whole session.

    Its endpoint and (distinctive, random) secret are written to the AWS config and
    credentials files that ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` name in
    this process's environment, so CLI subprocesses and the workers of Ray nodes started by
    the tests reach it without anything passed in code or in Ray's runtime environment.
    ``s3_server.env`` holds the same settings as plain ``AWS_*`` variables.
    """
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    config, creds = os.environ["AWS_CONFIG_FILE"], os.environ["AWS_SHARED_CREDENTIALS_FILE"]
    server.write_aws_files(config, creds)
    try:
        yield server
    finally:
        server.stop()
        for path in (config, creds):
            Path(path).unlink(missing_ok=True)


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``pixelmill ARGS`` as a user would, capturing output."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
