"""The bad-input corpus through the CLI (``tests/data/corpus.py``).

Every row kind sits in ONE dataset that ``pixelmill edit`` runs over once (real Ray, real
Prefect server): unusual images are edited, broken rows are rejects with a readable
reason, nothing is dropped. Every whole-input kind must exit 2 before anything starts
(the runtime addresses point at nothing, so a run that got past the checks would fail
with another status), naming the problem, with no traceback.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from pixelmill.datasets import Dataset, account
from pixelmill.datasets.images import decode_image
from tests.conftest import run_cli
from tests.data.corpus import (
    EXIT2,
    LONG_PROMPT,
    POOL_REJECT,
    RECORDED,
    REJECT,
    TRUNCATED,
    build_case,
    build_edit_rows,
    kinds,
    marker_corner,
)

pytestmark = pytest.mark.slow

ROW_KINDS = kinds("image row", "text row")
NOWHERE = {"RAY_ADDRESS": "127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:1/api"}


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_models, cluster):
    """The corpus rows edited once through ``pixelmill edit``: (summary, outputs by id, rejects by id)."""
    root = tmp_path_factory.mktemp("bad-rows")
    data = build_edit_rows(root)
    cfg = root / "edit.yaml"
    cfg.write_text(yaml.safe_dump(dict(input=data, output=str(root / "out"), model=tiny_models["img2img"],
                                       prompt_column="caption", strength=0.5, steps=2, resolution=64,
                                       batch_size=4, seed=5)))
    proc = run_cli(["edit", str(cfg), "--json"], cluster)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ds = Dataset.open(str(root / "out"))
    outputs = {r["id"]: r for r in ds.to_table().to_pylist()}
    rejects = {r["id"]: r for r in ds.rejects().to_pylist()}
    report = account([k.name for k in ROW_KINDS], ds)
    return summary, outputs, rejects, report


def test_every_row_is_accounted_for_once(edited):
    summary, outputs, rejects, report = edited
    assert report.ok, str(report)
    assert summary["rows_in"] == len(ROW_KINDS) == summary["rows_out"] + summary["rejects"]
    assert len(outputs) + len(rejects) == len(ROW_KINDS)


@pytest.mark.parametrize("kind", ROW_KINDS, ids=lambda k: k.name)
def test_row_kind(edited, kind):
    _, outputs, rejects, _ = edited
    if kind.outcome == REJECT:
        assert kind.name in rejects, f"{kind.name} was not rejected"
        reason = rejects[kind.name]["error"]
        assert kind.expect in reason and rejects[kind.name]["stage"] == "edit"
        assert "Traceback" not in reason and len(reason) < 300
        return
    assert kind.name in outputs, f"{kind.name} was rejected: {rejects.get(kind.name, {}).get('error')}"
    row = outputs[kind.name]
    edited_img, input_img = decode_image(row["edited_image"]), decode_image(row["input_image"])
    assert edited_img.mode == "RGB" and edited_img.size == input_img.size == (row["width"], row["height"])
    assert max(edited_img.size) == 64
    if kind.outcome in (RECORDED, TRUNCATED):
        assert row["notes"] and any(kind.expect in n for n in row["notes"]), row["notes"]
    else:
        assert not row["notes"]
    if kind.name == "exif_rotated":  # edited upright: the image edited is the one a viewer shows
        assert input_img.width > input_img.height and marker_corner(input_img) == "tl"
    if kind.name == "animated_gif":
        assert np.asarray(input_img, dtype=np.float64)[..., 2].mean() > 200  # the blue first frame
    if kind.name == "prompt_10000_chars":
        assert len(row["edit_prompt"]) <= 1000 and LONG_PROMPT.startswith(row["edit_prompt"])
    if kind.name == "wide_50to1":
        assert edited_img.size == (64, 8)


WHOLE = kinds("dataset", "config", "pool", "names")


@pytest.mark.parametrize("kind", WHOLE, ids=lambda k: k.name)
def test_whole_input_kind(kind, tmp_path, tiny_models, monkeypatch, capsys):
    from pixelmill.cli import main

    args = build_case(kind, tmp_path, tiny_models)
    for k, v in NOWHERE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if kind.outcome == POOL_REJECT:  # checks pass; the scan records the rows as rejects
        assert code == 0, err
        from pixelmill.tasks.regularization import clip_embed_dim
        from pixelmill.tasks.retrieval import validate

        report = validate(str(tmp_path / "pool"), clip_embed_dim(tiny_models["clip"]), on_bad="reject")
        assert ", ".join(report.bad_ids) == kind.expect
        return
    assert kind.outcome == EXIT2
    assert code == 2, err
    assert kind.expect in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ret").exists()  # nothing was written
    assert os.environ["RAY_ADDRESS"] == NOWHERE["RAY_ADDRESS"]
