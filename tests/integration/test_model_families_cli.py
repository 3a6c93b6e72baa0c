"""SDXL checkpoints through the real CLI (Ray + Prefect): the t0 search and InstructPix2Pix; unknown families exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pixelmill.datasets import Dataset, account
from tests.conftest import run_cli
from tests.helpers.edit_inputs import sample_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return sample_dataset(tmp_path_factory.mktemp("inputs"), n=5, corrupt=1, seed=2, buckets=16)[0]


def _config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def _ids(url: str) -> list[str]:
    return Dataset.open(url).to_table(["id"])["id"].to_pylist()


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sdxl_t0_search_and_instruct_pix2pix_run_end_to_end(cluster, tmp_path, images):
    from pixelmill.models.tiny_families import save_tiny_sdxl, save_tiny_sdxl_instruct_pix2pix

    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    cfg = _config(tmp_path / "auto.yaml", input=images, output=str(tmp_path / "auto"), model=sdxl,
                  prompt="a watercolor painting", strength="auto", target_l2=0.2, steps=4, resolution=64, seed=3)
    s = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    out = Dataset.open(str(tmp_path / "auto"))
    assert account(_ids(images), out).ok
    assert s["rows_out"] == 5 and s["rejects"] == 1  # the corrupt file
    rows = out.to_table(["t0_steps", "l2"]).to_pylist()
    assert all(0 <= r["t0_steps"] <= 4 and r["l2"] <= 0.2 for r in rows)
    assert s["model_family"]["family"] == "sdxl" and s["model_family"]["vae_force_upcast"]

    ip2p = save_tiny_sdxl_instruct_pix2pix(tmp_path / "sdxl-ip2p")
    cfg = _config(tmp_path / "ip2p.yaml", input=images, output=str(tmp_path / "ip2p"), model=ip2p,
                  method="instruct_pix2pix", instruction="make it green", steps=2, resolution=64, seed=3)
    s = _summary(run_cli(["edit", str(cfg), "--json"], cluster))
    assert s["rows_out"] == 5 and account(_ids(images), str(tmp_path / "ip2p")).ok


def test_a_checkpoint_of_no_supported_family_exits_2_before_anything_starts(tmp_path, images):
    folder = tmp_path / "flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    env = {"RAY_ADDRESS": "127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:1/api"}  # nothing listens
    cfg = _config(tmp_path / "bad.yaml", input=images, output=str(tmp_path / "o"), model=str(folder), prompt="p")
    proc = run_cli(["edit", str(cfg)], env)
    assert proc.returncode == 2, proc.stderr
    assert "model:" in proc.stderr and "FluxPipeline" in proc.stderr and "no UNet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sd2_v_prediction_pairs_run_end_to_end(cluster, tmp_path, tiny_models):
    """Prompt-to-Prompt pairs from an SD 2.x v-prediction checkpoint, through the CLI."""
    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter
    from pixelmill.models.tiny_families import save_tiny_sd2v

    captions = ["a red car parked on a street", "a cat sleeping on a wooden chair"]
    w = DatasetWriter(str(tmp_path / "captions"), "captions", 1, {"test": 1}).open()
    shard = w.shard("00000")
    shard.write(pa.table({"id": ["c0", "c1"], "caption": captions}))
    shard.commit()
    w.finish()
    cfg = _config(tmp_path / "pairs.yaml", input=str(tmp_path / "captions"), output=str(tmp_path / "out"), seed=4,
                  images=dict(model=save_tiny_sd2v(tmp_path / "sd2v"), clip_model=tiny_models["clip"],
                              samples_per_caption=2, steps=3, height=64, width=64, max_per_caption=2,
                              min_direction=-1.0, min_image_caption=-1.0, min_image_similarity=-1.0))
    s = _summary(run_cli(["pairs", str(cfg), "--json"], cluster))
    assert s["captions"] == 2 and s["pairs"] == 4
    text_ids = _ids(str(tmp_path / "out" / "text"))
    assert account(text_ids, str(tmp_path / "out" / "pairs")).ok
