"""One video job: decode → atlas → edit one atlas layer → render → encode → measure → record.

``run_video_job(spec)`` is what the video flow runs, one Prefect task per video on a Ray
worker (no Prefect here). It writes everything under the video's folder ``spec["dir"]``:

- ``atlas/``: the atlas (``Atlas.save``: one PNG per layer, UV maps, alpha), reused by a
  rerun whose atlas settings and decoded frames are unchanged (only the edit reruns);
- ``atlas-checkpoints/``: neural atlas training checkpoints, resumed after a crash or
  when ``iterations`` is raised;
- ``edit_layer.png``: the edit as a straight-alpha RGBA PNG of the edited layer's size.
  Text2Live makes it directly (transparent outside the atlas pixels some frame shows);
  for SDEdit and InstructPix2Pix it is the edited image (resized back to the layer) with
  alpha 255 on those pixels and 0 elsewhere;
- ``edited_atlas.png``: the edit composited over the layer image;
- ``edited.mp4``: the edited video, same frame count, size and frame rate as the source;
- ``frames/``: a few frames as PNG (``original-``, ``atlas-`` (re-rendered from the
  unedited atlas), ``edited-``), for the report;
- ``metrics.json`` and ``job.json`` (status ``running`` / ``finished`` / ``rejected`` /
  ``failed``, the reason, the spec's hash, the attempts).

A video that cannot be used (unreadable, no video stream, 0 or 1 frames, longer than
``max_frames``, frames that cannot be registered, an edit flagged ``nsfw``) is recorded as
``rejected`` with its reason and returned, not raised; any other error is recorded as
``failed`` and raised (a rerun retries it). A rerun with the same spec hash skips a
finished or rejected video.

A job spec is a plain dict made by ``tasks/video/plan.py``: ``id``, ``dir`` (local folder),
``source`` (``datasets.videos.read_video``), ``hash`` (everything the outputs depend on),
``atlas_hash`` (what the atlas depends on), ``atlas`` (``VideoAtlasSettings`` fields with
``neural`` resolved to ``NeuralAtlasConfig`` fields), ``edit`` (``VideoEditSettings.affecting()``),
``stage`` (the bulk-edit stage config, ``EditConfig`` as a dict), ``render``, ``device``,
``dtype``, ``cpus`` and ``reject`` (a reason known at planning, or None).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixelmill.datasets import storage

STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_REJECTED = "rejected"
STATUS_FAILED = "failed"

JOB_JSON = "job.json"
METRICS_JSON = "metrics.json"
ATLAS_DIR = "atlas"
CHECKPOINT_DIR = "atlas-checkpoints"
FRAMES_DIR = "frames"
EDITED_VIDEO = "edited.mp4"
EDIT_LAYER = "edit_layer.png"
EDITED_ATLAS = "edited_atlas.png"
REPORT_FRAMES = 4
MAX_AUTO_RESOLUTION = 1024
_OUTPUTS = (EDITED_VIDEO, EDIT_LAYER, EDITED_ATLAS, FRAMES_DIR, METRICS_JSON)


class VideoRejected(Exception):
    """A video that cannot be edited: recorded as a reject with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- records ---------------------------------------------------------------------------------

def read_record(directory: str | Path) -> dict[str, Any]:
    """The video's ``job.json`` (empty when there is none or it is unreadable); any fsspec URL."""
    try:
        return json.loads(storage.read_text(storage.join(str(directory), JOB_JSON)))
    except (OSError, ValueError):
        return {}


def _write_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    storage.write_text_atomic(str(directory / JOB_JSON), json.dumps(record, indent=2, default=str))
    return record


