"""`pixelmill video` through the real CLI, real Ray and a real Prefect server.

A dataset of video paths: a synthetic pan, a moving shape (odd size, NTSC rate), a broken
file, a zero-frame video and a single-frame video → homography atlases, SDEdit on the
tiny model → edited MP4s with the sources' frame count, size and rate, a metrics row per
video, rejects with reasons, a report; a rerun skips everything; a changed config is
refused without --overwrite. Then a tiny neural atlas on one file, resumed from its
checkpoint when its iterations are raised.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pixelmill.datasets.videos import write_video_dataset
from pixelmill.tasks.video.io import encode_video, probe_video
from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("video")
    clips = root / "clips"
    encode_video(synthetic_pan(frames=8, size=(64, 48), shift=(2.0, 1.0)).frames, 24, clips / "pan.mp4")
    encode_video(synthetic_moving_shape(frames=6, size=(47, 35), radius=6.0, velocity=(3.0, 1.0)).frames,
                 Fraction(30000, 1001), clips / "shape.mp4")
    (clips / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with av.open(str(clips / "zero.avi"), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    encode_video(synthetic_pan(frames=1, size=(32, 32)).frames, 24, clips / "single.mp4")
    names = {"pan": "pan.mp4", "shape": "shape.mp4", "broken": "broken.mp4", "zero": "zero.avi",
             "single": "single.mp4"}
    # paths relative to the dataset folder
    write_video_dataset(str(root / "videos"), [(k, f"../clips/{v}") for k, v in names.items()])
    cfg = {
        "input": str(root / "videos"), "output": str(root / "out"),
        "atlas": {"method": "homography"},
        "edit": {"method": "sdedit", "model": tiny_models["img2img"], "prompt": "a watercolor painting",
                 "strength": 0.5, "steps": 4, "guidance_scale": 1.0},
        "cpus_per_job": 1,
    }
    path = root / "video.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path, clips, names


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_video_flow_end_to_end(inputs, cluster):
    root, config, clips, names = inputs
    out = root / "out"
    dry = run_cli(["video", str(config), "--dry-run"], cluster)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "5 video(s): 5 to run" in dry.stdout and "run     pan" in dry.stdout
    assert not out.exists()

    s = _summary(run_cli(["video", str(config), "--json"], cluster))
    assert sorted(s["ran"]) == ["pan", "shape"] and not s["failed"] and not s["skipped"]
    assert sorted(s["rejected"]) == ["broken", "single", "zero"]
    assert "unreadable or broken video file" in s["rejected"]["broken"]
    assert s["rejected"]["zero"].endswith("zero.avi has 0 frames")
    assert s["rejected"]["single"].endswith("single.mp4 has 1 frame; atlas editing needs at least 2")

    for vid in ("pan", "shape"):
        src, edited = probe_video(clips / names[vid]), probe_video(out / "videos" / vid / "edited.mp4")
        assert (edited.frames, edited.width, edited.height, edited.fps_fraction) == \
            (src.frames, src.width, src.height, src.fps_fraction)
    assert probe_video(out / "videos" / "shape" / "edited.mp4").fps_fraction == Fraction(30000, 1001)

    rows = {r["id"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    assert sorted(rows) == ["broken", "pan", "shape", "single", "zero"]
    for vid in ("pan", "shape"):
        r = rows[vid]
        assert r["status"] == "finished" and r["error"] is None and r["atlas_method"] == "homography"
        assert r["temporal_consistency_original"] is not None and r["temporal_consistency_edited"] is not None
        assert r["edit_psnr"] < 30  # the (random-weight) edit changed the frames
        assert Path(r["edited_video"]).is_file() and Path(r["edit_layer_image"]).is_file()
    assert (rows["pan"]["frames"], rows["pan"]["fps"], rows["pan"]["width"], rows["pan"]["height"]) == (8, 24.0, 64, 48)
    # a camera pan is what a homography atlas models (measured 30.1 dB); the median mosaic leaves the
    # moving disk out, so the static-camera clip reconstructs worse (measured 22.8 dB)
    assert rows["pan"]["atlas_psnr"] > 27 and 20 < rows["shape"]["atlas_psnr"] < rows["pan"]["atlas_psnr"]
    for vid in ("broken", "zero", "single"):
        assert rows[vid]["status"] == "rejected" and rows[vid]["error"] == s["rejected"][vid]
    html = (out / "report.html").read_text()
    assert 'src="videos/pan/frames/original-00000.png"' in html and 'src="videos/pan/frames/edited-00007.png"' in html
    assert "has 1 frame; atlas editing needs at least 2" in html

    again = _summary(run_cli(["video", str(config), "--json"], cluster))
    assert again["ran"] == [] and sorted(again["skipped"]) == ["pan", "shape"]
    assert sorted(again["rejected"]) == ["broken", "single", "zero"]
    assert len(json.loads((out / "videos" / "pan" / "job.json").read_text())["attempts"]) == 1

    changed = run_cli(["video", str(config), "--set", "edit.prompt=an oil painting"], cluster)
    assert changed.returncode == 2 and "changed: edit.prompt" in changed.stderr and "Traceback" not in changed.stderr
    missing = run_cli(["video", str(config), "--set", f"input={root / 'nothing'}", "--set", f"output={root / 'o2'}"],
                      cluster)
    assert missing.returncode == 2 and "input: " in missing.stderr and "no video files" in missing.stderr


@pytest.mark.sweep  # resume from a checkpoint: tests/unit/tasks/test_video_job.py and test_video_atlas.py
def test_neural_atlas_on_one_file_resumes_from_checkpoint(inputs, cluster, tiny_models, tmp_path):
    root, _, clips, _ = inputs
    cfg = {
        "input": str(clips / "shape.mp4"), "output": str(tmp_path / "neural"),
        "atlas": {"method": "neural", "neural": {"preset": "tiny", "iterations": 100, "checkpoint_every": 50,
                                                 "batch_size": 512}},
        "edit": {"method": "text2live", "layer": "foreground", "prompt": "fire", "clip_model": tiny_models["clip"],
                 "text2live": {"iterations": 5, "views": 2, "width": 8, "alpha_init": 0.5}},
        "cpus_per_job": 1,
    }
    path = tmp_path / "neural.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = _summary(run_cli(["video", str(path), "--json"], cluster))
    assert s["ran"] == ["shape.mp4"], s
    d = tmp_path / "neural" / "videos" / "shape.mp4"
    assert probe_video(d / "edited.mp4").frames == 6
    assert (d / "atlas-checkpoints" / "checkpoint.json").is_file()
    assert json.loads((d / "atlas" / "atlas.json").read_text())["method"] == "neural"

    more = ["--set", "atlas.neural.iterations=150"]
    refused = run_cli(["video", str(path), *more], cluster)
    assert refused.returncode == 2 and "atlas.neural.iterations" in refused.stderr
    s2 = _summary(run_cli(["video", str(path), *more, "--overwrite", "--json"], cluster))
    assert s2["ran"] == ["shape.mp4"]
    atlas = json.loads((d / "metrics.json").read_text())["atlas"]
    assert atlas["start_iteration"] == 100 and atlas["iterations"] == 150
