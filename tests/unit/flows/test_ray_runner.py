"""Where a flow's tasks run: on Ray workers, or in this process inside ``in_process()`` (the stage
driver on the head node), both as Prefect task runs of the same flow run."""

from __future__ import annotations

import os

import pytest
from prefect import flow, task

from pixelmill.flows.common import Progress, driver_on_head
from pixelmill.flows.ray_runner import LazyRayTaskRunner, in_process


@task
def where() -> int:
    return os.getpid()


@flow(task_runner=LazyRayTaskRunner())
def both_ways() -> dict:
    with in_process():
        here = where.submit().result()
    there = where.submit().result()
    return {"in_process": here, "default": there, "driver_on_head": driver_on_head()}


@pytest.mark.slow
def test_tasks_run_on_ray_workers_unless_submitted_in_process(tmp_path):
    from pixelmill.runtime import Runtime

    with Runtime(home=tmp_path / "home", num_cpus=1):
        got = both_ways()
    assert got["in_process"] == os.getpid()  # a thread of this process, no Ray worker
    assert got["default"] != os.getpid()  # a Ray worker process
    assert got["driver_on_head"] is True  # a local Ray: this process is on its only (head) node


def test_a_local_progress_counter_counts_in_this_process():
    p = Progress.create(total=10, local=True)
    assert p.handle is None and p.get() == 0
    p.add(3)
    p.add(4)
    assert p.get() == 7
