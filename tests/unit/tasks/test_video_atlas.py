"""Layered atlases: homography and neural atlases of synthetic clips with known motion,
rendering and editing through them, checkpoint/resume, and the video metrics."""

from __future__ import annotations

import json
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch

from pixelmill.tasks.video.atlas import Atlas, AtlasError
from pixelmill.tasks.video.homography import build_homography_atlas, motion_masks
from pixelmill.tasks.video.metrics import psnr, temporal_consistency
from pixelmill.tasks.video.neural import NeuralAtlasConfig, checkpoint_weights, train_neural_atlas
from pixelmill.tasks.video.render import atlas_validity_mask, composite_edit, render_frames, sample_layer
from pixelmill.tasks.video.synthetic import Texture, synthetic_moving_shape, synthetic_pan

RED = (255, 0, 0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _footprint(uv: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame pixels whose bilinear sample reads any / only atlas pixels inside ``region``."""
    h, w = region.shape
    x0, y0 = np.floor(uv[..., 0]).astype(int), np.floor(uv[..., 1]).astype(int)
    hits = []
    for dx in (0, 1):
        for dy in (0, 1):
            x, y = np.clip(x0 + dx, 0, w - 1), np.clip(y0 + dy, 0, h - 1)
            hits.append(region[y, x])
    return np.any(hits, axis=0), np.all(hits, axis=0)


@pytest.fixture(scope="module")
def pan():
    """A 96x72 pan with sub-pixel shifts, and its homography atlas."""
    clip = synthetic_pan(frames=9, size=(96, 72), shift=(1.37, -0.62), fps=Fraction(30000, 1001))
    return clip, build_homography_atlas(clip.frames, fps=clip.fps)


@pytest.fixture(scope="module")
def shape_clip():
    return synthetic_moving_shape(frames=8, size=(32, 32), radius=5.0, velocity=(2.0, 1.0))


@pytest.fixture(scope="module")
def rough_masks(shape_clip):
    """A sloppy segmentation: the true masks grown by one pixel all round."""
    kernel = np.ones((3, 3), np.uint8)
    return [cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in shape_clip.masks]


@pytest.fixture(scope="module")
def neural(one_torch_thread, shape_clip, rough_masks):
    """The tiny neural atlas of the moving-shape clip (trained once for the module)."""
    return train_neural_atlas(shape_clip.frames, NeuralAtlasConfig.tiny(), masks=rough_masks)


# --- homography atlas ---------------------------------------------------------------------


def test_homography_recovers_known_subpixel_shifts(pan):
    clip, atlas = pan
    uv = atlas.layers[0].uv
    ref = atlas.meta["reference"]
    assert ref == 4 and atlas.method == "homography" and atlas.alpha is None
    # Pixel (x, y) of frame t shows what pixel (x + s_t - s_ref) of the reference shows, so
    # its atlas coordinate is offset by exactly the known shift difference.
    offsets = uv - uv[ref]
    truth = (clip.shifts - clip.shifts[ref])[:, None, None, :]
    err = np.abs(offsets - truth)
    assert err.max() < 0.5  # measured 0.17 px (worst pixel, worst frame)
    assert err.mean() < 0.1  # measured 0.017 px
    # The same from the homographies themselves: translation of frame t into the atlas.
    homs = np.asarray(atlas.meta["homographies"])
    np.testing.assert_allclose(homs[:, :2, 2] - homs[ref, :2, 2], clip.shifts - clip.shifts[ref], atol=0.5)  # 0.11
    assert not any(atlas.meta["chained"])


def test_homography_atlas_reconstructs_the_video(pan):
    clip, atlas = pan
    rendered = render_frames(atlas)
    assert psnr(rendered, clip.frames) > 25.0  # measured 27.9 dB (median of sub-pixel-warped frames)
    w, h = 96, 72
    span = np.ptp(clip.shifts, axis=0)
    ha, wa = atlas.layers[0].image.shape[:2]
    assert (wa, ha) == pytest.approx((w + span[0], h + span[1]), abs=2.0)


def test_tiny_frames_register_through_dense_fallback():
    clip = synthetic_pan(frames=6, size=(32, 32), shift=(1.0, 0.5))
    atlas = build_homography_atlas(clip.frames)
    uv, ref = atlas.layers[0].uv, atlas.meta["reference"]
    err = np.abs((uv - uv[ref]) - (clip.shifts - clip.shifts[ref])[:, None, None, :])
    assert err.max() < 1.0  # measured 0.52 px (worst corner pixel of 32x32 frames)
    assert "ecc" in atlas.meta["methods"]


def test_registration_failure_names_the_frame():
    clip = synthetic_pan(frames=7, size=(96, 72), shift=(2.0, 1.0))
    frames = list(clip.frames)
    yy, xx = np.mgrid[0:72, 0:96].astype(np.float64)
    frames[5] = (Texture(seed=99)(xx, yy) * 255).astype(np.uint8)  # an unrelated picture
    with pytest.raises(AtlasError, match=r"^frame 5: cannot register it to reference frame 3 or its neighbour frame 4"):
        build_homography_atlas(frames)


def test_motion_masks_find_the_moving_object():
    clip = synthetic_moving_shape(frames=8, size=(64, 48), radius=7.0, velocity=(4.0, 1.0))
    atlas = build_homography_atlas(clip.frames)
    masks = motion_masks(clip.frames, atlas)
    ious = [_iou(m, g) for m, g in zip(masks, clip.masks)]
    assert np.mean(ious) > 0.85 and min(ious) > 0.8  # measured mean 0.924, worst frame 0.893


def test_atlas_save_load_round_trip(tmp_path, pan, neural):
    for atlas in (pan[1], neural[0]):
        folder = atlas.save(tmp_path / atlas.method)
        assert {p.suffix for p in folder.iterdir()} == {".json", ".npy", ".png"}  # no pickle
        back = Atlas.load(folder)
        assert back.method == atlas.method and back.fps == atlas.fps
        assert back.meta == json.loads(json.dumps(atlas.meta))
        for a, b in zip(atlas.layers, back.layers):
            assert a.name == b.name
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.uv, b.uv)
        if atlas.alpha is None:
            assert back.alpha is None
        else:
            np.testing.assert_array_equal(atlas.alpha, back.alpha)
    assert Atlas.load(tmp_path / "homography").fps == Fraction(30000, 1001)


# --- editing ------------------------------------------------------------------------------


def test_composite_edit_leaves_transparent_pixels_bit_identical():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    edit = np.zeros((20, 30, 4), np.float32)
    edit[..., :3] = 0.5
    edit[:, :10, 3] = 0.9 / 255.0  # below 1/255: must not touch the image
    edit[:, 10:20, 3] = 0.5
    edit[:, 20:, 3] = 1.0
    out = composite_edit(base, edit)
    np.testing.assert_array_equal(out[:, :10], base[:, :10])
    np.testing.assert_array_equal(out[:, 20:], 128)
    half = np.rint(0.5 * 127.5 + 0.5 * base[:, 10:20].astype(np.float32))
    np.testing.assert_array_equal(out[:, 10:20], half)
    rgba8 = np.dstack([np.full((20, 30, 3), 255, np.uint8), np.zeros((20, 30), np.uint8)])
    np.testing.assert_array_equal(composite_edit(base, rgba8), base)


def test_edit_on_homography_atlas_follows_the_pan(pan):
    clip, atlas = pan
    image = atlas.layers[0].image
    ha, wa = image.shape[:2]
    region = np.zeros((ha, wa), bool)
    region[30:42, 45:57] = True
    edit = np.zeros((ha, wa, 4), np.uint8)
    edit[region] = (*RED, 255)
    edited = composite_edit(image, edit)
    np.testing.assert_array_equal(edited[~region], image[~region])

    before, after = render_frames(atlas), render_frames(atlas, [edited])
    ref = atlas.meta["reference"]
    centroids = []
    for t in range(atlas.num_frames):
        touched, inside = _footprint(atlas.layers[0].uv[t], region)
        assert inside.sum() > 50  # the square is in view in every frame
        np.testing.assert_array_equal(after[t][~touched], before[t][~touched])
        assert np.abs(after[t][inside].astype(int) - RED).max() <= 1
        red = np.all(after[t] == RED, axis=-1)
        ys, xs = np.nonzero(red)
        centroids.append((xs.mean(), ys.mean()))
    # The painted square moves against the camera by exactly the known shifts.
    moved = np.asarray(centroids) - centroids[ref]
    np.testing.assert_allclose(moved, -(clip.shifts - clip.shifts[ref]), atol=0.75)


def test_validity_mask_marks_what_frames_see(pan):
    clip, atlas = pan
    seen = atlas_validity_mask(atlas)
    assert seen.shape == atlas.layers[0].image.shape[:2]
    assert seen.mean() == pytest.approx(atlas.meta["covered_fraction"], abs=0.05)
    ref = atlas.meta["reference"]
    uv = atlas.layers[0].uv[ref]
    x0, y0 = np.rint(uv[0, 0]).astype(int)
    assert seen[y0 : y0 + 72, x0 : x0 + 96].all()  # the reference frame's footprint
    corners = [seen[0, 0], seen[0, -1], seen[-1, 0], seen[-1, -1]]
    assert corners.count(False) == 2  # a diagonal pan leaves two canvas corners unseen


# --- neural atlas -------------------------------------------------------------------------


def test_neural_atlas_reconstructs_and_separates_the_moving_shape(neural, shape_clip, rough_masks):
    atlas, stats = neural
    assert atlas.method == "neural" and [layer.name for layer in atlas.layers] == ["background", "foreground"]
    assert stats.start_iteration == 0 and stats.iterations == NeuralAtlasConfig.tiny().iterations
    # Re-rendered from the exported atlas images, not just the MLPs: measured 33.9 dB
    # (networks alone 35.4 dB).
    assert stats.psnr > 29.0
    assert psnr(render_frames(atlas), shape_clip.frames) == pytest.approx(stats.psnr)
    alpha = atlas.alpha > 0.5
    gt = np.stack(shape_clip.masks)
    iou = _iou(alpha, gt)
    rough_iou = _iou(np.stack(rough_masks), gt)
    assert iou > 0.75  # measured 0.86
    assert iou > rough_iou + 0.1  # training sharpened the sloppy masks (their IoU: 0.65)
    # The foreground layer tracks the shape: the disk centre stays put in the atlas.
    uv_fg = atlas.layers[1].uv
    centre_uv = np.array([sample_layer(uv_fg[t], np.float32([[c]]))[0, 0] for t, c in enumerate(shape_clip.centers)])
    assert centre_uv.std(axis=0).max() < 1.0  # atlas pixels (2 per frame pixel); measured 0.32
    # And the background layer stays still for the static camera.
    uv_bg = atlas.layers[0].uv
    assert np.abs(uv_bg - uv_bg[0]).mean() < 1.0  # measured 0.30 atlas pixels


def test_edit_on_neural_foreground_moves_with_the_shape(neural, shape_clip):
    atlas, _ = neural
    fg = atlas.layers[1]
    ha, wa = fg.image.shape[:2]
    c = sample_layer(fg.uv[0], np.float32([[shape_clip.centers[0]]]))[0, 0]
    region = np.zeros((ha, wa), bool)
    cx, cy = np.rint(c).astype(int)
    region[cy - 3 : cy + 4, cx - 3 : cx + 4] = True
    assert (region & atlas_validity_mask(atlas, layer=1)).sum() == region.sum()
    edit = np.zeros((ha, wa, 4), np.uint8)
    edit[region] = (0, 0, 255, 255)
    edited = composite_edit(fg.image, edit)

    before, after = render_frames(atlas), render_frames(atlas, [None, edited])
    for t, (x, y) in enumerate(shape_clip.centers):
        touched, _ = _footprint(fg.uv[t], region)
        np.testing.assert_array_equal(after[t][~touched], before[t][~touched])
        # At the shape's true centre the frame now shows the paint, in every frame.
        pixel = after[t][int(round(y)), int(round(x))].astype(int)
        assert pixel[2] > 200 and pixel[0] < 60, (t, pixel)
        assert touched.sum() < 120  # the paint stays a small patch on the shape


# --- checkpoints --------------------------------------------------------------------------


def test_resume_from_checkpoint_matches_an_unbroken_run(tmp_path, one_torch_thread, shape_clip, rough_masks):
    frames = shape_clip.frames
    cfg = NeuralAtlasConfig.tiny(iterations=40, checkpoint_every=10, batch_size=256)
    half = cfg.model_copy(update={"iterations": 20})

    seen: list[int] = []
    _, first = train_neural_atlas(
        frames, half, checkpoint_dir=tmp_path / "a", masks=rough_masks, progress=lambda i, n, losses: seen.append(i)
    )
    assert first.start_iteration == 0 and checkpoint_weights(tmp_path / "a")[0] == 20
    assert seen == [20]  # progress_every=100 in tiny(): called at the last step only
    atlas_b, resumed = train_neural_atlas(frames, cfg, checkpoint_dir=tmp_path / "a", masks=rough_masks)
    assert resumed.start_iteration == 20 and resumed.iterations == 40
    atlas_c, unbroken = train_neural_atlas(frames, cfg, checkpoint_dir=tmp_path / "b", masks=rough_masks)
    assert unbroken.start_iteration == 0

    step_b, weights_b = checkpoint_weights(tmp_path / "a")
    step_c, weights_c = checkpoint_weights(tmp_path / "b")
    assert step_b == step_c == 40 and weights_b.keys() == weights_c.keys()
    for name in weights_b:
        torch.testing.assert_close(weights_b[name], weights_c[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(atlas_b.alpha, atlas_c.alpha, atol=1e-5)
    assert len(list((tmp_path / "a").glob("weights-*.safetensors"))) == 1

    changed = cfg.model_copy(update={"learning_rate": 1e-2, "iterations": 50})
    with pytest.raises(AtlasError, match="different settings: learning_rate"):
        train_neural_atlas(frames, changed, checkpoint_dir=tmp_path / "a", masks=rough_masks)
    with pytest.raises(AtlasError, match="different video"):
        train_neural_atlas(frames[::-1], cfg, checkpoint_dir=tmp_path / "a", masks=rough_masks)


# --- metrics ------------------------------------------------------------------------------


def test_psnr_values():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    b = np.full((4, 4, 3), 0.1, np.float32)
    assert psnr(np.zeros_like(b), b) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:2])


def test_temporal_consistency_prefers_edits_that_follow_the_motion(pan):
    clip, atlas = pan
    original = temporal_consistency(clip.frames)
    assert 0.0 <= original < 0.02  # measured 0.0128

    flicker = [
        np.clip(f.astype(int) + (25 if t % 2 else -25), 0, 255).astype(np.uint8) for t, f in enumerate(clip.frames)
    ]
    assert temporal_consistency(flicker, flow_frames=clip.frames) > original + 0.1  # measured 0.18

    ha, wa = atlas.layers[0].image.shape[:2]
    edit = np.zeros((ha, wa, 4), np.uint8)
    edit[30:42, 45:57] = (*RED, 255)
    tracked = render_frames(atlas, [composite_edit(atlas.layers[0].image, edit)])
    pasted = [f.copy() for f in render_frames(atlas)]
    for f in pasted:
        f[20:32, 30:42] = RED  # the same square at a fixed screen position: it slides over the scene
    on_scene = temporal_consistency(tracked, flow_frames=clip.frames)
    on_screen = temporal_consistency(pasted, flow_frames=clip.frames)
    assert on_scene < 0.85 * on_screen  # measured 0.0089 vs 0.0123


# --- neural atlas losses in isolation -------------------------------------------------------

class _Linear2D(torch.nn.Module):
    """(x, y, t) -> scale * (A @ (x, y) - frame * shift) + offset: a mapping with a known Jacobian and motion."""

    def __init__(self, a, scale: float, frames: int = 1, shift=(0.0, 0.0), offset=(0.0, 0.0)) -> None:
        super().__init__()
        self.a = torch.tensor(a, dtype=torch.float32)
        self.scale, self.frames = scale, frames
        self.shift, self.offset = torch.tensor(shift), torch.tensor(offset)

    def forward(self, xyt):
        frame = (xyt[..., 2:3] + 1.0) * (self.frames - 1) / 2.0
        return self.scale * (xyt[..., :2] @ self.a.T - frame * self.shift) + self.offset


def _video_moving(n: int, h: int, w: int, v: tuple[float, float]):
    """A _Video whose content moves by ``v`` pixels per frame (exact flow, every pixel consistent)."""
    from pixelmill.tasks.video.neural import _Video

    fwd = torch.tensor(v, dtype=torch.float32).expand(n - 1, h, w, 2).clone()
    ok = torch.ones(n - 1, h, w, dtype=torch.bool)
    return _Video(rgb=torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0)), fwd=fwd, bwd=-fwd,
                  fwd_ok=ok, bwd_ok=ok.clone(), masks=None)


def test_rigidity_loss_is_zero_for_rigid_mappings_and_positive_otherwise():
    from pixelmill.tasks.video.neural import MappingNet, _rigidity

    scale, delta = 0.5, 0.01
    xyt = torch.rand(256, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c, s = np.cos(0.5), np.sin(0.5)

    def energy(net) -> float:
        with torch.no_grad():
            return float(_rigidity(net, xyt, net(xyt), delta, scale))

    assert abs(energy(MappingNet(16, 2, scale))) < 1e-5  # the identity the networks start from
    assert abs(energy(_Linear2D([[c, -s], [s, c]], scale, frames=5, shift=(0.1, 0.0), offset=(0.3, -0.2)))) < 1e-4
    # symmetric Dirichlet energy (tr M + tr M^-1) / 4 - 1 of M = JᵀJ, J the Jacobian over uv_scale
    assert energy(_Linear2D([[1.5, 0.0], [0.0, 1.5]], scale)) == pytest.approx((4.5 + 4.5 / 1.5**4) / 4 - 1, rel=1e-3)
    assert energy(_Linear2D([[1.0, 0.5], [0.0, 1.0]], scale)) == pytest.approx(0.125, rel=1e-3)  # a shear
    assert energy(_Linear2D([[1.0, 0.0], [0.0, 0.5]], scale)) > 0.1  # squashed along one axis


def test_flow_loss_is_zero_when_the_mapping_follows_the_flow_and_measures_the_miss_in_pixels():
    from pixelmill.tasks.video.neural import LayeredAtlasModel, MappingNet, _step_losses

    cfg = NeuralAtlasConfig.tiny()
    n, h, w, v = 5, 12, 16, (2.0, 1.0)
    video = _video_moving(n, h, w, v)
    torch.manual_seed(0)
    model = LayeredAtlasModel(cfg)
    follow = (np.asarray(v) * video.pixel).tolist()  # the content's motion in normalised units per frame
    identity = [[1.0, 0.0], [0.0, 1.0]]

    def losses(bg, fg):
        model.map_bg, model.map_fg = bg, fg
        with torch.no_grad():
            return {k: float(x) for k, x in _step_losses(model, video, cfg, step=0).items()}

    tracking = losses(_Linear2D(identity, cfg.uv_scale, n, follow), _Linear2D(identity, cfg.uv_scale, n, follow))
    assert abs(tracking["flow"]) < 1e-5 and abs(tracking["rigidity"]) < 1e-4
    # static mappings on moving content: each point misses by the flow, |v| pixels in both layers
    static = losses(MappingNet(16, 2, cfg.uv_scale), MappingNet(16, 2, cfg.uv_scale))
    assert static["flow"] == pytest.approx(float(np.hypot(*v)), rel=1e-3)
    assert abs(static["rigidity"]) < 1e-4  # rigid, just not moving: only the flow term sees it
    # only the background follows: the miss is weighted by the foreground's visibility (alpha)
    half = losses(_Linear2D(identity, cfg.uv_scale, n, follow), MappingNet(16, 2, cfg.uv_scale))
    assert 0.0 < half["flow"] < static["flow"]
    still = _video_moving(n, h, w, (0.0, 0.0))  # no motion: the static mapping is the consistent one
    model.map_bg, model.map_fg = MappingNet(16, 2, cfg.uv_scale), MappingNet(16, 2, cfg.uv_scale)
    with torch.no_grad():
        assert abs(float(_step_losses(model, still, cfg, step=0)["flow"])) < 1e-6
