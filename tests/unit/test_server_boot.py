"""The home's boot lock: one Prefect server at a time sets up a new home's database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from pixelmill.server_boot import (
    LOCK_FILE,
    READY_FILE,
    ServerBoot,
    database_template,
    prefect_version,
    save_template,
)

HOLD = """
import sys, time
from pathlib import Path
from pixelmill.server_boot import ServerBoot
boot = ServerBoot(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(home, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_boot_waits_for_the_first_and_a_dead_holder_frees_the_lock(tmp_path):
    holder = _holder(tmp_path, 1.5)
    t = time.monotonic()
    with ServerBoot(tmp_path) as boot:
        waited = time.monotonic() - t
        assert boot.held
    assert 0.8 < waited < 30, waited
    assert not boot.held
    holder.wait()
    killed = _holder(tmp_path, 60)
    killed.kill()
    killed.wait()
    t = time.monotonic()
    with ServerBoot(tmp_path, timeout=10):  # the kernel dropped the dead holder's lock
        assert time.monotonic() - t < 5


def test_a_boot_that_never_ends_is_an_error_naming_the_lock(tmp_path):
    holder = _holder(tmp_path, 60)
    try:
        with pytest.raises(RuntimeError, match=f"has been starting for over 1 s .*{LOCK_FILE}"):
            ServerBoot(tmp_path, timeout=1).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_database_is_ready_once_marked_by_this_prefect_version(tmp_path):
    boot = ServerBoot(tmp_path).acquire()
    assert not boot.database_ready()
    boot.mark_ready()
    assert not boot.database_ready()  # no database there
    (tmp_path / "prefect.db").write_bytes(b"")
    assert boot.database_ready()
    (tmp_path / READY_FILE).write_text("2.0.0\n")  # set up by another Prefect: its migrations may differ
    assert not boot.database_ready()
    assert prefect_version() != "2.0.0"
    boot.release()
    boot.release()  # twice is harmless


def test_only_a_migrated_database_without_runs_becomes_the_template(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELMILL_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "home" / "prefect.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as c:  # not migrated: no alembic version recorded
        c.execute("CREATE TABLE alembic_version (version_num TEXT)")
        c.execute("CREATE TABLE flow_run (id TEXT)")
    assert save_template(db) is None
    with sqlite3.connect(db) as c:  # migrated, but a run is recorded in it
        c.execute("INSERT INTO alembic_version VALUES ('head')")
        c.execute("INSERT INTO flow_run VALUES ('run')")
    assert save_template(db) is None
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM flow_run")
    template = save_template(db)
    assert template == database_template() and template.is_file()
    assert sorted(p.name for p in template.parent.iterdir()) == [template.name]  # no partial copy left
    assert save_template(db) is None  # one is kept already

    new_home = ServerBoot(tmp_path / "new").acquire()
    assert new_home.seed_database()
    with sqlite3.connect(tmp_path / "new" / "prefect.db") as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [("head",)]
    assert not new_home.seed_database()  # a home with a database keeps it
    new_home.release()


def test_a_broken_database_leaves_no_template_and_marking_ready_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELMILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prefect.db").write_bytes(b"not a database")
    boot = ServerBoot(tmp_path).acquire()
    boot.mark_ready()
    assert boot.database_ready()
    assert not database_template().exists()
    assert not any((tmp_path / "cache" / "prefect-db").iterdir())
    boot.release()


def test_a_damaged_template_is_not_seeded_and_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELMILL_CACHE", str(tmp_path / "cache"))
    template = database_template()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)  # cut short: not a readable database
    boot = ServerBoot(tmp_path / "home").acquire()
    assert not boot.seed_database()  # the server will create and migrate the database itself
    assert not (tmp_path / "home" / "prefect.db").exists() and not template.exists()
    assert [p.name for p in (tmp_path / "home").iterdir()] == [LOCK_FILE]  # no partial copy left
    boot.release()
