"""The CLIP pair filter: thresholds, ranking, per-caption decisions, and the stage's accounting."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pytest
import torch
from PIL import Image

from pixelmill.datasets.images import decode_image
from pixelmill.tasks.metrics import ClipScorer
from pixelmill.tasks.pair_filter import (
    ClipPairFilter,
    FilterThresholds,
    PairScores,
    decide_caption,
    select_pairs,
    threshold_failures,
)

T = FilterThresholds(min_image_similarity=0.6, min_direction=0.15, min_image_caption=0.25, max_per_caption=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see the conftest fixture)."""


def _s(image=0.9, direction=0.5, source=0.3, edited=0.3) -> PairScores:
    return PairScores(image, direction, source, edited)


def test_thresholds_are_applied_as_configured_at_the_boundaries():
    assert threshold_failures(_s(0.6, 0.15, 0.25, 0.25), T) == []
    below = math.nextafter
    assert threshold_failures(_s(image=below(0.6, 0)), T) == ["image_similarity<0.6"]
    assert threshold_failures(_s(direction=below(0.15, 0)), T) == ["direction<0.15"]
    assert threshold_failures(_s(source=below(0.25, 0)), T) == ["source_caption<0.25"]
    assert threshold_failures(_s(edited=below(0.25, 0)), T) == ["edited_caption<0.25"]
    assert threshold_failures(_s(direction=None), T) == ["direction_undefined"]
    assert threshold_failures(_s(image=float("nan")), T) == ["image_similarity<0.6"]
    assert threshold_failures(_s(0.1, 0.1, 0.1, 0.1), T) == [
        "image_similarity<0.6", "direction<0.15", "source_caption<0.25", "edited_caption<0.25"]
    paper = FilterThresholds()
    assert (paper.min_image_similarity, paper.min_direction, paper.min_image_caption, paper.max_per_caption) == (
        0.7, 0.2, 0.2, 4)
    assert threshold_failures(_s(0.7, 0.2, 0.2, 0.2), paper) == []


def test_passers_are_ranked_by_direction_and_capped_per_caption():
    directions = [0.3, 0.9, 0.2, 0.5, 0.5, 0.7]
    scores = [_s(direction=d) for d in directions] + [_s(image=0.1, direction=0.99)]
    out = select_pairs(scores, T)
    ranks = [d.rank for d in out]
    assert ranks == [5, 1, 6, 3, 4, 2, None]  # ties: lower sample index first
    assert [d.keep for d in out] == [False, True, False, True, False, True, False]
    assert [d.reason for d in out] == ["surplus_rank>3", None, "surplus_rank>3", None, "surplus_rank>3", None,
                                       "image_similarity<0.6"]


def test_caption_without_survivor_is_a_reject_naming_the_best_sample():
    samples = [_s(image=0.5, direction=0.1), _s(image=0.5, direction=0.4), "nsfw",
               "render_failed: RuntimeError: boom", _s(0.1, 0.1, 0.1, 0.1)]
    d = decide_caption(samples, T)
    assert not any(x.keep for x in d.decisions)
    assert d.best == 1  # one threshold missed, beats the one missing two
    assert d.reject.startswith("no_sample_passed_clip_filter: best image_similarity=0.500, direction=0.400")
    assert "(3 scored, 1 nsfw, 1 failed)" in d.reject
    assert [x.reason for x in d.decisions] == [
        "image_similarity<0.6;direction<0.15", "image_similarity<0.6", "nsfw",
        "render_failed: RuntimeError: boom", "image_similarity<0.6;direction<0.15;source_caption<0.25;"
        "edited_caption<0.25"]
    assert decide_caption(["nsfw", "nsfw"], T).reject == "nsfw"
    assert decide_caption(["nsfw", "render_failed: x"], T).reject == "render_failed: x"
    kept = decide_caption(["nsfw", _s()], T)
    assert kept.reject is None and kept.decisions[1].keep and kept.decisions[0].reason == "nsfw"


@pytest.fixture(scope="module")
def clip_filter(tiny_models):
    return ClipPairFilter(ClipScorer(tiny_models["clip"]), T)


def _img(color, size=64) -> Image.Image:
    im = Image.new("RGB", (size, size), color)
    im.paste((255 - color[0], 255 - color[1], color[2]), (8, 8, 40, 40))
    return im


