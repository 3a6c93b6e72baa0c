"""The demo's toy-world inputs (``pixelmill.toy.samples``): images + a broken row, pool, concept, pan clip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pixelmill.datasets import Dataset
from pixelmill.toy import world
from pixelmill.toy.detect import detect
from pixelmill.toy.samples import (
    toy_indices,
    toy_pan_clip,
    toy_pool_indices,
    write_toy_concept,
    write_toy_images,
    write_toy_pool_source,
)


def test_toy_images_are_world_rows_plus_an_undecodable_row(tmp_path):
    info = write_toy_images(str(tmp_path / "images"), rows=5, seed=3, broken=1)
    rows = Dataset.open(str(tmp_path / "images")).to_table().to_pylist()
    assert len(rows) == 6 and info["rows"] == 5 and info["broken"] == 1
    for index, row in enumerate(rows[:5]):
        image, caption, obj = world.make_row(3, index)
        assert row["caption"] == caption and (row["shape"], row["color"]) == (obj.shape, obj.color)
        assert Image.open(io.BytesIO(row["image"]["bytes"])).tobytes() == image.tobytes()
    assert len({r["id"] for r in rows}) == 6
    broken = rows[5]
    assert broken["shape"] and broken["color"] and broken["caption"]
    with pytest.raises(OSError):
        Image.open(io.BytesIO(broken["image"]["bytes"])).load()


def test_toy_indices_find_rows_with_the_attributes_and_say_when_they_cannot(tmp_path):
    hearts = toy_indices(21, 4, shape="heart")
    assert all(world.make_row(21, i)[2].shape == "heart" for i in hearts)
    reds = toy_indices(21, 3, color="red", shape="circle")
    assert all((world.make_row(21, i)[2].color, world.make_row(21, i)[2].shape) == ("red", "circle") for i in reds)
    with pytest.raises(ValueError, match="unknown colour"):
        toy_indices(0, 1, color="pink")
    captions = write_toy_concept(str(tmp_path / "concept"), shape="heart", count=4, seed=21)
    assert len(captions) == 4 and all("heart" in c for c in captions)
    images = Dataset.open(str(tmp_path / "concept")).to_table(columns=["image", "shape"]).to_pylist()
    assert {r["shape"] for r in images} == {"heart"}


def test_toy_pool_holds_matches_near_misses_and_others(tmp_path):
    targets = [("red", "circle"), ("blue", "square")]
    indices = toy_pool_indices(7, targets, per_target=6, near_misses=3, others=24)
    objs = [world.make_row(7, i)[2] for i in indices]
    assert len(indices) == len(set(indices)) == 2 * (6 + 3 + 3) + 24
    for color, shape in targets:
        assert sum((o.color, o.shape) == (color, shape) for o in objs) == 6
        assert sum(o.color == color and o.shape != shape for o in objs) >= 3
        assert sum(o.shape == shape and o.color != color for o in objs) >= 3
    n = write_toy_pool_source(str(tmp_path / "web"), "http://127.0.0.1:9/toy", str(tmp_path / "src"), targets=targets)
    rows = Dataset.open(str(tmp_path / "src")).to_table().to_pylist()
    assert n == len(rows) == len(indices)
    for row in rows:
        name = row["url"].rsplit("/", 1)[-1]
        assert row["url"].startswith("http://127.0.0.1:9/toy/") and (tmp_path / "web" / name).read_bytes() == \
            row["image"]["bytes"]
        assert world.parse_caption(row["caption"])["shape"] == row["shape"]


def test_toy_pan_clip_is_exact_crops_of_one_scene_the_detectors_read():
    clip = toy_pan_clip(frames=5, shift=(2, 1), shape="square", color="red")
    assert len(clip.frames) == 5 and all(f.shape == (32, 32, 3) for f in clip.frames)
    for t in range(1, 5):  # frame t is frame 0 moved by t * shift
        assert np.array_equal(clip.frames[t][: 32 - t, : 32 - 2 * t], clip.frames[0][t:, 2 * t:])
    assert clip.shifts.tolist()[-1] == [8.0, 4.0]
    d = detect(clip.frames[2])
    assert (d.color, d.shape) == ("red", "square")
