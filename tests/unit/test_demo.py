"""The demo's configs and readouts (``pixelmill.demo``); the whole demo runs as ``make demo``, not in the suite."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import yaml

from pixelmill.config import EditConfig
from pixelmill.datasets import Dataset
from pixelmill.datasets.images import IMAGE_TYPE, encode_image
from pixelmill.datasets.writer import write_table_dataset
from pixelmill.demo import DEMO_SEED, IP2P, demo_configs, detector_readout, retrieval_precision
from pixelmill.tasks.edit.base import template_fields
from pixelmill.toy import world
from pixelmill.toy.samples import write_toy_images

MODELS = {"sd": "toy:sd", "clip": "toy:clip", "instruct_pix2pix": "/models/tiny-ip2p"}


def test_demo_edits_run_on_the_toy_models_and_fill_their_templates_from_toy_columns(tmp_path):
    write_toy_images(str(tmp_path / "datasets" / "images"), rows=12, seed=DEMO_SEED)
    columns = set(Dataset.open(str(tmp_path / "datasets" / "images")).schema.names)
    cfgs = demo_configs(tmp_path, MODELS)
    sdedit = [c for c in cfgs.values() if c.method == "sdedit"]
    assert sorted(str(c.strength) for c in sdedit) == ["0.5", "0.8", "auto"]
    for cfg in sdedit:
        assert (cfg.model, cfg.clip_model, cfg.resolution) == ("toy:sd", "toy:clip", 32)
        assert set(template_fields(cfg.prompt)) <= columns, cfg.prompt
    ip2p = cfgs[IP2P]
    assert ip2p.method == "instruct_pix2pix" and ip2p.model == MODELS["instruct_pix2pix"]
    assert set(template_fields(ip2p.instruction)) <= columns
    written = sorted(p.name for p in (tmp_path / "configs").glob("edit-*.yaml"))
    assert written == ["edit-ip2p.yaml", "edit-sdedit-0.5.yaml", "edit-sdedit-0.8.yaml", "edit-sdedit-auto.yaml"]
    again = EditConfig.model_validate(yaml.safe_load((tmp_path / "configs" / "edit-sdedit-auto.yaml").read_text()))
    assert again.strength == "auto" and again.model == "toy:sd"


def test_no_demo_input_row_is_green_so_the_colour_prompt_is_always_a_change():
    for index in range(13):
        obj = world.make_row(DEMO_SEED, index)[2]
        assert "green" not in (obj.color, obj.background, obj.background2)


def test_detector_readout_pairs_each_edit_with_its_input_labels(tmp_path):
    write_toy_images(str(tmp_path / "in"), rows=4, seed=DEMO_SEED, broken=0)
    rows = Dataset.open(str(tmp_path / "in")).to_table(columns=["id"]).to_pylist()
    edited = []
    for k, row in enumerate(rows):
        obj = world.make_row(DEMO_SEED, k)[2]
        if k < 3:  # the first three turned green; the last one left as it was
            obj = dataclasses.replace(obj, color="green", background="white", background2=None, split=None)
        edited.append({"id": row["id"], "edited_image": encode_image(world.render(obj))})
    table = pa.table({"id": [r["id"] for r in edited],
                      "edited_image": pa.array([r["edited_image"] for r in edited], IMAGE_TYPE)})
    write_table_dataset(str(tmp_path / "out"), table, "edits", {})
    read = detector_readout(str(tmp_path / "out"), str(tmp_path / "in"))
    assert [d.color == "green" for d, _ in read] == [True, True, True, False]
    originals = [world.make_row(DEMO_SEED, k)[2] for k in range(4)]
    assert [lab for _, lab in read] == [{"shape": o.shape, "color": o.color} for o in originals]
    assert all(d.shape == lab["shape"] for d, lab in read)


def test_retrieval_precision_compares_colour_and_shape_of_the_captions(tmp_path):
    table = pa.table({"prompt": ["a red circle"] * 3 + ["a blue square"],
                      "caption": ["a small red circle on a white background", "a red heart in the center",
                                  "a picture of a red circle", "a large blue square"]})
    write_table_dataset(str(tmp_path / "reg"), table, "regularization", {})
    assert retrieval_precision(str(tmp_path / "reg")) == {"a red circle": 2, "a blue square": 1}


def test_campaign_readout_counts_the_concepts_shape_per_prompt_and_the_asked_colour(tmp_path):
    import json

    from pixelmill.demo import CONCEPT, campaign_readout
    from pixelmill.toy.detect import detect
    from pixelmill.toy.samples import toy_indices

    seed = 3
    red_heart = next(i for i in toy_indices(seed, 40, shape=CONCEPT) if world.make_row(seed, i)[2].color == "red")
    other_heart = next(i for i in toy_indices(seed, 40, shape=CONCEPT) if world.make_row(seed, i)[2].color != "red")
    circle = toy_indices(seed, 1, shape="circle")[0]
    picks = {"a photo of sks shape": [other_heart, circle, circle], "a red sks shape": [red_heart, other_heart]}
    samples, k = [], 0
    (tmp_path / "samples" / "final").mkdir(parents=True)
    for prompt, rows in picks.items():
        for row in rows:
            image = world.make_row(seed, row)[0]
            assert detect(image).shape == world.make_row(seed, row)[2].shape  # the readout reads what was drawn
            image.save(tmp_path / "samples" / "final" / f"{k:03d}.png")
            samples.append({"prompt": prompt, "file": f"samples/final/{k:03d}.png"})
            k += 1
    (tmp_path / "job.json").write_text(json.dumps({"samples": samples}))
    assert campaign_readout(str(tmp_path)) == (f"'a photo of sks shape' 1/3 {CONCEPT}s; "
                                               f"'a red sks shape' 2/2 {CONCEPT}s (1 red)")
