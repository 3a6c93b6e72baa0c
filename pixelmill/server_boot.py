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

Creating and migrating a new database is most of a new home's server start (10.5 s on the
2-core build machine, 3.8 s on a copy of a set-up database). So the first server of a Prefect
version to set up a database leaves a copy of it, still empty of runs (block types and
schemas only), in the cache (``$PIXELMILL_CACHE/prefect-db/<version>.sqlite``); a new home is
seeded from that copy before its server starts, which then finds nothing to migrate.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from importlib import metadata
from pathlib import Path

SERVER_FILE = "server.json"  # written in the home folder by `pixelmill server` while it runs
LOCK_FILE = "server-start.lock"
READY_FILE = "prefect-ready"
BOOT_TIMEOUT_S = 180.0


def database_template() -> Path:
    """Where a set-up, run-free database of this Prefect version is kept for new homes."""
    from pixelmill.datasets.storage import cache_dir

    return Path(cache_dir()) / "prefect-db" / f"{prefect_version()}.sqlite"


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

    def seed_database(self) -> bool:
        """Copy the cached set-up database into a home that has none yet (hold the lock).

        Returns whether it did; without a copy of this Prefect version the server migrates.
        """
        db, template = self.home / "prefect.db", database_template()
        if db.exists() or not template.is_file():
            return False
        tmp = self.home / ".prefect.db.seed"
        try:
            shutil.copyfile(template, tmp)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False  # the server creates and migrates the database itself
        if not _migrated(tmp):
            tmp.unlink(missing_ok=True)
            template.unlink(missing_ok=True)  # damaged: the next database a server sets up replaces it
            return False
        tmp.replace(db)
        return True

    def mark_ready(self) -> None:
        """Record that the home's database is set up (call once a server of it answers, before
        anything records a run in it): the first time for this Prefect version, keep a copy."""
        tmp = self.home / (READY_FILE + ".tmp")
        tmp.write_text(prefect_version() + "\n")
        tmp.replace(self.home / READY_FILE)
        try:
            save_template(self.home / "prefect.db")
        except (OSError, sqlite3.Error):
            pass  # a cache that cannot be written only costs the next new home its migration

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ServerBoot:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _migrated(db: Path) -> bool:
    """Whether ``db`` opens as an SQLite database with its migration recorded."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return bool(con.execute("SELECT count(*) FROM alembic_version").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return False


def save_template(db: Path) -> Path | None:
    """Keep a consistent copy of ``db`` (a database a server just set up, with no runs yet) as
    this Prefect version's template, unless one is kept already."""
    template = database_template()
    if template.is_file() or not db.is_file():
        return None
    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_name(f".{template.name}.{os.getpid()}")
    try:
        src, dst = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(tmp)
        try:
            src.backup(dst)  # consistent while the server runs (WAL included)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file (the server sets WAL again)
            runs = dst.execute("SELECT count(*) FROM flow_run").fetchone()[0]
            migrated = dst.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
        finally:
            src.close()
            dst.close()
        if runs or not migrated:  # only a migrated database with no runs is a template
            return None
        tmp.replace(template)
        return template
    finally:
        tmp.unlink(missing_ok=True)


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