def job_state(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What a run does with this video, from its folder, and its record.

    Returns:
        (state, record): ``finished`` or ``rejected`` (same spec hash: nothing to do),
        ``retry`` (failed before), ``changed`` (made with another config: redone, the atlas
        reused when its own settings did not change), ``resume`` (interrupted, or atlas
        work to reuse) or ``new``.
    """
    d = str(spec["dir"])
    rec = read_record(d)
    progress = storage.exists(storage.join(d, CHECKPOINT_DIR, "checkpoint.json")) \
        or storage.exists(storage.join(d, ATLAS_DIR, "atlas.json"))
    if not rec:
        return ("resume" if progress else "new"), {}
    same = rec.get("hash") == spec["hash"]
    status = rec.get("status")
    if same and status == STATUS_FINISHED and storage.exists(storage.join(d, EDITED_VIDEO)):
        return "finished", rec
    if same and status == STATUS_REJECTED:
        return "rejected", rec
    if status == STATUS_FAILED:
        return "retry", rec
    if not same:
        return "changed", rec
    return "resume", rec


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats (e.g. the PSNR of identical frames) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# -- the job ---------------------------------------------------------------------------------

def run_video_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Edit one video (or skip it when already done); returns its record plus ``skipped``.

    A video folder on object storage (``s3://…``) is mirrored: the job works in a local
    folder filled from it (saved atlas, checkpoints, record), and uploads what it wrote
    after every neural-atlas checkpoint and when it ends, failed or not, so a rerun on
    any node resumes from there. PyAV and PIL write local files only.

    Raises:
        Exception: anything but a reject, after recording the video as ``failed``.
    """
    if not storage.is_remote(spec["dir"]):
        return _run_job(spec, Path(spec["dir"]))
    remote = spec["dir"]
    local = Path(tempfile.mkdtemp(prefix="pixelmill-video-"))
    try:
        if storage.exists(remote):
            storage.get_dir(remote, str(local))

        def upload(sub: str | None = None) -> None:
            src = local / sub if sub else local
            storage.sync_dir(str(src), storage.join(remote, sub) if sub else remote)

        try:
            return _run_job({**spec, "dir": str(local)}, local, upload)
        finally:
            upload()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _run_job(spec: dict[str, Any], d: Path, upload: Callable[[str], None] | None = None) -> dict[str, Any]:
    from pixelmill.tasks.stage import set_torch_threads

    state, rec = job_state(spec)
    if state in ("finished", "rejected"):
        return {**rec, "skipped": True}
    d.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUTS:
        target = d / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    attempts = rec.get("attempts", []) if rec.get("hash") == spec["hash"] else []
    record = {"id": spec["id"], "status": STATUS_RUNNING, "hash": spec["hash"], "atlas_hash": spec["atlas_hash"],
              "source": spec["source"], "error": None, "attempts": attempts + [{"started": time.time()}]}
    if spec.get("reject"):
        record.update(status=STATUS_REJECTED, error=spec["reject"], seconds=0.0)
        return {**_write_record(d, record), "skipped": False}
    _write_record(d, record)
    set_torch_threads(spec.get("cpus", 1))
    t0 = time.perf_counter()
    try:
        metrics, files = _process(spec, d, upload)
    except VideoRejected as e:
        record.update(status=STATUS_REJECTED, error=e.reason, seconds=time.perf_counter() - t0)
        return {**_write_record(d, record), "skipped": False}
    except Exception as e:  # noqa: BLE001 - recorded on the video, then re-raised for Prefect
        record.update(status=STATUS_FAILED, error=f"{type(e).__name__}: {e}"[:2000], seconds=time.perf_counter() - t0)
        _write_record(d, record)
        raise
    seconds = time.perf_counter() - t0
    record["attempts"][-1]["seconds"] = seconds
    metrics["seconds"] = seconds
    storage.write_text_atomic(str(d / METRICS_JSON), json.dumps(_clean(metrics), indent=2))
    record.update(status=STATUS_FINISHED, seconds=seconds, metrics=_clean(metrics), files=files)
    return {**_write_record(d, record), "skipped": False}


VFR_TOLERANCE = 0.5
"""Largest spread of frame intervals, in frame periods, still taken as a constant frame rate."""


def _decode(spec: dict[str, Any]):
    from pixelmill.datasets.videos import read_video
    from pixelmill.tasks.video.io import VideoError, decode_video

    limit = spec["atlas"]["max_frames"]
    try:
        video = decode_video(read_video(spec["source"]), max_frames=limit + 1)
    except VideoError as e:
        raise VideoRejected(str(e)) from None
    if len(video.frames) > limit:
        raise VideoRejected(f"the video has more than atlas.max_frames={limit} frames; "
                            "raise max_frames or trim the video")
    for i, frame in enumerate(video.frames):
        if frame.shape != video.frames[0].shape:
            raise VideoRejected(f"the frame size changes at frame {i} ({frame.shape[1]}x{frame.shape[0]}, "
                                f"frame 0 is {video.width}x{video.height}); an atlas needs one size")
    gaps = np.diff(np.asarray(video.timestamps, dtype=np.float64))
    if gaps.size and (gaps.max() - gaps.min()) > VFR_TOLERANCE / float(video.fps):
        raise VideoRejected(f"variable frame rate: frame intervals range from {gaps.min() * 1000:.1f} to "
                            f"{gaps.max() * 1000:.1f} ms; the edited MP4 is written at one constant rate, so "
                            "re-encode the input at a constant rate first (e.g. ffmpeg -fps_mode cfr)")
    return video


def _frames_sha256(frames: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(np.ascontiguousarray(f).tobytes())
    return h.hexdigest()


def _process(spec: dict[str, Any], d: Path, upload: Callable[[str], None] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    from pixelmill.tasks.video.io import probe_video
    from pixelmill.tasks.video.metrics import psnr, temporal_consistency
    from pixelmill.tasks.video.render import atlas_validity_mask, composite_edit, overlay_edit, render_frames

    t = time.perf_counter()
    video = _decode(spec)
    frames = video.frames
    decode_s = time.perf_counter() - t

    t = time.perf_counter()
    atlas, atlas_info = _atlas(spec, d, frames, video.fps, upload)
    atlas_s = time.perf_counter() - t
    reconstruction = render_frames(atlas)

    layer = 1 if spec["edit"]["layer"] == "foreground" else 0
    image = atlas.layers[layer].image
    valid = atlas_validity_mask(atlas, layer)
    if not valid.any():
        raise VideoRejected(f"the {spec['edit']['layer']} layer is not visible in any frame: nothing to edit")
    t = time.perf_counter()
    rgba, edit_info = _edit_layer(spec, image, valid, (frames, atlas.layers[layer].uv, atlas.visibility(layer)))
    edit_s = time.perf_counter() - t
    edited_layer = composite_edit(image, rgba)

    if spec["render"] == "atlas":
        images: list[np.ndarray | None] = [None] * len(atlas.layers)
        images[layer] = edited_layer
        edited = render_frames(atlas, images)
    else:
        edited = overlay_edit(frames, atlas, layer, rgba)

    tmp = d / f".{EDITED_VIDEO}.tmp"
    codec = _encode(edited, video.fps, tmp)
    info = probe_video(tmp)
    if (info.frames, info.width, info.height, info.fps_fraction) != (len(frames), video.width, video.height, video.fps):
        raise RuntimeError(f"encoded video is {info.frames} frames {info.width}x{info.height} at {info.fps_fraction} "
                           f"fps, the source {len(frames)} frames {video.width}x{video.height} at {video.fps} fps")
    os.replace(tmp, d / EDITED_VIDEO)

    Image.fromarray(rgba, "RGBA").save(d / EDIT_LAYER)
    Image.fromarray(edited_layer).save(d / EDITED_ATLAS)
    samples = sorted({int(round(x)) for x in np.linspace(0, len(frames) - 1, min(REPORT_FRAMES, len(frames)))})
    (d / FRAMES_DIR).mkdir(exist_ok=True)
    frame_files = []
    for i in samples:
        entry = {"index": i}
        for kind, source in (("original", frames), ("atlas", reconstruction), ("edited", edited)):
            rel = f"{FRAMES_DIR}/{kind}-{i:05d}.png"
            Image.fromarray(source[i]).save(d / rel)
            entry[kind] = rel
        frame_files.append(entry)

    metrics = {
        "id": spec["id"], "frames": len(frames), "fps": float(video.fps), "fps_fraction": str(video.fps),
        "width": video.width, "height": video.height, "codec": codec,
        "atlas_method": atlas.method, "atlas_layers": [lay.name for lay in atlas.layers],
        "atlas_sizes": [[lay.image.shape[1], lay.image.shape[0]] for lay in atlas.layers],
        "atlas_psnr": psnr(reconstruction, frames), "atlas_reused": atlas_info.pop("reused"), "atlas": atlas_info,
        "edit_method": spec["edit"]["method"], "edit_layer": spec["edit"]["layer"],
        "edit_coverage": float(valid.mean()), "edit": edit_info,
        "temporal_consistency_original": temporal_consistency(frames),
        "temporal_consistency_edited": temporal_consistency(edited, flow_frames=frames),
        "edit_psnr": psnr(edited, frames),
        "decode_seconds": decode_s, "atlas_seconds": atlas_s, "edit_seconds": edit_s,
    }
    files = {
        "edited_video": EDITED_VIDEO, "atlas": ATLAS_DIR,
        "atlas_layers": [f"{ATLAS_DIR}/layer{i}.png" for i in range(len(atlas.layers))],
        "edit_layer": EDIT_LAYER, "edited_atlas": EDITED_ATLAS, "frames": frame_files,
    }
    return metrics, files


def _encode(frames: list[np.ndarray], fps, path: Path) -> str:
    from pixelmill.tasks.video.io import encode_video

    return encode_video(frames, fps, path)


# -- the atlas -------------------------------------------------------------------------------

def _atlas(spec: dict[str, Any], d: Path, frames: list[np.ndarray], fps,
           upload: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The saved atlas when its settings and frames are unchanged, else a new one (saved)."""
    from pixelmill.tasks.video.atlas import Atlas, AtlasError
    from pixelmill.tasks.video.homography import build_homography_atlas

    fingerprint = _frames_sha256(frames)
    folder = d / ATLAS_DIR
    if (folder / "atlas.json").is_file():
        try:
            saved = Atlas.load(folder)
        except (AtlasError, OSError, ValueError, KeyError):
            saved = None
        if saved is not None and saved.meta.get("atlas_hash") == spec["atlas_hash"] \
                and saved.meta.get("frames_sha256") == fingerprint:
            return saved, {"reused": True, **saved.meta.get("job", {})}
    a = spec["atlas"]
    if a["method"] == "homography":
        try:
            atlas = build_homography_atlas(frames, reference=a.get("reference"), blend=a["blend"], fps=fps,
                                           detector=a["detector"])
        except AtlasError as e:
            raise VideoRejected(f"homography atlas: {e}") from None
        info: dict[str, Any] = {"covered_fraction": atlas.meta.get("covered_fraction")}
    else:
        atlas, info = _neural_atlas(spec, d, frames, fps, upload)
    atlas.meta.update(atlas_hash=spec["atlas_hash"], frames_sha256=fingerprint, job=info)
    tmp = d / f".{ATLAS_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    atlas.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return atlas, {"reused": False, **info}


def _neural_atlas(spec: dict[str, Any], d: Path, frames: list[np.ndarray], fps,
                  upload: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    from pixelmill.models.device import resolve_device
    from pixelmill.tasks.video.atlas import AtlasError
    from pixelmill.tasks.video.homography import build_homography_atlas, motion_masks
    from pixelmill.tasks.video.neural import NeuralAtlasConfig, train_neural_atlas

    a = spec["atlas"]
    cfg = NeuralAtlasConfig.model_validate(a["neural"])
    masks = None
    if a["masks"] == "motion":
        try:
            found = motion_masks(frames, build_homography_atlas(frames))
            masks = found if any(m.any() for m in found) else None
        except AtlasError:
            masks = None
    checkpoints = d / CHECKPOINT_DIR
    device = resolve_device(spec.get("device", "auto"))

    def train():
        return train_neural_atlas(frames, cfg, checkpoint_dir=checkpoints, masks=masks, fps=fps, device=device,
                                  on_checkpoint=(lambda: upload(CHECKPOINT_DIR)) if upload else None)

    try:
        atlas, stats = train()
    except AtlasError as e:
        if not str(e).startswith("checkpoint in"):
            raise VideoRejected(f"neural atlas: {e}") from None
        shutil.rmtree(checkpoints, ignore_errors=True)  # another video or other settings: start over
        atlas, stats = train()
    return atlas, {"start_iteration": stats.start_iteration, "iterations": stats.iterations,
                   "train_seconds": stats.seconds, "psnr_mlp": stats.psnr_mlp, "motion_masks": masks is not None}


# -- the edit --------------------------------------------------------------------------------

_LOADED: dict[str, Any] = {}


def _cached(key: dict[str, Any], build: Callable[[], Any]) -> Any:
    """One loaded editor per worker process: consecutive videos with the same editor reuse it."""
    k = json.dumps(key, sort_keys=True, default=str)
    if k not in _LOADED:
        _LOADED.clear()
        _LOADED[k] = build()
    return _LOADED[k]


def edit_resolution(width: int, height: int, configured: int | None) -> int:
    """The long side the layer is edited at: configured, else its own rounded up to 8 (at most 1024)."""
    if configured:
        return configured
    return min(MAX_AUTO_RESOLUTION, max(8, -(-max(width, height) // 8) * 8))


def _edit_layer(spec: dict[str, Any], image: np.ndarray, valid: np.ndarray, video: tuple | None = None
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """The RGBA edit of one atlas layer image by the configured editing method (see the module docstring);
    a method that ``renders_frames`` (Text2Live) also gets ``video`` (frames, the layer's UV maps and
    visibility) to apply its losses on the rendered frames."""
    from pixelmill import registry
    from pixelmill.models.loading import model_fingerprint
    from pixelmill.tasks.stage import RowError

    e, stage_cfg = spec["edit"], spec["stage"]
    h, w = image.shape[:2]
    cfg = {**stage_cfg, "resolution": edit_resolution(w, h, e.get("resolution"))}
    model = stage_cfg.get("model") or stage_cfg.get("clip_model")
    key = {**{k: v for k, v in stage_cfg.items() if k != "resolution"}, "adapters_affecting": e.get("adapters"),
           "fp": model_fingerprint(model) if model else None, "device": spec.get("device", "auto")}
    cls = registry.get("edit", stage_cfg["method"]).obj.for_config(stage_cfg)
    stage = _cached(key, lambda: _setup(cls, {**stage_cfg, "device": spec.get("device", "auto")}, spec.get("cpus", 1)))
    stage.config = {**cfg, "device": stage.config["device"]}
    try:
        if video is not None and getattr(stage, "renders_frames", False):
            return stage.edit_rgba(image, valid, spec["id"], frames=video)
        return stage.edit_rgba(image, valid, spec["id"])
    except RowError as err:
        if err.reason.startswith("edit_failed"):
            raise RuntimeError(f"edit: {err.reason}") from None
        raise VideoRejected(f"edit: {err.reason}") from None


def _setup(cls, config: dict[str, Any], cpus: float):
    """The editing method's stage, loaded (models on this worker)."""
    from pixelmill.tasks.stage import Resources

    stage = cls(dict(config), Resources(cpus=cpus, gpus=0))
    stage.setup()
    return stage
