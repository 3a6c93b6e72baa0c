"""Fine-tuning steps/s and peak memory: pixelmill's LoRA and DreamBooth trainer vs a plain loop.

The plain loop is diffusers + PEFT written the way diffusers' example scripts write it
(issue #5); the target (issue #17) is >= 1.3x steps/s for pixelmill with cached latents and
text embeddings, at no more memory.

What runs. One SD-shaped pipeline saved with ``save_pretrained``: the benchmark UNet
(``build_sd_unet_for_benchmark``, blocks 64/128/256, 17.6M parameters), an 8x VAE and the
tiny CLIP text encoder (width 32 = the UNet's cross-attention width), random weights
(speed does not depend on them). Eight instance images from ``draw_concept_images``,
drawn larger than the training resolution and not square, so every variant resizes,
center-crops and randomly flips them. For each method, three variants train the same
job with the same batch size, resolution, fp32 weights and torch threads:

* ``baseline``: a plain loop in this file, as ``train_text_to_image_lora.py`` /
  ``train_dreambooth.py`` do it: a torch ``DataLoader`` (num_workers 0) whose dataset
  decodes each image and applies torchvision Resize / CenterCrop / RandomHorizontalFlip /
  ToTensor / Normalize and tokenizes the prompt on access; then per step
  ``vae.encode(pixels).latent_dist.sample() * scaling_factor``, ``text_encoder(ids)[0]``,
  noise, random timesteps, ``add_noise``, ``unet(...).sample``, MSE, backward,
  ``clip_grad_norm_`` (max 1.0, as both scripts do), AdamW step, LR-scheduler step,
  ``zero_grad``. LoRA is PEFT ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4,
  init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]))``;
  DreamBooth trains the full UNet, without prior preservation (so every variant's batch is
  instance images only). The scripts' ``accelerate`` wrapper is left out: on one CPU
  process it adds nothing.
* ``pixelmill``: the same job planned by ``plan_campaign`` and run by pixelmill's trainer
  (``_setup`` + ``load_or_build_caches`` + ``park_idle`` + ``trainer.step``, the loop
  ``train_worker`` runs) with ``cache_latents``, ``cache_text_embeddings`` and ``center_crop`` on
  (so its VAE and text encoder are parked: ``offload_idle``).
* ``pixelmill-nocache``: the same without the caches (where the gain comes from).

How. Speed: the three variants are loaded into ONE process (``--worker speed``), each
runs ``--warmup`` untimed steps, then ``--steps`` rounds of one step of each variant, in
rotating order; so every variant sees the same load from whatever else runs on the
machine. steps/s is one over the median step time; "vs base" is the median over rounds
of (baseline step time / variant step time) within the same round; the mean steps/s and
process CPU seconds per step are printed beside them. Each timed step is also split into
parts (data, VAE, text encoder, UNet forward, optimizer; the rest is mostly the backward
pass) by timing the loop's calls. Memory: each variant alone in its own process
(``--worker memory``) loads, builds its caches (the one-off cache build time is reported
from here), and runs ``--warmup`` + ``--mem-steps`` steps; "loaded" is its RSS before the
first step, "train peak" its RSS sampled every 5 ms over the warm-up and timed steps (the
target compares this; a compiled variant's compilation, in its first warm-up step, is
included: a job's real peak), "process max" its ``ru_maxrss`` (imports, model load and
cache build included).
"model load" is timed after the imports.

``--example-script PATH`` (LoRA): also runs diffusers' own
``examples/dreambooth/train_dreambooth_lora.py``, unchanged, as a subprocess on the same saved
model, the same eight images (written as PNG files into a folder, as the script reads them),
resolution, batch, rank and fp32 (``--center_crop``, ``--report_to all`` = no tracker installed,
no validation prompt). Its steps/s is (N2 - N1) / (T2 - T1) over two runs of N1 = ``--warmup``
and N2 = ``--warmup + --steps`` steps (T: the run's wall time), so its start-up, model load,
LoRA save and final pipeline reload cancel; the rate its own tqdm bar prints (start-up excluded,
first steps included) is shown beside it. pixelmill's LoRA steps/s (from the speed worker) is
divided by it. Not paired: the runs are sequential, so load from elsewhere on the machine moves
the ratio; the plain loop's steps/s against the script's is printed as a check.

``--scaling``: data-parallel scaling efficiency with 2 workers. The cached-latents job with a
global batch of ``2 x --batch`` runs on 1 worker, then on 2 workers (each ``--batch`` samples),
each worker ``--dp-threads`` torch threads, in processes joined by a gloo process group on
127.0.0.1: the loop Ray Train's workers run (``_setup``, ``load_or_build_caches``,
``trainer.step``) without Ray's start-up. Efficiency = steps/s(2 workers) / (2 x steps/s(1)).

``--compile`` adds a fourth variant: the cached job with ``compile: true`` (the UNet's step through
``torch.compile``; its warm-up steps compile, minutes on a CPU the first time). Its "unet fwd" part is
not split out (the clock would be traced into the graph), so it lands in "bwd + rest".

``--precision bf16``: every variant under bf16 mixed precision, the baseline as the scripts run under
``--mixed_precision bf16`` (frozen networks and the LoRA UNet in bf16, the forward under autocast), pixelmill
with ``mixed_precision: bf16`` (its frozen Linear/conv weights stored in bf16, ``--frozen-weights fp32`` keeps
them fp32 to measure that lever). ``--device cuda`` runs the workers on a GPU: each step is timed to a
synchronize, memory is the peak of tensors allocated on the GPU (``torch.cuda.max_memory_allocated``), and a
step's parts are not split. ``--unet sd15`` builds SD 1.5's shapes instead of the benchmark model (UNet
320/640/1280/1280, VAE 128/256/512/512, a CLIP ViT-L/14-shaped text encoder): ``bash benchmarks/gpu.sh
--finetune`` runs it on a GPU at 512 px, batch 4, bf16. ``--json FILE`` writes the figures.

``--vae sd-share`` (default, blocks 32/64/128/128) makes the VAE encoder ~30% of a
full-UNet training step's FLOPs, as SD 1.5's VAE encoder is of an SD 1.5 training step at
512 px (~32%): the proportion caching latents acts on in real jobs. ``--vae light`` is
bulk_edit.py's VAE (blocks 16/32/64/64), ~10% of a step; caching latents can only save the
encoder's share, so that model caps the gain near 1.1x.

    python benchmarks/finetune.py [--resolution 256 --batch 2 --warmup 2 --steps 12 --mem-steps 2
                                   --threads 2 --methods lora,dreambooth --vae sd-share
                                   --example-script /tmp/train_dreambooth_lora.py --scaling --dp-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = ("baseline", "pixelmill", "pixelmill-nocache")
COMPILED = "pixelmill-compiled"  # --compile: cached, and the UNet step compiled (the job setting ``compile``)
LABELS = {
    "baseline": "baseline (diffusers + PEFT loop)",
    "pixelmill": "pixelmill, cached latents + text",
    "pixelmill-nocache": "pixelmill, no caches",
    COMPILED: "pixelmill, cached + compile",
}
PARTS = ("data", "vae", "text", "unet fwd", "optim", "bwd + rest")
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_RANK = 4
LR = {"lora": 1e-4, "dreambooth": 5e-6}  # the two scripts' defaults
INSTANCE_PROMPT = "a photo of sks dog"
N_IMAGES = 8
VAES = {
    "light": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16),
    "sd-share": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32),
}
RESULT_TAG = "FINETUNE_RESULT "


# -- the model and the data ----------------------------------------------------------------

def build_model(out: Path, vae: str, unet: str = "bench", device: str = "cpu") -> str:
    """Save an SD-shaped pipeline (fp32): benchmark UNet 64/128/256, an 8x VAE, the tiny text encoder;
    or (``unet="sd15"``) SD 1.5's shapes: UNet 320/640/1280/1280, VAE 128/256/512/512, a CLIP ViT-L/14-shaped
    text encoder (random weights built on ``device``: seconds on a GPU)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from pixelmill.models.tiny import TINY_CROSS_ATTENTION_DIM, build_sd_unet_for_benchmark, build_tiny_sd_components

    if unet == "sd15":
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel

        from pixelmill.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MODEL_MAX_LENGTH, VOCAB_SIZE

        comps = build_tiny_sd_components()
        with torch.device(device):
            comps["unet"] = build_sd_unet_for_benchmark(block_out_channels=(320, 640, 1280, 1280),
                                                        cross_attention_dim=768, device=device)
            comps["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4,
                                         block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512)
            comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=MODEL_MAX_LENGTH, vocab_size=VOCAB_SIZE, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID))
        StableDiffusionPipeline(**comps).save_pretrained(str(out), safe_serialization=True)
        return str(out)
    comps = build_tiny_sd_components()
    comps["unet"] = build_sd_unet_for_benchmark(block_out_channels=(64, 128, 256),
                                                cross_attention_dim=TINY_CROSS_ATTENTION_DIM)
    comps["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 sample_size=512, **VAES[vae])
    StableDiffusionPipeline(**comps).save_pretrained(str(out), safe_serialization=True)
    return str(out)


def image_size(resolution: int) -> tuple[int, int]:
    """Drawn size: larger than the training resolution and not square (so resize and crop both work)."""
    return resolution * 5 // 4, resolution * 9 // 8


def build_data(url: str, resolution: int) -> str:
    from pixelmill.samples import draw_concept_images, write_image_dataset

    images = draw_concept_images(N_IMAGES, seed=0, size=image_size(resolution))
    return write_image_dataset(url, images, captions=[INSTANCE_PROMPT] * N_IMAGES)


def variants(args) -> tuple[str, ...]:
    return VARIANTS + ((COMPILED,) if args.compile else ())


def pixelmill_spec(root: Path, tag: str, model: str, data: str, method: str, cached: bool, args,
                   compiled: bool = False) -> dict[str, Any]:
    """The job spec ``plan_campaign`` makes for this benchmark's job."""
    from pixelmill.config import CampaignConfig
    from pixelmill.tasks.train.plan import plan_campaign

    shutil.rmtree(root / f"campaign-{tag}", ignore_errors=True)  # a fresh cache each run (--workdir reuse)
    settings = dict(resolution=args.resolution, train_batch_size=args.batch, max_steps=total_steps(args) + 1,
                    learning_rate=LR[method], center_crop=True, random_flip=True, cache_latents=cached,
                    cache_text_embeddings=cached, checkpoint_every=10**6, device=args.device,
                    mixed_precision="no" if args.precision == "fp32" else args.precision,
                    seed=0, compile=compiled, frozen_weights=args.frozen_weights)
    if method == "lora":
        settings.update(rank=LORA_RANK, alpha=LORA_RANK, target_modules=TARGET_MODULES)
    else:
        settings.update(with_prior_preservation=False)
    cfg = CampaignConfig.model_validate({
        "output": str(root / f"campaign-{tag}"), "model": model,
        "concepts": {"dog": {"instance_data": data, "token": "sks", "class_word": "dog",
                             "instance_prompt": INSTANCE_PROMPT}},
        "defaults": settings, "jobs": [{"method": method, "concepts": ["dog"]}],
    })
    plan = plan_campaign(cfg)
    assert not plan.class_images and len(plan.jobs) == 1, plan.describe()
    spec = plan.jobs[0].spec
    assert spec["concepts"][0]["instance_prompt_text"] == INSTANCE_PROMPT
    return spec


# -- measurement helpers ---------------------------------------------------------------------

class RssPeak:
    """Peak RSS of this process, sampled every 5 ms in a thread while the block runs."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = 0

    def __enter__(self) -> RssPeak:
        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self._stop.wait(0.005)

        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class DevicePeak:
    """Peak CUDA memory allocated by tensors while the block runs (``start``: allocated before it)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> DevicePeak:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


def synchronize() -> None:
    """Wait for the GPU's queued work (a step is timed to its end); nothing on the CPU."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PartClock:
    """Seconds per named step part, added to the running variant's table while it runs a timed step.

    Off on a GPU (``enabled``): the host returns before the kernels it queued have run, so a part's
    host time says nothing of its GPU time (the whole step is timed to a synchronize instead)."""

    def __init__(self) -> None:
        self.active: dict[str, float] | None = None
        self.enabled = True

    def add(self, name: str, t0: float) -> None:
        if self.active is not None and self.enabled:
            self.active[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, t0)
        timed.original = fn
        return timed


CLOCK = PartClock()


class Variant:
    """One variant's step function and what its timed steps measured."""

    def __init__(self, name: str, step, setup_seconds: float, cache_seconds: float | None) -> None:
        self.name, self.step = name, step
        self.setup_seconds, self.cache_seconds = setup_seconds, cache_seconds
        self.times: list[float] = []
        self.cpu = 0.0
        self.parts = {p: 0.0 for p in PARTS}
        self.next_step = 0

    def run(self, timed: bool) -> None:
        i, self.next_step = self.next_step, self.next_step + 1
        if not timed:
            self.step(i)
            return
        CLOCK.active = self.parts
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            self.step(i)
            synchronize()
        finally:
            self.times.append(time.perf_counter() - t0)
            self.cpu += time.process_time() - c0
            CLOCK.active = None

    def summary(self) -> dict[str, Any]:
        n = len(self.times)
        parts = {k: v / n for k, v in self.parts.items()} if n else dict(self.parts)
        if n:
            parts["bwd + rest"] = sum(self.times) / n - sum(v for k, v in parts.items() if k != "bwd + rest")
        return {"step_seconds": self.times, "cpu_per_step": self.cpu / n if n else None, "parts": parts,
                "setup_seconds": self.setup_seconds, "cache_seconds": self.cache_seconds}


# -- the variants -------------------------------------------------------------------------------

def make_baseline(args) -> Variant:
    """The example scripts' loop (train_text_to_image_lora.py / train_dreambooth.py), one process.

    ``--precision bf16`` does what the scripts do under ``--mixed_precision bf16``: the frozen networks and
    (LoRA) the whole UNet, adapters included, are moved to the device in bf16 (their ``weight_dtype``; the
    LoRA script re-casts trainable parameters to fp32 for fp16 only), DreamBooth's trained UNet stays fp32,
    and the UNet's forward runs under autocast (what ``accelerator.prepare`` wraps it in).
    """
    import io

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    from pixelmill.datasets import Dataset

    clip_grad_norm_ = getattr(torch.nn.utils.clip_grad_norm_, "original", torch.nn.utils.clip_grad_norm_)
    device = torch.device(args.device)
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    model = args.model
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype if args.method == "lora" else torch.float32)
    if args.method == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES))
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR[args.method], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=total_steps(args))

    # the scripts' dataset: encoded images, decoded and transformed on access; prompts tokenized on access
    rows = Dataset.open(args.data).to_table(["image", "caption"]).to_pylist()
    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])

    class ImageDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            image = Image.open(io.BytesIO(rows[i]["image"]["bytes"])).convert("RGB")
            ids = tokenizer(rows[i]["caption"], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": train_transforms(image), "input_ids": ids}

    def collate(examples):
        pixels = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format)
        return {"pixel_values": pixels.float(), "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(ImageDataset(), batch_size=args.batch, shuffle=True, collate_fn=collate,
                                         num_workers=0, drop_last=True)
    setup_s = time.perf_counter() - t0
    # train_dreambooth.py zeroes grads in place (--set_grads_to_none defaults off); the LoRA script sets None
    set_to_none = args.method == "lora"
    batches = iter(loader)
    unet.train()

    def step(_: int) -> None:
        nonlocal batches
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            batches = iter(loader)
            batch = next(batches)
        CLOCK.add("data", t)
        t = time.perf_counter()
        pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        CLOCK.add("vae", t)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        t = time.perf_counter()
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
        CLOCK.add("text", t)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=weight_dtype, enabled=args.precision != "fp32"):
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        CLOCK.add("unet fwd", t)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        t = time.perf_counter()
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        CLOCK.add("optim", t)
        float(loss.detach())  # the scripts log the loss every step

    return Variant("baseline", step, setup_s, None)


