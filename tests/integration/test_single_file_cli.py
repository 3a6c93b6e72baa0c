"""``model: file.safetensors`` through the real CLI: edits like its folder; a pickled file exits 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pixelmill.datasets import Dataset
from pixelmill.datasets.images import decode_image
from tests.conftest import run_cli
from tests.helpers.edit_inputs import sample_dataset

NOWHERE = {"RAY_ADDRESS": "127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:1/api"}  # nothing listens


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return sample_dataset(tmp_path_factory.mktemp("inputs"), n=4, corrupt=0, seed=2, buckets=16)[0]


def _config(path, **values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_pickled_model_file_exits_2_naming_why(tmp_path, images):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickled weights")
    for model in (str(ckpt), str(tmp_path / "absent.ckpt")):
        cfg = _config(tmp_path / "edit.yaml", input=images, output=str(tmp_path / "out"), model=model, prompt="p")
        proc = run_cli(["edit", cfg], NOWHERE)
        assert proc.returncode == 2, proc.stderr
        assert "model:" in proc.stderr and "pickled checkpoint" in proc.stderr and ".safetensors" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_edit_with_a_single_file_model_matches_its_folder(cluster, tmp_path, images, tiny_models):
    from pixelmill.models.single_file_writer import write_single_file

    single = write_single_file(tiny_models["img2img"], tmp_path / "tiny-sd1.safetensors")
    common = dict(input=images, prompt="a watercolor painting", strength=0.5, steps=3, resolution=64,
                  batch_size=2, seed=3)
    outputs = {}
    for name, model in (("folder", tiny_models["img2img"]), ("file", single)):
        cfg = _config(tmp_path / f"{name}.yaml", output=str(tmp_path / name), model=model, **common)
        proc = run_cli(["edit", cfg, "--json"], cluster)
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["rows_out"] == 4 and summary["rejects"] == 0
        table = Dataset.open(str(tmp_path / name)).to_table()
        outputs[name] = {r["id"]: np.asarray(decode_image(r["edited_image"]), dtype=np.int16)
                         for r in table.to_pylist()}
    assert outputs["file"].keys() == outputs["folder"].keys()
    for key, image in outputs["file"].items():
        assert np.abs(image - outputs["folder"][key]).max() <= 1, key  # same pixels, up to 8-bit rounding
