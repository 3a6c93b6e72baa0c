"""Connects pixelmill to Ray and Prefect.

Embedded default: a local Ray on this machine's CPUs, bound to 127.0.0.1, and a real
Prefect API server started here on a free 127.0.0.1 port with a SQLite database in the
pixelmill home folder. Cluster: ``--ray-address`` / ``RAY_ADDRESS`` and
``PREFECT_API_URL`` select existing services instead; nothing else changes.

Ray workers get ``PREFECT_API_URL`` through the Ray runtime environment, so task runs
executed on them are recorded in the same server (without it, each worker would start a
temporary server of its own and its runs would be invisible).

Services a command starts for itself end with it, however it ends: the embedded server
gets the kernel's parent-death signal, and a small watchdog process ends every process
the command spawned (the server, the local Ray's processes) once the command has died.
A server the user started with ``pixelmill server`` is found through ``server.json`` in
the home folder, reused, and never stopped by a command; with ``--ray`` it also hosts a
local Ray that the home's commands join instead of starting one (``host_ray``), as
``pixelmill serve`` does for its scheduled runs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pixelmill.process_watchdog import RUNTIME_MARK, Watchdog  # noqa: F401  (RUNTIME_MARK: re-exported)
from pixelmill.server_boot import SERVER_FILE, ServerBoot

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

# Passed on to Ray workers when set in the driver's environment. Never a credential (Ray logs
# and shows runtime environments): HF_TOKEN reaches the tasks that download hub models as an
# argument (models/hub.py), and the actors load from the cache those tasks filled.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_DATASETS_CACHE",
    "PIXELMILL_ALLOW_NETWORK",
    "PREFECT_LOGGING_LEVEL",
)



# Prefect server services a command's own server leaves off: nothing talks to it but the
# command (no workers to watch, no automations, no paused or late runs to expire), and each
# would start with the server and poll its database. The scheduler, the repossessor (frees
# the concurrency slots of crashed runs: deployments rely on both), the task-run recorder
# and the event persister (the run's records) and cancellation clean-up stay on.
EMBEDDED_SERVER_SERVICES = {
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
}


# Prefect's basic auth ("user:password"): the server's setting, and the one its clients send.
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"


def apply_quiet_defaults() -> None:
    """Turn telemetry and usage stats off unless the user set them explicitly, and drop Ray's
    notice that token auth is on by default (pixelmill's local Rays always use it: nothing to do)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _TOKEN_NOTICE not in auth_log.filters:
        auth_log.addFilter(_TOKEN_NOTICE)


def _token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_NOTICE = _token_notice


def default_home() -> Path:
    """pixelmill's working folder: ``$PIXELMILL_HOME`` or ``./.pixelmill``."""
    return Path(os.environ.get("PIXELMILL_HOME", ".pixelmill")).resolve()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_api_url(host: str, port: int) -> str:
    """The API URL the Prefect UI served on ``host:port`` should call from the browser.

    A wildcard bind (``0.0.0.0``, ``::``) is reached by this machine's name.
    """
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/api"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); names and wildcards are not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_bind_problem(host: str, env: dict[str, str] | None = None) -> str | None:
    """Why a Prefect server may not listen on ``host``, or None: beyond loopback it needs
    ``PREFECT_SERVER_API_AUTH_STRING`` in its environment (read there, not from Prefect profiles)."""
    env = os.environ if env is None else env
    if is_loopback_host(host) or env.get(SERVER_AUTH_ENV):
        return None
    return (f"refusing to serve the Prefect API on {host!r}, reachable beyond this machine, without "
            f"authentication: set {SERVER_AUTH_ENV}=user:password in the environment (clients then "
            f"send the same value as {CLIENT_AUTH_ENV}), or bind to 127.0.0.1")


def prefect_server_env(home: Path, ui: bool, host: str | None = None, port: int | None = None) -> dict[str, str]:
    """Environment for a Prefect server whose SQLite database lives in ``home``.

    With ``host`` and ``port``, the server's own settings name them too, so that the UI
    calls the API it is served with (``prefect server --port`` alone leaves the UI on
    127.0.0.1:4200); an explicit ``PREFECT_SERVER_UI_API_URL``/``PREFECT_UI_API_URL`` wins.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env["PREFECT_UI_ENABLED"] = "true" if ui else "false"
    env["PREFECT_SERVER_UI_ENABLED"] = env["PREFECT_UI_ENABLED"]
    env.pop("PREFECT_API_URL", None)
    if host is not None and port is not None:
        env["PREFECT_SERVER_API_HOST"] = host
        env["PREFECT_SERVER_API_PORT"] = str(port)
        if not (env.get("PREFECT_SERVER_UI_API_URL") or env.get("PREFECT_UI_API_URL")):
            env["PREFECT_SERVER_UI_API_URL"] = ui_api_url(host, port)
    return env


def prefect_server_command(host: str, port: int, ui: bool) -> list[str]:
    """The ``prefect server start`` command line, using this interpreter's Prefect."""
    exe = Path(sys.executable).with_name("prefect")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    return base + ["server", "start", "--host", host, "--port", str(port),
                   "--ui" if ui else "--no-ui", "--analytics-off"]


# Runs ``argv[3:]`` (with exec, same process) once the kernel is told to send it signal
# ``argv[2]`` when the thread that started it (in process ``argv[1]``) ends. Setting it
# here rather than in a ``preexec_fn`` is safe in a process that has threads.
_EXEC_WITH_PDEATHSIG = r"""
import ctypes, os, sys
parent, sig = int(sys.argv[1]), int(sys.argv[2])
if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != parent:  # the parent died before the signal was armed
    sys.exit(1)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def die_with_parent(cmd: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``cmd`` wrapped so that it gets ``sig`` when the calling thread's process dies (Linux).

    The parent-death signal fires when the thread that spawned the child ends, so call
    this from a thread that lives as long as the child should (the main thread). Other
    systems get ``cmd`` unchanged.
    """
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), str(int(sig)), *cmd]


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
    die_with_parent: bool = True
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra server settings (e.g. service loop seconds)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def start(self) -> PrefectServer:
        """Start the server and wait until it answers."""
        return self.launch().wait_ready()

    def launch(self) -> PrefectServer:
        """Start the server process without waiting for it (``wait_ready`` waits)."""
        self.port = self.port or free_port(self.host)
        logfile = open(self.home / "prefect-server.log", "ab") if self.home.exists() else None
        if logfile is None:
            self.home.mkdir(parents=True, exist_ok=True)
            logfile = open(self.home / "prefect-server.log", "ab")
        cmd = prefect_server_command(self.host, self.port, self.ui)
        if self.die_with_parent and threading.current_thread() is threading.main_thread():
            cmd = die_with_parent(cmd)  # a SIGKILLed owner must not leave its server behind
        self.proc = subprocess.Popen(
            cmd,
            env={**prefect_server_env(self.home, self.ui, self.host, self.port), **self.env},
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logfile.close()  # the server has its own descriptor
        return self

    def wait_ready(self) -> PrefectServer:
        """Block until the launched server answers its health check (else stop it and raise)."""
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


def user_server(home: Path) -> dict | None:
    """``server.json`` of a ``pixelmill server`` running on ``home``'s database, if it answers:
    ``api_url``, and ``ray_address`` when it hosts a Ray for the home's commands (``--ray``)."""
    try:
        info = json.loads((home / SERVER_FILE).read_text())
        pid, url = int(info["pid"]), str(info["api_url"])
        os.kill(pid, 0)
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return info if r.status == 200 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@contextmanager
def keep_sigterm_handler():
    """Put this process's Python SIGTERM handler (``cli.cancel``'s, or Prefect's in a flow run) back after the
    block: a driver's ``ray.init`` installs one that exits with status 15. Ray's stays where there was none."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def start_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """A new Ray on this machine, connected from this process: loopback only, no dashboard.

    ``address="local"``: a new Ray even when ``ray start`` left a cluster running on this
    machine (``ray.init()`` would join that one instead).
    """
    import ray

    with keep_sigterm_handler():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)


@contextmanager
def host_ray(num_cpus: int | None = None):
    """A local Ray hosted by this long-lived process (``pixelmill server --ray``, ``pixelmill serve``)
    for other processes to join; yields the address they join at, and ends it on exit.

    A command that joins an existing Ray connects in a fraction of a second instead of
    starting one (about 4 s here). Its Ray workers are this process's children, so they see
    this process's environment (plus the allow-listed ``Runtime.worker_env``), as a cluster
    node's workers see that node's. A watchdog ends its processes if this one is killed.
    """
    import ray

    watchdog = Watchdog().start()
    try:
        apply_quiet_defaults()
        # its processes stop at once when the host ends (no drain: nothing here serves traffic)
        os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        start_local_ray(num_cpus, logging_level=logging.WARNING, log_to_driver=False)
        enable_ray_token_auth_if_available()  # so the processes it starts join with its token
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        watchdog.stop()


def refresh_prefect_settings() -> None:
    """Make an already-imported Prefect read the environment again.

    Prefect reads its settings once, when it is imported. A command that imported it
    before the runtime set ``PREFECT_API_URL`` (``pixelmill retrieve`` planned with the
    retrieval flow's module) would otherwise run its flow on a temporary server.
    """
    context = sys.modules.get("prefect.context")
    if context is None:
        return
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()
    else:  # older Prefect 3 releases
        context.GLOBAL_SETTINGS_CONTEXT = context.root_settings_context()


def flush_prefect(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still holds, while its API is up.

    Prefect drains them at interpreter exit otherwise, after the embedded server has
    stopped: "--- Error logging to API --- All connection attempts failed".
    """
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:
        return
    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout, at_exit=False)
        except Exception as e:  # noqa: BLE001 - never fail a finished command over its logs
            log.warning("could not flush Prefect's %s: %s", service.__name__, e)


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


def node_gpus() -> list[float]:
    """GPUs on each alive node of the Ray cluster (the active runtime's, connected now if it was not; none
    when not connected)."""
    import ray

    if not ensure_ray():
        return []
    return [float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


def check_cluster_gpus(requests: list) -> None:
    """Refuse (``PlacementError``, exit 2) an explicit GPU count the cluster's nodes cannot provide.

    Only explicit counts can fail, so only they connect Ray to look (``auto`` is resolved
    when work starts, and a run with nothing to do never connects it).
    """
    from pixelmill.config.placement import check_gpu_requests, explicit_gpus

    if explicit := explicit_gpus(requests):
        check_gpu_requests(explicit, node_gpus())


# The Runtime whose Ray ``ensure_ray`` starts (the innermost one entered in this process).
_active: list[Runtime] = []


def ensure_ray() -> bool:
    """Connect Ray now if the active runtime has not yet (it connects when work first needs it).

    Returns whether Ray is connected. Without an active runtime nothing is started here.
    """
    import ray

    if ray.is_initialized():
        return True
    if _active:
        _active[-1].start_ray()
        return True
    return False


@dataclass
class Runtime:
    """Ray + Prefect for one pixelmill command; use as a context manager.

    Args:
        ray_address: an existing Ray cluster (else ``RAY_ADDRESS``, else the Ray of a ``pixelmill
            server --ray`` running on ``home``, else a local Ray started for this command).
        prefect_api_url: an existing Prefect API (else ``PREFECT_API_URL``, else a ``pixelmill
            server`` running on ``home``, else embedded).
        home: folder for the embedded server's database and logs.
        num_cpus: CPUs for the local Ray (default: all of this machine's).
        lazy_ray: connect Ray when work first needs it (``ensure_ray``: a flow's first
            submitted task, ``node_gpus``), not on entering, so a run with nothing to do never
            starts it; False: connect on entering. Default: lazy when the Prefect API is
            already up (``PREFECT_API_URL``, a running ``pixelmill server``); when this runtime
            starts its own server, Ray starts while the server does (it costs no extra wait).

    What it starts (the embedded server, a local Ray) ends with it: on ``close()`` after
    Prefect's logs and events are flushed, and through a watchdog if the process dies.
    """

    ray_address: str | None = None
    prefect_api_url: str | None = None
    home: Path = field(default_factory=default_home)
    num_cpus: int | None = None
    lazy_ray: bool | None = None
    server: PrefectServer | None = None
    owns_ray: bool = False
    watchdog: Watchdog | None = None
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _boot: ServerBoot = field(default=None)  # the home's boot lock while this runtime's server sets up its database

    def __enter__(self) -> Runtime:
        apply_quiet_defaults()
        self._boot = ServerBoot(self.home)
        self.ray_address = self.ray_address or os.environ.get("RAY_ADDRESS") or None
        named_url = self.prefect_api_url or os.environ.get("PREFECT_API_URL")
        found = None if named_url else user_server(self.home)
        if not named_url and not found:
            # no server of this home answers: wait while one boots, then look again (server_boot.py)
            self._boot = ServerBoot(self.home).acquire()
            found = user_server(self.home)
            if found or self._boot.database_ready():
                self._boot.release()
            else:
                self._boot.seed_database()  # a new home starts from the cached set-up database
        self.prefect_api_url = named_url or (found or {}).get("api_url") or None
        # a `pixelmill server --ray` of this home: its Ray is joined instead of starting one
        self.ray_address = self.ray_address or (found or {}).get("ray_address") or None
        if self.ray_address:
            enable_ray_token_auth_if_available()  # Ray reads it when imported: before anything imports it
        try:
            if not self.prefect_api_url or not self.ray_address:
                self.watchdog = Watchdog().start()
            if not self.prefect_api_url:
                # launched now, waited for after Ray's start: the two start at once
                self.server = PrefectServer(self.home, env=dict(EMBEDDED_SERVER_SERVICES)).launch()
                self.prefect_api_url = self.server.api_url
            self._set_env("PREFECT_API_URL", self.prefect_api_url)
            if not named_url:
                self._authenticate_to_own_server()
            # A worker without the URL must fail loudly, not start a hidden server of its own.
            self._set_env("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")
            refresh_prefect_settings()
            _active.append(self)
            if self.lazy_ray is False or (self.lazy_ray is None and self.server is not None):
                self.start_ray()
            if self.server is not None:
                self.server.wait_ready()
                if self._boot.held:
                    self._boot.mark_ready()
            self._boot.release()
        except BaseException:
            self.close()
            raise
        return self

    def _set_env(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def worker_env(self) -> dict[str, str]:
        """Environment variables every Ray worker of this job gets (a fixed allow-list).

        Storage endpoints and credentials (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
        ...) are never among them: Ray shows a job's runtime environment in its dashboard
        and metadata. Workers read them from their node's own environment or credential
        files, as every node must (the cluster configs set them).
        """
        env = {k: os.environ[k] for k in QUIET_ENV if k in os.environ}
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        env["PREFECT_API_URL"] = self.prefect_api_url or ""
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
        return env

    def start_ray(self) -> None:
        """Connect Ray (the cluster at ``ray_address``, else a new local one); nothing if connected."""
        import ray

        if ray.is_initialized():
            return
        kwargs = dict(runtime_env={"env_vars": self.worker_env()}, logging_level=logging.WARNING,
                      log_to_driver=True, configure_logging=True)
        if self.ray_address:
            enable_ray_token_auth_if_available()
            with keep_sigterm_handler():
                ray.init(address=self.ray_address, **kwargs)
        else:
            start_local_ray(self.num_cpus, **kwargs)
        self.owns_ray = True
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.verbose_stats_logs = False

    def _authenticate_to_own_server(self) -> None:
        """Send the auth string a server of this home (embedded, or ``pixelmill server``) was started with.

        That server has auth on when ``PREFECT_SERVER_API_AUTH_STRING`` is set; this command's
        client, and a local Ray's workers (which inherit this environment; the string never goes
        into Ray's runtime_env), then send it as ``PREFECT_API_AUTH_STRING`` unless that is set.
        """
        server_auth = os.environ.get(SERVER_AUTH_ENV)
        if server_auth and not os.environ.get(CLIENT_AUTH_ENV):
            self._set_env(CLIENT_AUTH_ENV, server_auth)

    def close(self) -> None:
        """Flush Prefect's logs and events, then stop Ray and the server this runtime started."""
        if self in _active:
            _active.remove(self)
        if self._boot is not None:
            self._boot.release()
        if self.prefect_api_url and (self.server is None or self.server.proc is not None):
            flush_prefect()
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_env:
            self._saved_env.clear()
            refresh_prefect_settings()

    def __exit__(self, *exc) -> None:
        self.close()
