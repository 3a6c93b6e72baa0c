"""Fine-tuning across model families on tiny models (CPU).

SDXL: LoRA (with prior preservation), Textual Inversion (one embedding per text encoder)
and InstructPix2Pix run as campaign jobs end to end; each artifact loads in a FRESH
diffusers SDXL pipeline with diffusers' own loaders and reproduces the job's own sample
for the same seed. A method that does not support a family is refused at preflight
(exit 2, naming both). SD 2.x v-prediction: every method trains, on the velocity target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelmill.config import CampaignConfig
from pixelmill.samples import draw_concept_images, write_image_dataset, write_table_dataset
from pixelmill.tasks.train.job import run_job, train_worker
from pixelmill.tasks.train.plan import plan_campaign
from tests.conftest import run_cli
from tests.helpers.train_data import ip2p_pairs_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 3, "guidance_scale": 5.0,
        "image_guidance_scale": 1.5, "seed": 7}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from pixelmill.models.tiny_families import save_tiny_sd2v, save_tiny_sdxl

    root = tmp_path_factory.mktemp("family-models")
    return {"sdxl": save_tiny_sdxl(root / "sdxl"), "sd2v": save_tiny_sd2v(root / "sd2v")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    pairs = ip2p_pairs_table()
    return {
        "dog": write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0)),
        "class": write_image_dataset(str(root / "class"), draw_concept_images(4, seed=2, color=(120, 120, 120))),
        "pairs": write_table_dataset(str(root / "pairs"), pairs, "pairs", {"t": 1}),
    }


def campaign_dict(model, data, tmp_path, method, concept="dog", **settings) -> dict:
    base = dict(resolution=64, max_steps=3, train_batch_size=2, learning_rate=1e-2, checkpoint_every=2,
                num_class_images=4, random_flip=True)
    base.update(settings)
    return {
        "output": str(tmp_path / "out"), "model": model,
        "concepts": {
            "dog": {"instance_data": data["dog"], "token": "sks" if method in ("dreambooth", "lora") else "<dog1>",
                    "class_word": "dog", "class_data": data["class"]},
            "edits": {"instance_data": data["pairs"], "token": "x"},
        },
        "defaults": base,
        "jobs": [{"name": f"{method}-job", "method": method, "concepts": [concept]}],
        "eval": EVAL,
    }


def spec_for(model, data, tmp_path, method, concept="dog", **settings) -> dict:
    cfg = CampaignConfig.model_validate(campaign_dict(model, data, tmp_path, method, concept, **settings))
    plan = plan_campaign(cfg)
    assert not plan.class_images
    return plan.jobs[0].spec


def fresh(model: str, cls_name: str = "StableDiffusionXLPipeline"):
    """The base model as a user loads it, with the scheduler the job samples with (DDIM from its config)."""
    import diffusers
    from diffusers import DDIMScheduler

    pipe = getattr(diffusers, cls_name).from_pretrained(model, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job_sample(spec, samples: list[dict] | None = None) -> tuple[dict, np.ndarray]:
    """The finished job's first final sample (from its record, or the given index): its entry and pixels."""
    if samples is None:
        rec = json.loads((Path(spec["dir"]) / "job.json").read_text())
        assert rec["status"] == "finished", rec.get("error")
        samples = rec["samples"]
    entry = samples[0]
    return entry, np.asarray(Image.open(Path(spec["dir"]) / entry["file"]).convert("RGB"), dtype=np.int16)


def generate(pipe, prompt: str, seed: int, **kw) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed)
    img = pipe(prompt=prompt, num_inference_steps=EVAL["steps"], guidance_scale=EVAL["guidance_scale"],
               generator=g, height=64, width=64, **kw).images[0]
    return np.asarray(img, dtype=np.int16)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to PNG rounding (one level in uint8)."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()


# -- SDXL ---------------------------------------------------------------------------------------

