"""The trainer core every method shares.

One step: for each gradient-accumulation micro-batch, take this worker's part of the
global micro-batch, prepare pixels (or read cached latents), draw the VAE sample, noise
and timestep from the sample id, predict the noise and add the per-sample loss (class
samples weighted by ``prior_loss_weight``), normalised by the GLOBAL batch size. Then
sum the gradients over workers (an all-reduce; nothing else is shared), clip, step,
let the method restore what must not change, update the EMA, and log.

Because every sample's randomness is derived from ``(seed, step, sample id)`` and the
loss is normalised globally, a step's update does not depend on how many workers share
it, and a resumed job repeats exactly the steps it would have run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pixelmill.config.campaign import prior_in_use, train_size
from pixelmill.tasks.train.conditioning import TextCond, encode_prompts, is_sdxl, null_conditioning, unet_kwargs
from pixelmill.tasks.train.data import (
    Augment,
    BatchSchedule,
    Prepared,
    Sample,
    TrainingData,
    bucket_sizes,
    center_crop_offset,
    generator,
    nearest_bucket,
    per_sample,
    prepare,
    prompt_key,
    shard,
)
from pixelmill.tasks.train.methods import Method
from pixelmill.tasks.train.optim import all_reduce_bucketed, make_adamw
from pixelmill.tasks.train.parking import Parked
from pixelmill.tasks.train.precision import FrozenHalf


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then constant, linear or cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def conditioning_dropout(ids: list[str], seed: int, step: int, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix's conditioning dropout: which samples lose their text, their source image, or both.

    One uniform draw ``r`` per sample from its (seed, step, id) generator: ``r < p`` drops
    the text only, ``p <= r < 2p`` both, ``2p <= r < 3p`` the image only (the paper's and
    diffusers' scheme: each with probability ``p``, so text and image are each dropped
    with probability ``2p``).

    Returns:
        ``(drop_text, drop_image)`` boolean tensors, one entry per id.
    """
    r = torch.tensor([torch.rand((), generator=generator(seed, step, i, "dropout")).item() for i in ids])
    return r < 2 * prob, (r >= prob) & (r < 3 * prob)


