"""Every flow with its inputs and outputs on ``s3://``: the real CLI, real Ray, real Prefect, a real S3 API.

The S3 API is moto's server on 127.0.0.1 (``s3_server`` fixture). No test passes an
endpoint or a key to pixelmill: CLI subprocesses and the session's Ray workers find
both in the AWS config and credentials files their environment names, as cluster
nodes do. The default suite runs one ``pixelmill run`` pipeline (a LoRA fine-tune
whose model, data, checkpoints and artifacts are on S3, then a bulk edit that reads
its images and model from S3 and loads the LoRA from S3), resumes the fine-tune from
its S3 checkpoints, and sweeps every record for a planted secret. Pairs, retrieval and
video on S3 run under ``make sweep``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pixelmill.datasets import Dataset, account, storage
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

# What a user exports on the machine they submit from; moto accepts any key. Workers on
# the Ray nodes never see these (they read the nodes' own AWS files), so a value that
# reached them, or any record, would have been carried by pixelmill.
PLANTED = {"AWS_ACCESS_KEY_ID": "pmplantedkeyid", "AWS_SECRET_ACCESS_KEY": "pmPLANTEDsecret-7Qz9xKc2Lw"}


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def s3_inputs(s3_server, tiny_models, tmp_path_factory):
    """Images, instance images and the tiny img2img model, all on S3 (written with the driver's AWS files)."""
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_concept_images, draw_sample_images, write_image_dataset

    local = tmp_path_factory.mktemp("s3-inputs")
    root = s3_server.url("inputs")
    draw_sample_images(str(local / "files"), n=4, corrupt=1, seed=3)
    import_folder(str(local / "files"), storage.join(root, "images"))
    write_image_dataset(storage.join(root, "dog"), draw_concept_images(3, seed=0))
    storage.sync_dir(tiny_models["img2img"], storage.join(root, "models", "img2img"), last="")
    ids = Dataset.open(storage.join(root, "images")).to_table(["id"])["id"].to_pylist()
    return {"images": storage.join(root, "images"), "dog": storage.join(root, "dog"),
            "model": storage.join(root, "models", "img2img"), "image_ids": ids}


def _campaign(s3_server, s3_inputs, tiny_models, name: str) -> dict:
    return {
        "output": s3_server.url(name, "campaign"), "model": s3_inputs["model"], "clip_model": tiny_models["clip"],
        "concepts": {"dog": {"instance_data": s3_inputs["dog"], "token": "<dog1>", "class_word": "dog"}},
        "defaults": {"resolution": 64, "max_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3,
                     "checkpoint_every": 1, "keep_checkpoints": 2},
        "jobs": [{"name": "dog-lora", "method": "lora", "concepts": ["dog"]}],
        "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 2},
    }


@pytest.fixture(scope="module")
def pipeline_run(s3_server, s3_inputs, tiny_models, cluster, tmp_path_factory):
    """``pixelmill run``: fine-tune (all on S3) → bulk edit on S3 with the LoRA from S3; planted keys in the env."""
    work = tmp_path_factory.mktemp("s3-pipeline")
    (work / "ft.yaml").write_text(yaml.safe_dump(_campaign(s3_server, s3_inputs, tiny_models, "pipe")))
    pipeline = {"steps": [
        {"name": "ft", "uses": "finetune", "config": "ft.yaml"},
        {"name": "edit", "uses": "edit",
         "with": {"input": s3_inputs["images"], "output": s3_server.url("pipe", "edited"), "model": s3_inputs["model"],
                  "prompt": "a painting", "strength": 0.5, "steps": 2, "resolution": 64,
                  "adapters": [{"path": "${steps.ft.jobs.dog-lora}", "scale": 0.8}],
                  "placement": {"workers": 1, "gpus": 0}}},
    ]}
    (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    proc = run_cli(["run", str(work / "pipeline.yaml"), "--json"], {**cluster, **PLANTED}, cwd=work)
    return work, proc


def test_pipeline_on_s3_trains_a_lora_and_edits_with_it_from_s3(pipeline_run, s3_server, s3_inputs):
    from pixelmill.models.adapters import adapter_fingerprint

    work, proc = pipeline_run
    s = _summary(proc)
    assert s["ft"]["ran"] == ["dog-lora"] and not s["ft"]["failed"], s
    assert s["edit"]["rows_out"] == 4 and s["edit"]["rejects"] == 1, s

    job_dir = s3_server.url("pipe", "campaign", "jobs")
    (job_id,) = storage.listdir(job_dir)
    job = storage.join(job_dir, job_id)
    assert json.loads(storage.read_text(storage.join(job, "job.json")))["status"] == "finished"
    assert storage.listdir(storage.join(job, "checkpoints")) == ["step-000001", "step-000002"]
    assert storage.exists(storage.join(job, "artifacts", "pytorch_lora_weights.safetensors"))
    fs = s3_server.filesystem()
    with fs.open(storage.join(s3_server.url("pipe", "campaign"), "results.parquet")) as f:
        (row,) = pq.read_table(f).to_pylist()
    assert row["status"] == "finished" and all(a.startswith("s3://") for a in row["artifacts"])
    assert storage.exists(storage.join(s3_server.url("pipe", "campaign"), "report.html"))

    edited = Dataset.open(s3_server.url("pipe", "edited"))
    assert edited.complete and account(s3_inputs["image_ids"], edited).ok
    hashes = set(edited.to_table(["model_hash"])["model_hash"].to_pylist())
    # the worker loaded the LoRA from S3: its file hash is in every row's provenance
    assert hashes == {next(iter(hashes)).split("+")[0] + "+" + adapter_fingerprint(storage.join(job, "artifacts"))}
    assert next(iter(hashes)).startswith("remote:")  # the model came from S3 too
    # nothing was written next to the command
    assert sorted(p.name for p in work.iterdir()) == ["ft.yaml", "pipeline.yaml"]


def test_finetune_resumes_from_its_s3_checkpoints(pipeline_run, s3_server, s3_inputs, tiny_models, cluster, tmp_path):
    work, first = pipeline_run
    assert first.returncode == 0, first.stderr[-3000:]
    more = ["--set", "defaults.max_steps=3"]
    dry = run_cli(["finetune", str(work / "ft.yaml"), *more, "--dry-run"], cluster, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "resume" in dry.stdout and "dog-lora" in dry.stdout, dry.stdout
    s = _summary(run_cli(["finetune", str(work / "ft.yaml"), *more, "--json"], cluster, cwd=tmp_path))
    assert s["ran"] == ["dog-lora"] and not s["failed"], s
    job_dir = s3_server.url("pipe", "campaign", "jobs")
    (job_id,) = storage.listdir(job_dir)
    job = storage.join(job_dir, job_id)
    record = json.loads(storage.read_text(storage.join(job, "job.json")))
    assert record["status"] == "finished" and record["step"] == 3
    assert storage.listdir(storage.join(job, "checkpoints")) == ["step-000002", "step-000003"]
    log = [json.loads(x) for x in storage.read_text(storage.join(job, "loss.jsonl")).splitlines() if x.strip()]
    assert [r["step"] for r in log] == [1, 2, 3]  # steps 1-2 from the first run, only step 3 trained now


def _sweep_files(paths: list[Path]) -> dict[Path, bytes]:
    out = {}
    for root in paths:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    out[p] = p.read_bytes()
                except OSError:
                    pass
    return out


def test_no_planted_secret_in_outputs_logs_ray_or_prefect(pipeline_run, s3_server, cluster):
    work, proc = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    secrets = [PLANTED["AWS_SECRET_ACCESS_KEY"], s3_server.secret_key]
    found = []

    # every object in the bucket (manifests, config copies, reports, job records, logs, weights)
    fs = s3_server.filesystem()
    objects = fs.find(s3_server.bucket)
    assert any(o.endswith("_manifest.json") for o in objects) and any(o.endswith("report.html") for o in objects)
    for key in objects:
        data = fs.cat_file(key)
        found += [f"s3://{key}" for s in secrets if s.encode() in data]
    # the command's output
    found += ["stdout/stderr" for s in secrets if s in proc.stdout or s in proc.stderr]
    # local files of the run, Ray's session logs, the Prefect server's database and logs
    ray_files = _sweep_files([Path(cluster["PIXELMILL_TEST_RAY_TMP"])])
    prefect_files = _sweep_files([Path(cluster["PIXELMILL_TEST_PREFECT_HOME"])])
    local = _sweep_files([work])
    for files in (ray_files, prefect_files, local):
        found += [str(p) for p, data in files.items() for s in secrets if s.encode() in data]
    assert not found, f"secret found in: {found}"

    # the sweep looked where the run left its traces (not a vacuous pass)
    edited_url = s3_server.url("pipe", "edited")
    assert any(p.name.endswith(".log") or p.suffix in (".out", ".err") for p in ray_files)
    # Ray logs each runtime environment it sets up (runtime_env_agent.log): the PREFECT_API_URL pixelmill
    # passes that way is there, so a credential passed the same way would have been found
    assert any(cluster["PREFECT_API_URL"].encode() in data for p, data in ray_files.items() if "runtime_env" in p.name)
    db = Path(cluster["PIXELMILL_TEST_PREFECT_HOME"]) / "prefect.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        params = [r[0] for r in con.execute("select parameters from flow_run")]
        logs = [r[0] for r in con.execute("select message from log")]
    finally:
        con.close()
    assert any(edited_url in (p or "") for p in params)  # the edit's config is in the flow run's parameters
    assert logs
    for s in secrets:
        assert not any(s in (p or "") for p in params) and not any(s in (m or "") for m in logs)


# -- the other flows on S3 (make sweep) ---------------------------------------------------------

@pytest.mark.sweep
def test_pairs_on_s3(s3_server, tiny_models, cluster, tmp_path):
    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter

    captions = s3_server.url("pairs", "captions")
    rows = ["a red car parked on a street", "a cat sleeping on a wooden chair", "   "]
    w = DatasetWriter(captions, "captions", 1, {"test": 1}).open()
    sw = w.shard("00000")
    sw.write(pa.table({"id": ["c0", "c1", "c2"], "caption": rows}))
    sw.commit()
    w.finish()
    out = s3_server.url("pairs", "out")
    cfg = tmp_path / "pairs.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        input=captions, output=out, seed=4,
        images=dict(model=tiny_models["img2img"], clip_model=tiny_models["clip"], samples_per_caption=2, steps=2,
                    height=64, width=64, max_per_caption=2, min_direction=-1.0, min_image_caption=-1.0,
                    min_image_similarity=-1.0))))
    s = _summary(run_cli(["pairs", str(cfg), "--json"], cluster, cwd=tmp_path))
    assert s["captions"] == 3 and s["text_rejects"] == 1
    text = Dataset.open(storage.join(out, "text"))
    pairs = Dataset.open(storage.join(out, "pairs"))
    assert text.complete and pairs.complete and account(["c0", "c1", "c2"], text).ok
    assert account(text.to_table(["id"])["id"].to_pylist(), pairs).ok and pairs.num_rows == 4
    assert {"input_image", "edit_prompt", "edited_image"} <= set(pairs.schema.names)
    again = _summary(run_cli(["pairs", str(cfg), "--json"], cluster, cwd=tmp_path))  # committed shards skipped
    assert again["pairs_skipped"] == ["00000"] and again["pairs"] == 0, again
    assert Dataset.open(storage.join(out, "pairs")).num_rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.yaml"]


