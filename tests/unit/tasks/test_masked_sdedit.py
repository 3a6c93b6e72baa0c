"""Masked SDEdit on tiny models: only the painted region changes, bad masks are rejects."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from pixelmill.config import EditConfig, load_config
from pixelmill.datasets.images import decode_image
from pixelmill.tasks.edit import (
    MaskedSDEditEditor,
    dilate_mask,
    input_columns,
    resize_mask,
    sdedit_steps,
    stroke_region,
)
from pixelmill.tasks.metrics import rgb_rmse

ROOT = Path(__file__).resolve().parents[3]
W, H = 64, 48


def _picture(color=(200, 40, 40), size=(W, H)) -> Image.Image:
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):
        im.paste((255 - color[0], color[1], 128), (x, 0, x + 4, size[1]))
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _rect_mask(box, size=(W, H), mode="L") -> Image.Image:
    m = Image.new(mode, size, 0)
    m.paste(255 if mode == "L" else (255, 255, 255), box)
    return m


def _expected(box, radius, size=(W, H)) -> np.ndarray:
    """The rectangle ``box`` grown by ``radius`` (square), clipped to the image."""
    m = np.zeros((size[1], size[0]), bool)
    x0, y0, x1, y1 = box
    m[max(0, y0 - radius) : y1 + radius, max(0, x0 - radius) : x1 + radius] = True
    return m


def _cell(data: bytes | None):
    return None if data is None else {"bytes": data, "path": None}


def _config(models, **kw) -> dict:
    base = dict(input="unused", output="unused", model=models["img2img"], prompt="a painting",
                strength=0.75, steps=4, resolution=64, batch_size=4, seed=7, mask_column="mask",
                mask_dilation=3, caption_column=None)
    base.update(kw)
    return EditConfig(**base).model_dump()


@pytest.fixture(scope="module")
def masked(tiny_models, one_torch_thread):
    stage = MaskedSDEditEditor(_config(tiny_models))
    stage.setup()
    return stage


BOX = (20, 12, 40, 30)


def test_only_the_dilated_mask_changes_and_the_rest_is_the_input_bit_for_bit(masked):
    images = [_picture((200, 40, 40)), _picture((30, 60, 200))]
    batch = pa.Table.from_pylist([
        {"id": f"r{i}", "image": _cell(_png(im)), "mask": _cell(_png(_rect_mask(BOX))), "shard": "0"}
        for i, im in enumerate(images)
    ])
    out = masked(batch).to_pylist()
    region = _expected(BOX, 3)
    for row, im in zip(out, images):
        assert row["status"] == "ok", row["error"]
        edited = np.asarray(decode_image(row["edited_image"]))
        original = np.asarray(im)
        # Already at the working size: the input file's own pixels come back outside the region.
        assert np.array_equal(edited[~region], original[~region])
        assert np.array_equal(np.asarray(decode_image(row["input_image"])), original)
        changed = (edited[region] != original[region]).any(-1).mean()
        assert changed > 0.5, changed
        assert row["mask_fraction"] == pytest.approx(region.mean())
        assert row["t0_steps"] == 3 and row["strength"] == 0.75
        assert row["l2"] == pytest.approx(rgb_rmse(im, decode_image(row["edited_image"])), abs=1e-6)


def test_resized_inputs_keep_the_resized_input_outside_the_mask(masked):
    big = _picture((220, 200, 40), size=(128, 96))
    mask = _rect_mask((40, 24, 80, 60), size=(128, 96))
    batch = pa.Table.from_pylist([{"id": "big", "image": _cell(_png(big)), "mask": _cell(_png(mask)),
                                   "shard": "0"}])
    row = masked(batch).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    edited = np.asarray(decode_image(row["edited_image"]))
    resized = np.asarray(decode_image(row["input_image"]))
    assert edited.shape == resized.shape == (H, W, 3)
    region = _expected((20, 12, 40, 30), 3)  # the mask halves exactly, then grows by 3
    assert row["mask_fraction"] == pytest.approx(region.mean())
    assert np.array_equal(edited[~region], resized[~region])
    assert (edited[region] != resized[region]).any()


def test_stroke_mask_is_the_painted_region_dilated():
    original = _picture()
    strokes = original.copy()
    strokes.paste((0, 255, 0), (10, 10, 22, 18))
    noisy = np.asarray(strokes).copy()
    noisy[40:44, 50:60] = np.clip(noisy[40:44, 50:60].astype(int) + 5, 0, 255)  # below the threshold
    strokes = Image.fromarray(noisy)
    region = stroke_region(_png(original), _png(strokes), threshold=10, max_pixels=10**6)
    assert np.array_equal(region, _expected((10, 10, 22, 18), 0))
    assert np.array_equal(dilate_mask(region, 2), _expected((10, 10, 22, 18), 2))
    # Brought to a smaller size conservatively: every working pixel over a painted one.
    half = resize_mask(region, (W // 2, H // 2))
    assert np.array_equal(half, _expected((5, 5, 11, 9), 0, size=(W // 2, H // 2)))


def test_strokes_guide_the_edit_and_only_the_painted_region_changes(tiny_models, one_torch_thread):
    original = _picture()
    strokes = original.copy()
    strokes.paste((0, 255, 0), (10, 10, 22, 18))
    noisy = np.asarray(strokes).copy()
    noisy[40:44, 50:60] = np.clip(noisy[40:44, 50:60].astype(int) + 5, 0, 255)
    strokes_im = Image.fromarray(noisy)
    batch = pa.Table.from_pylist([{"id": "s", "image": _cell(_png(original)),
                                   "strokes": _cell(_png(strokes_im)), "shard": "0"}])
    region = _expected((10, 10, 22, 18), 2)
    # t0 = 0 (strength 0.2 of 4 steps): the output is the guide itself inside the region,
    # which shows the stroke image is the guide, and the original everywhere else.
    stage = MaskedSDEditEditor(_config(tiny_models, mask_column=None, stroke_column="strokes",
                                       mask_dilation=2, strength=0.2))
    stage.setup()
    row = stage(batch).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    assert row["t0_steps"] == 0
    edited = np.asarray(decode_image(row["edited_image"]))
    assert np.array_equal(edited[region], np.asarray(strokes_im)[region])
    assert np.array_equal(edited[~region], np.asarray(original)[~region])
    assert row["mask_fraction"] == pytest.approx(region.mean())
    # With noised steps the painted region is re-synthesised; the rest stays the original.
    stage = MaskedSDEditEditor(_config(tiny_models, mask_column=None, stroke_column="strokes",
                                       mask_dilation=2, strength=0.75))
    stage.setup()
    row = stage(batch).to_pylist()[0]
    edited = np.asarray(decode_image(row["edited_image"]))
    assert row["t0_steps"] == 3
    assert np.array_equal(edited[~region], np.asarray(original)[~region])
    assert not np.array_equal(edited[region], np.asarray(strokes_im)[region])
    assert row["l2"] == pytest.approx(rgb_rmse(strokes_im, decode_image(row["edited_image"])), abs=1e-6)


def test_bad_masks_are_rejects_with_reasons_and_every_row_comes_back(masked):
    good = _png(_picture())
    rows = [
        ("ok", _png(_rect_mask(BOX))),
        ("missing", None),
        ("empty", _png(Image.new("L", (W, H), 0))),
        ("small", _png(_rect_mask((2, 2, 10, 10), size=(32, 24)))),
        ("garbage", b"not an image"),
        ("transparent", _png(Image.new("RGBA", (W, H), (255, 255, 255, 0)))),
    ]
    batch = pa.Table.from_pylist([{"id": name, "image": _cell(good), "mask": _cell(m), "shard": "0"}
                                  for name, m in rows])
    out = masked(batch).to_pylist()
    assert [r["id"] for r in out] == [name for name, _ in rows]
    status = {r["id"]: r["status"] for r in out}
    errors = {r["id"]: r["error"] for r in out}
    assert status == {"ok": "ok", "missing": "reject", "empty": "reject", "small": "reject",
                      "garbage": "reject", "transparent": "reject"}
    assert errors["missing"].startswith("mask_missing") and "'mask'" in errors["missing"]
    assert errors["empty"].startswith("mask_empty")
    assert errors["small"].startswith("mask_size_mismatch") and "32x24" in errors["small"]
    assert errors["garbage"].startswith("mask_undecodable")
    assert errors["transparent"].startswith("mask_empty")
    assert all(r["stage"] == "edit" for r in out if r["status"] == "reject")


def test_stroke_image_identical_to_the_input_is_a_reject(tiny_models, one_torch_thread):
    stage = MaskedSDEditEditor(_config(tiny_models, mask_column=None, stroke_column="strokes"))
    stage.setup()
    data = _png(_picture())
    batch = pa.Table.from_pylist([
        {"id": "same", "image": _cell(data), "strokes": _cell(data), "shard": "0"},
        {"id": "other-size", "image": _cell(data), "strokes": _cell(_png(_picture(size=(32, 32)))), "shard": "0"},
    ])
    out = stage(batch).to_pylist()
    assert [r["status"] for r in out] == ["reject", "reject"]
    assert out[0]["error"].startswith("stroke_empty") and "stroke_threshold=10" in out[0]["error"]
    assert out[1]["error"].startswith("stroke_size_mismatch")


def test_t0_search_with_a_mask(tiny_models, one_torch_thread):
    stage = MaskedSDEditEditor(_config(tiny_models, strength="auto", target_l2=0.2, steps=4))
    stage.setup()
    im = _picture()
    batch = pa.Table.from_pylist([{"id": "a", "image": _cell(_png(im)), "mask": _cell(_png(_rect_mask(BOX))),
                                   "shard": "0"}])
    row = stage(batch).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    edited = decode_image(row["edited_image"])
    region = _expected(BOX, 3)
    assert np.array_equal(np.asarray(edited)[~region], np.asarray(im)[~region])
    assert 0 <= row["t0_steps"] <= 4 and row["l2"] <= 0.2 + 1e-6
    assert row["l2"] == pytest.approx(rgb_rmse(im, edited), abs=1e-6)


def test_a_full_mask_is_plain_sdedit(masked):
    im = _picture()
    args = (masked.pipe, [im], ["a painting"], [3], 4, 7.5, None, [11])
    plain, _ = sdedit_steps(*args)
    full, _ = sdedit_steps(*args, masks=[np.ones((H, W), bool)])
    assert np.array_equal(np.asarray(plain[0]), np.asarray(full[0]))
    none, _ = sdedit_steps(*args, masks=[np.zeros((H, W), bool)])
    assert np.array_equal(np.asarray(none[0]), np.asarray(im))


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(method="instruct_pix2pix", instruction="x"), "need `method: sdedit`"),
        (dict(stroke_column="strokes"), "not both"),
        (dict(mask_column="image"), "another column"),
        (dict(stroke_threshold=300), "stroke_threshold"),
        (dict(mask_dilation=-1), "mask_dilation"),
        (dict(model=None), "needs `model`"),
    ],
)
def test_masked_config_errors_name_the_problem(kw, needle):
    base = dict(input="i", output="o", model="m", prompt="p", mask_column="mask")
    base.update(kw)
    with pytest.raises(ValidationError, match=needle):
        EditConfig(**base)


def test_mask_columns_are_read_and_hashed_only_when_used():
    cfg = EditConfig(input="i", output="o", model="m", prompt="p", mask_column="mask")
    assert input_columns(cfg.model_dump()) == ["id", "image", "caption", "mask"]
    assert cfg.output_affecting()["mask_dilation"] == 4
    plain = EditConfig(input="i", output="o", model="m", prompt="p")
    assert "mask_dilation" not in plain.output_affecting() and "text2live" not in plain.output_affecting()


def test_the_flow_picks_the_masked_editor(tiny_models):
    from pixelmill.flows.bulk_edit import editor_class

    assert editor_class(_config(tiny_models)) is MaskedSDEditEditor
    assert editor_class(_config(tiny_models, mask_column=None)).__name__ == "SDEditEditor"


def test_example_config_validates():
    cfg = load_config(EditConfig, ROOT / "configs" / "edit-masked-sdedit.yaml")
    assert cfg.method == "sdedit" and (cfg.mask_column or cfg.stroke_column)


def test_the_cli_checks_the_mask_column_exists_before_work_starts():
    from pixelmill.config.preflight import PreflightError as UsageError
    from pixelmill.config.preflight import check_input_columns

    cfg = EditConfig(input="i", output="o", model="m", prompt="p", stroke_column="strokes")
    assert check_input_columns(cfg, ["id", "image", "strokes"]).stroke_column == "strokes"
    with pytest.raises(UsageError, match="stroke_column: column 'strokes' is not in the input"):
        check_input_columns(cfg, ["id", "image", "caption"])
