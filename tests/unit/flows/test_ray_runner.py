"""Where a flow's tasks run: submitted, on Ray workers; called, in the flow's own thread (how a
stage is driven when the command is on the head node), both as task runs of the flow run."""

from __future__ import annotations

import os
import threading

import pytest
from prefect import flow, task

from pixelmill.flows.common import Progress, driver_on_head
from pixelmill.flows.ray_runner import LazyRayTaskRunner


@task
def where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


@flow(task_runner=LazyRayTaskRunner())
def both_ways() -> dict:
    return {"called": where(), "submitted": where.submit().result(), "flow_thread": threading.get_ident(),
            "driver_on_head": driver_on_head()}


@pytest.mark.slow
def test_a_called_task_runs_in_the_flows_thread_and_a_submitted_one_on_a_ray_worker(tmp_path):
    from pixelmill.runtime import Runtime

    with Runtime(home=tmp_path / "home", num_cpus=1):
        got = both_ways()
    assert tuple(got["called"]) == (os.getpid(), got["flow_thread"])  # interruptible by a Ctrl-C or a cancel
    assert got["submitted"][0] != os.getpid()  # a Ray worker process
    assert got["driver_on_head"] is True  # a local Ray: this process is on its only (head) node


def test_a_local_progress_counter_counts_in_this_process():
    p = Progress.create(total=10, local=True)
    assert p.handle is None and p.get() == 0
    p.add(3)
    p.add(4)
    assert p.get() == 7