def test_clip_scores_are_the_documented_cosines(clip_filter):
    a, b = _img((200, 30, 30)), _img((30, 30, 200))
    cap, edcap = "a red square", "a blue square"
    s = clip_filter.score([a, a], [b, a], [cap, cap], [edcap, cap])
    sc: ClipScorer = clip_filter.scorer
    ea, eb = sc.images([a]), sc.images([b])
    tc, te = sc.texts([cap]), sc.texts([edcap])
    assert s[0].image_similarity == pytest.approx(float((ea * eb).sum()), abs=1e-5)
    assert s[0].source_caption == pytest.approx(float((ea * tc).sum()), abs=1e-5)
    assert s[0].edited_caption == pytest.approx(float((eb * te).sum()), abs=1e-5)
    img_text, direction = sc.score([a], [b], [edcap], [cap])  # the bulk-edit metric agrees
    assert s[0].edited_caption == pytest.approx(img_text[0], abs=1e-5)
    assert s[0].direction == pytest.approx(direction[0], abs=1e-5)
    d_img = torch.nn.functional.normalize(eb - ea, dim=-1)
    d_txt = torch.nn.functional.normalize(te - tc, dim=-1)
    assert s[0].direction == pytest.approx(float((d_img * d_txt).sum()), abs=1e-5)
    assert s[1].image_similarity == pytest.approx(1.0, abs=1e-5) and s[1].direction is None
    scores, decision = clip_filter.filter_caption([a, a], [b, b], cap, edcap)
    assert len(scores) == 2 and decision == decide_caption(scores, T)


# --- the stage: routing and accounting, with scores set per caption ---------------------------------------

ROWS = [
    {"id": "keep", "caption": "a cat", "edit_prompt": "make it a dog", "edited_caption": "a dog", "shard": "s0"},
    {"id": "none", "caption": "a house", "edit_prompt": "make it red", "edited_caption": "a red house", "shard": "s0"},
    {"id": "bad", "caption": "a tree", "edit_prompt": "add snow", "edited_caption": None, "shard": "s0"},
    {"id": "same", "caption": "A car.", "edit_prompt": "nothing", "edited_caption": "a car", "shard": "s0"},
    {"id": "one", "caption": "a boat", "edit_prompt": "make it sail", "edited_caption": "a sailing boat",
     "shard": "s0"},
]


class _ScriptedFilter(ClipPairFilter):
    """Scores set per caption (by the caption's first word) and sample order, to drive every branch."""

    def __init__(self, thresholds: FilterThresholds) -> None:
        self.thresholds = thresholds
        self.script = {
            "a cat": [_s(direction=d) for d in (0.3, 0.8, 0.1, 0.6, 0.5)],
            "a house": [_s(image=0.2, direction=0.5)] * 5,
            "a boat": [_s(edited=0.0)] * 4 + [_s(direction=0.4)],
        }
        self.seen: Counter = Counter()

    def score(self, sources, editeds, source_captions, edited_captions):
        out = []
        for cap in source_captions:
            out.append(self.script[cap][self.seen[cap]])
            self.seen[cap] += 1
        return out


@pytest.fixture(scope="module")
def stage_out(tiny_models):
    from pixelmill.tasks.p2p import PairRenderStage

    stage = PairRenderStage(dict(model=tiny_models["img2img"], clip_model=tiny_models["clip"], device="cpu",
                                 samples_per_caption=5, steps=2, height=32, width=32, batch_size=4, seed=1,
                                 max_per_caption=3))
    stage.setup()
    stage.filter = _ScriptedFilter(stage.thresholds)
    return stage(pa.Table.from_pylist(ROWS)).to_pylist()


def test_stage_keeps_the_top_directions_and_records_drops_with_reasons(stage_out):
    by_id = {r["id"]: r for r in stage_out}
    ok = [r for r in stage_out if r["status"] == "ok"]
    assert [r["id"] for r in ok if r["parent_id"] == "keep"] == ["keep-001", "keep-003", "keep-004"]
    assert [by_id[i]["rank"] for i in ("keep-001", "keep-003", "keep-004", "keep-000")] == [1, 2, 3, 4]
    assert by_id["keep-000"]["status"] == "dropped" and by_id["keep-000"]["drop_reason"] == "surplus_rank>3"
    assert by_id["keep-002"]["drop_reason"] == "direction<0.2"
    assert by_id["one-004"]["status"] == "ok" and by_id["one-000"]["drop_reason"] == "edited_caption<0.2"
    for r in ok:
        src, ed = decode_image(r["input_image"]), decode_image(r["edited_image"])
        assert src.size == ed.size == (32, 32) == (r["width"], r["height"])
        assert r["clip_direction"] is not None and r["model_hash"] and r["shard"] == "s0"
        assert r["edit_prompt"] and r["caption"] and r["edited_caption"]
    dropped = [r for r in stage_out if r["status"] == "dropped"]
    assert all(r["input_image"] is None and r["edited_image"] is None and r["drop_reason"] for r in dropped)
    assert all(r["parent_id"] in {"keep", "none", "one"} for r in dropped)