def make_pixelmill(name: str, spec_path: str) -> Variant:
    """pixelmill's trainer on the planned spec: the steady-state loop of ``train_worker``."""
    import diffusers  # noqa: F401 - imported before the load timer, as the baseline's imports are
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    import pixelmill.models.loading  # noqa: F401
    import pixelmill.tasks.train.core as core
    import pixelmill.tasks.train.methods  # noqa: F401
    from pixelmill.tasks.train.job import _setup, load_or_build_caches

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    method, data, trainer = _setup(spec, torch.device(spec["settings"]["device"]))
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.latent_cache, trainer.text_cache = load_or_build_caches(spec, trainer, data, method)
    trainer.park_idle()  # as ``job._train`` does: the VAE / text encoder out of memory when all is cached
    cache_s = time.perf_counter() - t0
    cached = spec["settings"]["cache_latents"]
    if cached:
        assert trainer.latent_cache and trainer.text_cache, "caches were not built"
    # time the trainer's parts (the wrappers add only while this variant runs a timed step)
    if not hasattr(core.prepare, "original"):
        core.prepare = CLOCK.wrap("data", core.prepare)
    if not hasattr(torch.nn.utils.clip_grad_norm_, "original"):
        torch.nn.utils.clip_grad_norm_ = CLOCK.wrap("optim", torch.nn.utils.clip_grad_norm_)
    trainer.latents = CLOCK.wrap("vae", trainer.latents)
    trainer.encode_text = CLOCK.wrap("text", trainer.encode_text)
    if not spec["settings"]["compile"]:  # a compiled forward would trace the clock (its time lands in "bwd + rest")
        trainer.unet.forward = CLOCK.wrap("unet fwd", trainer.unet.forward)
    trainer.optimizer.step = CLOCK.wrap("optim", trainer.optimizer.step)
    trainer.optimizer.zero_grad = CLOCK.wrap("optim", trainer.optimizer.zero_grad)
    return Variant(name, trainer.step, setup_s, cache_s if cached else None)


