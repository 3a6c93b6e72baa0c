"""Ray for the flows, started only when a flow first submits work.

Every flow runs its tasks on Ray through prefect-ray. ``RayTaskRunner`` connects to Ray
as the flow starts, and importing prefect-ray imports Ray (about a second); a scheduled
run that finds nothing to do would pay both and use neither. ``LazyRayTaskRunner``
starts as a plain task runner and creates the ``RayTaskRunner`` at the first ``submit``,
after asking the command's runtime to connect Ray (``runtime.ensure_ray``: the local Ray
or cluster the command was set up for, with its workers' environment). ``remote_options``
is prefect-ray's, imported when used. Tasks submitted inside ``in_process()`` run on a
thread of this process instead (Prefect's ``ThreadPoolTaskRunner``), still recorded as
task runs: a stage driven from the head node's own process needs no Ray worker for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

_IN_PROCESS: ContextVar[bool] = ContextVar("pixelmill_in_process", default=False)


class LazyRayTaskRunner(TaskRunner):
    """A ``RayTaskRunner`` made at the first submitted task; a flow that submits none never touches Ray."""

    def __init__(self) -> None:
        super().__init__()
        self._inner = None
        self._threads: ThreadPoolTaskRunner | None = None

    def duplicate(self) -> LazyRayTaskRunner:
        return type(self)()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyRayTaskRunner)

    __hash__ = object.__hash__

    def _ray_runner(self):
        if self._inner is None:
            from prefect_ray.task_runners import RayTaskRunner

            from pixelmill.runtime import ensure_ray

            ensure_ray()  # the command's Ray; without a runtime, RayTaskRunner starts a local one
            self._inner = RayTaskRunner().__enter__()
        return self._inner

    def _thread_runner(self) -> ThreadPoolTaskRunner:
        if self._threads is None:
            self._threads = ThreadPoolTaskRunner().__enter__()
        return self._threads

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        runner = self._thread_runner() if _IN_PROCESS.get() else self._ray_runner()
        return runner.submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def __exit__(self, *exc_info: Any) -> None:
        inner, self._inner = self._inner, None
        threads, self._threads = self._threads, None
        try:
            if threads is not None:
                threads.__exit__(*exc_info)
            if inner is not None:
                inner.__exit__(*exc_info)
        finally:
            super().__exit__(*exc_info)


@contextmanager
def remote_options(**options: Any):
    """prefect-ray's ``remote_options`` (Ray resources for the tasks submitted inside), imported when used."""
    from prefect_ray.context import remote_options as ray_remote_options

    with ray_remote_options(**options):
        yield


@contextmanager
def in_process():
    """Tasks submitted inside run on a thread of this process (a Prefect task run all the same)."""
    token = _IN_PROCESS.set(True)
    try:
        yield
    finally:
        _IN_PROCESS.reset(token)
