"""Fine-tuning methods on tiny models (CPU): artifacts load with diffusers' own loaders and
reproduce the trained pipeline, only the intended parameters change, the loss falls,
resume is exact, and bad input fails before training."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pixelmill.config import CampaignConfig
from pixelmill.samples import draw_concept_images, write_image_dataset, write_table_dataset
from pixelmill.tasks.train.data import TrainingDataError
from pixelmill.tasks.train.job import run_job, train_worker
from pixelmill.tasks.train.plan import check_campaign_inputs, plan_campaign
from tests.helpers.train_data import ip2p_pairs_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("train-data")
    pairs = ip2p_pairs_table()
    return {
        "dog": write_image_dataset(str(root / "dog"), draw_concept_images(4, seed=0)),
        "cat": write_image_dataset(str(root / "cat"), draw_concept_images(4, seed=1, color=(40, 200, 40),
                                                                        shape="square")),
        "class": write_image_dataset(str(root / "class"), draw_concept_images(4, seed=2, color=(120, 120, 120))),
        "pairs": write_table_dataset(str(root / "pairs"), pairs, "pairs", {"t": 1}),
        "root": root,
    }


def campaign(tiny_models, data, tmp_path, method, concepts=("dog",), **settings) -> CampaignConfig:
    base = dict(resolution=64, max_steps=4, train_batch_size=2, learning_rate=1e-3, checkpoint_every=2,
                num_class_images=4, random_flip=True)
    base.update(settings)
    return CampaignConfig.model_validate({
        "output": str(tmp_path / "out"), "model": tiny_models["img2img"], "clip_model": tiny_models["clip"],
        "concepts": {
            "dog": {"instance_data": data["dog"], "token": "<dog1>" if method != "dreambooth" else "sks",
                    "class_word": "dog", "class_data": data["class"]},
            "cat": {"instance_data": data["cat"], "token": "<cat1>", "class_word": "cat", "class_data": data["class"]},
            "edits": {"instance_data": data["pairs"], "token": "x"},
        },
        "defaults": base,
        "jobs": [{"method": method, "concepts": list(concepts)}],
        "eval": {"prompts": ["a photo of {concept}"], "samples_per_prompt": 1, "steps": 3},
    })


def spec_for(cfg: CampaignConfig) -> dict:
    plan = plan_campaign(cfg)
    assert not plan.class_images
    return plan.jobs[0].spec


def _generate(pipe, prompt="a photo of <dog1> dog", **kw):
    g = torch.Generator("cpu").manual_seed(11)
    return pipe(prompt=prompt, num_inference_steps=3, guidance_scale=5.0, height=64, width=64, generator=g,
                output_type="np", **kw).images[0]


def _fresh(tiny_models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["img2img"], use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained_pipe(out):
    pipe = out["method_obj"].pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _base_state(tiny_models):
    pipe = _fresh(tiny_models)
    return {**{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}}


# -- artifacts load with diffusers' loaders and reproduce the trained pipeline --------------

def test_textual_inversion_artifact_and_only_new_rows_change(tiny_models, data, tmp_path):
    spec = spec_for(campaign(tiny_models, data, tmp_path, "textual_inversion", num_vectors=2, learning_rate=5e-2))
    out = train_worker(spec)
    method = out["method_obj"]
    emb = method.parts["text_encoder"].get_input_embeddings().weight.detach()
    base = _fresh(tiny_models).text_encoder.get_input_embeddings().weight.detach()
    n_old = base.shape[0]
    assert emb.shape[0] == n_old + 2
    assert torch.equal(emb[:n_old], base), "a non-placeholder embedding row changed"
    init = base[_fresh(tiny_models).tokenizer.encode("dog", add_special_tokens=False)[0]]
    assert not torch.allclose(emb[n_old], init), "the placeholder row did not train"

    artifacts = Path(spec["dir"]) / "artifacts"
    from safetensors.torch import load_file

    saved = load_file(str(artifacts / "learned_embeds.safetensors"))
    assert list(saved) == ["<dog1>"] and saved["<dog1>"].shape == (2, emb.shape[1])
    fresh = _fresh(tiny_models)
    fresh.load_textual_inversion(str(artifacts))
    prompt = "a photo of <dog1>"  # both pipelines expand a multi-vector token to "<dog1> <dog1>_1"
    np.testing.assert_allclose(_generate(fresh, prompt), _generate(_trained_pipe(out), prompt), atol=1e-5)
    assert not np.allclose(_generate(fresh, prompt), _generate(_fresh(tiny_models), prompt), atol=1e-3)


def test_lora_artifact_scale_zero_and_base_untouched(tiny_models, data, tmp_path):
    spec = spec_for(campaign(tiny_models, data, tmp_path, "lora", rank=4))
    out = train_worker(spec)
    trained = out["method_obj"]
    base = _base_state(tiny_models)
    unet_state = trained.parts["unet"].state_dict()
    for k, v in unet_state.items():
        if "lora_" in k:
            continue
        name = "unet." + k.replace(".base_layer", "")
        assert torch.equal(v, base[name]), f"base weight {k} changed"
    fresh = _fresh(tiny_models)
    fresh.load_lora_weights(str(Path(spec["dir"]) / "artifacts"))
    np.testing.assert_allclose(_generate(fresh), _generate(_trained_pipe(out)), atol=1e-5)
    plain = _generate(_fresh(tiny_models))
    np.testing.assert_allclose(_generate(fresh, cross_attention_kwargs={"scale": 0.0}), plain, atol=1e-6)
    assert not np.allclose(_generate(fresh), plain, atol=1e-4)


def test_custom_diffusion_two_concepts_only_kv_and_modifier_rows(tiny_models, data, tmp_path):
    spec = spec_for(campaign(tiny_models, data, tmp_path, "custom_diffusion", concepts=("dog", "cat"),
                             learning_rate=1e-2))
    out = train_worker(spec)
    method = out["method_obj"]
    base = _base_state(tiny_models)
    for k, v in method.parts["unet"].state_dict().items():
        if "custom_diffusion" in k:
            continue
        assert torch.equal(v, base[f"unet.{k}"]), f"{k} changed"
    trained_kv = [k for k in method.trainable() if k.startswith("unet.")]
    assert trained_kv and all("attn2" in k and ("to_k_custom" in k or "to_v_custom" in k) for k in trained_kv)
    emb = method.parts["text_encoder"].get_input_embeddings().weight.detach()
    n_old = base["te.embeddings.token_embedding.weight"].shape[0]
    assert torch.equal(emb[:n_old], base["te.embeddings.token_embedding.weight"])
    for k, v in method.parts["text_encoder"].state_dict().items():
        if "token_embedding" not in k:
            assert torch.equal(v, base[f"te.{k}"])
    changed = [k for k, p in method.procs.items()
               if not torch.equal(p.to_k_custom_diffusion.weight, base[f"unet.{k[:-len('.processor')]}.to_k.weight"])]
    assert changed, "no cross-attention K changed"

    art = Path(spec["dir"]) / "artifacts"
    assert {p.name for p in art.iterdir()} >= {"pytorch_custom_diffusion_weights.safetensors",
                                               "<dog1>.safetensors", "<cat1>.safetensors"}
    fresh = _fresh(tiny_models)
    # diffusers 0.42 only sets the processors when given the pipeline (without it the call is a silent no-op)
    fresh.unet.load_attn_procs(str(art), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=fresh)
    fresh.load_textual_inversion(str(art), weight_name="<dog1>.safetensors")
    fresh.load_textual_inversion(str(art), weight_name="<cat1>.safetensors")
    prompt = "a photo of <dog1> dog with <cat1> cat"
    np.testing.assert_allclose(_generate(fresh, prompt), _generate(_trained_pipe(out), prompt), atol=1e-5)


def test_dreambooth_prior_saves_full_pipeline(tiny_models, data, tmp_path):
    spec = spec_for(campaign(tiny_models, data, tmp_path, "dreambooth", with_prior_preservation=True,
                             prior_loss_weight=0.5, train_text_encoder=True))
    out = train_worker(spec)
    log = [json.loads(x) for x in (Path(spec["dir"]) / "loss.jsonl").read_text().splitlines()]
    assert all(r["prior_loss"] is not None for r in log)
    for r in log:  # total = instance + weight * prior
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-6)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(Path(spec["dir"]) / "artifacts"), use_safetensors=True)
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    loaded.set_progress_bar_config(disable=True)
    prompt = "a photo of sks dog"
    np.testing.assert_allclose(_generate(loaded, prompt), _generate(_trained_pipe(out), prompt), atol=1e-5)


def test_prior_loss_uses_the_class_half_only(tiny_models, data, tmp_path):
    """The logged prior loss is the mean per-sample loss of the class samples of the batch, nothing else."""
    from pixelmill.tasks.train.job import _setup

    spec = spec_for(campaign(tiny_models, data, tmp_path, "dreambooth", with_prior_preservation=True,
                             learning_rate=1e-12))
    method, d, trainer = _setup(spec, torch.device("cpu"))
    _, idx = trainer.schedule.batch(0)
    _, cidx = trainer.class_schedule.batch(0)
    inst = trainer.losses([d.instance[i] for i in idx], trainer.buckets[0], 0)
    klass = trainer.losses([d.klass[i] for i in cidx], trainer.buckets[0], 0)
    log = trainer.step(0)
    assert log.instance_loss == pytest.approx(float(inst.mean()), rel=1e-4)
    assert log.prior_loss == pytest.approx(float(klass.mean()), rel=1e-4)
    assert abs(log.prior_loss - log.instance_loss) > 1e-4  # the two halves are different data


def test_the_same_class_images_stored_elsewhere_train_the_same_weights(tiny_models, data, tmp_path):
    """A class image's noise and timestep come from its source's place in the job and its row id, not from
    where the dataset is stored: a copy in another folder (or on S3, or in another checkout) trains the
    same weights, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    moved = tmp_path / "elsewhere" / "class-copy"
    shutil.copytree(data["class"], moved)
    specs = []
    for name, url in (("here", data["class"]), ("there", str(moved))):
        cfg = campaign(tiny_models, data, tmp_path / name, "dreambooth", with_prior_preservation=True, max_steps=2,
                       random_flip=False).model_copy(deep=True)
        cfg.concepts["dog"].class_data = url
        specs.append(spec_for(cfg))
        train_worker(specs[-1])
    assert specs[0]["concepts"][0]["class_sources"] != specs[1]["concepts"][0]["class_sources"]
    logs = [[json.loads(x) for x in (Path(s["dir"]) / "loss.jsonl").read_text().splitlines()] for s in specs]
    assert [r["prior_loss"] for r in logs[0]] == [r["prior_loss"] for r in logs[1]]
    a, b = (load_file(str(next((Path(s["dir"]) / "artifacts" / "unet").glob("*.safetensors")))) for s in specs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_instruct_pix2pix_widens_unet_and_saves_editing_pipeline(tiny_models, data, tmp_path):
    cfg = campaign(tiny_models, data, tmp_path, "instruct_pix2pix", concepts=("edits",), use_ema=True)
    spec = spec_for(cfg)
    out = train_worker(spec)
    unet = out["method_obj"].parts["unet"]
    assert unet.config.in_channels == 8
    from pixelmill.models.loading import load_instruct_pix2pix_pipeline

    pipe = load_instruct_pix2pix_pipeline(str(Path(spec["dir"]) / "artifacts"), device="cpu")
    assert pipe.unet.config.in_channels == 8
    saved = pipe.unet.state_dict()
    live = {k: v for k, v in unet.state_dict().items()}
    assert any(not torch.equal(saved[k], live[k]) for k in ("conv_in.weight", "conv_out.weight"))

    # the saved weights are the EMA of the live ones, by the decay formula (warm-up as in diffusers):
    # shadow <- d * shadow + (1 - d) * live after every step, d = min(ema_decay, (1 + n) / (10 + n))
    from pixelmill.tasks.train.job import _setup

    _, _, trainer = _setup(spec, torch.device("cpu"))
    shadow = {k: p.detach().clone() for k, p in trainer.params.items()}
    for step in range(spec["settings"]["max_steps"]):
        trainer.step(step)
        d = min(spec["settings"]["ema_decay"], (1 + step + 1) / (10 + step + 1))
        for k, p in trainer.params.items():
            shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)
    names = [k for k in trainer.params if k.startswith("unet.")]
    assert names and len(names) == len(trainer.params)  # instruct_pix2pix trains the UNet only
    for k in names:
        torch.testing.assert_close(trainer.params[k].detach(), live[k.removeprefix("unet.")], rtol=0, atol=1e-6)
        torch.testing.assert_close(saved[k.removeprefix("unet.")], shadow[k], rtol=1e-5, atol=1e-6)
    moved = max((saved[k.removeprefix("unet.")] - live[k.removeprefix("unet.")]).abs().max().item() for k in names)
    assert moved > 1e-4  # the average lags the live weights


