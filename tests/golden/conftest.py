"""The golden tests' own Ray head and Prefect server, stopped by process id.

``tests/conftest.py``'s session ``cluster`` stops its Ray head with ``ray stop --force``,
which stops every Ray process of the user on the machine, other checkouts' clusters
included. The golden module is run while other work shares the machine, so it starts
its own head with ``ray start --block`` and, when done, stops exactly that process and
its children. The yielded environment is the same as the session fixture's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def _stop_tree(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM ``proc`` (``ray start --block`` then stops what it started), then kill what is left of its tree."""
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (127.0.0.1, 2 CPUs) and a Prefect API server for this module's CLI subprocesses."""
    from pixelmill.runtime import PrefectServer, free_port

    home = tmp_path_factory.mktemp("runtime")
    ray_tmp = Path(tempfile.mkdtemp(prefix="pmg"))  # short: Ray's socket paths must fit in 107 bytes
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
               "PIXELMILL_TEST_PREFECT_PID": str(server.proc.pid)}
    finally:
        _stop_tree(head)
        log.close()
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