def test_stage_rejects_captions_without_survivors_with_reasons(stage_out):
    rejects = {r["id"]: r for r in stage_out if r["status"] == "reject"}
    assert set(rejects) == {"none", "bad", "same"}
    assert rejects["none"]["error"].startswith("no_sample_passed_clip_filter: best image_similarity=0.200")
    assert rejects["none"]["clip_image_similarity"] == pytest.approx(0.2)
    assert rejects["bad"]["error"] == "missing 'edited_caption'"
    assert rejects["same"]["error"] == "edited_caption equals caption"
    assert all(r["stage"] == "pairs" and r["parent_id"] is None for r in rejects.values())
    assert [r["drop_reason"] for r in stage_out if r["parent_id"] == "none"] == ["image_similarity<0.7"] * 5


def test_stage_accounts_for_every_caption_once(stage_out):
    ids = [r["id"] for r in ROWS]
    ok_parents = {r["parent_id"] for r in stage_out if r["status"] == "ok"}
    reject_ids = [r["id"] for r in stage_out if r["status"] == "reject"]
    assert len(reject_ids) == len(set(reject_ids))
    assert ok_parents.isdisjoint(reject_ids)
    assert ok_parents | set(reject_ids) == set(ids)
    children = [r["id"] for r in stage_out if r["status"] != "reject"]
    assert len(children) == len(set(children)) == 15  # 3 rendered captions × 5 samples, each once
    assert {r["status"] for r in stage_out} == {"ok", "dropped", "reject"}


def test_all_flagged_samples_make_an_nsfw_reject(tiny_models, tmp_path):
    from pixelmill.models.tiny import save_tiny_img2img
    from pixelmill.tasks.p2p import PairRenderStage

    model = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    stage = PairRenderStage(dict(model=model, clip_model=tiny_models["clip"], device="cpu", samples_per_caption=2,
                                 steps=1, height=32, width=32))
    stage.setup()
    out = stage(pa.Table.from_pylist(ROWS[:1])).to_pylist()
    assert [(r["id"], r["status"], r["error"] or r["drop_reason"]) for r in out] == [
        ("keep", "reject", "nsfw"), ("keep-000", "dropped", "nsfw"), ("keep-001", "dropped", "nsfw")]


def test_safety_checker_off_renders_pairs_the_checker_would_flag(tiny_models, tmp_path):
    from pixelmill.config.pairs import PairRenderSettings
    from pixelmill.models.tiny import save_tiny_img2img
    from pixelmill.tasks.p2p import PairRenderStage

    assert PairRenderSettings(model="m", clip_model="c", safety_checker=False).safety_checker == "off"  # YAML off
    model = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    stage = PairRenderStage(dict(model=model, clip_model=tiny_models["clip"], device="cpu", samples_per_caption=2,
                                 steps=1, height=32, width=32, safety_checker="off", min_image_similarity=-1,
                                 min_direction=-1, min_image_caption=-1))
    stage.setup()
    assert stage.pipe.safety_checker is None
    out = stage(pa.Table.from_pylist(ROWS[:1])).to_pylist()
    assert "nsfw" not in {r["error"] or r["drop_reason"] for r in out}
    assert [r["id"] for r in out if r["status"] == "ok"] == ["keep-000", "keep-001"]


def test_a_failing_render_is_isolated_to_its_caption(tiny_models, monkeypatch):
    import pixelmill.tasks.p2p as p2p

    real = p2p.render_pairs

    def flaky(pipe, sources, *args, **kw):
        if any("boom" in s for s in sources):
            raise RuntimeError("kaboom")
        return real(pipe, sources, *args, **kw)

    monkeypatch.setattr(p2p, "render_pairs", flaky)
    stage = p2p.PairRenderStage(dict(model=tiny_models["img2img"], clip_model=tiny_models["clip"], device="cpu",
                                     samples_per_caption=2, steps=1, height=32, width=32, batch_size=4,
                                     min_image_similarity=-1, min_direction=-1, min_image_caption=-1))
    stage.setup()
    boom = {"id": "x", "caption": "a boom box", "edit_prompt": "e", "edited_caption": "a red boom box"}
    rows = [dict(ROWS[0]), boom]
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["id"] for r in out if r["status"] == "ok"] == ["keep-000", "keep-001"]
    reject = [r for r in out if r["status"] == "reject"]
    assert [(r["id"], r["error"]) for r in reject] == [("x", "render_failed: RuntimeError: kaboom")]
    assert [r["drop_reason"] for r in out if r["parent_id"] == "x"] == ["render_failed: RuntimeError: kaboom"] * 2
