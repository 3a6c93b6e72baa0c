"""Ends the processes a pixelmill command spawned for itself once the command is gone.

Used by ``pixelmill.runtime``: the embedded Prefect server and a local Ray's processes must
not outlive a command that was SIGKILLed. Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

# Every process a command spawns inherits this variable (value: a token unique to the
# command), so the watchdog finds them after the command died and they were reparented.
RUNTIME_MARK = "PIXELMILL_RUNTIME_ID"


# The watchdog: waits on a pipe from the command (EOF: the command died, however it
# died; "stop": it ended cleanly) and checks that its parent is still the command, noting
# the command's descendants as it goes (they are reparented when it dies). Then it SIGTERMs
# them and every process carrying the command's mark (a process that rewrites its title,
# as Ray's agents do, may hide its environment), and SIGKILLs what is left after ``grace``
# seconds. argv: command pid, mark ("NAME=VALUE"), grace.
_WATCHDOG = r"""
import os, select, signal, sys, time
parent, mark, grace = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
me = os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[1]), fields[19]  # state, ppid, start time
    except (OSError, IndexError, ValueError):
        return None

def table():
    return {int(n): s for n in os.listdir("/proc") if n.isdigit() and (s := stat(int(n))) and s[0] != b"Z"}

def descendants(roots, procs):
    children = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child != me:
                found.add(child)
                todo.append(child)
    return found

def marked(procs):
    found = set()
    for pid in procs:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if pid != me and mark in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:
            pass
    return found

seen = {}  # pid -> start time, for every descendant of the command seen so far
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    procs = table()
    seen = {p: t for p, t in seen.items() if p in procs and procs[p][2] == t}
    seen.update({p: procs[p][2] for p in descendants([parent], procs)})
    if select.select([0], [], [], 0.5)[0]:
        data = os.read(0, 64)
        if b"stop" in data:
            sys.exit(0)
        if not data:
            break
for sig in (signal.SIGTERM, signal.SIGKILL):
    procs = table()
    ours = {p for p, t in seen.items() if p in procs and procs[p][2] == t} | marked(procs)
    ours |= descendants(ours, procs)
    for pid in ours:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(stat(p) and stat(p)[0] != b"Z" for p in ours):
        time.sleep(0.1)
"""


class Watchdog:
    """Ends the processes a command spawned for itself once the command is gone.

    A separate process, in its own session so that signals sent to the command's process
    group spare it, notes the command's descendants every half second (the embedded
    Prefect server, a local Ray's GCS, raylet, agents and workers) and notices the
    command's death through a pipe and its parent pid. It then terminates those processes
    and every other one carrying the command's ``PIXELMILL_RUNTIME_ID`` (inherited by
    whatever it started, reparented or not): SIGTERM, then SIGKILL after ``grace``
    seconds. Linux only (``/proc``); elsewhere it does nothing.
    """

    def __init__(self, grace: float = 5.0):
        self.grace = grace
        self.proc: subprocess.Popen | None = None
        self._previous_mark: str | None = None

    def start(self) -> Watchdog:
        if not Path("/proc/self/environ").exists():
            return self
        self._previous_mark = os.environ.get(RUNTIME_MARK)
        value = f"{os.getpid()}-{secrets.token_hex(8)}"
        env = {k: v for k, v in os.environ.items() if k != RUNTIME_MARK}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), f"{RUNTIME_MARK}={value}", str(self.grace)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        os.environ[RUNTIME_MARK] = value
        return self

    def stop(self) -> None:
        """The command ends cleanly: the watchdog leaves without touching anything."""
        if self.proc is None:
            return
        if self._previous_mark is None:
            os.environ.pop(RUNTIME_MARK, None)
        else:
            os.environ[RUNTIME_MARK] = self._previous_mark
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None
