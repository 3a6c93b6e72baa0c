"""Text2Live on tiny random CLIP and ViT models: exact compositing, a falling loss, determinism."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from pixelmill.config import ConfigError, EditConfig, load_config
from pixelmill.datasets.images import decode_image
from pixelmill.models.loading import ModelNotFound
from pixelmill.tasks.edit.text2live import Text2LiveEditor
from pixelmill.tasks.edit.text2live_layer import Text2LiveLayerGenerator, composite

ROOT = Path(__file__).resolve().parents[3]
W, H = 64, 48

# On a random tiny CLIP the CLIP losses favour an opaque layer; a weak sparsity prior
# keeps it so, which makes the compositing checks non-trivial.
SETTINGS = dict(iterations=40, lr=0.01, views=3, width=16, sparsity_weight=0.02, sparsity_l1=2.0, sparsity_l0=1.0,
                structure_weight=0.5)


def _picture(color=(200, 40, 40)) -> Image.Image:
    im = Image.new("RGB", (W, H), color)
    for x in range(0, W, 8):
        im.paste((255 - color[0], color[1], 128), (x, 0, x + 4, H))
    im.paste((20, 220, 90), (24, 16, 40, 32))
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _blend(image: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha over, recomputed in float64 (independently of ``composite``)."""
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    out = a * rgba[..., :3].astype(np.float64) + (1.0 - a) * image.astype(np.float64)
    return np.rint(out).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    from pixelmill.models.tiny import save_tiny_vit

    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def generator(tiny_models, tiny_vit, one_torch_thread) -> Text2LiveLayerGenerator:
    return Text2LiveLayerGenerator.load(tiny_models["clip"], {**SETTINGS, "structure_model": tiny_vit},
                                        device="cpu")


def _config(models, vit, **t2l) -> dict:
    return EditConfig(input="unused", output="unused", method="text2live", prompt="fire",
                      clip_model=models["clip"], resolution=64, batch_size=2, seed=3, device="cpu",
                      text2live={**SETTINGS, "structure_model": vit, **t2l}).model_dump()


def test_transparent_pixels_are_the_input_and_the_rest_is_the_layer_over_it(generator):
    image = _picture()
    valid = np.zeros((H, W), bool)
    valid[:, : W // 2] = True
    result = generator.fit(image, "fire", seed=1, mask=valid)
    rgba = result.rgba
    assert rgba.dtype == np.uint8 and rgba.shape == (H, W, 4)
    alpha = rgba[..., 3]
    assert (alpha[~valid] == 0).all() and (rgba[~valid][:, :3] == 0).all()
    # The layer is really there where it may be, with fractional opacity, so the blend is tested.
    assert ((alpha[valid] > 0) & (alpha[valid] < 255)).mean() > 0.5
    out = composite(image, rgba)
    src = np.asarray(image)
    clear = alpha == 0  # exactly the pixels whose float alpha was below 1/255
    assert clear.any() and np.array_equal(out[clear], src[clear])
    assert np.array_equal(out, _blend(src, rgba))
    assert np.array_equal(Text2LiveLayerGenerator.composite(np.asarray(image), rgba), out)


def test_the_optimisation_lowers_the_loss(generator):
    result = generator.fit(_picture(), "fire", seed=2)
    assert set(result.terms) == {"composition", "screen", "sparsity", "structure"}
    assert result.final_loss < result.initial_loss - 0.1, (result.initial_loss, result.final_loss)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.1
    assert len(result.losses) == SETTINGS["iterations"]


def test_same_seed_same_layer(generator):
    image = _picture((30, 60, 200))
    a = generator.generate(image, "fire", seed=5)
    b = generator.generate(np.asarray(image), "fire", seed=5)
    c = generator.generate(image, "fire", seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stage_rows_carry_the_composite_the_layer_and_its_opacity(tiny_models, tiny_vit, one_torch_thread):
    stage = Text2LiveEditor(_config(tiny_models, tiny_vit, iterations=10))  # fractional alpha still
    stage.setup()
    images = [_picture(), _picture((30, 60, 200))]
    batch = pa.Table.from_pylist([
        {"id": "a", "image": {"bytes": _png(images[0]), "path": None}, "caption": "stripes", "shard": "0"},
        {"id": "bad", "image": {"bytes": b"not an image", "path": None}, "caption": "x", "shard": "0"},
        {"id": "b", "image": {"bytes": _png(images[1]), "path": None}, "caption": "stripes", "shard": "0"},
    ])
    out = stage(batch)
    assert {"edit_layer", "alpha_mean"} <= set(out.column_names)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "reject", "ok"]
    assert rows[1]["error"].startswith("undecodable")
    for row, image in zip([rows[0], rows[2]], images):
        layer = decode_image(row["edit_layer"])
        assert layer.mode == "RGBA" and layer.size == image.size
        rgba = np.asarray(layer)
        src = np.asarray(decode_image(row["input_image"]))
        assert np.array_equal(src, np.asarray(image))
        edited = np.asarray(decode_image(row["edited_image"]))
        assert ((rgba[..., 3] > 0) & (rgba[..., 3] < 255)).mean() > 0.5
        assert np.array_equal(edited, _blend(src, rgba))
        clear = rgba[..., 3] == 0
        assert np.array_equal(edited[clear], src[clear])
        assert row["alpha_mean"] == pytest.approx(rgba[..., 3].mean() / 255.0)
        assert row["method"] == "text2live" and row["edit_prompt"] == "fire"
        assert row["model"] == tiny_models["clip"] and "+" in row["model_hash"]
        assert row["steps"] == 10 and -1 <= row["clip_image_text"] <= 1
    again = stage(batch.slice(2, 1)).to_pylist()[0]
    assert again["edited_image"] == rows[2]["edited_image"] and again["edit_layer"] == rows[2]["edit_layer"]


def test_a_layer_the_sparsity_prior_removes_leaves_the_image_bit_identical(tiny_models, tiny_vit,
                                                                          one_torch_thread):
    # The caption is the source text, which turns on the directional loss (scale-invariant in the layer: its
    # pull does not fade as alpha does) and alpha bootstrapping (towards the relevancy map); both are off here.
    stage = Text2LiveEditor(_config(tiny_models, tiny_vit, sparsity_weight=5.0, iterations=30,
                                    directional_weight=0.0, bootstrap_weight=0.0))
    stage.setup()
    image = _picture()
    row = stage(pa.Table.from_pylist([{"id": "a", "image": {"bytes": _png(image), "path": None},
                                       "caption": "c", "shard": "0"}])).to_pylist()[0]
    assert row["status"] == "ok"
    assert row["alpha_mean"] == 0.0
    assert np.array_equal(np.asarray(decode_image(row["edited_image"])), np.asarray(image))


def test_the_flow_picks_the_text2live_editor(tiny_models, tiny_vit):
    from pixelmill.flows.bulk_edit import editor_class

    assert editor_class(_config(tiny_models, tiny_vit)) is Text2LiveEditor


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(clip_model=None), "text2live needs `clip_model`"),
        (dict(prompt=None), "text2live needs `prompt`"),
        (dict(text2live={"screen_text": "{thing} on green"}), "screen_text"),
        (dict(text2live={"structure_weights": "w.safetensors"}), "structure_weights needs structure_model"),
        (dict(text2live={"iterations": 0}), "iterations"),
        (dict(method="sdedit", model="m", text2live={}), "only with `method: text2live`"),
    ],
)
def test_text2live_config_errors(kw, needle):
    base = dict(input="i", output="o", method="text2live", prompt="fire", clip_model="clip")
    base.update(kw)
    with pytest.raises(ValidationError, match=needle):
        EditConfig(**base)