@pytest.mark.sweep
def test_retrieval_with_pool_and_output_on_s3(s3_server, tiny_models, cluster, tmp_path):
    from pixelmill.samples import write_sample_pool_source
    from tests.helpers.http_server import serve_directory

    src, pool, out = (s3_server.url("retrieval", name) for name in ("src", "pool", "out"))
    with serve_directory(str(tmp_path)) as srv:
        write_sample_pool_source(str(tmp_path / "files"), srv.base_url + "/files", src)
        built = run_cli(["pool", "build", src, "--clip", tiny_models["clip"], "--out", pool], cluster, cwd=tmp_path)
        assert built.returncode == 0, built.stderr[-3000:]
        cfg = tmp_path / "retrieve.yaml"
        cfg.write_text(yaml.safe_dump(dict(
            prompts=["a photo of a dog"], pool=pool, output=out, num_images=3, threshold=0.85, resolution=64,
            download=dict(allow_loopback=True, timeout=5, retries=0))))
        s = _summary(run_cli(["retrieve", str(cfg), "--json"], cluster, cwd=tmp_path))
    (dog,) = s["prompts"].values()
    assert dog["downloaded"] == 3 and dog["shortfall"] == 0
    images = Dataset.open(storage.join(out, "images"))
    assert images.complete and images.num_rows == 3
    (folder,) = storage.listdir(storage.join(out, "real_reg"))
    listed = storage.read_text(storage.join(out, "real_reg", folder, "images.txt")).split()
    assert len(listed) == 3 and all(p.startswith("s3://") and storage.exists(p) for p in listed)


