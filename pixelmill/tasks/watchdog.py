"""A watchdog that ends a worker which stops making progress.

A training job or a stage that hangs (a stuck collective, a driver that never returns, a
read from storage that never finishes) holds its GPU for ever and its run never ends.
The watchdog runs beside the work in a daemon thread: the work calls :meth:`Watchdog.beat`
each time it makes progress (a training step). When no beat came for ``stall`` seconds,
or the whole ran longer than ``total`` seconds, it records why (``on_expire``) and ends
the process hard: a hang inside native code never returns to Python, so nothing softer is
reliable. The process is a Ray worker; Ray then reports the task's worker as dead and
frees its resources, and the flow reads the recorded reason from the job's storage.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

EXIT_TIMED_OUT = 75  # EX_TEMPFAIL: the work may succeed when run again (it resumes)


class Watchdog:
    """Call ``on_expire(reason)`` and then ``exit(EXIT_TIMED_OUT)`` when progress stops.

    Args:
        stall: seconds allowed between beats, counted from the first beat (None: off).
        total: seconds allowed from :meth:`start` (None: off).
        on_expire: records the reason (called once, from the watchdog thread; its errors
            are swallowed so the process still ends).
        what: names the work in the reason ("job dog-lora").
        exit: ends the process (``os._exit``; tests pass their own).
        poll: seconds between checks.
    """

    def __init__(self, stall: float | None, total: float | None, on_expire: Callable[[str], None],
                 what: str = "the work", exit: Callable[[int], None] = os._exit, poll: float = 0.5) -> None:
        self.stall, self.total, self.on_expire, self.what = stall, total, on_expire, what
        self._exit, self._poll = exit, poll
        self._started = self._last = None
        self._progress = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired: str | None = None

    @property
    def enabled(self) -> bool:
        return self.stall is not None or self.total is not None

    def start(self) -> Watchdog:
        self._started = time.monotonic()
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="pixelmill-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, progress: str = "") -> None:
        """Progress was made (``progress`` says how far, for the reason)."""
        self._last = time.monotonic()
        self._progress = progress

    def disarm_stall(self) -> None:
        """Stop counting stalls (work with no beats follows, e.g. evaluation); ``total`` still applies."""
        self._last = None
        self.stall = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reason(self, now: float) -> str | None:
        """Why the work is out of time at ``now`` (None while it is not)."""
        where = f" ({self._progress})" if self._progress else ""
        if self.total is not None and now - self._started > self.total:
            return f"timed out: {self.what} ran longer than timeout={self.total:g} s{where}"
        if self.stall is not None and self._last is not None and now - self._last > self.stall:
            return f"timed out: {self.what} made no progress for stall_timeout={self.stall:g} s{where}"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            reason = self.reason(time.monotonic())
            if reason is None:
                continue
            self.expired = reason
            try:
                self.on_expire(reason)
            except Exception:  # noqa: BLE001 - the process must still end
                pass
            self._exit(EXIT_TIMED_OUT)
            return