# -- learning happens ---------------------------------------------------------------------

@pytest.mark.parametrize("method,lr", [("dreambooth", 1e-3), ("lora", 1e-2)])
def test_loss_on_fixed_triples_falls(tiny_models, data, tmp_path, method, lr):
    from pixelmill.tasks.train.job import _setup

    spec = spec_for(campaign(tiny_models, data, tmp_path, method, max_steps=30, learning_rate=lr,
                             with_prior_preservation=False, random_flip=False, center_crop=True))
    _, _, trainer = _setup(spec, torch.device("cpu"))
    before = trainer.fixed_loss(4)
    for step in range(30):
        trainer.step(step)
    after = trainer.fixed_loss(4)
    assert after < 0.75 * before, (before, after)


# -- resume, skip --------------------------------------------------------------------------

def _weights(spec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(spec["dir"]) / "artifacts" / "pytorch_lora_weights.safetensors"))


def test_killed_job_resumes_from_checkpoint_and_matches_uninterrupted(tiny_models, data, tmp_path):
    cfg = campaign(tiny_models, data, tmp_path, "lora", max_steps=16, checkpoint_every=2, keep_checkpoints=1)
    spec = spec_for(cfg)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.tasks.train.job", str(spec_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = Path(spec["dir"]) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "state.json").exists() for p in ckpts.glob("step-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = json.loads((Path(spec["dir"]) / "job.json").read_text())
    assert rec["status"] == "running" and rec["attempts"][-1].get("end_step") is None

    resumed = run_job(spec)
    assert 0 < resumed["start_step"] < 16
    assert resumed["status"] == "finished" and resumed["step"] == 16
    assert [a["start_step"] for a in resumed["attempts"]] == [0, resumed["start_step"]]

    straight = copy.deepcopy(spec)
    straight["dir"] = str(tmp_path / "straight")
    run_job(straight)
    a, b = _weights(spec), _weights(straight)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    again = run_job(spec)
    assert again["skipped"] is True


