"""Shared fixtures: network guard, offline env, one Ray + Prefect runtime for the session."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A Ray head (127.0.0.1) and a Prefect API server shared by all CLI subprocesses.

    Yields the environment a CLI subprocess needs to join them.
    """
    from pixelmill.runtime import PrefectServer, free_port

    home = tmp_path_factory.mktemp("runtime")
    server = PrefectServer(home).start()
    port = free_port()
    env = dict(os.environ)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={home / 'ray'}"],
        check=True, env=env, capture_output=True,
    )
    out = {"RAY_ADDRESS": f"127.0.0.1:{port}", "PREFECT_API_URL": server.api_url,
           "PIXELMILL_TEST_PREFECT_PID": str(server.proc.pid)}
    try:
        yield out
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        server.stop()


def prefect_servers_not_started_by(pid: int) -> list[str]:
    """Command lines of Prefect API servers running here that are not ``pid`` or its children.

    Prefect's temporary server (what a process without ``PREFECT_API_URL`` starts) runs
    ``uvicorn ... prefect.server.api.server:create_app``.
    """
    import psutil

    ours = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] not in ours and ("prefect.server.api.server" in cmd or "prefect server start" in cmd
                                             or ("prefect" in cmd and " server start" in cmd)):
            found.append(cmd)
    return found


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``pixelmill ARGS`` as a user would, capturing output."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
