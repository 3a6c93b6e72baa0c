"""A fine-tuning campaign through the real CLI, real Ray and a real Prefect server.

One DAG: regularization retrieval (real prior for Custom Diffusion) → generated class
images for DreamBooth (only the missing ones) → three jobs → results table and report;
then a rerun skips everything and `finetune status` reports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pixelmill.datasets import Dataset
from tests.conftest import run_cli
from tests.helpers.http_server import serve_directory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def campaign_file(tmp_path_factory, tiny_models, cluster):
    from pixelmill.samples import draw_concept_images, write_image_dataset, write_sample_pool_source

    root = tmp_path_factory.mktemp("campaign")
    with serve_directory(str(root)) as srv:
        write_sample_pool_source(str(root / "files"), srv.base_url + "/files", str(root / "pool-src"))
        proc = run_cli(["pool", "build", str(root / "pool-src"), "--clip", tiny_models["clip"],
                        "--out", str(root / "pool")], cluster)
        assert proc.returncode == 0, proc.stderr[-3000:]
        write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0))
        write_image_dataset(str(root / "one-class-image"), draw_concept_images(1, seed=9, color=(90, 90, 90)))
        cfg = {
            "output": str(root / "out"), "model": tiny_models["img2img"], "clip_model": tiny_models["clip"],
            "retrieve": {"prompts": ["a photo of a dog"], "pool": str(root / "pool"), "num_images": 3,
                         "threshold": 0.85, "resolution": 64,
                         "download": {"allow_loopback": True, "timeout": 5, "retries": 0}},
            "concepts": {
                "dog": {"instance_data": str(root / "dog"), "token": "<dog1>", "class_word": "dog",
                        "class_data": "retrieval"},
                "dog-db": {"instance_data": str(root / "dog"), "token": "sks", "class_word": "dog",
                           "class_data": str(root / "one-class-image")},
            },
            "defaults": {"resolution": 64, "max_steps": 4, "train_batch_size": 2, "learning_rate": 1e-3,
                         "checkpoint_every": 2, "num_class_images": 3},
            # (data-parallel jobs, a Ray Train TorchTrainer over 2 workers: test_multinode.py)
            "jobs": [{"name": "dog-lora", "method": "lora", "concepts": ["dog"]},
                     {"name": "dog-cd", "method": "custom_diffusion", "concepts": ["dog"]},
                     {"name": "dog-dreambooth", "method": "dreambooth", "concepts": ["dog-db"]}],
            "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 3},
        }
        path = root / "campaign.yaml"
        path.write_text(yaml.safe_dump(cfg))
        yield path


def test_campaign_end_to_end(campaign_file, cluster):
    out = Path(yaml.safe_load(campaign_file.read_text())["output"])
    dry = run_cli(["finetune", str(campaign_file), "--dry-run"], cluster)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "3 job(s): 3 to run" in dry.stdout
    assert "generate 2 class image(s) for 'a photo of a dog'" in dry.stdout
    assert "retrieval first" in dry.stdout

    proc = run_cli(["finetune", str(campaign_file), "--json"], cluster)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(summary["ran"]) == ["dog-cd", "dog-dreambooth", "dog-lora"] and not summary["failed"]
    assert summary["class_images"] == 2

    real = Dataset.open(str(out / "retrieval" / "images"))
    assert real.complete and real.num_rows == 3
    generated = [p for p in (out / "class_images").glob("*/images")]
    assert len(generated) == 1 and Dataset.open(str(generated[0])).num_rows == 2

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["name"] for r in table} == {"dog-lora", "dog-cd", "dog-dreambooth"}
    for r in table:
        assert r["status"] == "finished" and r["step"] == 4
        assert r["clip_text_alignment"] is not None and r["peak_memory_mb"] > 0
        assert all(Path(a).exists() for a in r["artifacts"])
    cd = next(r for r in table if r["name"] == "dog-cd")
    cd_job = json.loads((Path(cd["job_dir"]) / "job.json").read_text())
    assert cd_job["skipped_rows"] == []
    assert any(a.endswith("pytorch_custom_diffusion_weights.safetensors") for a in cd["artifacts"])
    html = (out / "report.html").read_text()
    assert "dog-dreambooth" in html and "<svg" in html and "samples/final/000.png" in html

    # the job and flow runs are in the test's Prefect server
    status = run_cli(["finetune", "status", str(campaign_file), "--json"], cluster)
    assert status.returncode == 0, status.stderr[-2000:]
    assert {s["state"] for s in json.loads(status.stdout)} == {"finished"}

    again = run_cli(["finetune", str(campaign_file), "--json"], cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["ran"] == [] and sorted(second["skipped"]) == ["dog-cd", "dog-dreambooth", "dog-lora"]
    assert second["class_images"] == 0


def test_bad_campaign_fails_before_anything_starts(campaign_file, cluster, tmp_path):
    cfg = yaml.safe_load(campaign_file.read_text())
    cfg["output"] = str(tmp_path / "out")
    cfg["concepts"]["dog"]["initializer_token"] = "golden retriever"
    cfg["concepts"]["dog-db"]["instance_data"] = str(tmp_path / "missing")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = run_cli(["finetune", str(bad)], cluster)
    assert proc.returncode == 2
    assert "initializer_token 'golden retriever' is 2 tokens" in proc.stderr
    assert "concept 'dog-db': instance_data" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_prior_whose_class_images_are_all_flagged_trains_saying_so(cluster, tmp_path):
    """The campaign generates the class images with a model whose safety checker flags every image:
    with ``prior_shortfall: warn`` it trains without the prior, and the run's summary, the results
    table, the report and ``finetune status`` say so."""
    from pixelmill.models.tiny import save_tiny_img2img
    from pixelmill.samples import draw_concept_images, write_image_dataset

    model = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    write_image_dataset(str(tmp_path / "dog"), draw_concept_images(4, seed=0))
    cfg = tmp_path / "campaign.yaml"
    cfg.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "model": model,
        "concepts": {"dog": {"instance_data": str(tmp_path / "dog"), "token": "sks", "class_word": "dog"}},
        "defaults": {"resolution": 64, "max_steps": 2, "train_batch_size": 2, "num_class_images": 2,
                     "with_prior_preservation": True},
        "jobs": [{"name": "db", "method": "dreambooth", "concepts": ["dog"]}],
        "eval": {"prompts": [], "samples_per_prompt": 1},
    }))
    # (the default, prior_shortfall: error, fails the job: tests/unit/tasks/test_train.py)
    warned = run_cli(["finetune", str(cfg), "--set", "defaults.prior_shortfall=warn", "--json"], cluster)
    assert warned.returncode == 0, warned.stderr[-4000:]
    out = tmp_path / "out"
    generated = next((out / "class_images").glob("*/images"))
    rejects = Dataset.open(str(generated)).rejects().to_pylist()
    assert [r["error"] for r in rejects] == ["nsfw", "nsfw"]  # the safety checker flagged both
    summary = json.loads(warned.stdout.strip().splitlines()[-1])
    assert summary["ran"] == ["db"] and "trained WITHOUT the prior" in summary["warnings"]["db"][0]
    (row,) = pq.read_table(out / "results.parquet").to_pylist()
    assert row["status"] == "finished" and (row["class_images"], row["class_images_wanted"]) == (0, 2)
    assert "trained WITHOUT the prior" in row["warnings"][0]
    assert "trained WITHOUT the prior" in (out / "report.html").read_text()
    status = run_cli(["finetune", "status", str(cfg)], cluster)
    assert "warning: concept 'dog': prior preservation has NO class image" in status.stdout