def test_raising_max_steps_resumes_a_finished_job(tiny_models, data, tmp_path):
    cfg = campaign(tiny_models, data, tmp_path, "lora", max_steps=2)
    first = spec_for(cfg)
    run_job(first)
    longer = spec_for(campaign(tiny_models, data, tmp_path, "lora", max_steps=4))
    assert longer["id"] == first["id"]
    plan = plan_campaign(campaign(tiny_models, data, tmp_path, "lora", max_steps=4))
    assert plan.jobs[0].state == "resume" and plan.jobs[0].last_step == 2
    out = run_job(longer)
    assert out["start_step"] == 2 and out["step"] == 4


def test_job_id_ignores_placement_and_eval(tiny_models, data, tmp_path):
    a = spec_for(campaign(tiny_models, data, tmp_path, "lora"))
    b = spec_for(campaign(tiny_models, data, tmp_path, "lora", num_workers=2, checkpoint_every=7,
                          cache_latents=True))
    c = spec_for(campaign(tiny_models, data, tmp_path, "lora", rank=8))
    assert a["id"] == b["id"] and a["id"] != c["id"]


# -- data parallel ---------------------------------------------------------------------------

# make sweep: make test keeps two-worker training through tests/integration/test_multinode.py
@pytest.mark.sweep
def test_two_workers_match_one_worker(tiny_models, data, tmp_path, cluster):
    import ray

    from pixelmill.tasks.train.job import _run_data_parallel

    def spec(name, workers, seed=0):
        s = spec_for(campaign(tiny_models, data, tmp_path / name, "lora", max_steps=3, train_batch_size=4,
                              num_workers=workers, cpus_per_worker=0.5, seed=seed))
        return s

    ray.init(address=cluster["RAY_ADDRESS"])
    try:
        two = spec("two", 2)
        result = _run_data_parallel(two, None)
        assert result["end_step"] == 3
    finally:
        ray.shutdown()
    one, other_seed = spec("one", 1), spec("seed", 1, seed=1)
    train_worker(one)
    train_worker(other_seed)
    a, b, c = _weights(two), _weights(one), _weights(other_seed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((c[k] - b[k]).abs().max().item() for k in a) > 1e-3  # negative control


# -- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth", "lora", "custom_diffusion", "instruct_pix2pix"])
def test_bf16_autocast_runs_with_finite_loss(tiny_models, data, tmp_path, method):
    from pixelmill.tasks.train.job import _setup

    concepts = ("edits",) if method == "instruct_pix2pix" else ("dog",)
    spec = spec_for(campaign(tiny_models, data, tmp_path, method, concepts=concepts, mixed_precision="bf16",
                             gradient_checkpointing=True))
    _, _, trainer = _setup(spec, torch.device("cpu"))
    seen: dict[str, set[torch.dtype]] = {}  # what the UNet's linear and conv layers computed in

    def record(module, args, output):
        seen.setdefault(type(module).__name__, set()).add(output.dtype)

    hooks = [m.register_forward_hook(record) for m in trainer.unet.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        losses = [trainer.step(s).loss for s in range(2)]
    finally:
        for h in hooks:
            h.remove()
    assert all(np.isfinite(x) and x > 0 for x in losses)
    assert seen == {"Linear": {torch.bfloat16}, "Conv2d": {torch.bfloat16}}  # autocast ran the forward in bf16
    assert {p.dtype for p in trainer.params.values()} == {torch.float32}  # the weights stay fp32


def test_fp16_resume_restores_the_grad_scaler_and_matches_an_uninterrupted_run(tiny_models, data, tmp_path):
    """fp16 on the CPU (torch.amp.GradScaler("cpu")) through ``train_worker``: the scaler's state is in the
    checkpoint, and a run stopped there and resumed matches a straight run (scales and weights)."""
    spec = spec_for(campaign(tiny_models, data, tmp_path, "lora", mixed_precision="fp16", max_steps=4,
                             checkpoint_every=2, learning_rate=1e-2, device="cpu"))
    first = train_worker(spec, stop_at=2)
    assert first["end_step"] == 2
    state = json.loads((Path(spec["dir"]) / "checkpoints" / "step-000002" / "state.json").read_text())
    saved = state["grad_scaler"]
    assert saved == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                     "_growth_tracker": 2}  # two clean steps counted towards the next growth
    resumed = train_worker(spec)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 4

    straight = copy.deepcopy(spec)
    straight["dir"] = str(tmp_path / "straight")
    train_worker(straight)

    def scales(s):
        return [r["grad_scale"] for r in (json.loads(x) for x in (Path(s["dir"]) / "loss.jsonl").read_text()
                                          .splitlines())]

    assert scales(spec) == scales(straight) and len(scales(spec)) == 4
    assert scales(spec)[1] == saved["scale"]
    a, b = _weights(spec), _weights(straight)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_fp16_grad_scaler_scale_and_growth_survive_a_checkpoint(tiny_models, data, tmp_path):
    """A scaler whose scale changes during the run (grows every 2 clean steps): restored from the checkpoint,
    the resumed trainer goes on with the same scale and growth tracker as an uninterrupted one. A resume
    that started a fresh scaler (65536, growth every 2000 steps) would scale and step differently."""
    from pixelmill.tasks.train.checkpoint import JobStore
    from pixelmill.tasks.train.job import _checkpoint, _setup, restore_checkpoint

    spec = spec_for(campaign(tiny_models, data, tmp_path, "lora", mixed_precision="fp16", max_steps=6,
                             learning_rate=1e-2, device="cpu"))
    cpu = torch.device("cpu")

    def trainer_with_a_moving_scale():
        method, _, trainer = _setup(spec, cpu)
        assert trainer.scaler is not None and trainer.scaler._device == "cpu"
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
        return method, trainer

    method, trainer = trainer_with_a_moving_scale()
    for step in range(3):
        trainer.step(step)
    store = JobStore(spec["dir"])
    _checkpoint(store, trainer, method, 3, 0, 1, [], spec["settings"])

    method2, _, resumed = _setup(spec, cpu)  # a fresh default scaler, as a new process would have
    assert restore_checkpoint(store, method2, resumed, cpu) == 3
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()
    assert resumed.scaler.state_dict()["_growth_tracker"] == 1
    resumed_scales = [resumed.step(step).grad_scale for step in range(3, 6)]

    method3, straight = trainer_with_a_moving_scale()
    straight_scales = [straight.step(step).grad_scale for step in range(6)][3:]
    assert resumed_scales == straight_scales and straight_scales[-1] == 256.0 * 2 ** 3
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for k in straight.names:
        torch.testing.assert_close(resumed.params[k], straight.params[k], rtol=0, atol=1e-6)


def test_instruct_pix2pix_conditioning_dropout_rates_match_the_setting():
    """Over many seeded samples: text only, image only and both each dropped with probability p (so text and
    image each 2p), the rest kept; the draw is a function of (seed, step, sample id)."""
    from pixelmill.tasks.train.core import conditioning_dropout

    n = 20_000
    ids = [f"pair0:p{i}" for i in range(n)]
    for prob in (0.05, 0.2):
        text, image = conditioning_dropout(ids, seed=0, step=3, prob=prob)
        tol = 4 * (prob * (1 - prob) / n) ** 0.5  # four standard deviations of a rate over n samples
        rates = {"text only": (text & ~image), "image only": (image & ~text), "both": (text & image)}
        for name, mask in rates.items():
            assert abs(mask.float().mean().item() - prob) < tol, (prob, name, mask.float().mean().item())
        assert abs((~text & ~image).float().mean().item() - (1 - 3 * prob)) < 4 * (3 * prob / n) ** 0.5
        for mask in (text, image):
            assert abs(mask.float().mean().item() - 2 * prob) < 2 * tol
    again = conditioning_dropout(ids[:500], seed=0, step=3, prob=0.2)
    assert all(torch.equal(a, b[:500]) for a, b in zip(again, (text, image)))  # seeded per sample
    later = conditioning_dropout(ids[:500], seed=0, step=4, prob=0.2)
    assert not torch.equal(later[0], text[:500])  # a new draw every step
    assert not conditioning_dropout(ids[:500], seed=0, step=3, prob=0.0)[0].any()


def test_instruct_pix2pix_dropout_replaces_text_by_the_empty_prompt_and_zeroes_the_image(tiny_models, data, tmp_path):
    from pixelmill.tasks.train.core import conditioning_dropout
    from pixelmill.tasks.train.job import _setup

    spec = spec_for(campaign(tiny_models, data, tmp_path, "instruct_pix2pix", concepts=("edits",),
                             conditioning_dropout_prob=0.3))
    _, d, trainer = _setup(spec, torch.device("cpu"))
    samples = d.instance
    seed = spec["settings"]["seed"]
    step = next(st for st in range(200)  # a step whose draws mix dropped and kept text and images
                if all(0 < int(m.sum()) < len(samples)
                       for m in conditioning_dropout([x.id for x in samples], seed, st, 0.3)))
    drop_text, drop_image = conditioning_dropout([x.id for x in samples], seed, step, 0.3)
    prepared = [trainer._prepare(x, trainer.buckets[0], seed, step) for x in samples]
    text = trainer.encode_text([p.prompt for p in prepared]).detach()
    with torch.no_grad():
        out_text, src = trainer._pair_conditioning(samples, prepared, text, seed, step)
    text, out_text, null = text.embeds, out_text.embeds, trainer.null_text().embeds[0]
    for i in range(len(samples)):
        assert torch.equal(out_text[i], null if drop_text[i] else text[i]), i
        assert bool((src[i] == 0).all()) == bool(drop_image[i]), i
    assert not torch.equal(text[0], null)


# -- caches ---------------------------------------------------------------------------------

def test_cached_latents_and_text_give_the_same_weights(tiny_models, data, tmp_path):
    plain = spec_for(campaign(tiny_models, data, tmp_path / "a", "lora", center_crop=True))
    cached = spec_for(campaign(tiny_models, data, tmp_path / "b", "lora", center_crop=True, cache_latents=True,
                               cache_text_embeddings=True))
    train_worker(plain)
    train_worker(cached)
    assert Path(cached["cache"]["latents"]).exists() and Path(cached["cache"]["text"]).exists()
    a, b = _weights(plain), _weights(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_fails_before_training(tiny_models, data, tmp_path):
    cfg = campaign(tiny_models, data, tmp_path, "textual_inversion")
    bad = cfg.model_copy(deep=True)
    bad.concepts["dog"].initializer_token = "golden retriever"
    with pytest.raises(ValueError, match=r"initializer_token 'golden retriever' is 2 tokens"):
        check_campaign_inputs(bad)
    missing = cfg.model_copy(deep=True)
    missing.concepts["dog"].instance_data = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"concept 'dog': instance_data: .*does not exist"):
        check_campaign_inputs(missing)
    pairs = campaign(tiny_models, data, tmp_path, "instruct_pix2pix", concepts=("dog",))
    with pytest.raises(ValueError, match=r"has no column\(s\) \['edited_image', 'input_image', 'edit_prompt'\]"):
        check_campaign_inputs(pairs)
    with pytest.raises(TrainingDataError, match="has no column"):
        train_worker(spec_for(pairs))
    assert not (Path(spec_for(pairs)["dir"]) / "checkpoints").exists()


# -- data, schedules, failures -----------------------------------------------------------------

def test_batch_schedule_is_stateless_and_covers_every_sample_per_epoch():
    from pixelmill.tasks.train.data import BatchSchedule, bucket_sizes, nearest_bucket

    buckets = bucket_sizes(512, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and 0.75 < w * h / 512**2 < 1.3 for w, h in buckets)
    assert buckets[nearest_bucket((1600, 900), buckets)] in ((640, 384), (704, 384), (640, 448))
    sizes = [(64, 64)] * 5 + [(96, 48)] * 3
    assignment = [nearest_bucket(s, buckets) for s in sizes]
    sched = BatchSchedule(assignment, batch_size=2, seed=3)
    epoch = [sched.batch(b) for b in range(sched.per_epoch)]
    seen = {i for _, idx in epoch for i in idx}
    assert seen == set(range(8))
    for bucket, idx in epoch:  # a batch never mixes buckets
        assert {assignment[i] for i in idx} == {bucket}
    again = BatchSchedule(assignment, batch_size=2, seed=3)
    assert [again.batch(b) for b in range(20)] == [sched.batch(b) for b in range(20)]
    other = BatchSchedule(assignment, batch_size=2, seed=4)
    assert [other.batch(b) for b in range(sched.per_epoch)] != epoch


def test_lr_warmup_and_decay():
    from pixelmill.tasks.train.core import lr_factor

    assert [lr_factor(s, 4, 10, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, 4, 10, "linear") == 1.0 and lr_factor(9, 4, 10, "linear") == pytest.approx(1 / 6)
    assert lr_factor(4, 4, 10, "cosine") == 1.0 and lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)


def test_rescale_augmentation_masks_the_loss_and_says_so_in_the_prompt():
    from pixelmill.tasks.train.data import Augment, Sample, prepare

    img = draw_concept_images(1, seed=0)[0]
    import io as _io

    buf = _io.BytesIO()
    img.save(buf, "PNG")
    sample = Sample("s1", "instance", "a photo of sks dog", buf.getvalue(), size=img.size)
    seen = set()
    for step in range(40):
        p = prepare(sample, (64, 64), Augment(rescale=True), seed=0, step=step, prompt=sample.prompt)
        assert p.pixels.shape == (3, 64, 64)
        if p.prompt.startswith(("a far away", "very small")):
            assert p.mask is not None and 0 < float(p.mask.mean()) < 1
            seen.add("small")
        elif p.prompt.startswith(("zoomed in", "close up")):
            assert p.mask is None
            seen.add("zoom")
    assert seen == {"small", "zoom"}
    same = prepare(sample, (64, 64), Augment(rescale=True), seed=0, step=7, prompt=sample.prompt)
    again = prepare(sample, (64, 64), Augment(rescale=True), seed=0, step=7, prompt=sample.prompt)
    assert torch.equal(same.pixels, again.pixels) and same.prompt == again.prompt


def test_failed_job_is_recorded_and_retried(tiny_models, data, tmp_path):
    import shutil

    from pixelmill.tasks.train.job import job_state

    victim = write_image_dataset(str(tmp_path / "victim"), draw_concept_images(2, seed=8))
    cfg = campaign(tiny_models, data, tmp_path, "lora", max_steps=2, validation_every=1)
    cfg = cfg.model_copy(deep=True)
    cfg.concepts["dog"].instance_data = victim
    spec = spec_for(cfg)
    shutil.rmtree(victim)
    with pytest.raises(TrainingDataError, match="cannot open dataset"):
        run_job(spec)
    rec = json.loads((Path(spec["dir"]) / "job.json").read_text())
    assert rec["status"] == "failed" and "cannot open dataset" in rec["error"]
    assert job_state(spec)[0] == "retry"
    write_image_dataset(victim, draw_concept_images(2, seed=8))
    out = run_job(spec)
    assert out["status"] == "finished" and out["error"] is None
    samples = sorted(p.name for p in (Path(spec["dir"]) / "samples").iterdir())
    assert samples == ["final", "step-000001", "step-000002"]  # validation samples every step


def test_custom_diffusion_crossattn_trains_q_and_out_too_and_loads(tiny_models, data, tmp_path):
    spec = spec_for(campaign(tiny_models, data, tmp_path, "custom_diffusion", train="crossattn",
                             with_prior_preservation=False))
    out = train_worker(spec)
    names = [k for k in out["method_obj"].trainable() if k.startswith("unet.")]
    for part in ("to_k_custom", "to_v_custom", "to_q_custom", "to_out_custom"):
        assert any(part in k for k in names), part
    fresh = _fresh(tiny_models)
    art = Path(spec["dir"]) / "artifacts"
    fresh.unet.load_attn_procs(str(art), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=fresh)
    fresh.load_textual_inversion(str(art), weight_name="<dog1>.safetensors")
    prompt = "a photo of <dog1> dog"
    np.testing.assert_allclose(_generate(fresh, prompt), _generate(_trained_pipe(out), prompt), atol=1e-5)


def test_aspect_buckets_with_accumulation_train_on_mixed_sizes(tiny_models, data, tmp_path):
    from pixelmill.tasks.train.job import _setup

    imgs = draw_concept_images(6, seed=4, size=(96, 48))[:3] + draw_concept_images(3, seed=5, size=(48, 96))
    mixed = write_image_dataset(str(tmp_path / "mixed"), imgs)
    cfg = campaign(tiny_models, data, tmp_path, "lora", aspect_buckets=True, gradient_accumulation_steps=2,
                   train_batch_size=2).model_copy(deep=True)
    cfg.concepts["dog"].instance_data = mixed
    spec = spec_for(cfg)
    _, d, trainer = _setup(spec, torch.device("cpu"))
    assert len({trainer.schedule.batch(b)[0] for b in range(trainer.schedule.per_epoch)}) == 2
    sizes = {trainer.buckets[trainer.schedule.batch(b)[0]] for b in range(trainer.schedule.per_epoch)}
    assert all(w != h for w, h in sizes), sizes  # landscape and portrait buckets, not squares
    losses = [trainer.step(s).loss for s in range(3)]
    assert all(np.isfinite(x) for x in losses)


def test_resolution_width_height_trains_samples_and_generates_class_images_at_that_size(tiny_models, data, tmp_path):
    from PIL import Image

    from pixelmill.datasets.images import decode_image
    from pixelmill.tasks.train.class_images import ClassImageGenerator, prompt_rows
    from pixelmill.tasks.train.data import prepare
    from pixelmill.tasks.train.job import _setup

    cfg = campaign(tiny_models, data, tmp_path, "dreambooth", resolution=[96, 48], with_prior_preservation=True,
                   max_steps=2, cache_latents=False)
    spec = spec_for(cfg)
    assert spec["settings"]["resolution"] in ([96, 48], (96, 48))
    _, d, trainer = _setup(spec, torch.device("cpu"))
    assert trainer.buckets == [(96, 48)]
    for sample in (d.instance[0], d.klass[0]):  # square images of both kinds cover-and-crop to 96 x 48
        assert prepare(sample, trainer.buckets[0], trainer.aug, 0, 0, sample.prompt).pixels.shape == (3, 48, 96)
    record = run_job(spec)
    assert record["status"] == "finished", record
    finals = sorted((Path(spec["dir"]) / "samples" / "final").glob("*.png"))
    assert finals and {Image.open(p).size for p in finals} == {(96, 48)}
    stage = ClassImageGenerator({"model": tiny_models["img2img"], "resolution": [96, 48], "steps": 2, "device": "cpu"})
    out = stage(prompt_rows("a dog", 0, 1, 0))
    assert decode_image(out["image"][0].as_py()).size == (96, 48)


@pytest.mark.parametrize("settings, message", [
    ({"resolution": [96, 4]}, "resolution [96, 4]: each side must be 8..4096"),
    ({"resolution": [96, 48], "aspect_buckets": True}, "resolution [96, 48] with aspect_buckets"),
])
def test_resolution_width_height_refused_with_a_reason(tiny_models, data, tmp_path, settings, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        campaign(tiny_models, data, tmp_path, "lora", **settings).expand()


# -- prior preservation short of class images ------------------------------------------------

def _generate_class_images(tiny_models, request, flagged: int, tmp_path) -> None:
    """Run the real class-image stage for a plan's request and commit its rows as the flow does
    (ok rows to the data, rejects with their reason); the last ``flagged`` images come from a
    model whose safety checker flags everything."""
    import pyarrow.compute as pc

    from pixelmill.datasets import DatasetWriter
    from pixelmill.models.tiny import save_tiny_img2img
    from pixelmill.tasks.train.class_images import ClassImageGenerator, prompt_rows

    rows = prompt_rows(request.prompt, request.first_index, request.count, request.seed)
    flagging = save_tiny_img2img(tmp_path / "flagging", flagging_safety_checker=True)
    split = request.count - flagged
    parts = []
    for model, batch in ((tiny_models["img2img"], rows.slice(0, split)), (flagging, rows.slice(split))):
        if batch.num_rows:
            stage = ClassImageGenerator({"model": model, "resolution": 64, "steps": 2, "device": "cpu"})
            parts.append(stage(batch))
    out = pa.concat_tables(parts)
    assert out["error"].to_pylist().count("nsfw") == flagged
    writer = DatasetWriter(request.url, "class-images", 1, {"key": request.key}).open()
    sw = writer.shard("00000")
    sw.write(out.filter(pc.equal(out["status"], "ok")).drop_columns(["status", "error", "stage", "shard"]))
    rejected = out.filter(pc.equal(out["status"], "reject"))
    if rejected.num_rows:
        sw.reject(rejected.select(["id", "error", "stage"]))
    sw.commit(input_rows=request.count)
    writer.finish()


def _prior_campaign(tiny_models, data, tmp_path, flagged: int, **settings):
    cfg = campaign(tiny_models, data, tmp_path, "dreambooth", with_prior_preservation=True, max_steps=2, **settings)
    cfg = cfg.model_copy(deep=True)
    cfg.concepts["dog"].class_data = None  # every class image is generated
    plan = plan_campaign(cfg)
    (request,) = plan.class_images
    assert request.count == 4
    _generate_class_images(tiny_models, request, flagged, tmp_path)
    return cfg, plan.jobs[0].spec


def _results_and_report(cfg, spec) -> tuple[dict, str]:
    import pyarrow.parquet as pq

    from pixelmill.tasks.train.results import write_results

    table_url, report_url = write_results(cfg.output, [spec])
    (row,) = pq.read_table(table_url).to_pylist()
    return row, Path(report_url).read_text()


def test_prior_with_no_class_image_fails_the_job_by_default_saying_why(tiny_models, data, tmp_path):
    """Every generated class image flagged: the job must not train without its prior unnoticed."""
    cfg, spec = _prior_campaign(tiny_models, data, tmp_path, flagged=4)
    assert spec["settings"]["prior_shortfall"] == "error"
    with pytest.raises(TrainingDataError, match=r"concept 'dog': prior preservation has NO class image \(0 of 4"):
        run_job(spec)
    rec = json.loads((Path(spec["dir"]) / "job.json").read_text())
    assert rec["status"] == "failed" and "prior_shortfall: warn" in rec["error"]
    assert not (Path(spec["dir"]) / "checkpoints").exists()
    row, report = _results_and_report(cfg, spec)
    assert row["status"] == "failed" and "NO class image" in row["error"]
    assert "NO class image" in report


def test_prior_with_no_class_image_and_warn_trains_without_it_and_says_so(tiny_models, data, tmp_path):
    cfg, spec = _prior_campaign(tiny_models, data, tmp_path, flagged=4, prior_shortfall="warn")
    out = run_job(spec)
    assert out["status"] == "finished"
    log = [json.loads(x) for x in (Path(spec["dir"]) / "loss.jsonl").read_text().splitlines()]
    assert all(r["prior_loss"] is None for r in log)  # trained without the prior, as recorded
    assert out["prior"] == [{"concept": "dog", "wanted": 4, "used": 0}]
    (warning,) = out["warnings"]
    assert "NO class image (0 of 4" in warning and "trained WITHOUT the prior" in warning
    row, report = _results_and_report(cfg, spec)
    assert row["status"] == "finished" and row["warnings"] == [warning]
    assert (row["class_images"], row["class_images_wanted"]) == (0, 4)
    assert report.count("trained WITHOUT the prior") == 2  # in the results table and the job's section


def test_prior_with_fewer_class_images_trains_on_them_and_records_the_shortfall(tiny_models, data, tmp_path):
    cfg, spec = _prior_campaign(tiny_models, data, tmp_path, flagged=2)
    out = run_job(spec)
    assert out["status"] == "finished"
    assert out["prior"] == [{"concept": "dog", "wanted": 4, "used": 2}]
    assert out["warnings"] == [f"concept 'dog': prior preservation with only 2 of 4 class images (from "
                               f"{spec['concepts'][0]['class_sources'][0]['url']})"]
    log = [json.loads(x) for x in (Path(spec["dir"]) / "loss.jsonl").read_text().splitlines()]
    assert all(r["prior_loss"] is not None for r in log)
    row, report = _results_and_report(cfg, spec)
    assert (row["class_images"], row["class_images_wanted"]) == (2, 4) and row["warnings"] == out["warnings"]
    assert "only 2 of 4 class images" in report

    strict = spec_dir_copy(spec, tmp_path / "strict", prior_shortfall="strict")
    with pytest.raises(TrainingDataError, match=r"only 2 of 4 class images .*prior_shortfall: strict"):
        run_job(strict)
    assert json.loads((Path(strict["dir"]) / "job.json").read_text())["status"] == "failed"


def test_a_full_prior_records_its_class_images_and_no_warning(tiny_models, data, tmp_path):
    cfg, spec = _prior_campaign(tiny_models, data, tmp_path, flagged=0)
    out = run_job(spec)
    assert out["prior"] == [{"concept": "dog", "wanted": 4, "used": 4}] and out["warnings"] == []
    row, _ = _results_and_report(cfg, spec)
    assert (row["class_images"], row["class_images_wanted"], row["warnings"]) == (4, 4, [])


def spec_dir_copy(spec: dict, folder: Path, **settings) -> dict:
    """The same job spec with other (not weight-affecting) settings, in another folder."""
    other = copy.deepcopy(spec)
    other["settings"].update(settings)
    other["dir"] = str(folder)
    return other