class EMA:
    """Exponential moving average of the trainable tensors (decay warms up as in diffusers)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}
        self.updates = 0

    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, p in params.items():
                self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def swap(self, params: dict[str, torch.Tensor]) -> None:
        """Exchange the live weights and the averages (call twice to undo)."""
        with torch.no_grad():
            for k, p in params.items():
                live = p.detach().clone()
                p.copy_(self.shadow[k].to(p.dtype))
                self.shadow[k].copy_(live.float())


@dataclass
class StepLog:
    step: int
    loss: float
    instance_loss: float
    prior_loss: float | None
    lr: float
    seconds: float
    grad_scale: float | None = None  # fp16: the loss scale after this step's update


@dataclass
class Trainer:
    """Runs a method's training from ``start_step`` to ``max_steps``.

    Args:
        method: the method (its ``setup`` already called).
        data: the job's samples.
        settings: the job's ``TrainSettings`` as a dict.
        device: where the models run.
        rank / world: this worker's place in a data-parallel group (torch.distributed
            must be initialised when ``world > 1``).
        latent_cache: optional ``{(sample id, flip): (mean, std)}`` VAE posteriors.
        text_cache: optional ``{prompt_key(prompt): embedding}`` (and ``{key|pooled: …}`` on SDXL) for
            methods with fixed text (``conditioning.TextCond.cache_entries``).
        vae_multiple: pixel sizes must be multiples of this (bucket sizes).
    """

    method: Method
    data: TrainingData
    settings: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    latent_cache: dict | None = None
    text_cache: dict | None = None
    vae_multiple: int = 8

    def __post_init__(self) -> None:
        s = self.settings
        if s["train_batch_size"] % self.world:
            raise ValueError(f"train_batch_size {s['train_batch_size']} is not divisible by {self.world} workers")
        parts = self.method.parts
        self.unet, self.vae, self.te, self.tok = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
        self.sdxl = is_sdxl(parts)
        self.text_encoders = [m for m in (self.te, parts.get("text_encoder_2")) if m is not None]
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
        self.params = self.method.trainable()
        self.names = sorted(self.params)
        self.optimizer = make_adamw(  # fused on CUDA, foreach elsewhere (optim.adamw_kernel)
            [self.params[k] for k in self.names], lr=s["learning_rate"], betas=(s["adam_beta1"], s["adam_beta2"]),
            weight_decay=s["adam_weight_decay"], eps=s["adam_epsilon"],
        )
        use_ema = s["use_ema"] if s["use_ema"] is not None else self.method.use_ema_default
        self.ema = EMA(self.params, s["ema_decay"]) if use_ema else None
        self.prior = bool(self.data.klass and prior_in_use(self.method.prior, s["with_prior_preservation"]))
        self.aug = Augment(center_crop=s["center_crop"], random_flip=s["random_flip"], rescale=s["rescale"])
        self.buckets = (bucket_sizes(s["resolution"], self.vae_multiple) if s["aspect_buckets"]
                        else [train_size(s["resolution"])])
        sample_buckets = [nearest_bucket(x.size, self.buckets) if s["aspect_buckets"] else 0
                          for x in self.data.instance]
        self.schedule = BatchSchedule(sample_buckets, s["train_batch_size"], s["seed"], "instance")
        self.class_schedule = (BatchSchedule([0] * len(self.data.klass), s["train_batch_size"], s["seed"], "class")
                               if self.prior else None)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s["mixed_precision"])
        # fp16 scales the loss (on CUDA, or on the CPU where torch's autocast runs fp16 too); the
        # scaler's state (scale, growth tracker) is part of every checkpoint, so a resume is exact
        self.scaler = (torch.amp.GradScaler(self.device.type) if s["mixed_precision"] == "fp16" else None)
        if s["gradient_checkpointing"]:
            self.unet.enable_gradient_checkpointing()
            for te in self.text_encoders if self.method.trains_text else ():
                # transformers 5 renamed it; the old name warns and will go in v6
                enable = getattr(te, "activation_checkpointing_enable", None) or \
                    getattr(te, "gradient_checkpointing_enable", None)
                if enable is not None:
                    enable()
        # frozen weights in autocast's dtype: the same numbers each step, without autocast's casts
        # (on the CPU the fp32 originals wait in a file: host memory is the device's memory there)
        self.frozen = (FrozenHalf([self.unet, *self.text_encoders], self.autocast_dtype,
                                  spill=self.device.type == "cpu")
                       if self.autocast_dtype is not None and s.get("frozen_weights", "auto") == "auto" else None)
        self.parked: dict[str, Parked] = {}  # networks no step needs, out of memory (park_idle)
        self.unet.train()
        # the UNet call of each step; compiled, the weights stay the UNet's own (saving is unchanged)
        self.unet_call = torch.compile(self.unet) if s.get("compile") else self.unet
        for te in self.text_encoders:
            te.train(self.method.trains_text)
        self.vae.eval()
        self._null_text: TextCond | None = None

    # -- frozen networks no step needs ----------------------------------------------------
    def park_idle(self) -> list[str]:
        """Park the VAE when every latent is cached and the frozen text encoders when every prompt's
        embedding is (``parking.py``; setting ``offload_idle``); returns the parked parts' names."""
        if not self.settings.get("offload_idle", True):
            return []
        names = ["vae"] if self.latent_cache is not None else []
        if self.text_cache is not None and self.method.text_is_fixed():
            names += [n for n in ("text_encoder", "text_encoder_2") if self.method.parts.get(n) is not None]
        for n in names:
            self.parked.setdefault(n, Parked(self.method.parts[n], self.device)).park()
        return names

    def _need(self, *names: str) -> None:
        """Bring parked networks back before a step uses them (a sample the caches lack); they stay."""
        for n in names:
            if n in self.parked:
                self.parked[n].restore()

    @contextmanager
    def exact_weights(self) -> Iterator[None]:
        """Every network as loaded (parked ones back, frozen weights fp32) inside the block: sampling,
        saving; as it was for training after it."""
        parked = [p for p in self.parked.values() if p.parked]
        for p in parked:
            p.restore()
        try:
            with self.frozen.exact() if self.frozen is not None else nullcontext():
                yield
        finally:
            for p in parked:
                p.park()

    def release(self) -> None:
        """Training is over: every network as loaded, for good (final samples, saving)."""
        for p in self.parked.values():
            p.restore()
        if self.frozen is not None:
            self.frozen.restore()

    def eval_mode(self) -> None:
        """The UNet and text encoders in eval mode (saving and sampling)."""
        for module in (self.unet, *self.text_encoders):
            module.eval()

    # -- one step -------------------------------------------------------------------------
    def step(self, step: int) -> StepLog:
        s = self.settings
        t0 = time.perf_counter()
        accum = s["gradient_accumulation_steps"]
        norm = s["train_batch_size"] * accum
        lr = s["learning_rate"] * lr_factor(step, s["lr_warmup_steps"], s["max_steps"], s["lr_scheduler"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64)  # instance loss sum, class loss sum, class count
        for micro in range(accum):
            b = step * accum + micro
            bucket, idx = self.schedule.batch(b)
            samples = [self.data.instance[i] for i in shard(idx, self.rank, self.world)]
            if self.prior:
                _, cidx = self.class_schedule.batch(b)
                samples += [self.data.klass[i] for i in shard(cidx, self.rank, self.world)]
            per_sample = self.losses(samples, self.buckets[bucket], step)
            weights = torch.tensor([s["prior_loss_weight"] if x.kind == "class" else 1.0 for x in samples],
                                   device=per_sample.device)
            loss = (per_sample * weights).sum() / norm
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            ps = per_sample.detach().double().cpu()
            is_class = torch.tensor([x.kind == "class" for x in samples])
            sums += torch.stack([ps[~is_class].sum(), ps[is_class].sum(), is_class.sum().double()])
        grads = [self.params[k] for k in self.names]
        if self.world > 1:
            import torch.distributed as dist

            for p in grads:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_bucketed([p.grad for p in grads])  # ~25 MB flat buckets, one all-reduce each
            sums_on_device = sums.to(self.device)  # NCCL reduces device tensors only (a no-op copy on the CPU)
            dist.all_reduce(sums_on_device)
            sums = sums_on_device.cpu()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(grads, s["max_grad_norm"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.params)
        inst = float(sums[0] / norm)
        prior = float(sums[1] / sums[2]) if sums[2] > 0 else None
        total = inst + (s["prior_loss_weight"] * prior if prior is not None else 0.0)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        return StepLog(step + 1, total, inst, prior, lr, time.perf_counter() - t0, scale)

    # -- the grad scaler's state (checkpoints) ----------------------------------------------
    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 grad scaler's state as JSON-able numbers (None without a scaler)."""
        if self.scaler is None:
            return None
        return {k: (float(v) if isinstance(v, float) else v) for k, v in self.scaler.state_dict().items()}

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        """Restore the scaler from ``scaler_state()`` (a checkpoint without one keeps a fresh scaler)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    # -- the loss -------------------------------------------------------------------------
    def losses(self, samples: list[Sample], size: tuple[int, int], step: int) -> torch.Tensor:
        """Per-sample noise-prediction MSE (masked to the image for rescaled samples)."""
        seed = self.settings["seed"]
        prepared = [self._prepare(x, size, seed, step) for x in samples]
        prompts = [p.prompt for p in prepared]
        latents = self.latents(samples, prepared, seed, step)
        ids = [x.id for x in samples]
        noise = per_sample(ids, seed, step, "noise", self.device, tuple(latents.shape[1:]))
        t = per_sample(ids, seed, step, "t", self.device, high=self.noise_scheduler.config.num_train_timesteps)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        batch: dict[str, Any] = {}
        text = self.encode_text(prompts)
        if samples and samples[0].source is not None:
            text, batch["source_latents"] = self._pair_conditioning(samples, prepared, text, seed, step)
        cond = unet_kwargs(text, [x.size for x in samples], [p.crop for p in prepared], size, self.device)
        with self._autocast():
            pred = self.unet_call(self.method.unet_input(noisy, batch), t, **cond).sample
        pred = pred.float()
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        err = (pred - target) ** 2
        masks = [p.mask for p in prepared]
        if any(m is not None for m in masks):
            h, w = err.shape[-2:]
            m = torch.stack([F.interpolate(mm[None, None], size=(h, w), mode="nearest")[0, 0] if mm is not None
                             else torch.ones(h, w) for mm in masks]).to(err.device)[:, None]
            return (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1)
        return err.mean(dim=(1, 2, 3))

    def _prepare(self, sample: Sample, size: tuple[int, int], seed: int, step: int) -> Prepared:
        """``data.prepare``, without decoding the image when its latent is cached.

        With a center crop and no rescale, the flip is the only draw ``prepare`` makes from
        the sample's generator, so drawing it here gives the same flip as decoding would.
        """
        prompt = self.method.prompt(sample, seed, step)
        if (self.latent_cache is not None and sample.source is None and self.aug.center_crop
                and not self.aug.rescale):
            flip = bool(self.aug.random_flip and
                        torch.rand((), generator=generator(seed, step, sample.id, "augment")).item() < 0.5)
            if (sample.id, flip) in self.latent_cache:
                return Prepared(None, prompt, None, flip, crop=center_crop_offset(sample.size, size))
        return prepare(sample, size, self.aug, seed, step, prompt)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def latents(self, samples: list[Sample], prepared: list[Prepared], seed: int, step: int) -> torch.Tensor:
        """The scaled VAE latents of a batch: posterior mean + std · ε(sample, step), one row per sample.

        Cached posteriors are read; the other images are encoded together (``posteriors``).
        """
        post: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(samples)
        todo = []
        for i, (x, p) in enumerate(zip(samples, prepared)):
            key = (x.id, p.flip)
            if self.latent_cache is not None and key in self.latent_cache and p.mask is None:
                post[i] = tuple(t.to(self.device) for t in self.latent_cache[key])
            else:
                todo.append(i)
        for i, mean_std in zip(todo, self.posteriors([prepared[i].pixels for i in todo])):
            post[i] = mean_std
        mean = torch.stack([m for m, _ in post])
        std = torch.stack([s for _, s in post])
        eps = per_sample([x.id for x in samples], seed, step, "vae", self.device, tuple(mean.shape[1:]))
        return (mean + std * eps) * self.vae.config.scaling_factor

    @torch.no_grad()
    def posteriors(self, pixels: list[torch.Tensor], chunk: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """VAE posterior (mean, std) of each image; images of one size are encoded in one call.

        fp32 (an fp16 VAE gives NaNs). ``chunk`` caps the images per call (0: no cap). On
        the CPU a batched encode is not always bitwise the per-image one (the convolution
        kernels may sum in another order for another batch size): within float rounding.
        """
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pixels)
        if pixels:
            self._need("vae")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, px in enumerate(pixels):
            by_size.setdefault(tuple(px.shape), []).append(i)
        for idx in by_size.values():
            n = chunk or len(idx)
            for j in range(0, len(idx), n):
                part = idx[j:j + n]
                batch = torch.stack([pixels[i] for i in part]).to(self.device, torch.float32)
                dist = self.vae.encode(batch).latent_dist
                mean, std = dist.mean, dist.std
                for k, i in enumerate(part):
                    out[i] = (mean[k], std[k])
        return out  # type: ignore[return-value]

    def encode_text(self, prompts: list[str]) -> TextCond:
        """The prompts' conditioning (``conditioning.encode_prompts``), from the text cache when it has them."""
        if self.text_cache is not None and self.method.text_is_fixed():
            cached = TextCond.from_cache(self.text_cache, [prompt_key(p) for p in prompts], self.device, self.sdxl)
            if cached is not None:
                return cached
        self._need("text_encoder", "text_encoder_2")
        with (nullcontext() if self.method.trains_text else torch.no_grad()), self._autocast():
            return encode_prompts(self.method.parts, prompts, self.device)

    def _pair_conditioning(self, samples, prepared, text, seed, step):
        """Source-image latents (posterior mode) and the paper's conditioning dropout."""
        # the posterior's mode is its mean; the sources are encoded together
        src = torch.stack([mean for mean, _ in self.posteriors([p.source for p in prepared])])
        prob = self.settings["conditioning_dropout_prob"]
        if prob > 0:
            drop_text, drop_image = conditioning_dropout([x.id for x in samples], seed, step, prob)
            text = text.where(drop_text, self.null_text())
            src = src * (~drop_image).float().to(self.device)[:, None, None, None]
        return text, src

    def null_text(self) -> TextCond:
        """The unconditional text (``conditioning.null_conditioning``) that conditioning dropout trains with."""
        if self._null_text is None:
            self._need("text_encoder", "text_encoder_2")
            with self._autocast():
                self._null_text = null_conditioning(self.method.parts, self.device)
        return self._null_text

    # -- fixed-triple evaluation loss (for tests and reports) ------------------------------
    @torch.no_grad()
    def fixed_loss(self, n_steps: int = 4) -> float:
        """Mean loss over the first ``n_steps`` steps' (image, noise, timestep) draws, without training."""
        total, count = 0.0, 0
        for st in range(n_steps):
            bucket, idx = self.schedule.batch(st)
            samples = [self.data.instance[i] for i in idx]
            total += float(self.losses(samples, self.buckets[bucket], st).sum().float())
            count += len(samples)
        return total / count

