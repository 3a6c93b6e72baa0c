"""``pixelmill dataset toy`` writes a readable pixelmill dataset."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from PIL import Image

from pixelmill.cli import main
from pixelmill.datasets import Dataset
from pixelmill.toy import world
from pixelmill.toy.dataset import TOY_SCHEMA_NAME, toy_row_id


def test_dataset_toy_writes_images_captions_and_labels(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["dataset", "toy", "--out", str(out), "--rows", "30", "--seed", "4",
                 "--exclude-shape", world.HELD_OUT_SHAPE]) == 0
    assert "wrote 30 toy rows" in capsys.readouterr().out
    ds = Dataset.open(str(out))
    assert ds.num_rows == 30 and ds.manifest.complete and ds.manifest.schema_name == TOY_SCHEMA_NAME
    table = pq.read_table(str(out / "part-00000.parquet"))
    assert {"id", "image", "caption", "shape", "color", "size", "position", "background"} <= set(table.column_names)
    rows = table.to_pylist()
    assert [r["row_index"] for r in rows] == list(range(30))
    for r in rows:
        img, caption, obj = world.make_row(4, r["row_index"], world.TRAIN_SHAPES)
        assert r["id"] == toy_row_id(4, r["row_index"])
        assert r["caption"] == caption and r["shape"] == obj.shape != world.HELD_OUT_SHAPE
        assert r["color"] == obj.color and r["background2"] == obj.background2
        decoded = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert decoded.size == (32, 32) and decoded.tobytes() == img.tobytes()


def test_dataset_toy_resumes_and_refuses_other_arguments(tmp_path, capsys):
    out = str(tmp_path / "toy")
    args = ["dataset", "toy", "--out", out, "--rows", "12"]
    assert main(args) == 0
    assert main(args) == 0
    assert main(["dataset", "toy", "--out", out, "--rows", "13"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["dataset", "toy", "--out", out, "--rows", "13", "--overwrite"]) == 0
    assert Dataset.open(out).num_rows == 13
    assert main(["dataset", "toy", "--out", out, "--rows", "0"]) == 2


def test_hugging_face_datasets_reads_it(tmp_path):
    import datasets

    out = tmp_path / "toy"
    assert main(["dataset", "toy", "--out", str(out), "--rows", "5"]) == 0
    loaded = datasets.load_dataset(str(out), split="train")
    assert loaded.num_rows == 5 and loaded[0]["image"].size == (32, 32)
    assert loaded[0]["caption"] == world.make_row(0, 0)[1]