def make_variant(name: str, args, spec_path: str | None) -> Variant:
    return make_baseline(args) if name == "baseline" else make_pixelmill(name, spec_path)


def total_steps(args) -> int:
    return args.warmup + max(args.steps, args.mem_steps)


# -- the workers (subprocesses) -------------------------------------------------------------

def worker_memory(args) -> dict[str, Any]:
    """One variant alone: load, warm up, run ``--mem-steps`` steps; RSS peak over the steps."""
    v = make_variant(args.variant, args, args.spec[0] if args.spec else None)
    with (DevicePeak(args.device) if args.device.startswith("cuda") else RssPeak()) as mem:
        for _ in range(args.warmup):
            v.run(timed=False)
        for _ in range(args.mem_steps):
            v.run(timed=True)
    return {**v.summary(), "train_peak_bytes": mem.peak, "loaded_bytes": mem.start}


def worker_speed(args) -> dict[str, Any]:
    """All the variants in one process, stepped round-robin (rotating order): same load for each."""
    names = variants(args)
    specs = dict(zip(names, [None] + args.spec))
    vs = {name: make_variant(name, args, specs[name]) for name in names}
    for _ in range(args.warmup):
        for v in vs.values():
            v.run(timed=False)
    for r in range(args.steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            vs[name].run(timed=True)
    return {name: v.summary() for name, v in vs.items()}


def worker_main(args) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    CLOCK.enabled = args.device == "cpu"
    out = {"memory": worker_memory, "speed": worker_speed, "dp": worker_dp}[args.worker](args)
    out = {"result": out, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB
           "threads": torch.get_num_threads()}
    print(RESULT_TAG + json.dumps(out), flush=True)


def worker_dp(args) -> dict[str, Any]:
    """One data-parallel rank: gloo group on 127.0.0.1, ``_setup`` + caches, warm-up, timed steps."""
    import torch
    import torch.distributed as dist

    from pixelmill.tasks.train.job import _setup, load_or_build_caches

    spec = json.loads(Path(args.spec[0]).read_text())
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world)
    method, data, trainer = _setup(spec, torch.device("cpu"), args.rank, args.world)
    trainer.latent_cache, trainer.text_cache = load_or_build_caches(spec, trainer, data, method)
    trainer.park_idle()
    for i in range(args.warmup):
        trainer.step(i)
    if args.world > 1:
        dist.barrier()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.step(i)
        times.append(time.perf_counter() - t0)
    if args.world > 1:
        dist.destroy_process_group()
    return {"step_seconds": times}


