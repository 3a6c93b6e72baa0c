"""Frozen weights stored in the mixed-precision dtype (``frozen_weights: auto``): every step computes
with the numbers autocast computed with, bit for bit; only frozen Linear/conv weights change
dtype; the fp32 originals come back exactly for sampling and saving."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from pixelmill.config import CampaignConfig
from pixelmill.samples import draw_concept_images, write_image_dataset, write_table_dataset
from pixelmill.tasks.train.job import _setup, run_job
from pixelmill.tasks.train.plan import plan_campaign
from pixelmill.tasks.train.precision import CAST_LAYERS
from tests.helpers.train_data import ip2p_pairs_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("precision-data")
    return {
        "dog": write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0)),
        "pairs": write_table_dataset(str(root / "pairs"), ip2p_pairs_table(), "pairs", {"t": 1}),
        "model": tiny_models["img2img"],
    }


def _spec(inputs, out, method: str, frozen: str, **settings) -> dict:
    concept = "edits" if method == "instruct_pix2pix" else "dog"
    base = dict(resolution=64, max_steps=3, train_batch_size=2, learning_rate=1e-2, mixed_precision="bf16",
                frozen_weights=frozen, center_crop=True, random_flip=True, checkpoint_every=100)
    if method in ("custom_diffusion", "dreambooth"):
        base["with_prior_preservation"] = False
    base.update(settings)
    return plan_campaign(CampaignConfig.model_validate({
        "output": str(out), "model": inputs["model"],
        "concepts": {"dog": {"instance_data": inputs["dog"], "token": "<dog1>", "class_word": "dog"},
                     "edits": {"instance_data": inputs["pairs"], "token": "x"}},
        "defaults": base, "jobs": [{"method": method, "concepts": [concept]}],
        "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 2},
    })).jobs[0].spec


def _networks(trainer) -> dict[str, torch.nn.Module]:
    return {"unet": trainer.unet, **{f"te{i}": te for i, te in enumerate(trainer.text_encoders)}}


@pytest.mark.parametrize("method", ["lora", "custom_diffusion", "textual_inversion", "dreambooth",
                                    "instruct_pix2pix"])
def test_half_frozen_weights_train_bitwise_as_autocast_and_come_back_exactly(inputs, tmp_path, method):
    specs = {f: _spec(inputs, tmp_path / f, method, f) for f in ("fp32", "auto")}
    assert specs["auto"]["id"] == specs["fp32"]["id"]  # the same weights: not part of the job id
    runs = {}
    for f, spec in specs.items():
        _, _, trainer = _setup(spec, torch.device("cpu"))
        runs[f] = (trainer, [trainer.step(step).loss for step in range(3)])
    plain, half = runs["fp32"][0], runs["auto"][0]
    assert plain.frozen is None and half.frozen is not None and half.frozen.count > 0
    # on the CPU the fp32 originals wait in a file, not in memory
    spill = Path(half.frozen.spill_file)
    assert spill.stat().st_size >= 4 * half.frozen.count and half.frozen._originals is None

    # what is half: frozen Linear/conv weights of the UNet and text encoders; nothing that trains, no norm
    trainable = {id(p) for p in half.params.values()}
    for net in _networks(half).values():
        for layer in net.modules():
            for p in layer.parameters(recurse=False):
                cast = isinstance(layer, CAST_LAYERS) and id(p) not in trainable
                assert p.dtype == (torch.bfloat16 if cast else torch.float32), (type(layer).__name__, p.shape)
    assert all(p.dtype == torch.float32 for p in half.vae.parameters())  # the VAE encodes in fp32 by design

    # the same steps, bit for bit
    assert runs["auto"][1] == runs["fp32"][1]
    for k, p in plain.params.items():
        assert torch.equal(half.params[k], p), k

    # the originals come back exactly (sampling and saving see the base weights, not rounded ones)
    half.frozen.restore()
    for name, net in _networks(plain).items():
        theirs = _networks(half)[name].state_dict()
        for k, t in net.state_dict().items():
            assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), (name, k)
    runs.clear()
    del half, plain, trainer
    gc.collect()
    assert not spill.parent.exists()  # the file goes with the trainer


def test_a_job_with_half_frozen_weights_saves_and_samples_what_the_fp32_job_does(inputs, tmp_path):
    """The job path: validation samples during training and the final samples and LoRA file are the fp32
    job's, bit for bit (the originals are back for them), and training goes on in half after validation."""
    outs = {}
    for f in ("fp32", "auto"):
        spec = _spec(inputs, tmp_path / f, "lora", f, validation_every=1, validation_prompts=["a <dog1> dog"])
        outs[f] = (spec, run_job(spec))
    from safetensors.torch import load_file

    files = {}
    for f, (spec, out) in outs.items():
        assert out["status"] == "finished" and out["step"] == 3
        root = Path(spec["dir"])
        files[f] = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                    if p.is_file() and ("samples" in p.parts or p.suffix == ".safetensors") and "checkpoints"
                    not in p.parts}
    assert sorted(files["auto"]) == sorted(files["fp32"])
    assert any("step-000001" in k for k in files["auto"]) and any(k.endswith("lora_weights.safetensors")
                                                                    for k in files["auto"])
    for k, p in files["fp32"].items():
        if p.suffix == ".safetensors":
            a, b = load_file(str(p)), load_file(str(files["auto"][k]))
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
        elif p.suffix == ".png":
            assert p.read_bytes() == files["auto"][k].read_bytes(), k


def test_without_mixed_precision_nothing_is_cast(inputs, tmp_path):
    _, _, trainer = _setup(_spec(inputs, tmp_path, "lora", "auto", mixed_precision="no"), torch.device("cpu"))
    assert trainer.frozen is None
    assert {p.dtype for p in trainer.unet.parameters()} == {torch.float32}