def test_sdxl_lora_with_prior_loads_in_a_fresh_sdxl_pipeline_and_reproduces_the_job_sample(family_models, data,
                                                                                          tmp_path):
    spec = spec_for(family_models["sdxl"], data, tmp_path, "lora", with_prior_preservation=True,
                    prior_loss_weight=0.5)
    summary = run_job(spec)
    assert summary["status"] == "finished"
    log = [json.loads(x) for x in (Path(spec["dir"]) / "loss.jsonl").read_text().splitlines()]
    assert log and all(r["prior_loss"] is not None for r in log)  # the class images trained as the prior
    for r in log:
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-6)

    entry, sample = job_sample(spec)
    assert entry["prompt"] == "a photo of sks dog"
    pipe = fresh(family_models["sdxl"])
    plain = generate(pipe, entry["prompt"], entry["seed"])
    pipe.load_lora_weights(str(Path(spec["dir"]) / "artifacts"))
    loaded = generate(pipe, entry["prompt"], entry["seed"])
    assert_same_image(loaded, sample)
    assert np.abs(loaded - plain).max() > 2  # the LoRA changed the output
    assert_same_image(generate(pipe, entry["prompt"], entry["seed"], cross_attention_kwargs={"scale": 0.0}), plain)

    # the report says which family each job trained
    from pixelmill.tasks.train.results import write_results

    assert spec["family"] == "sdxl"
    _, report_url = write_results(str(tmp_path / "out"), [spec])
    assert '<td>lora<br><span class="muted">sdxl</span></td>' in Path(report_url).read_text()


def test_lora_prior_is_opt_in_and_its_settings_leave_the_id_alone_when_off(family_models, data, tmp_path):
    off = spec_for(family_models["sdxl"], data, tmp_path, "lora")
    off_other = spec_for(family_models["sdxl"], data, tmp_path, "lora", prior_loss_weight=0.3, num_class_images=2)
    on = spec_for(family_models["sdxl"], data, tmp_path, "lora", with_prior_preservation=True)
    assert off["id"] == off_other["id"] != on["id"]
    assert all(not c["class_sources"] for c in off["concepts"])  # no class images read without the setting
    assert on["concepts"][0]["class_sources"] == [{"url": data["class"]}]