def measure_scaling(args, model: str, data: str, root: Path, method: str) -> dict[str, Any]:
    """Steps/s of the cached job (global batch 2 x --batch) on 1 and on 2 gloo workers."""
    import socket

    big = argparse.Namespace(**{**vars(args), "batch": 2 * args.batch})
    spec = pixelmill_spec(root, f"{method}-dp", model, data, method, True, big)
    spec_path = root / f"spec-{method}-dp.json"
    Path(spec_path).write_text(json.dumps(spec))
    out = {}
    for world in (1, 2):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.dp_threads), "MKL_NUM_THREADS": str(args.dp_threads),
               "PYTHONWARNINGS": "ignore"}
        procs = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "dp", "--method", method, "--model", model,
             "--data", data, "--resolution", str(args.resolution), "--batch", str(big.batch), "--warmup",
             str(args.warmup), "--steps", str(args.steps), "--threads", str(args.dp_threads), "--spec",
             str(spec_path), "--rank", str(r), "--world", str(world), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(world)]
        outs = [p.communicate() for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"data-parallel worker failed: {[o[1][-3000:] for o in outs]}")
        line = [ln for ln in outs[0][0].splitlines() if ln.startswith(RESULT_TAG)][-1]
        out[world] = json.loads(line[len(RESULT_TAG):])["result"]["step_seconds"]
    return out


