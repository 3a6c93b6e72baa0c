"""The instruction-pairs flow through the real CLI, with real Ray and a real Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pixelmill.datasets import Dataset, account
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[str, list[str]]:
    """Eight captions (one duplicate, one blank) as a dataset."""
    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter

    root = tmp_path_factory.mktemp("captions")
    rows = ["a red car parked on a street", "a cat sleeping on a wooden chair", "a bowl of apples on a table",
            "a house with a red roof under a blue sky", "a red car parked on a street", "   ",
            "a man riding a bicycle in a park", "a portrait of a woman with a hat"]
    table = pa.table({"id": [f"c{i}" for i in range(len(rows))], "caption": rows})
    w = DatasetWriter(str(root / "captions"), "captions", 1, {"test": 1}).open()
    sw = w.shard("00000")
    sw.write(table)
    sw.commit()
    w.finish()
    return str(root / "captions"), table["id"].to_pylist()


def _config(tmp_path: Path, captions_url: str, tiny_models, **images) -> Path:
    cfg = tmp_path / "pairs.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        input=captions_url, output=str(tmp_path / "out"), seed=4,
        images=dict(model=tiny_models["img2img"], clip_model=tiny_models["clip"], samples_per_caption=3,
                    steps=4, height=64, width=64, max_per_caption=2, **images),
    )))
    return cfg


def test_pairs_end_to_end_accounts_for_every_caption(cluster, tmp_path, captions, tiny_models):
    cfg = _config(tmp_path, captions[0], tiny_models, min_direction=-1.0, min_image_caption=-1.0,
                  min_image_similarity=0.9)
    proc = run_cli(["pairs", str(cfg), "--json"], cluster)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["captions"] == 8 and s["text_rejects"] == 2  # the blank caption and the duplicate

    text = Dataset.open(str(tmp_path / "out" / "text"))
    reasons = sorted(r["error"].split(" ")[0] for r in text.rejects().to_pylist())
    assert reasons == ["duplicate_caption", "missing_caption"]
    assert account(captions[1], text).ok

    pairs = Dataset.open(str(tmp_path / "out" / "pairs"))
    assert pairs.complete
    table = pairs.to_table()
    assert {"input_image", "edit_prompt", "edited_image", "caption", "edited_caption", "seed", "p", "cfg",
            "clip_image_similarity", "clip_direction"} <= set(table.column_names)
    # every instruction row (caption) is a parent of kept pairs or a reject, exactly once
    text_ids = text.to_table(["id"])["id"].to_pylist()
    report = account(text_ids, pairs)
    assert report.ok, str(report)
    # at most max_per_caption per caption; thresholds applied exactly; drops recorded with reasons
    per_parent: dict[str, int] = {}
    for row in table.to_pylist():
        per_parent[row["parent_id"]] = per_parent.get(row["parent_id"], 0) + 1
        assert row["clip_image_similarity"] >= 0.9
        assert 0.1 <= row["p"] <= 0.9 and 7.5 <= row["cfg"] <= 15.0
        assert row["id"].startswith(row["parent_id"] + "-")
    assert per_parent and max(per_parent.values()) <= 2
    dropped = pairs.dropped().to_pylist()
    assert len(dropped) + table.num_rows == 3 * len(text_ids)
    assert all(d["drop_reason"] for d in dropped)

    # the pairs open in Hugging Face datasets with decoded images in all three columns
    import datasets

    hf = datasets.load_dataset(str(tmp_path / "out" / "pairs"), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(hf[0]["input_image"], Image.Image) and isinstance(hf[0]["edited_image"], Image.Image)
    assert isinstance(hf[0]["edit_prompt"], str)

    # a rerun does no work; same seeds -> same pairs
    again = run_cli(["pairs", str(cfg), "--json"], cluster)
    s2 = json.loads(again.stdout.strip().splitlines()[-1])
    assert s2["captions"] == 0 and s2["pairs"] == 0 and s2["pairs_skipped"] and s2["text_skipped"]


def test_strict_default_filter_rejects_with_reasons(cluster, tmp_path, captions, tiny_models):
    cfg = _config(tmp_path, captions[0], tiny_models)  # paper thresholds; the tiny CLIP fails them
    proc = run_cli(["pairs", str(cfg), "--json", "--limit", "3"], cluster)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pairs = Dataset.open(str(tmp_path / "out" / "pairs"))
    rejects = pairs.rejects().to_pylist()
    assert pairs.num_rows + len({r["id"] for r in rejects}) >= 1
    for r in rejects:
        assert r["error"].startswith("no_sample_passed_clip_filter") and r["stage"] == "pairs"
