"""Ending what a test started: a command's whole process group, as Ctrl-C would, then by force."""

from __future__ import annotations

import os
import signal
import subprocess


def interrupt_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT to ``proc``'s process group (started with ``start_new_session``); SIGKILL after ``timeout`` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
