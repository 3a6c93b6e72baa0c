"""Ray for the flows, started only when a flow first submits work.

Every flow runs its tasks on Ray through prefect-ray. ``RayTaskRunner`` connects to Ray
as the flow starts, and importing prefect-ray imports Ray (about a second); a scheduled
run that finds nothing to do would pay both and use neither. ``LazyRayTaskRunner``
starts as a plain task runner and creates the ``RayTaskRunner`` at the first ``submit``,
after asking the command's runtime to connect Ray (``runtime.ensure_ray``: the local Ray
or cluster the command was set up for, with its workers' environment). ``remote_options``
is prefect-ray's, imported when used.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from prefect.task_runners import TaskRunner


class LazyRayTaskRunner(TaskRunner):
    """A ``RayTaskRunner`` made at the first submitted task; a flow that submits none never touches Ray."""

    def __init__(self) -> None:
        super().__init__()
        self._inner = None

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

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        return self._ray_runner().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def __exit__(self, *exc_info: Any) -> None:
        inner, self._inner = self._inner, None
        try:
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