def example_images(root: Path, resolution: int) -> Path:
    """The benchmark's instance images as PNG files in a folder (what the example script reads)."""
    from pixelmill.samples import draw_concept_images

    folder = root / "instance-images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, im in enumerate(draw_concept_images(N_IMAGES, seed=0, size=image_size(resolution))):
        im.save(folder / f"{i:02d}.png")
    return folder


def run_example_script(args, model: str, root: Path) -> dict[str, Any]:
    """diffusers' train_dreambooth_lora.py, unchanged, at N1 and N2 steps: (N2 - N1) / (T2 - T1) steps/s."""
    import re

    images = example_images(root, args.resolution)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for n in (args.warmup, args.warmup + args.steps):
        out_dir = root / f"example-out-{n}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, args.example_script, "--pretrained_model_name_or_path", model,
               "--instance_data_dir", str(images), "--instance_prompt", INSTANCE_PROMPT,
               "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
               "--max_train_steps", str(n), "--learning_rate", str(LR["lora"]), "--rank", str(LORA_RANK),
               "--center_crop", "--seed", "0", "--mixed_precision", "no", "--report_to", "all",
               "--checkpointing_steps", str(10**6), "--output_dir", str(out_dir)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"example script failed (rc {p.returncode}):\n{p.stderr[-5000:]}")
        bars = re.findall(r"Steps: 100%.*?\[[^,]*, *([0-9.]+)(s/it|it/s)", p.stderr)
        tqdm_rate = None
        if bars:
            value, unit = float(bars[-1][0]), bars[-1][1]
            tqdm_rate = value if unit == "it/s" else 1 / value
        runs[n] = {"wall": wall, "tqdm_steps_per_s": tqdm_rate}
    n1, n2 = sorted(runs)
    return {"runs": runs, "steps_per_s": (n2 - n1) / (runs[n2]["wall"] - runs[n1]["wall"])}


