"""The toy world's generator: determinism, labels, captions."""

from __future__ import annotations

import numpy as np
import pytest

from pixelmill.toy import world


def test_rows_are_deterministic_and_independent_of_each_other():
    a_img, a_cap, a_obj = world.make_row(7, 42)
    b_img, b_cap, b_obj = world.make_row(7, 42)
    assert a_img.tobytes() == b_img.tobytes() and a_cap == b_cap and a_obj == b_obj
    assert a_img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and a_img.mode == "RGB"
    other_seed = world.make_row(8, 42)
    other_row = world.make_row(7, 43)
    assert other_seed[0].tobytes() != a_img.tobytes()
    assert other_row[0].tobytes() != a_img.tobytes()


def test_captions_name_the_labels():
    for i in range(500):
        _, caption, obj = world.make_row(11, i)
        named = world.parse_caption(caption)
        assert named["color"] == obj.color and named["shape"] == obj.shape, caption
        for key, value in named.items():
            expected = obj.background_phrase if key == "background" else getattr(obj, key)
            assert value == expected, (caption, key)


def test_labels_cover_the_world_and_backgrounds_never_match_the_object():
    objs = [world.make_row(3, i)[2] for i in range(600)]
    assert {o.shape for o in objs} == set(world.SHAPES)
    assert {o.color for o in objs} == set(world.COLORS)
    assert {o.size for o in objs} == set(world.SIZES)
    assert any(o.background2 for o in objs) and any(o.background2 is None for o in objs)
    assert len({o.position for o in objs}) == 9
    for o in objs:
        assert o.color not in (o.background, o.background2)
        assert o.background != o.background2
        lo, hi = world.SIZES[o.size]
        assert lo <= o.extent <= hi
        x0, y0, x1, y1 = o.box
        assert x0 >= world.MARGIN and y0 >= world.MARGIN
        assert x1 <= world.IMAGE_SIZE - world.MARGIN and y1 <= world.IMAGE_SIZE - world.MARGIN
        assert o.position == world.position_name(o.cx, o.cy)


def test_pixels_follow_the_labels():
    img, _, obj = world.make_row(5, 1)
    arr = np.asarray(img, dtype=float)
    centre = arr[int(obj.cy), int(obj.cx)]
    corner = arr[0, 0]
    assert np.abs(centre - world.COLORS[obj.color]).max() <= world.COLOR_JITTER + 1
    assert np.abs(corner - world.BACKGROUND_COLORS[obj.background]).max() <= world.COLOR_JITTER + 1


def test_excluded_shapes_are_never_drawn_and_the_held_out_shape_exists():
    assert world.HELD_OUT_SHAPE in world.SHAPES
    assert world.HELD_OUT_SHAPE not in world.TRAIN_SHAPES
    shapes = {world.make_row(0, i, world.TRAIN_SHAPES)[2].shape for i in range(300)}
    assert shapes == set(world.TRAIN_SHAPES)
    with pytest.raises(ValueError, match="unknown shape"):
        world.check_shapes(["hexagon"])


def test_every_shape_fills_its_box():
    for shape in world.SHAPES:
        cover = world.shape_coverage(shape, (4, 6, 28, 30))
        rows, cols = np.nonzero(cover > 0)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 29, 4, 27), shape
    fills = {s: world.shape_coverage(s, (4, 4, 28, 28)).sum() / 24**2 for s in world.SHAPES}
    assert fills["square"] == pytest.approx(1.0)
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.01)
    assert fills["triangle"] == pytest.approx(0.5, abs=0.01)
    assert fills["star"] < 0.5


def test_a_box_of_no_area_covers_nothing_and_warns_nothing():
    """A detector's one-pixel blob gives a box with x1 == x0: no coverage, and no divide-by-zero warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in world.SHAPES:
            for box in ((5, 5, 5, 9), (5, 5, 9, 5), (5.5, 5.5, 5.5, 5.5)):
                assert world.shape_coverage(shape, box).sum() == 0, (shape, box)
