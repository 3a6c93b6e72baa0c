"""What every flow run reports, in one shape, and where it goes: the CLI and a Prefect artifact.

Each flow's summary (``EditSummary``, ``CampaignSummary``, …) derives from
:class:`FlowSummary` and says how its own fields map onto :class:`RunFigures` (rows in,
rows out, rejects by reason, throughput, GPU-hours, output URL, notes such as "ran on
CPU"). :func:`publish` is the one place that turns those figures into a Prefect table
artifact keyed ``pixelmill-<flow>-summary`` on the flow run, so the Prefect UI answers
"what did last night's run do" without opening any file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pixelmill.flows.summary")


@dataclass(kw_only=True)
class RunFigures:
    """One flow run's figures.

    Args:
        flow: the flow's name (``bulk-edit``, ``finetune``, …); the artifact key is
            ``pixelmill-<flow>-summary``.
        output: the output URL (dataset or root folder).
        unit_in / unit_out: what ``rows_in`` / ``rows_out`` count (rows, captions, pairs,
            jobs, videos, prompts, images).
        rows_in: inputs this run worked on (not those skipped as already done).
        rows_out: outputs this run made.
        rejected: rejects by reason (a reason is the error text before its first ``": "``).
        dropped: candidates dropped by design (CLIP-filtered samples, surplus downloads).
        skipped: units (shards, jobs, videos, prompts) already done before, not rerun.
        seconds: the run's wall time.
        gpu_hours: GPUs claimed × wall time of the work that claimed them (0 on CPU).
        notes: what the reader should know (``ran on CPU: the Ray cluster has no GPUs``).
    """

    flow: str
    output: str
    unit_in: str = "rows"
    unit_out: str = "rows"
    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    skipped: int = 0
    seconds: float = 0.0
    gpu_hours: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Outputs per second of wall time."""
        return self.rows_out / self.seconds if self.seconds > 0 else 0.0

    @property
    def key(self) -> str:
        return f"pixelmill-{self.flow}-summary"

    def table(self) -> list[dict[str, Any]]:
        """The artifact's rows: one ``{"figure", "value"}`` per figure, rejects one per reason."""
        rows: list[tuple[str, Any]] = [
            (f"{self.unit_in} in", self.rows_in), (f"{self.unit_out} out", self.rows_out),
            ("rejected", sum(self.rejected.values())),
        ]
        rows += [(f"rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        rows += [("dropped", self.dropped), ("skipped (done before)", self.skipped),
                 ("seconds", round(self.seconds, 3)), (f"throughput ({self.unit_out}/s)", round(self.throughput, 4)),
                 ("GPU-hours", round(self.gpu_hours, 6)), ("output", self.output)]
        rows += [("note", n) for n in self.notes]
        return [{"figure": k, "value": v} for k, v in rows]

    def line(self) -> str:
        """One line of Markdown for the artifact's description."""
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
        text = (f"**{self.flow}**: {self.rows_in} {self.unit_in} in → {self.rows_out} {self.unit_out} out, "
                f"{rejected} rejected{f' ({reasons})' if reasons else ''} in {self.seconds:.1f} s "
                f"({self.throughput:.3g} {self.unit_out}/s), {self.gpu_hours:.3g} GPU-hours → `{self.output}`")
        return text + "".join(f"  \n_{n}_" for n in self.notes)


@dataclass(kw_only=True)
class FlowSummary:
    """Fields every flow summary has besides its own (a base for the flows' summary dataclasses).

    Args:
        notes: what the reader should know about where it ran (``ran on CPU: …``).
        gpus: GPUs each worker of the run's GPU-claiming work claimed (0: CPU).
        gpu_hours: GPUs claimed × wall time of the work that claimed them.
        rejected_by_reason: rejects counted by reason.
        nodes: Ray node id → rows its stage actors made (data-parallel flows).
        flow_run_id: the Prefect flow run (its artifact ``pixelmill-<flow>-summary``).
    """

    notes: list[str] = field(default_factory=list)
    gpus: float = 0.0
    gpu_hours: float = 0.0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    flow_run_id: str | None = None

    def figures(self) -> RunFigures:  # pragma: no cover - interface
        raise NotImplementedError


def add_counts(into: dict[str, int], counts: dict[str, int], prefix: str = "") -> dict[str, int]:
    """``counts`` added into ``into`` (keys prefixed), returned."""
    for k, n in counts.items():
        into[prefix + k] = into.get(prefix + k, 0) + n
    return into


def reason_key(error: str | None) -> str:
    """A reject's reason without its row-specific detail: the text before the first ``": "``."""
    key = str(error or "").split(": ", 1)[0].strip()
    return key[:80] or "unknown"


def reason_counts(errors) -> dict[str, int]:
    """Errors counted by reason (:func:`reason_key`)."""
    out: dict[str, int] = {}
    for e in errors:
        k = reason_key(e)
        out[k] = out.get(k, 0) + 1
    return out


def gpu_hours(gpus_per_worker: float, workers: int, seconds: float) -> float:
    """GPUs claimed by ``workers`` workers for ``seconds`` seconds, in GPU-hours."""
    return gpus_per_worker * max(0, workers) * max(0.0, seconds) / 3600.0


def combine(flow: str, output: str, parts: list[RunFigures]) -> RunFigures:
    """A chained run's figures: the first step's inputs, the last step's outputs, the sums of the rest."""
    out = RunFigures(flow=flow, output=output)
    if not parts:
        return out
    out.unit_in, out.rows_in = parts[0].unit_in, parts[0].rows_in
    out.unit_out, out.rows_out = parts[-1].unit_out, parts[-1].rows_out
    for p in parts:
        add_counts(out.rejected, p.rejected, f"{p.flow}: ")
        out.dropped += p.dropped
        out.skipped += p.skipped
        out.seconds += p.seconds
        out.gpu_hours += p.gpu_hours
        out.notes += [f"{p.flow}: {n}" for n in p.notes]
    return out


def publish_figures(figures: RunFigures) -> str | None:
    """Publish ``figures`` as a table artifact on the current Prefect flow run; its id (None outside one)."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    try:
        create_table_artifact(table=figures.table(), key=figures.key, description=figures.line())
    except Exception as e:  # noqa: BLE001 - a finished run is never failed over its report
        log.warning("could not publish the run summary to Prefect: %s", e)
    return str(ctx.flow_run.id)


def publish(summary: FlowSummary) -> FlowSummary:
    """Publish a flow's summary (its :meth:`FlowSummary.figures`) and note the flow run on it."""
    summary.flow_run_id = publish_figures(summary.figures())
    for note in summary.notes:
        print(note)
    return summary
