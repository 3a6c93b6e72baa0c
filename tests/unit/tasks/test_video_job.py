"""The video job without Ray: MP4s keep frame count, size and rate; rejects with reasons;
skip, atlas reuse and checkpoint resume on rerun; the overlay leaves unedited pixels alone;
planning and config validation."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelmill.config import ConfigError, VideoConfig, load_config
from pixelmill.datasets.videos import list_videos, write_video_dataset
from pixelmill.tasks.video.atlas import Atlas
from pixelmill.tasks.video.homography import build_homography_atlas
from pixelmill.tasks.video.io import decode_video, encode_video, probe_video
from pixelmill.tasks.video.job import job_state, run_video_job
from pixelmill.tasks.video.plan import plan_videos, video_dir_name
from pixelmill.tasks.video.render import overlay_edit, render_frames
from pixelmill.tasks.video.results import write_video_results
from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan

T2L = {"iterations": 8, "alpha_init": 0.5, "sparsity_weight": 0.05, "views": 2, "width": 8}


def _mp4(path: Path, frames, fps=24) -> bytes:
    encode_video(frames, fps, path)
    return path.read_bytes()


def _zero_frame_avi(path: Path) -> bytes:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Encoded clips: an odd-size NTSC-rate pan (mpeg4), a moving shape, and three bad files."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "pan": _mp4(d / "pan.mp4", synthetic_pan(frames=6, size=(63, 47), shift=(2.0, 1.0)).frames,
                    Fraction(30000, 1001)),
        "shape": _mp4(d / "shape.mp4", synthetic_moving_shape(frames=6, size=(48, 40), radius=6.0,
                                                              velocity=(3.0, 1.0)).frames),
        "broken": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "zero": _zero_frame_avi(d / "zero.avi"),
        "single": _mp4(d / "single.mp4", synthetic_pan(frames=1, size=(32, 32)).frames),
    }


def _config(tmp_path: Path, clips: dict, ids: list[str], models: dict, **over) -> VideoConfig:
    ds = tmp_path / "videos"
    write_video_dataset(str(ds), [(i, clips[i]) for i in ids])
    base = {"input": str(ds), "output": str(tmp_path / "out"), "cpus_per_job": 1,
            "edit": {"method": "text2live", "prompt": "fire", "clip_model": models["clip"], "text2live": T2L}}
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return VideoConfig.model_validate(base)


def _jobs(cfg: VideoConfig) -> dict:
    return {j.spec["id"]: j for j in plan_videos(cfg).jobs}


def test_job_keeps_frames_size_and_rate_then_skips_then_reuses_the_atlas(tmp_path, clips, tiny_models,
                                                                           one_torch_thread):
    cfg = _config(tmp_path, clips, ["pan"], tiny_models)
    spec = _jobs(cfg)["pan"].spec
    rec = run_video_job(spec)
    assert rec["status"] == "finished" and rec["skipped"] is False, rec.get("error")
    d = Path(spec["dir"])
    src, out = probe_video(clips["pan"]), probe_video(d / "edited.mp4")
    assert (out.frames, out.width, out.height, out.fps_fraction) == (6, 63, 47, Fraction(30000, 1001))
    assert (src.frames, src.width, src.height, src.fps_fraction) == \
        (out.frames, out.width, out.height, out.fps_fraction)
    m = json.loads((d / "metrics.json").read_text())
    assert m["atlas_method"] == "homography" and m["atlas_psnr"] > 26  # measured 32.6 dB
    assert m["temporal_consistency_original"] >= 0 and m["temporal_consistency_edited"] >= 0
    layer = np.asarray(Image.open(d / "edit_layer.png"))
    atlas = Atlas.load(d / "atlas")
    assert layer.shape == atlas.layers[0].image.shape[:2] + (4,)
    assert len(rec["files"]["frames"]) == 4 and all((d / f["edited"]).is_file() for f in rec["files"]["frames"])

    again = run_video_job(spec)
    assert again["skipped"] is True and len(again["attempts"]) == 1

    # another edit: the job redoes the edit on the saved atlas without rebuilding it
    before = (d / "atlas" / "layer0_uv.npy").stat().st_mtime_ns
    cfg2 = cfg.model_copy(update={"edit": cfg.edit.model_copy(update={"prompt": "ice"})})
    spec2 = _jobs(cfg2)["pan"].spec
    assert spec2["atlas_hash"] == spec["atlas_hash"] and spec2["hash"] != spec["hash"]
    assert job_state(spec2)[0] == "changed"
    rec2 = run_video_job(spec2)
    assert rec2["status"] == "finished" and rec2["metrics"]["atlas_reused"] is True
    assert (d / "atlas" / "layer0_uv.npy").stat().st_mtime_ns == before


def test_bad_videos_are_rejects_with_reasons(tmp_path, clips, tiny_models):
    cfg = _config(tmp_path, clips, ["broken", "zero", "single", "shape"], tiny_models,
                  atlas={"max_frames": 4})
    reasons = {}
    for vid, job in _jobs(cfg).items():
        rec = run_video_job(job.spec)
        assert rec["status"] == "rejected", vid
        reasons[vid] = rec["error"]
    assert "unreadable or broken video file" in reasons["broken"]
    assert reasons["zero"].endswith("has 0 frames")
    assert reasons["single"].endswith("has 1 frame; atlas editing needs at least 2")
    assert "more than atlas.max_frames=4 frames" in reasons["shape"]
    # a rerun with the same config does not retry them; the metrics table has every row once
    plan = plan_videos(cfg)
    assert {j.action for j in plan.jobs} == {"reject"}
    assert "rejected before: " in plan.describe()
    table, _ = write_video_results(cfg.output, [j.spec for j in plan.jobs])
    rows = pq.read_table(table).to_pylist()
    assert sorted(r["id"] for r in rows) == ["broken", "shape", "single", "zero"]
    assert all(r["status"] == "rejected" and r["error"] for r in rows)


def test_sdedit_on_the_atlas_and_a_failed_edit_is_recorded_then_retried(tmp_path, clips, tiny_models,
                                                                         one_torch_thread):
    edit = {"method": "sdedit", "model": tiny_models["img2img"], "prompt": "a painting", "strength": 0.5,
            "steps": 3, "guidance_scale": 1.0, "clip_model": None, "text2live": None}
    cfg = _config(tmp_path, clips, ["shape"], tiny_models, edit=edit, render="atlas")
    spec = _jobs(cfg)["shape"].spec
    rec = run_video_job(spec)
    assert rec["status"] == "finished", rec.get("error")
    m = rec["metrics"]
    assert m["edit"]["t0_steps"] == 1 and m["edit"]["model_hash"]
    assert probe_video(Path(spec["dir"]) / "edited.mp4").frames == 6
    assert np.asarray(Image.open(Path(spec["dir"]) / "edit_layer.png"))[..., 3].max() == 255

    bad = {**spec, "hash": "other", "stage": {**spec["stage"], "model": str(tmp_path / "no-such-model")}}
    with pytest.raises(Exception):
        run_video_job(bad)
    failed = json.loads((Path(spec["dir"]) / "job.json").read_text())
    assert failed["status"] == "failed" and "no-such-model" in failed["error"]
    assert job_state(bad)[0] == "retry"


def test_neural_atlas_resumes_from_its_checkpoint(tmp_path, clips, tiny_models, one_torch_thread):
    neural = {"preset": "tiny", "iterations": 20, "checkpoint_every": 10, "batch_size": 256}
    cfg = _config(tmp_path, clips, ["shape"], tiny_models, atlas={"method": "neural", "neural": neural},
                  edit={"layer": "background"})
    spec = _jobs(cfg)["shape"].spec
    rec = run_video_job(spec)
    assert rec["status"] == "finished", rec.get("error")
    assert rec["metrics"]["atlas"]["start_iteration"] == 0 and rec["metrics"]["atlas_layers"] == ["background",
                                                                                                  "foreground"]
    assert (Path(spec["dir"]) / "atlas-checkpoints" / "checkpoint.json").is_file()
    more = cfg.model_copy(update={"atlas": cfg.atlas.model_copy(update={"neural": {**neural, "iterations": 30}})})
    spec2 = _jobs(more)["shape"].spec
    assert spec2["atlas_hash"] != spec["atlas_hash"]
    rec2 = run_video_job(spec2)
    assert rec2["status"] == "finished"
    assert rec2["metrics"]["atlas"]["start_iteration"] == 20 and rec2["metrics"]["atlas"]["iterations"] == 30
    assert probe_video(Path(spec["dir"]) / "edited.mp4").frames == 6


def test_overlay_keeps_pixels_the_edit_leaves_transparent():
    clip = synthetic_pan(frames=5, size=(64, 48), shift=(2.0, 1.0))
    atlas = build_homography_atlas(clip.frames)
    ha, wa = atlas.layers[0].image.shape[:2]
    edit = np.zeros((ha, wa, 4), np.uint8)
    edit[20:30, 30:44] = (255, 0, 0, 255)
    out = overlay_edit(clip.frames, atlas, 0, edit)
    rendered = render_frames(atlas, [np.where(edit[..., 3:] > 0, edit[..., :3], atlas.layers[0].image)])
    for t, (frame, new) in enumerate(zip(clip.frames, out)):
        red = np.all(new == (255, 0, 0), axis=-1)
        assert red.sum() > 60  # the square shows in every frame ...
        untouched = np.all(rendered[t] == render_frames(atlas)[t], axis=-1)
        # ... and wherever the edit does not reach, the frame is the original, not the atlas's rendering
        np.testing.assert_array_equal(new[untouched & ~red], frame[untouched & ~red])


def test_inputs_plan_and_config_errors(tmp_path, clips, tiny_models):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.mp4").write_bytes(clips["shape"])
    (folder / "sub" / "b c.mov").write_bytes(clips["pan"])
    (folder / "notes.txt").write_text("not a video")
    rows = list_videos(str(folder))
    assert [r.id for r in rows] == ["a.mp4", "sub/b c.mov"] and all(r.kind == "path" for r in rows)
    assert list_videos(str(folder / "a.mp4"))[0].id == "a.mp4"
    assert video_dir_name("sub/b c.mov").startswith("sub_b_c.mov-") and video_dir_name("a.mp4") == "a.mp4"

    ds = tmp_path / "paths"
    write_video_dataset(str(ds), [("a", "../folder/a.mp4"), ("gone", "../folder/gone.mp4")])
    cfg = VideoConfig(input=str(ds), output=str(tmp_path / "out"),
                      edit={"method": "text2live", "prompt": "fire", "clip_model": tiny_models["clip"]})
    jobs = _jobs(cfg)
    assert jobs["a"].action == "run" and decode_video(str(folder / "a.mp4")).width == 48
    assert jobs["gone"].action == "reject" and "gone.mp4: no such file" in jobs["gone"].reason
    write_video_dataset(str(tmp_path / "dupes"), [("x", b"1"), ("x", b"2")])
    with pytest.raises(ValueError, match="ids must be unique; repeated: x"):
        list_videos(str(tmp_path / "dupes"))

    def err(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(VideoConfig, path)
        return str(e.value)

    assert "sdedit needs `model`" in err("input: a\noutput: b\nedit: {method: sdedit, prompt: x}\n")
    assert "text2live needs `clip_model`" in err("input: a\noutput: b\nedit: {method: text2live, prompt: x}\n")
    assert "neural: iterationz: unknown key" in err(
        "input: a\noutput: b\natlas: {neural: {preset: tiny, iterationz: 3}}\nedit: {method: text2live, "
        "prompt: x, clip_model: c}\n")
    assert "needs `atlas.method: neural`" in err(
        "input: a\noutput: b\nedit: {method: text2live, prompt: x, clip_model: c, layer: foreground}\n")
    assert "placeholders are not supported" in err(
        "input: a\noutput: b\nedit: {method: sdedit, model: m, prompt: 'a {caption}'}\n")


def test_example_configs_are_valid():
    root = Path(__file__).resolve().parents[3] / "configs"
    homography = load_config(VideoConfig, root / "video-homography.yaml")
    assert homography.atlas.method == "homography" and homography.edit.method == "sdedit"
    neural = load_config(VideoConfig, root / "video-neural.yaml")
    assert neural.atlas.neural_config().iterations == 400 and neural.atlas.neural_config().mapping_width == 32
    assert neural.edit.layer == "foreground" and neural.edit.text2live.iterations == 40