def test_missing_clip_model_is_a_config_error_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: in\noutput: out\nmethod: text2live\nprompt: fire\n")
    with pytest.raises(ConfigError, match="text2live needs `clip_model`"):
        load_config(EditConfig, p)


def test_example_config_validates():
    cfg = load_config(EditConfig, ROOT / "configs" / "edit-text2live.yaml")
    assert cfg.method == "text2live" and cfg.clip_model and cfg.text2live.iterations >= 1
    assert cfg.model is None and cfg.output_affecting()["text2live"]["screen_text"] == "{text} over a green screen"


def test_load_vit_reads_safetensors_only(tiny_vit, tmp_path):
    import torch

    from pixelmill.models.vit import load_vit

    vit, pre = load_vit(tiny_vit, device="cpu")
    tokens = vit.forward_features(pre(torch.rand(1, 3, 40, 50)))
    assert tokens.shape == (1, vit.num_prefix_tokens + 64, 32)
    assert not any(p.requires_grad for p in vit.parameters())
    with pytest.raises(ValueError, match="do not fit 'vit_small_patch16_224'"):
        load_vit("vit_small_patch16_224", str(Path(tiny_vit) / "model.safetensors"), device="cpu")
    pickled = tmp_path / "w.pth"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ModelNotFound, match="only .safetensors"):
        load_vit("vit_small_patch16_224", str(pickled))
    with pytest.raises(ModelNotFound, match="needs a local safetensors"):
        load_vit("vit_small_patch16_224")
    with pytest.raises(ModelNotFound, match="hub downloads are not supported"):
        load_vit("hf-hub:timm/vit_small_patch16_224.dino")
    with pytest.raises(ModelNotFound, match="not found"):
        load_vit(str(tmp_path / "nowhere"))


def test_the_cli_makes_structure_paths_absolute_for_workers(monkeypatch, tmp_path):
    from pixelmill.config.preflight import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = EditConfig(input="in", output="out", method="text2live", prompt="fire", clip_model="./clip",
                     text2live={"structure_model": "vit_small_patch16_224",
                                "structure_weights": "weights/dino.safetensors"})
    t2l = absolute_paths(cfg).text2live
    assert t2l.structure_weights == str(tmp_path / "weights" / "dino.safetensors")
    assert t2l.structure_model == "vit_small_patch16_224"  # an architecture name stays a name