# -- the driver --------------------------------------------------------------------------------

def run_worker(kind: str, method: str, args, model: str, data: str, variant: str | None,
               specs: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--method", method, "--model", model,
           "--data", data, "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--mem-steps", str(args.mem_steps),
           "--threads", str(args.threads), "--device", args.device, "--precision", args.precision] + \
        (["--compile"] if args.compile else [])
    if variant:
        cmd += ["--variant", variant]
    for spec in specs:
        cmd += ["--spec", spec]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{method}/{kind}/{variant} worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-5000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def report(method: str, speed: dict[str, Any], memory: dict[str, Any], names: tuple[str, ...],
           device: str = "cpu") -> dict[str, Any]:
    """Print a method's tables and verdict; returns pixelmill's (cached) ratios against the baseline."""
    mb = 1 << 20
    base_t = speed["baseline"]["step_seconds"]

    def paired(v: str) -> float:
        """Median over rounds of baseline step time / variant step time (same round, same load)."""
        return statistics.median(b / x for b, x in zip(base_t, speed[v]["step_seconds"]))

    base_m = memory["baseline"]
    title = (f"LoRA (rank {LORA_RANK}, alpha {LORA_RANK}, {'/'.join(TARGET_MODULES)})" if method == "lora"
             else "DreamBooth (full UNet, no prior preservation, text encoder frozen)")
    print(f"\n{title}")
    gpu = device != "cpu"
    kind = "GPU" if gpu else "RSS"  # on a GPU: tensors allocated on it (loaded = before the first step)
    print(f"  {'variant':<34}{'steps/s':>8}{'vs base':>9}{'mean steps/s':>14}{'CPU s/step':>12}{'vs base':>9}"
          f"{'loaded MB':>11}{'train peak MB':>15}{'vs base':>9}{'process max MB':>16}{'vs base':>9}   one-off"
          + ("   (loaded, train peak: GPU memory allocated; process max: host RSS)" if gpu else ""))
    for v in names:
        s, m = speed[v], memory[v]
        steps = s["step_seconds"]
        notes = f"model load {m['setup_seconds']:.1f} s"
        if m["cache_seconds"] is not None:
            notes += f", cache build {m['cache_seconds']:.1f} s"
        print(f"  {LABELS[v]:<34}{1 / statistics.median(steps):>8.3f}{paired(v):>8.2f}x"
              f"{len(steps) / sum(steps):>14.3f}{s['cpu_per_step']:>12.2f}"
              f"{speed['baseline']['cpu_per_step'] / s['cpu_per_step']:>8.2f}x"
              f"{m['loaded_bytes'] / mb:>11.0f}"
              f"{m['train_peak_bytes'] / mb:>15.0f}{m['train_peak_bytes'] / base_m['train_peak_bytes']:>8.2f}x"
              f"{m['max_rss_bytes'] / mb:>16.0f}{m['max_rss_bytes'] / base_m['max_rss_bytes']:>8.2f}x   {notes}")
    if not gpu:  # a GPU step's parts are not timed (PartClock)
        print(f"  wall seconds per step, by part: {'':<2}" + "".join(f"{p:>11}" for p in PARTS))
        for v in names:
            print(f"  {LABELS[v]:<34}" + "".join(f"{speed[v]['parts'][p]:>11.3f}" for p in PARTS))
    steps_per_s = {v: (1 / statistics.median(speed[v]["step_seconds"]),
                       len(speed[v]["step_seconds"]) / sum(speed[v]["step_seconds"])) for v in names}
    found = {}
    for v in [n for n in ("pixelmill", COMPILED) if n in names]:
        ratio, mem = paired(v), memory[v]["train_peak_bytes"] / base_m["train_peak_bytes"]
        met = ratio >= 1.3 and mem <= 1.0
        print(f"  {method}: target >= 1.3x steps/s ({LABELS[v]} vs baseline) at no more memory: "
              f"{'MET' if met else 'NOT MET'}  (steps/s {ratio:.2f}x, train peak {kind} {mem:.2f}x = "
              f"{(memory[v]['train_peak_bytes'] - base_m['train_peak_bytes']) / mb:+.0f} MB)")
        found.setdefault("speed", ratio)
        found.setdefault("memory", mem)
        found.setdefault("vs_baseline", {})[v] = {"steps_per_s": ratio, "train_peak": mem, "met": met}
    found["train_peak_mb"] = {v: memory[v]["train_peak_bytes"] / mb for v in names}
    return {**found, "steps_per_s": steps_per_s}


