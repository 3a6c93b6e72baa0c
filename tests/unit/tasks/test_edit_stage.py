"""The edit stages on tiny models: rows in = rows out, per-row determinism, t0 search, nsfw."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pixelmill.config import EditConfig
from pixelmill.datasets.images import decode_image, encode_image
from pixelmill.tasks.edit import InstructPix2PixEditor, SDEditEditor, row_seed, sdedit_steps
from pixelmill.tasks.metrics import rgb_rmse


def _png(color, size=(64, 48)) -> bytes:
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):
        im.paste((255 - color[0], color[1], 128), (x, 0, x + 4, size[1]))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _batch(n: int, corrupt: tuple[int, ...] = ()) -> pa.Table:
    colors = [(200, 40, 40), (40, 160, 60), (30, 60, 200), (220, 200, 40), (120, 60, 160), (10, 200, 200)]
    rows = []
    for i in range(n):
        data = b"not an image" if i in corrupt else _png(colors[i % len(colors)])
        rows.append({"id": f"row-{i}", "image": {"bytes": data, "path": None},
                     "caption": f"stripes number {i}", "shard": "00000"})
    return pa.Table.from_pylist(rows)


def _config(models, **kw) -> dict:
    base = dict(input="unused", output="unused", model=models["img2img"], prompt="a painting",
                strength=0.5, steps=4, resolution=64, batch_size=4, seed=7)
    base.update(kw)
    return EditConfig(**base).model_dump()


@pytest.fixture(scope="module")
def sdedit(tiny_models):
    stage = SDEditEditor(_config(tiny_models))
    stage.setup()
    return stage


def test_every_row_comes_back_once_and_bad_rows_are_rejects(sdedit):
    out = sdedit(_batch(5, corrupt=(1, 3)))
    assert out.num_rows == 5
    assert out["id"].to_pylist() == [f"row-{i}" for i in range(5)]
    status = out["status"].to_pylist()
    assert status == ["ok", "reject", "ok", "reject", "ok"]
    errors = [e for e in out["error"].to_pylist() if e]
    assert len(errors) == 2 and all(e.startswith("undecodable") for e in errors)
    ok = out.filter(pa.compute.equal(out["status"], "ok")).to_pylist()
    for row in ok:
        edited = decode_image(row["edited_image"])
        assert edited.size == decode_image(row["input_image"]).size == (64, 48)
        assert row["t0_steps"] == 2 and row["strength"] == 0.5
        assert row["l2"] == pytest.approx(rgb_rmse(decode_image(row["input_image"]), edited), abs=1e-6)
        assert row["model_hash"] and row["seed"] == row_seed(7, row["id"])


def test_a_rows_result_does_not_depend_on_its_batch(tiny_models, sdedit):
    alone = sdedit(_batch(3).slice(2, 1)).to_pylist()[0]
    together = sdedit(_batch(3)).to_pylist()[2]
    a = np.asarray(decode_image(alone["edited_image"]), dtype=np.int16)
    b = np.asarray(decode_image(together["edited_image"]), dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_missing_prompt_in_column_is_a_reject(tiny_models):
    stage = SDEditEditor(_config(tiny_models, prompt=None, prompt_column="caption"))
    stage.setup()
    batch = _batch(2).set_column(2, "caption", pa.array(["a caption", None]))
    out = stage(batch).to_pylist()
    assert [r["status"] for r in out] == ["ok", "reject"]
    assert "missing prompt" in out[1]["error"]
    assert out[0]["edit_prompt"] == "a caption"


def test_t0_search_meets_the_target(tiny_models):
    stage = SDEditEditor(_config(tiny_models, strength="auto", target_l2=0.3, steps=8))
    stage.setup()
    out = stage(_batch(3)).to_pylist()
    for row in out:
        assert row["status"] == "ok"
        assert 0 <= row["t0_steps"] <= 8
        assert row["strength"] == row["t0_steps"] / 8
        achieved = rgb_rmse(decode_image(row["input_image"]), decode_image(row["edited_image"]))
        assert achieved <= 0.3 + 1e-6
        assert row["l2"] == pytest.approx(achieved, abs=1e-6)
    # The search is not trivial on these models: at least one row keeps some noised steps.
    assert max(r["t0_steps"] for r in out) > 0


def test_l2_grows_with_t0_within_slack(sdedit):
    image = decode_image({"bytes": _png((200, 40, 40)), "path": None}).convert("RGB")
    steps = 8
    for seed in (1, 2):
        ks = list(range(steps + 1))
        outs, _ = sdedit_steps(sdedit.pipe, [image] * len(ks), ["a painting"] * len(ks), ks, steps,
                               7.5, None, [seed] * len(ks))
        l2 = [rgb_rmse(image, o) for o in outs]
        assert l2[0] == 0.0
        for a, b in zip(l2, l2[1:]):
            assert b >= a - 0.01, l2


def test_instruct_pix2pix_stage(tiny_models):
    cfg = _config(tiny_models, method="instruct_pix2pix", model=tiny_models["instruct_pix2pix"],
                  prompt=None, instruction="make it snowy", clip_model=tiny_models["clip"])
    stage = InstructPix2PixEditor(cfg)
    stage.setup()
    out = stage(_batch(2, corrupt=(0,))).to_pylist()
    assert out[0]["status"] == "reject"
    row = out[1]
    assert row["status"] == "ok" and row["edit_prompt"] == "make it snowy"
    assert row["image_guidance_scale"] == 1.5 and row["method"] == "instruct_pix2pix"
    assert -1.0 <= row["clip_image_text"] <= 1.0
    assert row["clip_direction"] is not None and -1.0 <= row["clip_direction"] <= 1.0

    # the pixels are an edit: not the input, and what the instruction says matters
    def pixels(cell) -> np.ndarray:
        return np.asarray(decode_image(cell), dtype=np.float32)

    source, edited = pixels(row["input_image"]), pixels(row["edited_image"])
    assert edited.shape == source.shape == (48, 64, 3)
    assert row["l2"] == pytest.approx(rgb_rmse(decode_image(row["input_image"]), decode_image(row["edited_image"])),
                                      abs=1e-6)
    assert np.abs(edited - source).mean() > 5.0 and row["l2"] > 0.02
    again = stage(_batch(2, corrupt=(0,))).to_pylist()[1]
    assert np.abs(pixels(again["edited_image"]) - edited).max() <= 1.0  # seeded: the same instruction, the same edit
    other = InstructPix2PixEditor({**cfg, "instruction": "turn it into a pencil sketch"})
    other.setup()
    sketch = other(_batch(2, corrupt=(0,))).to_pylist()[1]
    assert sketch["edit_prompt"] == "turn it into a pencil sketch"
    assert np.abs(pixels(sketch["edited_image"]) - edited).mean() > 2.0  # another instruction, another edit


def test_flagged_outputs_are_nsfw_rejects_not_black_images(tmp_path, tiny_models):
    from pixelmill.models.tiny import save_tiny_img2img

    path = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    for strength in (0.5, "auto"):
        stage = SDEditEditor(_config(tiny_models, model=path, strength=strength, target_l2=0.5))
        stage.setup()
        out = stage(_batch(2)).to_pylist()
        assert [r["status"] for r in out] == ["reject", "reject"], strength
        assert [r["error"] for r in out] == ["nsfw", "nsfw"]
        assert all(r["edited_image"] is None for r in out)


def test_safety_checker_off_loads_no_checker_and_rejects_nothing(tmp_path, tiny_models):
    from pixelmill.models.tiny import save_tiny_img2img

    path = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    stage = SDEditEditor(_config(tiny_models, model=path, safety_checker="off"))
    stage.setup()
    assert stage.pipe.safety_checker is None  # not loaded at all, not removed after
    out = stage(_batch(2)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok"] and all(r["edited_image"] for r in out)


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "a") == row_seed(0, "a")
    assert len({row_seed(0, "a"), row_seed(1, "a"), row_seed(0, "b")}) == 3


def test_encode_image_roundtrip_keeps_pixels():
    im = Image.new("RGB", (16, 8), (1, 2, 3))
    assert decode_image(encode_image(im)).getpixel((0, 0)) == (1, 2, 3)


def test_prompt_templates_fill_from_the_row(tiny_models):
    from pixelmill.tasks.edit import input_columns

    cfg = _config(tiny_models, prompt="a watercolor painting of {caption}", clip_model=tiny_models["clip"])
    assert input_columns(cfg) == ["id", "image", "caption"]
    stage = SDEditEditor(cfg)
    stage.setup()
    batch = _batch(2).set_column(2, "caption", pa.array(["a red barn", None]))
    out = stage(batch).to_pylist()
    assert out[0]["edit_prompt"] == "a watercolor painting of a red barn"
    assert out[0]["clip_direction"] is not None
    assert out[1]["status"] == "reject" and "'caption'" in out[1]["error"]


def test_direction_is_undefined_when_target_equals_source(tiny_models):
    stage = SDEditEditor(_config(tiny_models, prompt=None, prompt_column="caption", clip_model=tiny_models["clip"]))
    stage.setup()
    row = stage(_batch(1)).to_pylist()[0]
    assert row["status"] == "ok" and row["clip_direction"] is None and row["clip_image_text"] is not None


def test_a_row_that_breaks_the_model_is_a_reject_not_a_failed_batch(tiny_models):
    class Fussy(SDEditEditor):
        def edit(self, images, texts, seeds):
            if any("poison" in t for t in texts):
                raise RuntimeError("shape mismatch")
            return super().edit(images, texts, seeds)

    stage = Fussy(_config(tiny_models, prompt=None, prompt_column="caption"))
    stage.setup()
    batch = _batch(3).set_column(2, "caption", pa.array(["fine", "poison pill", "also fine"]))
    out = stage(batch).to_pylist()
    assert [r["status"] for r in out] == ["ok", "reject", "ok"]
    assert out[1]["error"] == "edit_failed: RuntimeError: shape mismatch"