def test_sdxl_cached_latents_and_text_give_the_same_weights(family_models, data, tmp_path):
    """The text cache holds SDXL's pooled embeddings too; cached latents keep the crop's time ids."""
    from safetensors.torch import load_file

    plain = spec_for(family_models["sdxl"], data, tmp_path / "a", "lora", center_crop=True, max_steps=2)
    cached = spec_for(family_models["sdxl"], data, tmp_path / "b", "lora", center_crop=True, max_steps=2,
                      cache_latents=True, cache_text_embeddings=True)
    train_worker(plain)
    train_worker(cached)
    text = load_file(cached["cache"]["text"])
    assert any(k.endswith("|pooled") for k in text) and Path(cached["cache"]["latents"]).exists()
    a, b = (load_file(str(Path(s["dir"]) / "artifacts" / "pytorch_lora_weights.safetensors")) for s in (plain, cached))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_sdxl_textual_inversion_trains_both_encoders_and_loads_with_diffusers_sdxl_pattern(family_models, data,
                                                                                          tmp_path):
    from safetensors.torch import load_file

    spec = spec_for(family_models["sdxl"], data, tmp_path, "textual_inversion", num_vectors=2,
                    learning_rate=5e-2)
    out = train_worker(spec)
    method = out["method_obj"]
    base = fresh(family_models["sdxl"])
    for name in ("text_encoder", "text_encoder_2"):
        emb = method.parts[name].get_input_embeddings().weight.detach()
        old = getattr(base, name).get_input_embeddings().weight.detach()
        n = old.shape[0]
        assert emb.shape[0] == n + 2
        assert torch.equal(emb[:n], old), f"{name}: a non-placeholder row changed"
        init = old[base.tokenizer.encode("dog", add_special_tokens=False)[0]]
        assert not torch.allclose(emb[n], init), f"{name}: the placeholder row did not train"
    for tok in (method.parts["tokenizer"], method.parts["tokenizer_2"]):
        assert len(tok.encode("<dog1> <dog1>_1", add_special_tokens=False)) == 2

    art = Path(spec["dir"]) / "artifacts"
    state = load_file(str(art / "learned_embeds.safetensors"))
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape[0] == state["clip_g"].shape[0] == 2
    entry, sample = job_sample(spec, out["samples"])
    assert entry["prompt"] == "a photo of <dog1>"
    pipe = fresh(family_models["sdxl"])
    # diffusers' documented SDXL pattern: one call per text encoder
    pipe.load_textual_inversion(state["clip_l"], token="<dog1>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<dog1>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    loaded = generate(pipe, entry["prompt"], entry["seed"])
    assert_same_image(loaded, sample)
    assert np.abs(loaded - generate(base, entry["prompt"], entry["seed"])).max() > 2

    # pixelmill's own adapter loading (bulk edit's `adapters:`) reads the same file
    from pixelmill.models.adapters import apply_adapters

    again = fresh(family_models["sdxl"])
    apply_adapters(again, [{"path": str(art)}])
    assert_same_image(generate(again, entry["prompt"], entry["seed"]), sample)


def test_sdxl_instruct_pix2pix_saves_an_sdxl_editing_pipeline_that_reproduces_the_job_sample(family_models, data,
                                                                                            tmp_path):
    spec = spec_for(family_models["sdxl"], data, tmp_path, "instruct_pix2pix", concept="edits",
                    conditioning_dropout_prob=0.2)
    summary = run_job(spec)
    assert summary["status"] == "finished"
    art = Path(spec["dir"]) / "artifacts"
    index = json.loads((art / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    pipe = fresh(str(art), "StableDiffusionXLInstructPix2PixPipeline")
    assert pipe.unet.config.in_channels == 8
    base = fresh(family_models["sdxl"])
    assert not torch.equal(pipe.unet.conv_out.weight, base.unet.conv_out.weight)  # the UNet trained

    entry, sample = job_sample(spec)
    # the job samples its first pair's source (the dataset's first row), resized to the resolution
    from pixelmill.tasks.train.job import load_training_data

    first = load_training_data(spec).instance[0]
    from pixelmill.tasks.train.data import _open

    source = _open(first.source).resize((64, 64))
    g = torch.Generator("cpu").manual_seed(entry["seed"])
    out = pipe(prompt=entry["prompt"], image=source, num_inference_steps=EVAL["steps"],
               guidance_scale=EVAL["guidance_scale"], image_guidance_scale=EVAL["image_guidance_scale"],
               generator=g, height=64, width=64).images[0]
    assert_same_image(np.asarray(out, dtype=np.int16), sample)


def test_sdxl_conditioning_is_what_diffusers_sdxl_pipeline_encodes(family_models, data, tmp_path):
    """Hidden states (penultimate layers, concatenated) and pooled embeds equal the pipeline's encode_prompt."""
    from pixelmill.tasks.train.job import _setup

    spec = spec_for(family_models["sdxl"], data, tmp_path, "lora")
    _, _, trainer = _setup(spec, torch.device("cpu"))
    prompts = ["a photo of sks dog", "a dog on a beach"]
    with torch.no_grad():
        text = trainer.encode_text(prompts)
        embeds, _, pooled, _ = fresh(family_models["sdxl"]).encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text.embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=1e-6)
    null = trainer.null_text()
    assert not null.embeds.any() and not null.pooled.any()  # force_zeros_for_empty_prompt, as the pipeline


def test_unsupported_method_family_is_an_exit_2_preflight_error_naming_both(family_models, data, tmp_path):
    import yaml

    from pixelmill.config.preflight import PreflightError

    cfg = campaign_dict(family_models["sdxl"], data, tmp_path, "dreambooth")
    with pytest.raises(PreflightError, match=r"training method 'dreambooth' does not support sdxl"):
        CampaignConfig.model_validate(cfg).preflight()
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    nowhere = {"RAY_ADDRESS": "127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    proc = run_cli(["finetune", str(path)], nowhere)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training method 'dreambooth' does not support sdxl (Stable Diffusion XL)" in proc.stderr
    assert "it supports sd1 (Stable Diffusion 1.x), sd2 (Stable Diffusion 2.x)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    # a job spec run directly (no preflight) is refused by the job itself, before training
    from pixelmill.models.family import UnsupportedFamily

    spec = spec_for(family_models["sdxl"], data, tmp_path, "dreambooth")
    with pytest.raises(UnsupportedFamily, match="training method 'dreambooth' does not support sdxl"):
        train_worker(spec)
    assert not (Path(spec["dir"]) / "checkpoints").exists()


def test_methods_declare_their_families():
    from pixelmill.config.campaign import method_families

    assert {m: method_families(m) for m in ("textual_inversion", "lora", "instruct_pix2pix", "dreambooth",
                                            "custom_diffusion", "text_to_image")} == {
        "textual_inversion": ("sd1", "sd2", "sdxl"), "lora": ("sd1", "sd2", "sdxl"),
        "instruct_pix2pix": ("sd1", "sd2", "sdxl"), "dreambooth": ("sd1", "sd2"),
        "custom_diffusion": ("sd1", "sd2"), "text_to_image": ("sd1", "sd2")}


# -- SD 2.x v-prediction ------------------------------------------------------------------------

def test_sd2_v_prediction_trains_on_the_velocity_target(family_models, data, tmp_path):
    from pixelmill.tasks.train.data import per_sample
    from pixelmill.tasks.train.job import _setup

    spec = spec_for(family_models["sd2v"], data, tmp_path, "lora", random_flip=False, center_crop=True)
    _, d, trainer = _setup(spec, torch.device("cpu"))
    assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
    samples, seed, step, size = d.instance[:2], spec["settings"]["seed"], 0, trainer.buckets[0]
    with torch.no_grad():
        loss = trainer.losses(samples, size, step)
        prepared = [trainer._prepare(x, size, seed, step) for x in samples]
        latents = trainer.latents(samples, prepared, seed, step)
        ids = [x.id for x in samples]
        noise = per_sample(ids, seed, step, "noise", trainer.device, tuple(latents.shape[1:]))
        t = per_sample(ids, seed, step, "t", trainer.device, high=trainer.noise_scheduler.config.num_train_timesteps)
        noisy = trainer.noise_scheduler.add_noise(latents, noise, t)
        pred = trainer.unet(noisy, t, trainer.encode_text([p.prompt for p in prepared]).embeds).sample
    velocity = trainer.noise_scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(loss, ((pred - velocity) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-3)  # not epsilon's


@pytest.mark.parametrize("method,concept", [("textual_inversion", "dog"), ("dreambooth", "dog"), ("lora", "dog"),
                                            ("custom_diffusion", "dog"), ("instruct_pix2pix", "edits"),
                                            ("text_to_image", "dog")])
def test_every_method_trains_an_sd2_v_prediction_checkpoint(family_models, data, tmp_path, method, concept):
    spec = spec_for(family_models["sd2v"], data, tmp_path, method, concept=concept, max_steps=2,
                    with_prior_preservation=False)
    summary = run_job(spec)
    assert summary["status"] == "finished" and summary["step"] == 2
    log = [json.loads(x) for x in (Path(spec["dir"]) / "loss.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    art = Path(spec["dir"]) / "artifacts"
    assert all((art / f).exists() for f in summary["artifacts"])
    if (art / "model_index.json").exists():  # a full pipeline keeps the v-prediction scheduler
        sched = json.loads((art / "scheduler" / "scheduler_config.json").read_text())
        assert sched["prediction_type"] == "v_prediction"
