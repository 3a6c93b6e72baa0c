"""The home's boot lock: one Prefect server at a time sets up a new home's database."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pixelmill.server_boot import LOCK_FILE, READY_FILE, ServerBoot, prefect_version

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
