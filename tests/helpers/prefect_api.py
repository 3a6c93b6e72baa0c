"""Read back what a CLI run recorded in the test Prefect server: its task runs and its summary artifact."""

from __future__ import annotations

import asyncio
import json
from typing import Any


def _run(api_url: str, coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(go())


def task_runs(api_url: str, flow_run_id: str) -> list:
    """The task runs of one flow run."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    async def read(client):
        return await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))

    return _run(api_url, read)


def summary_artifact(api_url: str, flow_run_id: str) -> tuple[str, dict[str, Any], str]:
    """The ``pixelmill-*-summary`` artifact of one flow run: its key, ``{figure: value}``, its description.

    Rejects come back as ``rejected: <reason>`` figures; notes as a list under ``note``.
    """
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read(client):
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    found = [a for a in _run(api_url, read) if (a.key or "").startswith("pixelmill-")]
    assert len(found) == 1, f"expected one summary artifact on flow run {flow_run_id}, got {found}"
    art = found[0]
    assert art.type == "table"
    rows = json.loads(art.data) if isinstance(art.data, str) else art.data
    figures: dict[str, Any] = {"note": []}
    for row in rows:
        if row["figure"] == "note":
            figures["note"].append(row["value"])
        else:
            figures[row["figure"]] = row["value"]
    return art.key, figures, art.description or ""
