"""Connects pixelmill to Ray and Prefect.

Embedded default: a local Ray on this machine's CPUs, bound to 127.0.0.1, and a real
Prefect API server started here on a free 127.0.0.1 port with a SQLite database in the
pixelmill home folder. Cluster: ``--ray-address`` / ``RAY_ADDRESS`` and
``PREFECT_API_URL`` select existing services instead; nothing else changes.

Ray workers get ``PREFECT_API_URL`` through the Ray runtime environment, so task runs
executed on them are recorded in the same server (without it, each worker would start a
temporary server of its own and its runs would be invisible).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pixelmill.runtime")

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    # Bind Ray to 127.0.0.1 rather than the machine's interface address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}

# Passed on to Ray workers when set in the driver's environment.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "PIXELMILL_ALLOW_NETWORK",
    "PREFECT_LOGGING_LEVEL",
)


def apply_quiet_defaults() -> None:
    """Turn telemetry and usage stats off unless the user set them explicitly."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def default_home() -> Path:
    """pixelmill's working folder: ``$PIXELMILL_HOME`` or ``./.pixelmill``."""
    return Path(os.environ.get("PIXELMILL_HOME", ".pixelmill")).resolve()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prefect_server_env(home: Path, ui: bool) -> dict[str, str]:
    """Environment for a Prefect server whose SQLite database lives in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env["PREFECT_UI_ENABLED"] = "true" if ui else "false"
    env["PREFECT_SERVER_UI_ENABLED"] = env["PREFECT_UI_ENABLED"]
    env.pop("PREFECT_API_URL", None)
    return env


def prefect_server_command(host: str, port: int, ui: bool) -> list[str]:
    """The ``prefect server start`` command line, using this interpreter's Prefect."""
    exe = Path(sys.executable).with_name("prefect")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    return base + ["server", "start", "--host", host, "--port", str(port),
                   "--ui" if ui else "--no-ui", "--analytics-off"]


def wait_for_health(api_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Block until ``{api_url}/health`` answers, or raise with the server's log path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"Prefect server at {api_url} did not become healthy in {timeout:.0f}s")


@dataclass
class PrefectServer:
    """A Prefect API server process owned by pixelmill, on 127.0.0.1 unless asked."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    ui: bool = False
    proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def start(self) -> PrefectServer:
        self.port = self.port or free_port(self.host)
        logfile = open(self.home / "prefect-server.log", "ab") if self.home.exists() else None
        if logfile is None:
            self.home.mkdir(parents=True, exist_ok=True)
            logfile = open(self.home / "prefect-server.log", "ab")
        self.proc = subprocess.Popen(
            prefect_server_command(self.host, self.port, self.ui),
            env=prefect_server_env(self.home, self.ui),
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_health(self.api_url, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(
                f"could not start the Prefect server; see {self.home / 'prefect-server.log'}"
            ) from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def enable_ray_token_auth_if_available() -> None:
    """Present this machine's Ray token when joining a cluster.

    Ray 2.60 clusters use token authentication by default, but a driver joining one by
    address only sends its token when ``RAY_AUTH_MODE=token``; without it the join fails
    with "Authentication token is missing". An explicit ``RAY_AUTH_MODE`` is respected.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token"
    ).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


@dataclass
class Runtime:
    """Ray + Prefect for one pixelmill command; use as a context manager.

    Args:
        ray_address: an existing Ray cluster (else ``RAY_ADDRESS``, else a local Ray).
        prefect_api_url: an existing Prefect API (else ``PREFECT_API_URL``, else embedded).
        home: folder for the embedded server's database and logs.
        num_cpus: CPUs for the local Ray (default: all of this machine's).
    """

    ray_address: str | None = None
    prefect_api_url: str | None = None
    home: Path = field(default_factory=default_home)
    num_cpus: int | None = None
    server: PrefectServer | None = None
    owns_ray: bool = False

    def __enter__(self) -> Runtime:
        apply_quiet_defaults()
        self.ray_address = self.ray_address or os.environ.get("RAY_ADDRESS") or None
        self.prefect_api_url = self.prefect_api_url or os.environ.get("PREFECT_API_URL") or None
        if not self.prefect_api_url:
            self.server = PrefectServer(self.home).start()
            self.prefect_api_url = self.server.api_url
        os.environ["PREFECT_API_URL"] = self.prefect_api_url
        # A worker without the URL must fail loudly, not start a hidden server of its own.
        os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
        try:
            self._start_ray()
        except Exception:
            self.close()
            raise
        return self

    def worker_env(self) -> dict[str, str]:
        """Environment variables every Ray worker of this job gets."""
        env = {k: os.environ[k] for k in QUIET_ENV if k in os.environ}
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        env["PREFECT_API_URL"] = self.prefect_api_url or ""
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
        return env

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs = dict(
            runtime_env={"env_vars": self.worker_env()},
            logging_level=logging.WARNING,
            log_to_driver=True,
            configure_logging=True,
        )
        if self.ray_address:
            enable_ray_token_auth_if_available()
            ray.init(address=self.ray_address, **kwargs)
        else:
            ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
        self.owns_ray = True
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.verbose_stats_logs = False

    def close(self) -> None:
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __exit__(self, *exc) -> None:
        self.close()
