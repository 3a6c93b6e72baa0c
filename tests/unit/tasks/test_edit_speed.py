"""The edit stage's ``speed`` settings and ``batch_size: auto`` on tiny models (CPU).

What a GPU adds (bf16 speed, CUDA streams, inductor compile) is measured by
``benchmarks/gpu.sh``; here: the settings validate, stay out of the output's hash, leave
outputs as they were (bit for bit for the decode overlap and the I/O threads; within
rounding for channels-last) and keep every row and every failure isolation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from pixelmill.config import EditConfig
from pixelmill.datasets.images import decode_image
from pixelmill.models.speed import AUTO_BATCH_FALLBACK, auto_batch_size, tune_pipeline
from pixelmill.tasks.edit import InstructPix2PixEditor, MaskedSDEditEditor, SDEditEditor
from tests.unit.tasks.test_edit_stage import _batch, _config

FAST = {"overlap_decode": True, "io_threads": 2}


def _ip2p(models, **kw) -> dict:
    return _config(models, method="instruct_pix2pix", model=models["instruct_pix2pix"], prompt=None,
                   instruction="make it snowy", **kw)


def _run(cls, config, batch: pa.Table) -> tuple[list[dict], object]:
    stage = cls(config)
    stage.setup()
    return stage(batch).to_pylist(), stage


def test_speed_settings_default_off_and_are_not_hashed(tiny_models):
    plain = EditConfig(input="in", output="out", model="m", prompt="p")
    assert plain.speed.model_dump() == {"channels_last": False, "compile": "off", "overlap_decode": False,
                                        "io_threads": 0, "attention": "auto", "fuse_qkv": False}
    fast = EditConfig(input="in", output="out", model="m", prompt="p", batch_size="auto",
                      speed={"channels_last": True, "compile": "unet", "overlap_decode": True, "io_threads": 4})
    assert fast.output_affecting() == plain.output_affecting()
    assert "speed" not in plain.output_affecting() and "batch_size" not in plain.output_affecting()
    for bad in ({"compile": "max"}, {"io_threads": -1}, {"warp": True}, {"attention": "fastest"}):
        with pytest.raises(ValidationError):
            EditConfig(input="in", output="out", model="m", prompt="p", speed=bad)
    with pytest.raises(ValidationError):
        EditConfig(input="in", output="out", model="m", prompt="p", batch_size=0)


@pytest.mark.parametrize("method", ["sdedit", "instruct_pix2pix"])
def test_overlapped_decode_and_io_threads_give_the_same_rows(tiny_models, one_torch_thread, method):
    cls, config = (SDEditEditor, _config) if method == "sdedit" else (InstructPix2PixEditor, _ip2p)
    batch = _batch(5, corrupt=(1,))
    before, _ = _run(cls, config(tiny_models, batch_size=2), batch)
    after, stage = _run(cls, config(tiny_models, batch_size=2, speed=FAST), batch)
    assert stage._decoder is not None and "decode overlapped with the next batch" in stage.tuning
    assert [r["status"] for r in after] == [r["status"] for r in before] == ["ok", "reject", "ok", "ok", "ok"]
    assert after == before  # PNG bytes, metrics, every column: one torch thread computes the same either way


def test_channels_last_changes_pixels_only_within_rounding(tiny_models, one_torch_thread):
    batch = _batch(2)
    before, _ = _run(SDEditEditor, _config(tiny_models, batch_size=2), batch)
    after, stage = _run(SDEditEditor, _config(tiny_models, batch_size=2, speed={"channels_last": True}), batch)
    assert stage.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(before, after):
        pa_, pb = (np.asarray(decode_image(r["edited_image"]), dtype=np.int16) for r in (a, b))
        assert np.abs(pa_ - pb).max() <= 2


def test_methods_with_their_own_loop_run_as_before_under_overlap(tiny_models, one_torch_thread):
    """The t0 search is not one pipeline call: with overlap on it is edited in the stage's thread."""
    config = _config(tiny_models, strength="auto", target_l2=0.3, batch_size=2)
    before, _ = _run(SDEditEditor, config, _batch(3))
    after, _ = _run(SDEditEditor, {**config, "speed": FAST}, _batch(3))
    assert after == before


