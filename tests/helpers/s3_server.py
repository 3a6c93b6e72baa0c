"""A real S3 API on 127.0.0.1 for tests: moto's server mode in a subprocess.

``S3Server`` starts ``python -m moto.server`` on a free loopback port (a subprocess, so the
server never competes with the test process for the GIL), creates a bucket, and writes an
AWS config file (``endpoint_url``, region) and a shared credentials file. Every process
whose environment names those files through ``AWS_CONFIG_FILE`` and
``AWS_SHARED_CREDENTIALS_FILE`` — the pytest process, CLI subprocesses, and the Ray nodes
the tests start, hence their workers — reaches the server through s3fs/botocore with no
endpoint or key passed in code or through Ray's runtime environment. That is how a
cluster node reads its credentials: from its own environment or a file it reads.

``env`` gives the same settings as plain variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ...) for processes started with an explicit environment
(botocore 1.31+ honours ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL``, and an
``endpoint_url`` in the config file; checked with botocore 1.43 / s3fs 2026.9).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Variables that would override the test server's files (a developer's real AWS setup).
OVERRIDING_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
REGION = "us-east-1"


def isolate_aws_env(aws_dir: Path, environ: dict | None = None) -> dict[str, str]:
    """Point AWS config/credentials at ``aws_dir`` and drop variables that would override them.

    Call this before any Ray node is started, so that the nodes (and every worker they
    spawn) look for credentials where the S3 fixture later writes them. The files need not
    exist yet: botocore reads them when a client is first made.

    Args:
        aws_dir: folder for ``config`` and ``credentials``.
        environ: the environment to change (``os.environ`` by default).

    Returns:
        The variables set.
    """
    environ = os.environ if environ is None else environ
    for name in OVERRIDING_VARS:
        environ.pop(name, None)
    aws_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance metadata service
    }
    environ.update(values)
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket and the AWS files that reach it.

    Args:
        log_dir: where the server's log goes.
        bucket: the bucket to create.
        access_key: key id written to the credentials file.
        secret_key: secret written to the credentials file (a fresh, distinctive value by
            default, so a secrets sweep can search for it).
    """

    def __init__(self, log_dir: Path, bucket: str = "pixelmill-test",
                 access_key: str = "pixelmill-test-key", secret_key: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or f"pmsecret-{secrets.token_hex(12)}"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The server's endpoint and credentials as the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://BUCKET/part/part``."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"s3://{self.bucket}/{tail}" if tail else f"s3://{self.bucket}"

    def start(self, timeout: float = 60.0) -> S3Server:
        """Start the server, wait until it answers, create the bucket."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self._log = open(self.log_dir / "moto-server.log", "wb")
        from pixelmill.runtime import die_with_parent

        self.proc = subprocess.Popen(  # ends with the test session, however it ends (SIGKILL too)
            die_with_parent([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]),
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited:\n" + (self.log_dir / "moto-server.log").read_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server not listening on port {self.port} within {timeout:.0f}s") from None
                time.sleep(0.2)
        self.filesystem().mkdir(self.bucket)
        return self

    def write_aws_files(self, config_file: str | Path, credentials_file: str | Path) -> None:
        """Write the AWS config (endpoint, region) and shared credentials files for this server."""
        Path(config_file).write_text(
            f"[default]\nregion = {REGION}\nendpoint_url = {self.endpoint_url}\n"
        )
        Path(credentials_file).write_text(
            f"[default]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n"
        )
        os.chmod(credentials_file, 0o600)

    def filesystem(self):
        """A fresh (uncached) s3fs filesystem talking to this server with explicit settings."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint_url},
        )

    def stop(self) -> None:
        """Stop the server (this process only, by pid)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
