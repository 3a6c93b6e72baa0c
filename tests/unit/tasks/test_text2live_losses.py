"""Text2Live's losses one by one, on the toy CLIP (``toy:clip``) and toy-world scenes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pixelmill.tasks.edit.text2live import DEFAULT_TEMPLATES, Text2LiveSettings
from pixelmill.tasks.edit.text2live_layer import Text2LiveLayerGenerator, composite
from pixelmill.tasks.edit.text2live_nets import KeyExtractor, LayerUNet, internal_views, view_boxes
from pixelmill.toy import world

FAST = dict(iterations=6, width=8, depth=2, views=2, relevancy_samples=2)


def _scene(color: str = "red", index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = world.row_rng(5, index)
    obj = replace(world.sample_object(rng), shape="circle", color=color, background="white", background2=None,
                  split=None, extent=18, cx=16.0, cy=16.0)
    return np.asarray(world.render(obj)), world.shape_coverage("circle", obj.box)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def gen(one_torch_thread) -> Text2LiveLayerGenerator:
    return Text2LiveLayerGenerator.load("toy:clip", FAST, device="cpu")


def _texts(gen, target="a green circle", source="a red circle"):
    return (gen._texts(target), gen._texts(gen.settings.screen_text.format(text=target)),
            gen._texts(source) if source else None)


def test_defaults_are_the_papers():
    s = Text2LiveSettings()
    assert (s.iterations, s.lr, s.lr_decay, s.lr_min) == (1000, 2.5e-3, 0.99, 1e-5)
    assert (s.composition_weight, s.screen_weight, s.structure_weight) == (1.0, 1.0, 2.0)
    assert (s.sparsity_weight, s.sparsity_l1, s.sparsity_l0) == (6.0, 0.01, 0.01)
    assert (s.bootstrap_weight, s.bootstrap_iterations) == (10.0, 1000)
    assert (s.flip_p, s.jitter_p, s.min_crop) == (0.5, 0.1, 0.85)
    assert s.structure_weight > 0 and s.structure_model is None  # on by default, on CLIP's vision tower
    assert s.text_templates == list(DEFAULT_TEMPLATES) and "{} in the scene" in s.text_templates
    with pytest.raises(ValueError, match="text_templates"):
        Text2LiveSettings(text_templates=["no placeholder"])


def test_structure_loss_is_zero_for_identical_images_and_not_for_a_different_layout(gen):
    image, _ = _scene()
    x = _tensor(image)
    rgb = torch.zeros_like(x)
    _, same = gen._losses(x, rgb, torch.zeros_like(x[:, :1]), _texts(gen), None)
    assert same["structure"] == 0.0
    moved = np.roll(image, 9, axis=1)
    _, diff = gen._losses(x, _tensor(moved), torch.ones_like(x[:, :1]), _texts(gen), None)
    assert diff["structure"] > 1e-4
    assert isinstance(gen.keys, KeyExtractor) and gen.keys.model is gen.clip.visual


def test_keys_come_from_the_last_layer_and_no_hook_is_left_behind(gen):
    x = _tensor(_scene()[0])
    keys = gen.keys.keys(x)
    assert keys.shape == (1, 64, 64)  # 8×8 patches of the 32 px toy CLIP, width 64, class token dropped
    block = gen.clip.visual.transformer.resblocks[-1]
    assert not block.ln_1._forward_hooks
    h = block.ln_1(torch.randn(1, 65, 64))
    d = block.attn.embed_dim
    manual = h @ block.attn.in_proj_weight[d:2 * d].T + block.attn.in_proj_bias[d:2 * d]
    values = h @ block.attn.in_proj_weight[2 * d:].T
    assert not torch.allclose(manual, values)  # keys, not values or outputs


def test_timm_vit_keys(tmp_path):
    from pixelmill.models.tiny import save_tiny_vit
    from pixelmill.models.vit import load_vit

    vit, pre = load_vit(save_tiny_vit(tmp_path), device="cpu")
    ex = KeyExtractor(vit, pre)
    sim = ex.self_similarity(torch.rand(2, 3, 40, 50))
    assert sim.shape == (2, 64, 64) and torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 64), atol=1e-5)
    assert not vit.blocks[-1].attn.qkv._forward_hooks


def test_directional_term_points_from_source_to_target(gen):
    red, _ = _scene("red")
    x = _tensor(red)
    one = torch.ones_like(x[:, :1])
    _, to_green = gen._losses(x, _tensor(_scene("green")[0]), one, _texts(gen), None)
    _, to_blue = gen._losses(x, _tensor(_scene("blue")[0]), one, _texts(gen), None)
    assert to_green["directional"] < 0.5 < to_blue["directional"], (to_green, to_blue)
    assert to_green["composition"] < to_blue["composition"]
    _, none = gen._losses(x, x, one, _texts(gen, source=None), None)
    assert "directional" not in none


def test_sparsity_is_l1_plus_approximate_l0(gen):
    x = _tensor(_scene()[0])
    s = gen.settings
    for a in (0.0, 0.3, 1.0):
        _, terms = gen._losses(x, x, torch.full_like(x[:, :1], a), _texts(gen), None)
        l0 = 2 / (1 + np.exp(-5 * a)) - 1
        assert terms["sparsity"] == pytest.approx(s.sparsity_l1 * a + s.sparsity_l0 * l0, abs=1e-6)


def test_relevancy_map_finds_the_source_object(gen):
    image, cov = _scene()
    rel = gen.relevancy(image, "a red circle")
    assert rel.shape == cov.shape and rel.min() >= 0 and rel.max() == pytest.approx(1.0)
    assert rel[cov > 0.5].mean() > 2 * rel[cov == 0].mean()


def test_bootstrap_target_is_used_only_in_the_first_iterations(gen):
    image, _ = _scene()
    g = Text2LiveLayerGenerator(gen.clip, gen.tokenizer, {**FAST, "bootstrap_iterations": 3})
    res = g.fit(image, "a green circle", seed=0, source="a red circle")
    assert len(res.curves["bootstrap"]) == 3 and len(res.losses) == 6
    assert len(res.curves["directional"]) == 6 and res.relevancy is not None
    assert "bootstrap" not in res.terms
    plain = g.fit(image, "a green circle", seed=0)  # no source text: no directional, no bootstrap
    assert plain.relevancy is None and not {"bootstrap", "directional"} & set(plain.curves)
    own = Text2LiveLayerGenerator(gen.clip, gen.tokenizer, {**FAST, "source_prompt": "a red circle"})
    assert {"bootstrap", "directional"} <= set(own.fit(image, "a green circle", seed=0).curves)


def test_transparent_alpha_keeps_the_input_bit_for_bit_with_every_loss_on(gen):
    image, _ = _scene()
    valid = np.zeros(image.shape[:2], bool)
    valid[:, :20] = True
    res = gen.fit(image, "a green circle", seed=1, mask=valid, source="a red circle")
    assert {"composition", "screen", "directional", "structure", "sparsity", "bootstrap"} <= set(res.curves)
    assert (res.rgba[..., 3][~valid] == 0).all()
    clear = res.rgba[..., 3] == 0
    assert clear.any() and np.array_equal(composite(image, res.rgba)[clear], image[clear])


def test_time_budget_stops_training(gen):
    g = Text2LiveLayerGenerator(gen.clip, gen.tokenizer, {**FAST, "iterations": 500, "time_budget_s": 1e-3})
    assert len(g.fit(_scene()[0], "a green circle").losses) == 1


def test_internal_views_crop_flip_and_jitter_with_the_mask_riding_along():
    x = torch.rand(1, 3, 20, 30)
    m = x[:, :1].clone()
    g = torch.Generator().manual_seed(0)
    boxes = view_boxes(20, 30, 16, 0.5, 0.5, 0.0, g)
    assert {b[4] for b in boxes} == {True, False}
    for top, left, h, w, _, _ in boxes:
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30 and h >= 10 and w >= 15
    views, (mv, none) = internal_views(x, [m, None], boxes, 0.2, g)
    assert views.shape == (16, 3, 20, 30) and none is None and torch.equal(mv, views[:, :1])
    jittered, _ = internal_views(x, [], [(0, 0, 20, 30, False, True)], 0.5, g)
    assert not torch.equal(jittered, x) and 0 <= jittered.min() and jittered.max() <= 1


def test_unet_any_size_starts_at_alpha_init():
    net = LayerUNet(8, 3, 0.2)
    rgb, alpha = net(torch.rand(2, 3, 21, 37))
    assert rgb.shape == (2, 3, 21, 37) and alpha.shape == (2, 1, 21, 37)
    assert alpha.mean().item() == pytest.approx(0.2, abs=0.05)


def test_stage_rows_use_the_caption_as_source_and_carry_alpha_and_loss_curves(one_torch_thread):
    import io
    import json

    import pyarrow as pa
    from PIL import Image

    from pixelmill.config import EditConfig
    from pixelmill.datasets.images import decode_image
    from pixelmill.tasks.edit.text2live import Text2LiveEditor

    cfg = EditConfig(input="unused", output="unused", method="text2live", prompt="a green circle",
                     clip_model="toy:clip", resolution=32, batch_size=2, seed=0, device="cpu",
                     text2live=FAST).model_dump()
    stage = Text2LiveEditor(cfg)
    stage.setup()
    buf = io.BytesIO()
    Image.fromarray(_scene()[0]).save(buf, "PNG")
    cell = {"bytes": buf.getvalue(), "path": None}
    rows = stage(pa.Table.from_pylist([{"id": "a", "image": cell, "caption": "a red circle", "shard": "0"},
                                       {"id": "b", "image": cell, "caption": None, "shard": "0"}])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    with_caption, without = (json.loads(r["final_losses"]) for r in rows)
    assert "directional" in with_caption and "directional" not in without
    for r in rows:
        alpha = np.asarray(decode_image(r["edit_alpha"]))
        assert alpha.shape == (32, 32) and np.array_equal(alpha, np.asarray(decode_image(r["edit_layer"]))[..., 3])
        assert decode_image(r["loss_curves"]).size == (320, 160) and r["iterations_run"] == FAST["iterations"]


def _pan_atlas(frames: int = 4):
    """A 40×48 background layer seen through a 32×32 window sliding 2 px right per frame."""
    from pixelmill.tasks.video.atlas import Atlas, AtlasLayer

    image, _ = _scene()
    layer = np.pad(image, ((4, 4), (0, 16), (0, 0)), mode="edge")
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    uv = np.stack([np.stack([xx + 2 * t, yy + 4], -1) for t in range(frames)])
    atlas = Atlas([AtlasLayer("background", layer, uv)])
    frames_ = [np.ascontiguousarray(layer[4:36, 2 * t:2 * t + 32]) for t in range(frames)]
    return atlas, frames_


def test_atlas_frames_render_the_layer_as_the_video_overlay_does():
    from pixelmill.tasks.edit.text2live_nets import AtlasFrames
    from pixelmill.tasks.video.render import overlay_edit

    atlas, frames = _pan_atlas()
    lay = atlas.layers[0]
    rgba = np.random.default_rng(0).integers(0, 256, lay.image.shape[:2] + (4,), dtype=np.uint8)
    af = AtlasFrames(frames, lay.uv, atlas.visibility(0), lay.image.shape[:2])
    rgb = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255).permute(2, 0, 1)[None]
    alpha = torch.from_numpy(rgba[..., 3].astype(np.float32) / 255)[None, None]
    fx, frgb, falpha = af.render(rgb, alpha, torch.arange(len(frames)))
    ours = (falpha * frgb + (1 - falpha) * fx).permute(0, 2, 3, 1).numpy() * 255
    theirs = np.stack(overlay_edit(frames, atlas, 0, rgba)).astype(np.float32)
    assert np.abs(ours - theirs).max() <= 1.0


def test_a_video_layer_trains_on_rendered_frames_too(gen):
    atlas, frames = _pan_atlas()
    lay = atlas.layers[0]
    from pixelmill.tasks.edit.text2live_nets import AtlasFrames

    af = AtlasFrames(frames, lay.uv, atlas.visibility(0), lay.image.shape[:2])
    valid = np.ones(lay.image.shape[:2], bool)
    valid[:, -4:] = False
    res = gen.fit(lay.image, "a green circle", seed=0, mask=valid, source="a red circle", frames=af)
    assert {"frame composition", "frame directional", "frame structure", "frame screen"} <= set(res.curves)
    # The sparsity prior is the layer's, applied once on the atlas: on the frames too it collapsed the layer.
    assert "sparsity" in res.curves and "frame sparsity" not in res.curves
    assert len(res.curves["frame composition"]) == len(res.losses) and (res.rgba[:, -4:, 3] == 0).all()
    still = Text2LiveLayerGenerator(gen.clip, gen.tokenizer, {**FAST, "frame_weight": 0.0})
    assert not any(k.startswith("frame") for k in still.fit(lay.image, "x", frames=af).curves)


def test_a_clip_without_a_vit_tower_needs_a_structure_model_or_no_structure(gen):
    class NoViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

    class FakeClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = NoViT()

    with pytest.raises(ValueError, match="structure_model"):
        Text2LiveLayerGenerator(FakeClip(), gen.tokenizer, FAST)
    assert Text2LiveLayerGenerator(FakeClip(), gen.tokenizer, {**FAST, "structure_weight": 0.0}).keys is None


def test_attention_relevancy_is_chefers_on_the_towers_own_attention_and_finds_the_object(gen):
    from pixelmill.tasks.edit.text2live_nets import attention_relevancy, relevancy_map

    image, cov = _scene()
    x = _tensor(image)
    e = gen._texts("a red circle").mean(0, keepdim=True)
    e = e / e.norm()
    before = gen.clip.visual(gen.clip_pre(x))
    rel = attention_relevancy(gen.clip.visual, gen.clip_pre, x, e)[0, 0].numpy()
    assert not any("attention" in vars(b) for b in gen.clip.visual.transformer.resblocks)  # methods restored
    assert torch.equal(gen.clip.visual(gen.clip_pre(x)), before)
    assert rel.shape == cov.shape and rel.min() == 0.0 and rel.max() == pytest.approx(1.0)
    assert rel[cov > 0.5].mean() > 2 * rel[cov == 0].mean()
    grad = relevancy_map(gen._encode, x, e, samples=2)[0, 0].numpy()  # the fallback for other towers
    assert grad[cov > 0.5].mean() > grad[cov == 0].mean()
    assert attention_relevancy(torch.nn.Linear(2, 2), gen.clip_pre, x, e) is None
