"""Stopping a command's run: Ctrl-C here, SIGTERM, or "Cancel" on its flow run in the Prefect UI / API.

A flow started by the CLI runs in the CLI's process, so no Prefect worker is there to act
on a cancellation asked for in the UI. :func:`cancellable` tags every flow run the command
starts with one tag of its own and watches the Prefect API for one of them entering
``Cancelling``; then it interrupts the command's main thread as Ctrl-C does. Either way the
command unwinds: the Ray driver ends, and with it the run's stage actors and training
tasks (Ray ends a driver's tasks and actors with it), committed shards and checkpoints
stay, and the command's flow runs are marked ``Cancelled`` (not ``Crashed``) with what
stopped them, while the Prefect API is still up. A rerun resumes. A cancel that arrives as
the work returns is honoured the same way (checked once more at the end), so no run is
left ``Cancelling`` behind a command that says it succeeded. SIGTERM (a service manager's stop,
``kill``, a scheduler's preemption) stops the command the same way, with exit status 143
instead of 130 (before, Ray's own handler ended it with status 15 and the run ``Crashed``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_log = logging.getLogger("pixelmill")

TAG_PREFIX = "pixelmill-cli-"


class RunCancelled(KeyboardInterrupt):
    """The command's run was stopped (Ctrl-C, SIGTERM, or cancelled through the Prefect API).

    ``exit_status``: what the command exits with (130, or 143 = 128 + SIGTERM).
    """

    def __init__(self, message: str, exit_status: int = 130) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command's flows ran."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


class _Watcher:
    def __init__(self, tag: str, poll: float) -> None:
        self.tag, self.poll = tag, poll
        self.requested: str | None = None  # the cancelled run's name, once seen
        self._stop = threading.Event()
        self._done = False  # the command's work has returned: no interrupt may be sent any more
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="pixelmill-cancel-watch", daemon=True)

    def _cancelling(self, client) -> str | None:
        """The name of one of this command's flow runs in ``Cancelling``, if any."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType

        cancelling = FlowRunFilter(tags=FlowRunFilterTags(all_=[self.tag]),
                                   state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])))
        runs = client.read_flow_runs(flow_run_filter=cancelling, limit=1)
        return runs[0].name if runs else None

    def _watch(self) -> None:
        from prefect.client.orchestration import get_client

        client = None
        while not self._stop.wait(self.poll):
            try:
                if client is None:  # one client for the thread's life, not one per poll
                    client = get_client(sync_client=True).__enter__()
                name = self._cancelling(client)
            except Exception:  # noqa: BLE001 - the API may be briefly away; the run itself reports a lost API
                continue
            if name:
                with self._lock:
                    self.requested = name
                    if not self._done:
                        os.kill(os.getpid(), signal.SIGINT)  # the main thread unwinds as on Ctrl-C
                break
        if client is not None:
            client.__exit__(None, None, None)

    def finish(self) -> str | None:
        """The work returned: stop interrupting, and say whether a cancel came in meanwhile
        (between the last poll and the end, the flow run is left ``Cancelling``)."""
        from prefect.client.orchestration import get_client

        with self._lock:
            self._done = True
        self.stop()
        if self.requested is None:
            try:
                with get_client(sync_client=True) as client:
                    self.requested = self._cancelling(client)
            except Exception:  # noqa: BLE001 - the run itself reports a lost API
                pass
        return self.requested

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _mark_cancelled(tag: str, message: str) -> None:
    """Every flow run of this command not yet final → ``Cancelled`` with ``message``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))):
                if run.state is None or not run.state.is_final() or run.state.is_crashed():
                    client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
    except Exception as e:  # noqa: BLE001 - the command is stopping anyway; say what could not be recorded
        _log.warning("could not mark the run cancelled in Prefect: %s", e)


def _own_interrupts(watcher: _Watcher):
    """Make sure the watcher's SIGINT reaches the main thread; returns what undoes it.

    Python turns SIGINT into KeyboardInterrupt only when SIGINT was not ignored at start-up,
    and a command started in the background by a script (``cmd &`` in a non-interactive
    shell, as CI runners and cron wrappers do) starts with it ignored: a cancel from the UI
    would then do nothing at all. Where SIGINT is ignored, a handler is installed for the
    command's duration that acts on the watcher's own interrupt only; any other SIGINT stays
    ignored, as whoever started the command asked.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.SIG_IGN, signal.SIG_DFL, None):
        return lambda: None  # Python's own KeyboardInterrupt (or the caller's handler) is in place

    def on_sigint(signum, frame) -> None:
        if watcher.requested:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return lambda: signal.signal(signal.SIGINT, previous)


@contextmanager
def cancellable(command: str, poll: float = 2.0) -> Iterator[None]:
    """Run a command's flows so that Ctrl-C or a cancellation in the Prefect UI stops them cleanly.

    Raises:
        RunCancelled: when stopped; its message says by what.
    """
    from prefect import tags

    tag = TAG_PREFIX + uuid.uuid4().hex[:12]
    watcher = _Watcher(tag, poll)
    restore = _own_interrupts(watcher)
    # SIGTERM unwinds as Ctrl-C does (``runtime`` keeps this handler across ray.init, which would put in
    # its own; Prefect's, inside a flow run, marks the run and then sends the signal on to this one)
    main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    watcher.start()
    try:
        with tags(tag):
            yield
        if watcher.finish():  # cancelled as it finished: the request is honoured all the same
            raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        watcher.stop()
        status = 130
        if watcher.requested:
            why = f"cancelled through the Prefect API (flow run {watcher.requested})"
        elif isinstance(e, Terminated):
            why, status = "stopped (SIGTERM)", 128 + signal.SIGTERM
        else:
            why = "interrupted (Ctrl-C)"
        _mark_cancelled(tag, f"pixelmill {command}: {why}")
        raise RunCancelled(f"{command} {why}", status) from None
    finally:
        watcher.stop()
        restore()
        if main:
            signal.signal(signal.SIGTERM, previous_term)