def test_masked_sdedit_keeps_its_own_loop_under_overlap(tiny_models, one_torch_thread):
    from tests.unit.tasks.test_masked_sdedit import BOX, _cell, _picture, _png, _rect_mask
    from tests.unit.tasks.test_masked_sdedit import _config as masked_config

    batch = pa.Table.from_pylist([
        {"id": f"r{i}", "image": _cell(_png(_picture(c))), "mask": _cell(_png(_rect_mask(BOX))), "shard": "0"}
        for i, c in enumerate([(200, 40, 40), (30, 60, 200), (40, 160, 60)])
    ])
    config = masked_config(tiny_models, batch_size=2)
    before, _ = _run(MaskedSDEditEditor, config, batch)
    after, stage = _run(MaskedSDEditEditor, {**config, "speed": FAST}, batch)
    assert stage.pipe_call([], [], []) is None
    assert after == before and all(r["status"] == "ok" and r["mask_fraction"] for r in after)


def test_a_failing_row_is_isolated_under_overlap(tiny_models):
    class Fussy(SDEditEditor):
        def pipe_call(self, images, texts, seeds):
            kwargs, extras = super().pipe_call(images, texts, seeds)
            if any("poison" in t for t in texts):
                kwargs["strength"] = 5.0  # the pipeline refuses it
            return kwargs, extras

    config = _config(tiny_models, prompt=None, prompt_column="caption", batch_size=3, speed=FAST)
    batch = _batch(3).set_column(2, "caption", pa.array(["fine", "poison pill", "also fine"]))
    out, _ = _run(Fussy, config, batch)
    assert [r["status"] for r in out] == ["ok", "reject", "ok"]
    assert out[1]["error"].startswith("edit_failed: ValueError")


def test_auto_batch_size_off_cuda_is_the_default_batch(tiny_models):
    out, stage = _run(SDEditEditor, _config(tiny_models, batch_size="auto"), _batch(2))
    assert stage.batch_size == AUTO_BATCH_FALLBACK == 4
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert auto_batch_size(stage.pipe, 64, 2, stage.device) == AUTO_BATCH_FALLBACK


def test_compile_compiles_the_unet_and_with_vae_its_encoder_and_decoder(monkeypatch):
    from pixelmill.models.tiny import build_tiny_img2img_pipeline

    compiled = []

    def fake_compile(fn, *args, **kwargs):
        compiled.append(fn.__self__)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = build_tiny_img2img_pipeline()
    assert tune_pipeline(pipe) == [] and compiled == []
    assert tune_pipeline(pipe, compile="unet") == ["unet: torch.compile"] and compiled == [pipe.unet]
    compiled.clear()
    tune_pipeline(pipe, compile="unet+vae")
    assert compiled == [pipe.unet, pipe.vae.encoder, pipe.vae.decoder]
    with pytest.raises(ValueError):
        tune_pipeline(pipe, compile="everything")


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    unet = pipe.unet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=text).sample


def test_attention_preference_wraps_the_unet_and_keeps_its_output(one_torch_thread):
    """A preferred SDPA kernel the device lacks (cuDNN on a CPU) falls back: same output, no error."""
    from pixelmill.models.tiny import build_tiny_img2img_pipeline

    pipe = build_tiny_img2img_pipeline()
    before = _unet_out(pipe)
    for attention in ("cudnn", "flash", "efficient"):
        fresh = build_tiny_img2img_pipeline()
        assert tune_pipeline(fresh, attention=attention) == [f"unet: {attention} attention preferred"]
        assert torch.allclose(_unet_out(fresh), before, atol=1e-5)
    assert tune_pipeline(pipe, attention="auto") == []
    with pytest.raises(ValueError, match="attention: 'fastest' is not one of auto, cudnn, flash, efficient"):
        tune_pipeline(pipe, attention="fastest")


def test_fused_qkv_projections_keep_the_output_and_refuse_lora(one_torch_thread):
    from peft import LoraConfig

    from pixelmill.models.tiny import build_tiny_img2img_pipeline

    pipe = build_tiny_img2img_pipeline()
    before = _unet_out(pipe)
    assert tune_pipeline(pipe, fuse_qkv=True) == ["unet+vae: fused QKV projections"]
    assert any("Fused" in type(p).__name__ for p in pipe.unet.attn_processors.values())
    assert torch.allclose(_unet_out(pipe), before, atol=1e-5)
    with_lora = build_tiny_img2img_pipeline()
    with_lora.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]))
    with pytest.raises(ValueError, match="adapters \\(LoRA\\) loaded"):
        tune_pipeline(with_lora, fuse_qkv=True)
