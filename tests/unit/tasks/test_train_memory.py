"""What frozen networks cost in memory while training, with the same numbers.

``frozen_weights: auto``: under mixed precision every step computes with the numbers autocast
computed with, bit for bit; only frozen Linear/conv weights change dtype; the fp32 originals come
back exactly for sampling and saving. ``offload_idle``: the VAE and text encoders leave memory
while everything is cached, come back on first use, and every sample and saved file is the same."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from pixelmill.config import CampaignConfig
from pixelmill.samples import draw_concept_images, write_image_dataset, write_table_dataset
from pixelmill.tasks.train.job import _setup, load_or_build_caches, run_job
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


# -- offload_idle: the VAE and text encoders parked while everything is cached ---------------

def _cached_trainer(inputs, out, **settings):
    spec = _spec(inputs, out, "lora", "auto", mixed_precision="no", cache_latents=True, cache_text_embeddings=True,
                 **settings)
    method, data, trainer = _setup(spec, torch.device("cpu"))
    trainer.latent_cache, trainer.text_cache = load_or_build_caches(spec, trainer, data, method)
    return trainer


def _state(module) -> dict[str, torch.Tensor]:
    return {**{f"p:{k}": v.detach().clone() for k, v in module.named_parameters()},
            **{f"b:{k}": v.detach().clone() for k, v in module.named_buffers()}}


def test_parked_networks_leave_memory_the_steps_are_the_same_and_they_come_back_exactly(inputs, tmp_path):
    plain = _cached_trainer(inputs, tmp_path / "a")
    parked = _cached_trainer(inputs, tmp_path / "b")
    before = {n: _state(parked.method.parts[n]) for n in ("vae", "text_encoder")}
    assert parked.park_idle() == ["vae", "text_encoder"]
    for n in ("vae", "text_encoder"):
        assert sum(p.numel() for p in parked.method.parts[n].parameters()) == 0, n  # no storage left
    assert [plain.step(i).loss for i in range(3)] == [parked.step(i).loss for i in range(3)]
    assert all(p.parked for p in parked.parked.values())  # no step needed them
    with parked.exact_weights():  # validation: back, the same values; parked again after it
        for n, saved in before.items():
            now = _state(parked.method.parts[n])
            assert now.keys() == saved.keys() and all(torch.equal(now[k], t) for k, t in saved.items()), n
    assert sum(p.numel() for p in parked.vae.parameters()) == 0
    parked.release()
    for n, saved in before.items():
        now = _state(parked.method.parts[n])
        assert all(torch.equal(now[k], t) for k, t in saved.items()), n
    files = [Path(p.file).parent for p in parked.parked.values()]
    assert all(f.exists() for f in files)
    del parked
    gc.collect()
    assert not any(f.exists() for f in files)  # the files go with the trainer


def test_a_step_that_needs_a_parked_network_brings_it_back(inputs, tmp_path):
    plain = _cached_trainer(inputs, tmp_path / "a")
    parked = _cached_trainer(inputs, tmp_path / "b")
    parked.park_idle()
    for t in (plain, parked):  # a sample the cache lacks: its latents are encoded in the step
        t.latent_cache = {k: v for k, v in t.latent_cache.items() if not k[0].endswith("0")}
        t.text_cache = {}
    assert [plain.step(i).loss for i in range(2)] == [parked.step(i).loss for i in range(2)]
    assert not parked.parked["vae"].parked and not parked.parked["text_encoder"].parked
    assert sum(p.numel() for p in parked.vae.parameters()) == sum(p.numel() for p in plain.vae.parameters())


def test_offload_idle_off_parks_nothing(inputs, tmp_path):
    trainer = _cached_trainer(inputs, tmp_path, offload_idle=False)
    assert trainer.park_idle() == [] and not trainer.parked


def test_a_cached_bf16_dreambooth_job_saves_and_samples_what_the_plain_job_does(inputs, tmp_path):
    """The job path with both levers on (VAE and text encoder parked, frozen weights in bf16) against both
    off: the saved pipeline (VAE and text encoder included) and every sample, byte for byte."""
    files = {}
    for tag, offload, frozen in (("plain", False, "fp32"), ("lean", True, "auto")):
        spec = _spec(inputs, tmp_path / tag, "dreambooth", frozen, cache_latents=True, cache_text_embeddings=True,
                     offload_idle=offload, validation_every=2, validation_prompts=["a <dog1> dog"])
        out = run_job(spec)
        assert out["status"] == "finished", out
        root = Path(spec["dir"])
        files[tag] = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                      if p.is_file() and ("samples" in p.parts or "artifacts" in p.parts)
                      and p.suffix in (".png", ".safetensors")}
    assert files["lean"].keys() == files["plain"].keys()
    assert any("vae/" in k for k in files["lean"]) and any("step-000002" in k for k in files["lean"])
    for k, blob in files["plain"].items():
        assert files["lean"][k] == blob, k
