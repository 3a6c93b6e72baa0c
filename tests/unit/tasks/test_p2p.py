"""Prompt-to-Prompt pair rendering on a tiny SD pipeline: sharing, equivalences, determinism."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pixelmill.datasets.images import decode_image
from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.p2p import (
    OUTPUT_SCHEMA,
    RECORD_MAX_TOKENS,
    PairRenderStage,
    render_pairs,
    sample_params,
    token_alignment,
)

SRC = "a photo of a cat on a sofa"
EDIT = "a photo of a dog on a sofa"
SIZE = 32  # 16×16 latents with the tiny VAE: maps are 256×256


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see the conftest fixture)."""


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pixelmill.models.tiny import build_tiny_sd_components

    p = StableDiffusionPipeline(**build_tiny_sd_components(seed=0))
    p.set_progress_bar_config(disable=True)
    assert isinstance(p.scheduler, DDIMScheduler)
    return p


def _arr(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_self_attention_is_the_sources_before_p_and_differs_after(pipe):
    steps, ps = 6, [0.5, 0.2]
    res = render_pairs(pipe, [SRC, "a red house"], [EDIT, "a blue house"], [1, 2], ps, [7.5, 9.0],
                       steps, SIZE, SIZE, record=True)
    n_self = sum(1 for name in pipe.unet.attn_processors if ".attn1." in name)
    assert len(res.self_attention) == steps
    for j, layers in enumerate(res.self_attention):
        assert len(layers) == n_self
        for name, maps in layers.items():
            assert maps.shape[:3] == (2, 2, 2)
            for i, p in enumerate(ps):
                for g in (0, 1):  # uncond and cond halves
                    src, ed = maps[g, 0, i], maps[g, 1, i]
                    if j < p * steps:
                        assert torch.equal(src, ed), (j, name, i, g)
                    elif g == 1 or j >= 1:  # at step 0 the uncond halves see identical inputs
                        assert (src - ed).abs().max() > 1e-6, (j, name, i, g)


def test_with_p_zero_the_edited_branch_is_a_plain_render_and_the_source_always_is(pipe):
    steps, seed, cfg = 5, 11, 8.0
    res = render_pairs(pipe, [SRC], [EDIT], [seed], [0.0], [cfg], steps, SIZE, SIZE)
    shared = render_pairs(pipe, [SRC], [EDIT], [seed], [0.8], [cfg], steps, SIZE, SIZE)

    def plain(prompt: str, output_type: str):
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                    guidance_scale=cfg, eta=0.0, height=SIZE, width=SIZE, output_type=output_type).images

    edited_latent, source_latent = plain(EDIT, "latent")[0], plain(SRC, "latent")[0]
    assert torch.allclose(res.latents[0, 1], edited_latent, atol=1e-3)
    assert np.abs(_arr(res.pairs[0][1]) - _arr(plain(EDIT, "pil")[0])).max() <= 1
    for r in (res, shared):  # the source branch is never changed by sharing
        assert torch.allclose(r.latents[0, 0], source_latent, atol=1e-3)
    assert (shared.latents[0, 1] - edited_latent).abs().max() > 1e-3  # sharing changed the edit


def test_same_seeds_give_the_same_pairs(pipe):
    args = ([SRC, "a red house"], [EDIT, "a blue house"], [5, 6], [0.3, 0.6], [7.5, 12.0], 3, SIZE, SIZE)
    a, b = render_pairs(pipe, *args), render_pairs(pipe, *args)
    for (s1, e1), (s2, e2) in zip(a, b):
        assert np.array_equal(_arr(s1), _arr(s2)) and np.array_equal(_arr(e1), _arr(e2))
    c = render_pairs(pipe, *args[:2], [7, 8], *args[3:])
    assert not np.array_equal(_arr(a[0][0]), _arr(c[0][0]))


def test_per_pair_p_and_cfg_in_one_batch_equal_separate_renders(pipe):
    src = [SRC, "a red house by the sea", "an old car"]
    ed = [EDIT, "a blue house by the sea", "an old red car"]
    seeds, ps, cfgs = [3, 4, 5], [0.2, 0.5, 0.8], [7.5, 11.0, 15.0]
    batch = render_pairs(pipe, src, ed, seeds, ps, cfgs, 5, SIZE, SIZE, cross_replace=True)
    assert len(batch) == 3 and batch.nsfw == [False] * 3
    for i in range(3):
        alone = render_pairs(pipe, [src[i]], [ed[i]], [seeds[i]], [ps[i]], [cfgs[i]], 5, SIZE, SIZE,
                             cross_replace=True)
        assert torch.allclose(batch.latents[i], alone.latents[0], atol=1e-4), i
        for a, b in zip(batch[i], alone[0]):
            assert np.abs(_arr(a) - _arr(b)).max() <= 1


def test_recorded_render_matches_the_fast_path(pipe):
    args = ([SRC], [EDIT], [9], [0.5], [10.0], 4, SIZE, SIZE)
    fast, recorded = render_pairs(pipe, *args), render_pairs(pipe, *args, record=True)
    assert fast.self_attention is None
    assert torch.allclose(fast.latents, recorded.latents, atol=1e-4)