@pytest.mark.sweep
def test_video_on_s3_with_a_neural_atlas_resumed_from_s3(s3_server, tiny_models, cluster, tmp_path):
    from pixelmill.datasets.videos import write_video_dataset
    from pixelmill.tasks.video.io import encode_video, probe_video
    from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan

    encode_video(synthetic_pan(frames=6, size=(48, 32), shift=(2.0, 1.0)).frames, 24, tmp_path / "pan.mp4")
    encode_video(synthetic_moving_shape(frames=6, size=(40, 32), radius=6.0, velocity=(3.0, 1.0)).frames, 24,
                 tmp_path / "shape.mp4")
    videos = s3_server.url("video", "input")
    write_video_dataset(videos, [("pan", (tmp_path / "pan.mp4").read_bytes()),
                                 ("shape", (tmp_path / "shape.mp4").read_bytes())])
    out = s3_server.url("video", "out")
    cfg = {"input": videos, "output": out, "atlas": {"method": "homography"},
           "edit": {"method": "sdedit", "model": tiny_models["img2img"], "prompt": "a watercolor painting",
                    "strength": 0.5, "steps": 2, "guidance_scale": 1.0}, "cpus_per_job": 1}
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = _summary(run_cli(["video", str(path), "--json"], cluster, cwd=tmp_path))
    assert sorted(s["ran"]) == ["pan", "shape"] and not s["failed"] and not s["rejected"], s
    local = tmp_path / "check.mp4"
    local.write_bytes(storage.read_bytes(storage.join(out, "videos", "pan", "edited.mp4")))
    assert probe_video(local).frames == 6
    for name in ("metrics.parquet", "report.html", "config.json", "videos/pan/job.json",
                 "videos/pan/frames/edited-00005.png", "videos/shape/atlas/atlas.json"):
        assert storage.exists(storage.join(out, name)), name
    again = _summary(run_cli(["video", str(path), "--json"], cluster, cwd=tmp_path))
    assert again["ran"] == [] and sorted(again["skipped"]) == ["pan", "shape"]

    # a neural atlas whose checkpoints live on S3: more iterations resume from them
    neural = {**cfg, "input": storage.join(videos), "output": s3_server.url("video", "neural"), "atlas": {
        "method": "neural", "neural": {"preset": "tiny", "iterations": 40, "checkpoint_every": 20,
                                       "batch_size": 256}}, "limit": 1}
    path.write_text(yaml.safe_dump(neural))
    first = _summary(run_cli(["video", str(path), "--json"], cluster, cwd=tmp_path))
    assert first["ran"] == ["pan"], first
    ckpt = s3_server.url("video", "neural", "videos", "pan", "atlas-checkpoints", "checkpoint.json")
    assert storage.exists(ckpt)
    more = ["--set", "atlas.neural.iterations=60", "--overwrite", "--json"]
    second = _summary(run_cli(["video", str(path), *more], cluster, cwd=tmp_path))
    assert second["ran"] == ["pan"]
    atlas = json.loads(storage.read_text(s3_server.url("video", "neural", "videos", "pan", "metrics.json")))["atlas"]
    assert atlas["start_iteration"] == 40 and atlas["iterations"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.mp4", "pan.mp4", "shape.mp4", "video.yaml"]
