"""A Prefect server reachable beyond this machine has auth on: `pixelmill server --host` refuses
to bind to anything but loopback without ``PREFECT_SERVER_API_AUTH_STRING`` (exit 2, nothing started)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pixelmill.runtime import SERVER_AUTH_ENV, is_loopback_host, public_bind_problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_binds_need_no_auth(host):
    assert is_loopback_host(host)
    assert public_bind_problem(host, env={}) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "10.0.0.5", "my-host.example", "::ffff:127.0.0.1"])
def test_public_binds_need_the_auth_string(host):
    assert not is_loopback_host(host)
    problem = public_bind_problem(host, env={})
    assert problem and SERVER_AUTH_ENV in problem
    assert public_bind_problem(host, env={SERVER_AUTH_ENV: ""}) == problem  # empty is not set
    assert public_bind_problem(host, env={SERVER_AUTH_ENV: "admin:s3cret"}) is None


def test_server_refuses_a_public_host_without_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != SERVER_AUTH_ENV}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pixelmill.cli", "server", "--host", "0.0.0.0", "--port", "1",
                           "--home", str(tmp_path / "home")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert SERVER_AUTH_ENV in proc.stderr and "0.0.0.0" in proc.stderr, proc.stderr
    assert not (tmp_path / "home").exists(), "nothing is started or written before the refusal"
    assert time.monotonic() - started < 60


def test_the_auth_string_never_goes_into_rays_runtime_env(monkeypatch):
    """Ray shows a job's runtime_env in its dashboard: workers get the auth string from their environment."""
    from pixelmill.runtime import CLIENT_AUTH_ENV, Runtime

    monkeypatch.setenv(SERVER_AUTH_ENV, "pm:s3cret-server")
    monkeypatch.setenv(CLIENT_AUTH_ENV, "pm:s3cret-client")
    env = Runtime(prefect_api_url="http://127.0.0.1:4200/api").worker_env()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert not [k for k, v in env.items() if "s3cret" in v or "AUTH_STRING" in k], env