def test_token_alignment_maps_shared_words_start_and_end(pipe):
    tok = pipe.tokenizer
    src, ed = "a photo of a cat", "a photo of a big dog"
    ids_s = tok(src).input_ids
    ids_e = tok(ed).input_ids
    m = token_alignment(tok, src, ed)
    assert len(m) == tok.model_max_length
    n_s, n_e = len(ids_s), len(ids_e)  # with start and end tokens
    assert m[0] == 0
    for j in range(1, n_e - 1):
        if m[j] is not None:
            assert ids_e[j] == ids_s[m[j]]
    shared = [j for j in range(1, n_e - 1) if m[j] is not None]
    assert len(shared) == 4  # "a photo of a"
    assert all(m[j] is None for j in range(5, n_e - 1))  # "big dog"
    assert m[n_e - 1] == n_s - 1  # end-of-text
    assert m[n_e] == n_s  # padding follows, shifted by the length difference
    assert m[-1] == tok.model_max_length - 1 - (n_e - n_s)
    back = token_alignment(tok, ed, src)  # the other way the source is longer: its tail is cut
    assert back[n_s - 1] == n_e - 1 and back[-2] == tok.model_max_length - 1 and back[-1] is None


def test_cross_replace_gives_the_edit_the_sources_maps_for_shared_tokens(pipe):
    steps, p = 4, 0.5
    res = render_pairs(pipe, [SRC], [EDIT], [2], [p], [7.5], steps, SIZE, SIZE, cross_replace=True, record=True)
    m = token_alignment(pipe.tokenizer, SRC, EDIT)
    aligned = [j for j, s in enumerate(m) if s is not None]
    changed = [j for j, s in enumerate(m) if s is None]
    src_idx = torch.tensor([m[j] for j in aligned])
    assert changed == [5]  # "dog"
    for j, layers in enumerate(res.cross_attention):
        assert layers
        for maps in layers.values():
            src, ed = maps[1, 0, 0], maps[1, 1, 0]  # conditional half, pair 0
            same = torch.equal(ed[..., aligned], src[..., src_idx])
            assert same == (j < p * steps)
            assert not torch.equal(ed[..., changed], src[..., changed])


def test_processors_are_restored_after_a_render(pipe):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    render_pairs(pipe, [SRC], [EDIT], [1], [0.5], [7.5], 2, SIZE, SIZE)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_bad_arguments_are_refused(pipe):
    with pytest.raises(ValueError, match="same non-zero length"):
        render_pairs(pipe, [SRC], [EDIT, EDIT], [1], [0.5], [7.5], 2, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_pairs(pipe, [SRC], [EDIT], [1], [1.5], [7.5], 2, SIZE, SIZE)
    with pytest.raises(ValueError, match="multiples"):
        render_pairs(pipe, [SRC], [EDIT], [1], [0.5], [7.5], 2, 30, SIZE)
    side = 2 * int(RECORD_MAX_TOKENS**0.5) * pipe.vae_scale_factor
    with pytest.raises(ValueError, match="record"):
        render_pairs(pipe, [SRC], [EDIT], [1], [0.5], [7.5], 2, side, side, record=True)


def test_non_sd_shaped_pipelines_are_refused():
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    from pixelmill.models.tiny import build_tiny_instruct_pix2pix_pipeline

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="Prompt-to-Prompt.*DDPMPipeline"):
        render_pairs(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), [SRC], [EDIT], [1], [0.5], [7.5], 2, 8, 8)
    with pytest.raises(ValueError, match="Prompt-to-Prompt.*input channels"):
        render_pairs(build_tiny_instruct_pix2pix_pipeline(), [SRC], [EDIT], [1], [0.5], [7.5], 2, SIZE, SIZE)


def _stage_config(models, **kw) -> dict:
    base = dict(model=models["img2img"], clip_model=models["clip"], device="cpu", samples_per_caption=3,
                steps=3, height=SIZE, width=SIZE, seed=4, batch_size=2, min_image_similarity=-1.0,
                min_direction=-1.0, min_image_caption=-1.0, max_per_caption=2)
    base.update(kw)
    return base


ROWS = [
    {"id": "c1", "caption": "a photo of a cat", "edit_prompt": "make it a dog", "edited_caption": "a photo of a dog"},
    {"id": "c2", "caption": "a red house", "edit_prompt": "paint it blue", "edited_caption": "a blue house"},
]


