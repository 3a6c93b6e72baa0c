"""One Prefect server at a time boots on a home whose database this Prefect has not set up yet;
and ``server.json``, the file through which a running ``pixelmill server`` is found.

A Prefect server creates and migrates its SQLite database when it starts. Two servers
starting at once on a new home (two commands started together, or a command started while
``pixelmill server`` boots) run the same migrations at once, and one of them fails
("index ... already exists"). So whoever starts a server for a home first takes the home's
boot lock (``server-start.lock``, an ``flock``: the kernel drops it if its holder dies):

* a command that finds no running server takes the lock (waiting while another server of
  the home boots), then looks again: a ``pixelmill server`` that was booting is found and
  reused; else, if the database was already set up by this Prefect version
  (``prefect-ready`` names it), it lets the lock go and starts its own server at once;
  only on a database not set up yet does it hold the lock until its server answers;
* ``pixelmill server`` and ``pixelmill serve`` hold it until their server answers (and
  ``pixelmill server`` until it has written ``server.json``).

Commands on a home that is set up never wait for each other.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from importlib import metadata
from pathlib import Path

SERVER_FILE = "server.json"  # written in the home folder by `pixelmill server` while it runs
LOCK_FILE = "server-start.lock"
READY_FILE = "prefect-ready"
BOOT_TIMEOUT_S = 180.0


def prefect_version() -> str:
    try:
        return metadata.version("prefect")
    except metadata.PackageNotFoundError:  # pragma: no cover - prefect is a dependency
        return "unknown"


class ServerBoot:
    """The boot lock of ``home``'s Prefect server (see the module's docstring)."""

    def __init__(self, home: Path, timeout: float = BOOT_TIMEOUT_S) -> None:
        self.home = Path(home)
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ServerBoot:
        """Take the lock, waiting while another server of this home boots (at most ``timeout`` s)."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(
                        f"another Prefect server for {self.home} has been starting for over {self.timeout:.0f} s "
                        f"(it holds {self.home / LOCK_FILE}); see {self.home / 'prefect-server.log'}") from None
                time.sleep(0.1)
        self._fd = fd
        return self

    def database_ready(self) -> bool:
        """Whether a server of this Prefect version has already set up the home's database."""
        try:
            return (self.home / READY_FILE).read_text().strip() == prefect_version() and \
                (self.home / "prefect.db").exists()
        except OSError:
            return False

    def mark_ready(self) -> None:
        """Record that the home's database is set up (call once a server of it answers)."""
        tmp = self.home / (READY_FILE + ".tmp")
        tmp.write_text(prefect_version() + "\n")
        tmp.replace(self.home / READY_FILE)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ServerBoot:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_server_file(home: Path, pid: int, api_url: str, ray_address: str | None = None) -> Path:
    """Record a user-started server (``pixelmill server``) so that commands reuse it (and its Ray, if any)."""
    path = home / SERVER_FILE
    tmp = path.with_suffix(".tmp")
    info = {"pid": pid, "api_url": api_url, **({"ray_address": ray_address} if ray_address else {})}
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
    return path


def remove_server_file(home: Path, pid: int) -> None:
    """Remove ``server.json`` if it still names ``pid``."""
    path = home / SERVER_FILE
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
