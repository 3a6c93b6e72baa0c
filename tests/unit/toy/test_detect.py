"""The frozen colour and shape detectors, scored on the generator's own images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixelmill.toy import world
from pixelmill.toy.detect import detect

AGREEMENT = 0.98


def _agreement(seed: int, rows: int, resize: int | None = None) -> dict[str, float]:
    hits = {"color": 0, "shape": 0}
    for i in range(rows):
        img, _, obj = world.make_row(seed, i)
        if resize:
            img = img.resize((resize, resize), Image.BICUBIC)
        found = detect(img)
        hits["color"] += found.color == obj.color
        hits["shape"] += found.shape == obj.shape
    return {k: v / rows for k, v in hits.items()}


def test_detectors_agree_with_the_ground_truth_on_500_images():
    scores = _agreement(seed=2024, rows=500)
    assert scores["color"] >= AGREEMENT, scores
    assert scores["shape"] >= AGREEMENT, scores


def test_detectors_read_any_picture_size():
    scores = _agreement(seed=99, rows=60, resize=64)
    assert scores["color"] >= 0.95 and scores["shape"] >= 0.95, scores


def test_detection_reads_size_position_and_background():
    img, _, obj = world.make_row(1, 3)
    found = detect(img)
    assert (found.size, found.background, found.background2) == (obj.size, obj.background, obj.background2)
    x0, y0, x1, y1 = found.bbox
    assert abs((x1 - x0) - obj.extent) <= 1 and abs((x0 + x1) / 2 - obj.cx) <= 1


def test_each_shape_and_colour_is_told_apart_in_a_hard_case():
    for shape in world.SHAPES:
        for color in world.COLORS:
            obj = world.ToyObject(shape, color, "small", 10, 16.0, 16.0, "center",
                                  "white" if color != "white" else "black", "gray", "vertical")
            found = detect(world.render(obj))
            assert (found.shape, found.color) == (shape, color)


def test_a_picture_without_an_object_has_no_colour_or_shape():
    found = detect(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert found.color is None and found.shape is None and found.background == "gray"
    noisy = np.clip(np.random.default_rng(0).normal(128, 5, (32, 32, 3)), 0, 255)
    assert detect(noisy).shape is None