def example_report(args, model: str, root: Path, steps_per_s: dict[str, float]) -> None:
    ex = run_example_script(args, model, root)
    rate = ex["steps_per_s"]
    n1, n2 = sorted(ex["runs"])
    walls = ", ".join(f"{n} steps {r['wall']:.1f} s" for n, r in ex["runs"].items())
    tq = ex["runs"][n2]["tqdm_steps_per_s"]
    print(f"\ndiffusers' train_dreambooth_lora.py ({args.example_script}), unchanged, LoRA rank {LORA_RANK}, "
          f"batch {args.batch}, {args.resolution} px, fp32, {args.threads} torch threads")
    print(f"  runs: {walls}; steps/s = ({n2} - {n1}) / wall difference = {rate:.3f}"
          + (f"  (its tqdm bar at {n2} steps: {tq:.3f})" if tq else ""))
    print("  (the script's rate is a mean over its steps: compare the mean column; the median one resists outliers)")
    for v in steps_per_s:
        median, mean = steps_per_s[v]
        print(f"  {LABELS[v]:<34} median {median:.3f} steps/s = {median / rate:.2f}x the script, "
              f"mean {mean:.3f} steps/s = {mean / rate:.2f}x")


def scaling_report(args, model: str, data: str, root: Path, method: str) -> None:
    t = measure_scaling(args, model, data, root, method)
    rate = {w: 1 / statistics.median(v) for w, v in t.items()}
    print(f"\ndata-parallel scaling, {method}, cached latents + text, global batch {2 * args.batch}, "
          f"{args.dp_threads} torch thread(s) per worker, gloo on 127.0.0.1 (Ray Train's per-step path, "
          f"not its start-up)")
    for w, r in rate.items():
        print(f"  {w} worker{'s' if w > 1 else ' '}: {r:.3f} steps/s (median of {len(t[w])} steps; "
              f"{r * 2 * args.batch:.2f} samples/s)")
    print(f"  efficiency with 2 workers: {rate[2] / (2 * rate[1]):.2f} (speed-up {rate[2] / rate[1]:.2f}x of 2x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=12, help="timed rounds (one step of each variant per round)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps after warm-up in each memory run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="lora,dreambooth")
    p.add_argument("--vae", choices=sorted(VAES), default="sd-share")
    p.add_argument("--unet", choices=("bench", "sd15"), default="bench",
                   help="the benchmark UNet (17.6M) or SD 1.5's shapes (UNet, VAE and text encoder; --vae ignored)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every variant under bf16 mixed precision, as the scripts' --mixed_precision bf16")
    p.add_argument("--frozen-weights", choices=("auto", "fp32"), default="auto",
                   help="pixelmill frozen_weights setting (bf16: auto stores frozen weights in bf16; fp32 keeps them)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--workdir", default=None, help="keep the model, data and caches here (default: a temp dir)")
    p.add_argument("--example-script", default=None,
                   help="path of diffusers' examples/dreambooth/train_dreambooth_lora.py: compare LoRA steps/s")
    p.add_argument("--scaling", action="store_true", help="data-parallel scaling efficiency with 2 gloo workers")
    p.add_argument("--compile", action="store_true",
                   help="add a variant with the UNet step compiled (the job setting compile: true)")
    p.add_argument("--dp-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads per data-parallel worker (--scaling)")
    # worker mode (internal)
    p.add_argument("--worker", choices=("memory", "speed", "dp"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS + (COMPILED,), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--spec", action="append", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in LR:
            p.error(f"unknown method {m!r}; choose from {sorted(LR)}")
    t_start = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pixelmill-bench-finetune-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.device != "cpu" and (args.scaling or args.example_script):
        p.error("--scaling and --example-script run on the CPU: leave out --device")
    model = build_model(root / "model", args.vae, args.unet, args.device)
    data = build_data(str(root / "instance"), args.resolution)
    w, h = image_size(args.resolution)
    if args.unet == "sd15":
        nets = ("SD 1.5-shaped UNet 320/640/1280/1280 (859.5M params), VAE 128/256/512/512, CLIP ViT-L/14-shaped "
                "text encoder")
    else:
        vae_desc = "/".join(map(str, VAES[args.vae]["block_out_channels"]))
        nets = (f"SD-shaped UNet 64/128/256 (17.6M params), VAE {vae_desc} ({args.vae}, 8x), tiny CLIP text encoder "
                "(width 32)")
    where = f"{args.threads} torch threads" if args.device == "cpu" else f"{gpu_name(args.device)}"
    print(f"finetune bench: {nets}; {N_IMAGES} instance images {w}x{h} -> {args.resolution} px "
          f"(resize, center crop, random flip), batch {args.batch}, "
          f"{'fp32' if args.precision == 'fp32' else 'bf16 mixed precision'}"
          f"{', pixelmill frozen_weights ' + args.frozen_weights if args.precision != 'fp32' else ''}, {where}")
    print(f"speed: the 3 variants in one process, {args.warmup} warm-up steps each, then {args.steps} rounds of one "
          f"step each (rotating order); memory: each variant alone in its own process "
          f"({args.warmup} + {args.mem_steps} steps)")
    print(f"machine: {machine()}; torch {torch.__version__}; load average at start {load()}")

    if args.example_script and "lora" not in methods:
        p.error("--example-script compares LoRA: include lora in --methods")
    threads, found = set(), {}
    for method in methods:
        specs, names = {}, variants(args)
        for v in names[1:]:
            tag = f"{method}-{v}"
            spec = pixelmill_spec(root, tag, model, data, method, v != "pixelmill-nocache", args, v == COMPILED)
            specs[v] = str(root / f"spec-{tag}.json")
            Path(specs[v]).write_text(json.dumps(spec))
        memory = {}
        for v in names:  # the cached variant builds its cache here (fresh), so the build time is the one-off
            out = run_worker("memory", method, args, model, data, v, [specs[v]] if v in specs else [])
            memory[v] = {**out["result"], "max_rss_bytes": out["max_rss_bytes"]}
            threads.add(out["threads"])
        out = run_worker("speed", method, args, model, data, None, [specs[v] for v in names[1:]])
        threads.add(out["threads"])
        found[method] = report(method, out["result"], memory, names, args.device)
    if args.example_script:
        example_report(args, model, root, found["lora"]["steps_per_s"])
    if args.scaling:
        scaling_report(args, model, data, root, methods[0])
    print(f"\nload average at end {load()}; total {time.perf_counter() - t_start:.0f} s; "
          f"torch threads in workers: {sorted(threads)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine(), "device": args.device if args.device == "cpu" else gpu_name(args.device),
            "torch": torch.__version__, "precision": args.precision, "frozen_weights": args.frozen_weights,
            "unet": args.unet, "vae": args.vae,
            "resolution": args.resolution, "batch": args.batch, "threads": args.threads,
            "results": found}, indent=1))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
