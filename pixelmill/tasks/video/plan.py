"""Planning a video run: every input video's job spec and what the run does with it.

No Prefect and no models here: ``pixelmill video --dry-run`` uses this as is, and the
flow (``flows/video.py``) runs what it plans.

Each video's ``hash`` covers what its outputs depend on: the atlas, edit and render
settings and the source (path, size and modification time for files; the id for bytes
in a dataset, ids being stable). Its ``atlas_hash`` covers only the atlas settings and
the source, so a rerun with another edit reuses the saved atlas. Placement (GPUs, CPUs,
device) is hashed nowhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pixelmill.config import VideoConfig
from pixelmill.datasets import storage

VIDEOS_DIR = "videos"
CONFIG_JSON = "config.json"
METRICS_FILE = "metrics.parquet"
REPORT_FILE = "report.html"

_ACTIONS = {"new": "run", "resume": "resume", "retry": "retry", "changed": "redo", "finished": "skip",
            "rejected": "reject", "invalid": "reject"}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def video_dir_name(video_id: str) -> str:
    """A folder name for a video id: the id itself when it is a plain name, else a cleaned
    version with a hash suffix (so ids differing only in unsafe characters stay apart)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", video_id).strip("._") or "video"
    if clean == video_id and len(clean) <= 100:
        return clean
    return f"{clean[:80]}-{_hash(video_id)[:8]}"


@dataclass
class VideoJobPlan:
    """One video of the plan: its job spec, state and why."""

    spec: dict[str, Any]
    state: str  # new | resume | retry | changed | finished | rejected | invalid
    reason: str | None = None
    source: str = ""

    @property
    def action(self) -> str:
        return _ACTIONS[self.state]

    @property
    def runs(self) -> bool:
        """Whether the run submits a job for this video."""
        return self.action in ("run", "resume", "retry", "redo")

    def describe(self) -> str:
        why = {"new": "new", "resume": "resume: interrupted, or an atlas / checkpoints to reuse",
               "retry": f"failed before: {self.reason}", "changed": "made with another config: redo "
               "(the atlas is reused when its settings and the video are unchanged)",
               "finished": "finished with the same config", "rejected": f"rejected before: {self.reason}",
               "invalid": f"{self.reason}"}[self.state]
        return f"  {self.action:<7} {self.spec['id']:<32} {self.source}  ({why})"


@dataclass
class VideoPlan:
    """Every input video (up to ``limit``) with its job spec and state."""

    output: str
    config: dict[str, Any]
    jobs: list[VideoJobPlan] = field(default_factory=list)

    @property
    def todo(self) -> list[VideoJobPlan]:
        return [j for j in self.jobs if j.runs]

    def describe(self) -> str:
        n = {a: sum(j.action == a for j in self.jobs) for a in ("run", "resume", "retry", "redo", "skip", "reject")}
        lines = [f"{len(self.jobs)} video(s): {n['run']} to run, {n['resume']} to resume, {n['retry']} to retry, "
                 f"{n['redo']} to redo, {n['skip']} finished (skipped), {n['reject']} rejected"]
        lines += [j.describe() for j in self.jobs]
        return "\n".join(lines)


def plan_videos(cfg: VideoConfig) -> VideoPlan:
    """List the input's videos and read each one's state under ``output/videos/``.

    Raises:
        pixelmill.datasets.DatasetNotFound: no dataset and no video files at ``input``.
        ValueError: the video column is missing or of another type, or ids repeat.
    """
    from pixelmill.datasets.videos import list_videos
    from pixelmill.tasks.video.job import job_state

    rows = list_videos(cfg.input, cfg.video_column, cfg.limit)
    atlas = cfg.atlas.model_dump()
    if cfg.atlas.method == "neural":
        atlas["neural"] = cfg.atlas.neural_config().model_dump()
    atlas_affecting = cfg.atlas.affecting()
    edit_affecting = cfg.edit.affecting()
    stage = cfg.edit.stage_config(cfg.edit.resolution or 512, cfg.device, cfg.dtype, cfg.placement.cpus)
    plan = VideoPlan(output=cfg.output, config=cfg.output_affecting())
    root = storage.join(cfg.output, VIDEOS_DIR)
    for row in rows:
        source = row.fingerprint
        spec = {
            "id": row.id, "dir": storage.join(root, video_dir_name(row.id)), "source": row.source(),
            "hash": _hash({"atlas": atlas_affecting, "edit": edit_affecting, "render": cfg.render, "source": source}),
            "atlas_hash": _hash({"atlas": atlas_affecting, "source": source}),
            "atlas": atlas, "edit": edit_affecting, "stage": stage, "render": cfg.render,
            "device": cfg.device, "dtype": cfg.dtype, "cpus": cfg.placement.cpus, "reject": row.problem,
        }
        if row.problem:
            plan.jobs.append(VideoJobPlan(spec, "invalid", row.problem, row.describe() if row.path else ""))
            continue
        state, rec = job_state(spec)
        plan.jobs.append(VideoJobPlan(spec, state, rec.get("error"), row.describe()))
    return plan


def read_output_config(output: str) -> dict[str, Any] | None:
    """The ``config.json`` an earlier run left under ``output`` (None when there is none)."""
    url = storage.join(output, CONFIG_JSON)
    if not storage.exists(url):
        return None
    try:
        return json.loads(storage.read_text(url))
    except ValueError:
        return None


def write_output_config(output: str, affecting: dict[str, Any]) -> None:
    """Record the output-affecting config and its hash under ``output``."""
    from pixelmill.datasets import config_hash

    doc = {"config": affecting, "config_hash": config_hash(affecting)}
    storage.write_text_atomic(storage.join(output, CONFIG_JSON), json.dumps(doc, indent=2, sort_keys=True))