def test_stage_samples_are_seeded_per_row_and_sample_and_reproducible(tiny_models):
    stage = PairRenderStage(_stage_config(tiny_models))
    stage.setup()
    first = stage(pa.Table.from_pylist(ROWS))
    assert first.schema.equals(OUTPUT_SCHEMA)
    again = stage(pa.Table.from_pylist(ROWS[::-1])).to_pylist()
    by_id = {r["id"]: r for r in again}
    ok = [r for r in first.to_pylist() if r["status"] == "ok"]
    assert sorted(r["parent_id"] for r in ok) == ["c1", "c1", "c2", "c2"]  # max_per_caption=2 of 3
    for r in first.to_pylist():
        if r["status"] == "reject":
            continue
        k = r["sample"]
        assert r["id"] == f"{r['parent_id']}-{k:03d}"
        assert r["seed"] == row_seed(4, f"{r['parent_id']}:{k}")
        assert (r["p"], r["cfg"]) == sample_params(r["seed"], (0.1, 0.9), (7.5, 15.0))
        assert 0.1 <= r["p"] <= 0.9 and 7.5 <= r["cfg"] <= 15.0
        other = by_id[r["id"]]
        assert other["status"] == r["status"]
        assert other["clip_direction"] == pytest.approx(r["clip_direction"], abs=1e-4)
        if r["status"] == "ok":
            for col in ("input_image", "edited_image"):
                a, b = _arr(decode_image(r[col])), _arr(decode_image(other[col]))
                assert a.shape == (SIZE, SIZE, 3) and np.abs(a - b).max() <= 1


@pytest.fixture(scope="module")
def custom_diffusion_adapter(tmp_path_factory, tiny_models) -> str:
    """A Custom Diffusion job trained for a few steps (its K/V weights differ from the base model's)."""
    from pixelmill.config import CampaignConfig
    from pixelmill.samples import draw_concept_images, write_image_dataset
    from pixelmill.tasks.train.job import run_job
    from pixelmill.tasks.train.plan import plan_campaign

    root = tmp_path_factory.mktemp("p2p-cd")
    dog = write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0))
    cfg = CampaignConfig.model_validate({
        "output": str(root / "out"), "model": tiny_models["img2img"],
        "concepts": {"dog": {"instance_data": dog, "token": "<dog1>", "class_word": "dog"}},
        "defaults": {"resolution": 64, "max_steps": 4, "train_batch_size": 2, "learning_rate": 5e-2,
                     "with_prior_preservation": False},
        "jobs": [{"name": "cd", "method": "custom_diffusion", "concepts": ["dog"]}],
        "eval": {"prompts": [], "samples_per_prompt": 1},
    })
    (job,) = plan_campaign(cfg).jobs
    run_job(job.spec)
    return job.spec["dir"]


def _text2img(tiny_models, adapters=()):
    from diffusers import DDIMScheduler

    from pixelmill.models.adapters import apply_adapters
    from pixelmill.models.loading import load_text2img_pipeline

    p = load_text2img_pipeline(tiny_models["img2img"], device="cpu", dtype="float32")
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    if adapters:
        apply_adapters(p, list(adapters))
    return p


def test_custom_diffusion_adapter_still_acts_under_prompt_to_prompt(tiny_models, custom_diffusion_adapter):
    """P2P's processors must keep the adapter's own K/V projections (they used to replace them with the base ones).

    The prompts do not use the adapter's token, so only its K/V weights can change the render.
    """
    steps, seed, cfg = 4, 7, 7.5
    base, cd = _text2img(tiny_models), _text2img(tiny_models, [{"path": custom_diffusion_adapter}])
    without = render_pairs(base, [SRC], [EDIT], [seed], [0.0], [cfg], steps, SIZE, SIZE)
    with_cd = render_pairs(cd, [SRC], [EDIT], [seed], [0.0], [cfg], steps, SIZE, SIZE)
    shared = render_pairs(cd, [SRC], [EDIT], [seed], [0.5], [cfg], steps, SIZE, SIZE, cross_replace=True)
    assert (with_cd.latents - without.latents).abs().max() > 1e-3  # the adapter acts

    def plain(prompt: str):  # diffusers' own pipeline with the adapter loaded its normal way
        return cd(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  guidance_scale=cfg, eta=0.0, height=SIZE, width=SIZE, output_type="latent").images[0]

    ref_src, ref_edit = plain(SRC), plain(EDIT)
    assert torch.allclose(with_cd.latents[0, 0], ref_src, atol=1e-3)
    assert torch.allclose(with_cd.latents[0, 1], ref_edit, atol=1e-3)
    assert torch.allclose(shared.latents[0, 0], ref_src, atol=1e-3)  # the source branch is a plain render
    before = {k: type(v) for k, v in cd.unet.attn_processors.items()}
    render_pairs(cd, [SRC], [EDIT], [1], [0.5], [7.5], 2, SIZE, SIZE)
    assert {k: type(v) for k, v in cd.unet.attn_processors.items()} == before


def test_unknown_attention_processors_are_refused_not_dropped(pipe):
    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            raise AssertionError("not reached")

    before = dict(pipe.unet.attn_processors)
    name = next(iter(before))
    pipe.unet.set_attn_processor({**before, name: Custom()})
    try:
        with pytest.raises(ValueError, match="attention processor"):
            render_pairs(pipe, [SRC], [EDIT], [1], [0.5], [7.5], 2, SIZE, SIZE)
    finally:
        pipe.unet.set_attn_processor(before)
