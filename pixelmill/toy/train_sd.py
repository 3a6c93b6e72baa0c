"""Train the toy Stable Diffusion on toy-world images and captions, and ship it with its model card.

Two phases, both resumable from ``--work``:

1. VAE: a small ``AutoencoderKL`` with 2x downsampling (32x32 images -> 4x16x16 latents;
   ``--vae-factor 4`` gives 8x8, too coarse for a 10-pixel object's shape) trained to
   reconstruct toy images (MSE + a small KL term, decoding posterior samples so the
   decoder tolerates imperfect latents). Its ``scaling_factor`` is set to 1 / std of the training latents.
2. UNet: a small ``UNet2DConditionModel`` trained from scratch by pixelmill's trainer
   core (``pixelmill.tasks.train.core.Trainer``) with the ``text_to_image`` method
   (the whole UNet trains, 10 % of captions dropped to the empty prompt for
   classifier-free guidance), on a toy dataset written by ``write_toy_dataset`` WITHOUT
   ``world.HELD_OUT_SHAPE``. VAE posteriors and text embeddings are cached (the text
   encoder is a frozen random ``CLIPTextModel`` with the real CLIP tokenizer).

The learning rate warms up, then follows a cosine to zero at ``--max-minutes`` of
training (or ``--steps``, whichever comes first), so a busy machine still ends on an
annealed model. Every ``--checkpoint-minutes`` the UNet and AdamW state go to
``--work`` (safetensors); rerunning the same command resumes. One thread by default.

At the end the pipeline is written to ``--out`` (diffusers ``StableDiffusionPipeline``
layout, fp16 safetensors), loaded back through ``pixelmill.models.loading`` and measured
with the frozen detectors (``pixelmill.toy.detect``) on held-out prompts, with and
without guidance, against the random-weight tiny SD; ``MODEL_CARD.md`` and
``metrics.json`` are written beside it::

    nohup python -m pixelmill.toy.train_sd --out pixelmill/toy/models/sd > sd-train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pixelmill.toy import world
from pixelmill.toy.quality import EVAL_SEED, agreement, eval_prompts, generate, save_grid

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "sd"
DEFAULT_WORK = Path(".pixelmill") / "toy-train" / "sd"
TRAIN_SEED = 11
"""World seed of the training rows (``quality.EVAL_SEED`` holds out the prompts)."""
TEXT_WIDTH = 64
LATENT_CHANNELS = 4
VAE_FACTORS = (2, 4)
"""Downsampling of the VAE: 2 (32x32 images -> 16x16 latents, the shipped model) or 4 (-> 8x8,
the first shipped model: too coarse for the shape of a 10-pixel object)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the shipped pipeline")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="dataset, checkpoints and the training log")
    p.add_argument("--rows", type=int, default=30000, help="training rows of world seed 11 (no held-out shape)")
    p.add_argument("--vae-minutes", type=float, default=7.0)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-minutes", type=float, default=30.0,
                   help="phase 3: fine-tune the VAE decoder alone (the encoder, so the latents, stay)")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--decoder-only", action="store_true",
                   help="run only the decoder phase (after the VAE phase; it can run beside the UNet phase, "
                        "which reads only the encoder)")
    p.add_argument("--card-only", action="store_true",
                   help="rewrite MODEL_CARD.md from --out's metrics.json (pass the training arguments too)")
    p.add_argument("--decoder-continue", action="store_true",
                   help="with --decoder-only: train a finished decoder phase for another --decoder-minutes")
    p.add_argument("--steps", type=int, default=100000, help="UNet steps (the time limit usually ends first)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--max-minutes", type=float, default=44.0, help="UNet training time")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--vae-factor", type=int, choices=VAE_FACTORS, default=2,
                   help="VAE downsampling: 2 (16x16 latents) or 4 (8x8 latents)")
    return p.parse_args(argv)


# -- the architecture ---------------------------------------------------------------------
def vae_config(factor: int = 2) -> dict[str, Any]:
    blocks = {2: (32, 64), 4: (16, 32, 64)}[factor]
    return {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(blocks),
        "up_block_types": ("UpDecoderBlock2D",) * len(blocks),
        "block_out_channels": blocks, "layers_per_block": 1, "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 16, "sample_size": world.IMAGE_SIZE,
    }


def unet_config(factor: int = 2) -> dict[str, Any]:
    config = {"sample_size": world.IMAGE_SIZE // factor, "in_channels": LATENT_CHANNELS,
              "out_channels": LATENT_CHANNELS, "layers_per_block": 1, "cross_attention_dim": TEXT_WIDTH}
    if factor == 4:  # 8x8 latents: cross-attention at 8x8 and 4x4
        return {**config, "block_out_channels": (64, 96, 128),
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                "attention_head_dim": (2, 3, 4), "norm_num_groups": 32}
    # 16x16 latents: plain resnets at 16x16, cross-attention at 8x8 and 4x4 (about the 8x8
    # model's cost per step, with half its width at the top level)
    return {**config, "block_out_channels": (32, 64, 128),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (1, 2, 4), "norm_num_groups": 16}


def text_config():
    from transformers import CLIPTextConfig

    from pixelmill.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MODEL_MAX_LENGTH, VOCAB_SIZE

    return CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=TEXT_WIDTH,
        layer_norm_eps=1e-5, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
    )


def build_parts(seed: int, factor: int = 2) -> dict[str, Any]:
    """Fresh components (seeded): tokenizer, frozen text encoder, VAE, UNet, DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pixelmill.models.tiny import sd_scheduler_config
    from pixelmill.models.tokenizer import build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(factor))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config(factor))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config())
    text_encoder.eval()
    return {"tokenizer": build_clip_tokenizer(), "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": DDIMScheduler(**sd_scheduler_config())}


# -- helpers ------------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _log(work: Path, record: dict[str, Any]) -> None:
    with (work / "log.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def dataset_rows(work: Path, rows: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The training dataset (written once to ``work/data``): its rows and their pixels in [-1, 1]."""
    from pixelmill.tasks.train.data import _open, pixel_tensor, read_image_rows
    from pixelmill.toy.dataset import write_toy_dataset

    url = str(work / "data")
    t0 = time.time()
    write_toy_dataset(url, rows, seed=TRAIN_SEED, exclude_shapes=[world.HELD_OUT_SHAPE])
    table, skipped = read_image_rows(url, "image", "toy SD training data", extra=("caption", "shape", "color"))
    assert not skipped, skipped[:3]
    pixels = torch.stack([pixel_tensor(_open(r["_bytes"])) for r in table])
    print(f"data: {len(table)} rows ({sorted({r['shape'] for r in table})}) in {time.time() - t0:.0f}s", flush=True)
    return table, pixels


# -- phase 1: the VAE ---------------------------------------------------------------------
def train_vae(args: argparse.Namespace, work: Path, vae, pixels: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    done = work / "vae.json"
    if done.is_file():
        vae.load_state_dict(load_file(str(work / "vae.safetensors")))
        state = json.loads(done.read_text())
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        print(f"vae: resumed ({state['steps']} steps, rmse {state['rmse']:.4f})", flush=True)
        return state
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0, step = time.time(), 0
    gen = torch.Generator().manual_seed(args.seed)
    while time.time() - t0 < args.vae_minutes * 60:
        progress = (time.time() - t0) / (args.vae_minutes * 60)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(args.vae_lr, step, 50, progress)
        x = pixels[torch.randint(len(pixels), (args.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            _log(work, {"phase": "vae", "step": step, "mse": round(mse.item(), 5),
                        "minutes": round((time.time() - t0) / 60, 2)})
    vae.eval()
    with torch.no_grad():
        x = pixels[:512]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        rmse = float(((rec - x) / 2).pow(2).mean().sqrt())
        std = float(vae.encode(pixels[:2048]).latent_dist.mean.std())
    state = {"steps": step, "seconds": round(time.time() - t0, 1), "rmse": rmse, "scaling_factor": 1.0 / std}
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    _atomic(work / "vae.safetensors", lambda p: save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
                                                          str(p)))
    _atomic(done, lambda p: p.write_text(json.dumps(state, indent=2)))
    print(f"vae: {step} steps, rmse {rmse:.4f} on [0, 1], latent std {std:.3f}", flush=True)
    return state


def finetune_decoder(args: argparse.Namespace, work: Path, vae, pixels: torch.Tensor) -> dict[str, Any]:
    """Phase 3: train the decoder (and ``post_quant_conv``) alone, L1 + MSE, on posterior samples of
    the frozen encoder. The latents the UNet learns do not change; the images they decode to
    get sharper (the shape detector needs clean edges). Saved to ``work/vae-decoder.*``."""
    from safetensors.torch import load_file, save_file

    done = work / "vae-decoder.json"
    before = {"steps": 0, "seconds": 0.0, "sessions": 0}
    if done.is_file():
        vae.load_state_dict(load_file(str(work / "vae-decoder.safetensors")))
        state = json.loads(done.read_text())
        print(f"decoder: resumed ({state['steps']} steps, rmse {state['rmse']:.4f})", flush=True)
        if not args.decoder_continue:
            return state
        before = {"steps": state["steps"], "seconds": state["seconds"], "sessions": state.get("sessions", 1)}
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:  # the UNet phase froze the whole VAE
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    vae.eval()
    vae.decoder.train()
    t0, step = time.time(), 0
    gen = torch.Generator().manual_seed(args.seed + 1)
    while time.time() - t0 < args.decoder_minutes * 60:
        progress = (time.time() - t0) / (args.decoder_minutes * 60)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(args.decoder_lr, step, 50, progress)
        x = pixels[torch.randint(len(pixels), (args.vae_batch,), generator=gen)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + torch.nn.functional.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            _log(work, {"phase": "decoder", "step": step, "mse": round(mse.item(), 5),
                        "minutes": round((time.time() - t0) / 60, 2)})
    vae.eval()
    with torch.no_grad():
        x = pixels[:512]
        rmse = float(((vae.decode(vae.encode(x).latent_dist.mode()).sample - x) / 2).pow(2).mean().sqrt())
    state = {"steps": before["steps"] + step, "seconds": round(before["seconds"] + time.time() - t0, 1),
             "rmse": rmse, "sessions": before["sessions"] + 1}
    _atomic(work / "vae-decoder.safetensors",
            lambda p: save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(p)))
    _atomic(done, lambda p: p.write_text(json.dumps(state, indent=2)))
    print(f"decoder: {step} steps, rmse {rmse:.4f} on [0, 1]", flush=True)
    return state


@torch.no_grad()
def latent_cache(vae, rows: list[dict[str, Any]], pixels: torch.Tensor) -> dict:
    """``{(id, False): (mean, std)}``: the trainer core's VAE-posterior cache (no flips)."""
    cache = {}
    for i in range(0, len(rows), 256):
        dist = vae.encode(pixels[i:i + 256]).latent_dist
        for j, r in enumerate(rows[i:i + 256]):
            cache[(r["id"], False)] = (dist.mean[j].clone(), dist.std[j].clone())
    return cache


@torch.no_grad()
def text_cache(parts: dict[str, Any], prompts: list[str]) -> dict:
    """``{prompt_key: embedding}`` of every caption and the empty prompt (the encoder is frozen)."""
    from pixelmill.tasks.train.data import prompt_key

    tok, te = parts["tokenizer"], parts["text_encoder"]
    unique = sorted(set(prompts) | {""})
    cache = {}
    for i in range(0, len(unique), 256):
        chunk = unique[i:i + 256]
        ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = te(ids)[0]
        for p, e in zip(chunk, emb):
            cache[prompt_key(p)] = e.clone()
    return cache


# -- phase 2: the UNet through the trainer core ------------------------------------------------
def trainer_settings(args: argparse.Namespace) -> dict[str, Any]:
    from pixelmill.config.campaign import TrainSettings

    s = TrainSettings().model_dump()
    s.update({
        "resolution": world.IMAGE_SIZE, "center_crop": True, "random_flip": False, "rescale": False,
        "aspect_buckets": False, "train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "adam_weight_decay": 0.0, "max_grad_norm": 1.0, "seed": args.seed, "mixed_precision": "no",
        "use_ema": False, "conditioning_dropout_prob": args.caption_dropout,
    })
    return s


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``opt.<index>.<name>`` tensors (safetensors, no pickle)."""
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"opt.{idx}.{name}"] = torch.as_tensor(value).contiguous()
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore ``optimizer_tensors`` output (hyper-parameters come from the live optimizer)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def train_unet(args: argparse.Namespace, work: Path, parts: dict[str, Any], rows, pixels):
    """Train the UNet with the ``text_to_image`` method on the trainer core; returns (method, state)."""
    from safetensors.torch import load_file, save_file

    from pixelmill.tasks.train.core import Trainer
    from pixelmill.tasks.train.data import Sample, TrainingData
    from pixelmill.tasks.train.methods import make_method

    settings = trainer_settings(args)
    method = make_method("text_to_image", parts, settings, [])
    method.setup()
    ckpt, meta = work / "unet-checkpoint.safetensors", work / "unet-checkpoint.json"
    state = {"step": 0, "train_seconds": 0.0}
    saved = None
    if meta.is_file():
        state = json.loads(meta.read_text())
        saved = load_file(str(ckpt))
        parts["unet"].load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("unet.")})
        print(f"unet: resumed from step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)", flush=True)
        if state["step"] >= args.steps or state["train_seconds"] > args.max_minutes * 60:
            parts["unet"].eval()
            return method, state
    data = TrainingData(instance=[Sample(id=r["id"], kind="instance", prompt=r["caption"], image=r["_bytes"],
                                         size=tuple(r["_size"])) for r in rows])
    t0 = time.time()
    lat = latent_cache(parts["vae"], rows, pixels)
    txt = text_cache(parts, [r["caption"] for r in rows])
    print(f"caches: {len(lat)} latents, {len(txt)} prompts in {time.time() - t0:.0f}s", flush=True)
    trainer = Trainer(method, data, settings, latent_cache=lat, text_cache=txt, vae_multiple=args.vae_factor)
    if saved is not None:
        load_optimizer(trainer.optimizer, saved)

    def checkpoint() -> None:
        tensors = {f"unet.{k}": v.contiguous() for k, v in parts["unet"].state_dict().items()}
        tensors.update(optimizer_tensors(trainer.optimizer))
        _atomic(ckpt, lambda p: save_file(tensors, str(p)))
        _atomic(meta, lambda p: p.write_text(json.dumps(state, indent=2)))

    last_ckpt, start, before = time.time(), time.time(), state["train_seconds"]
    window: list[float] = []
    while state["step"] < args.steps:
        step = state["step"]
        elapsed = before + time.time() - start
        if elapsed > args.max_minutes * 60:
            print(f"unet: time limit reached at step {step}", flush=True)
            break
        progress = max((step - args.warmup) / max(1, args.steps - args.warmup), elapsed / (args.max_minutes * 60))
        settings["learning_rate"] = cosine_lr(args.lr, step, args.warmup, progress)
        log = trainer.step(step)
        window.append(log.loss)
        state["step"] = step + 1
        state["train_seconds"] = before + time.time() - start
        if state["step"] % args.log_every == 0 or state["step"] == 1:
            _log(work, {"phase": "unet", "step": state["step"], "loss": round(sum(window) / len(window), 5),
                        "lr": round(log.lr, 7), "sec_per_step": round(log.seconds, 3),
                        "minutes": round(state["train_seconds"] / 60, 2)})
            window = []
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    parts["unet"].eval()
    return method, state


def save_shipped(method, out: Path) -> int:
    """Write the diffusers pipeline folder through the method, weights converted to fp16; returns bytes."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    method.save(out)
    total = 0
    for f in sorted(out.glob("*/*.safetensors")):
        state = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(state, str(f), metadata={"format": "pt"})
        total += f.stat().st_size
    return total


# -- measurement --------------------------------------------------------------------------
def measure(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load the shipped folder through pixelmill's loading and score it and the random tiny SD."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pixelmill.models.loading import load_text2img_pipeline
    from pixelmill.models.tiny import build_tiny_sd_components

    items = eval_prompts(args.eval_prompts)
    prompts = [p for p, _, _ in items]
    pipe = load_text2img_pipeline(str(out.resolve()), device="cpu", dtype="float32")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    res: dict[str, Any] = {"prompts": len(items), "eval_seed": EVAL_SEED, "sample_steps": args.sample_steps,
                           "guidance": args.guidance}
    t0 = time.time()
    guided = generate(pipe, prompts, args.guidance, args.sample_steps)
    res["guided"] = agreement(guided, items)
    res["unguided"] = agreement(generate(pipe, prompts, 1.0, args.sample_steps), items)
    res["sample_seconds_per_image"] = round((time.time() - t0) / (2 * len(prompts)), 4)
    tiny = StableDiffusionPipeline(**build_tiny_sd_components(seed=0))
    tiny.set_progress_bar_config(disable=True)
    control = generate(tiny, prompts, args.guidance, args.sample_steps, size=64)
    res["random_tiny_sd"] = agreement(control, items)
    res["chance"] = {"color": 1 / len(world.COLORS), "shape": 1 / len(world.TRAIN_SHAPES)}
    save_grid(guided[:32], out / "samples.png")
    return res


def model_card(args, vae_state, state, metrics, sizes) -> str:
    g, u, r = metrics["guided"], metrics["unguided"], metrics["random_tiny_sd"]
    ok = g["color"] >= 0.8 and g["shape"] >= 0.7
    command = "python -m pixelmill.toy.train_sd " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a != "--card-only")
    uc, vc = unet_config(args.vae_factor), vae_config(args.vae_factor)
    dec = vae_state.get("decoder")
    dec_line = dec_time = dec_note = ""
    if dec:
        runs = dec.get("sessions", 1)
        dec_line = (f";\n  then the decoder alone fine-tuned {dec['steps']} steps of batch {args.vae_batch}"
                    f"{f' in {runs} runs' if runs > 1 else ''} ({dec['seconds'] / 60:.1f} min, L1 + MSE,"
                    f" encoder frozen): RMSE {dec['rmse']:.4f}")
        dec_time = f" + decoder {dec['seconds'] / 60:.1f} min"
        dec_note = ("; the decoder phase reads only the frozen encoder, so it can also run beside the\n"
                    "  UNet phase (`--decoder-only`, a second process)")
    return f"""# toy Stable Diffusion (pixelmill toy world)

A small text-to-image latent diffusion model in diffusers `StableDiffusionPipeline`
format, trained from scratch on CPU by pixelmill's own trainer core
(`pixelmill/tasks/train/core.py`, method `text_to_image`) on toy-world images
(`pixelmill/toy/world.py`: {world.IMAGE_SIZE}x{world.IMAGE_SIZE}, one shape in one of
{len(world.COLORS)} colours on a plain or two-tone background) and their grammar
captions. It knows only this world; every figure below is a toy-world number.
It never saw a **{world.HELD_OUT_SHAPE}** (`world.HELD_OUT_SHAPE`): fine-tuning methods teach it.

## Load it

`toy:sd` anywhere a model is accepted (e.g. `model: toy:sd` in an edit config), or by
path: `pixelmill.models.loading.load_text2img_pipeline("toy:sd")` /
`load_img2img_pipeline("toy:sd")`. It generates {world.IMAGE_SIZE}x{world.IMAGE_SIZE} images
(the pipeline's default size); other sizes are outside its training.

## Architecture

- VAE: `AutoencoderKL`, blocks {list(vc["block_out_channels"])}, {vc["layers_per_block"]} layer per block,
  {args.vae_factor}x downsampling, {LATENT_CHANNELS} latent channels
  ({world.IMAGE_SIZE}px -> {LATENT_CHANNELS}x{uc["sample_size"]}x{uc["sample_size"]}),
  scaling factor {vae_state["scaling_factor"]:.4f}; reconstruction RMSE {vae_state["rmse"]:.4f} on [0, 1]
  (trained {vae_state["steps"]} steps of batch {args.vae_batch}, {vae_state["seconds"] / 60:.1f} min,
  MSE + {args.kl_weight} KL){dec_line}
- UNet: `UNet2DConditionModel`, sample size {uc["sample_size"]}, blocks {list(uc["block_out_channels"])},
  {uc["layers_per_block"]} layer per block, down {list(uc["down_block_types"])},
  cross-attention dim {uc["cross_attention_dim"]}
- text encoder: `CLIPTextModel`, width {TEXT_WIDTH}, 2 layers, 4 heads, 77 positions, **frozen random
  weights**; tokenizer: the real CLIP BPE tokenizer (49,408 tokens, built offline from
  open_clip's BPE, `pixelmill.models.tokenizer`). Every colour and shape word of the
  grammar is its own token, so a fixed random encoder already gives them distinct
  per-token states; the UNet's cross-attention learns to read them. Frozen, its
  embeddings are cached and every training step is UNet-only.
- scheduler: DDIM with SD 1.x's betas (scaled linear, 1000 steps, epsilon prediction)
- sizes (fp16 safetensors): {", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())}

## Training

- command: `{command}`
- data: {args.rows} rows of world seed {TRAIN_SEED} written by `write_toy_dataset` with
  `exclude_shapes=[{world.HELD_OUT_SHAPE!r}]` (shapes {", ".join(world.TRAIN_SHAPES)}), no flips (captions
  name positions); {args.caption_dropout:.0%} of captions replaced by the empty prompt per step
- UNet: {state["step"]} steps of batch {args.batch} through `Trainer.step`, AdamW lr {args.lr}
  (warm-up {args.warmup} steps, cosine to zero at {args.max_minutes:.0f} min of training), no weight decay,
  gradient clipping 1.0, fp32
- wall time: VAE {vae_state["seconds"] / 60:.1f} min + UNet {state["train_seconds"] / 60:.1f} min{dec_time} on
  {args.threads} CPU thread(s) each, on a shared 2-core machine{dec_note}

## Measured

{metrics["prompts"]} held-out prompts (the first rows of world seed {EVAL_SEED}, training shapes only),
one sample each, DDIM {metrics["sample_steps"]} steps at {world.IMAGE_SIZE}x{world.IMAGE_SIZE}, loaded back
from this folder with `load_text2img_pipeline` (fp32 on CPU); an image agrees when the
frozen detectors (`pixelmill/toy/detect.py`) read the prompt's colour / shape.
The negative control is the random-weight tiny SD (`pixelmill.models.tiny`, 64x64,
resized to 32x32) on the same prompts. {"Targets met." if ok else "NOT ALL TARGETS MET: see the table."}

| model | colour | shape | both |
|---|---|---|---|
| toy SD, guidance {metrics["guidance"]} (target colour >= 0.8, shape >= 0.7) \
| {g["color"]:.3f} | {g["shape"]:.3f} | {g["both"]:.3f} |
| toy SD, no guidance (scale 1) | {u["color"]:.3f} | {u["shape"]:.3f} | {u["both"]:.3f} |
| random tiny SD (negative control) | {r["color"]:.3f} | {r["shape"]:.3f} | {r["both"]:.3f} |
| chance | {1 / len(world.COLORS):.3f} | {1 / len(world.TRAIN_SHAPES):.3f} | |

`samples.png`: the first 32 guided samples (prompts: `eval_prompts(32)` in
`pixelmill/toy/train_sd.py`).

## Retrain

Retraining adds the weights' size to the repository's history: retrain rarely.

    nohup {command} > sd-train.log 2>&1 &
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    start = time.time()
    work, out = Path(args.work), Path(args.out)
    if args.card_only:
        m = json.loads((out / "metrics.json").read_text())
        state = {"step": m["unet_steps"], "train_seconds": m["unet_train_minutes"] * 60}
        (out / "MODEL_CARD.md").write_text(model_card(args, m["vae"], state, m, m["weights_bytes"]))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    parts = build_parts(args.seed, args.vae_factor)
    rows, pixels = dataset_rows(work, args.rows)
    vae_state = train_vae(args, work, parts["vae"], pixels)
    parts["vae"].eval()
    if args.decoder_only:
        finetune_decoder(args, work, parts["vae"], pixels)
        return 0
    method, state = train_unet(args, work, parts, rows, pixels)
    if args.decoder_minutes > 0:
        vae_state = {**vae_state, "decoder": finetune_decoder(args, work, parts["vae"], pixels)}
    del rows, pixels
    save_shipped(method, out)
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in sorted(out.iterdir())
             if d.is_dir() and any(d.glob("*.safetensors"))}
    metrics = measure(out, args)
    metrics.update({"unet_steps": state["step"], "unet_train_minutes": round(state["train_seconds"] / 60, 2),
                    "vae": vae_state, "weights_bytes": sizes, "total_minutes": round((time.time() - start) / 60, 2)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(args, vae_state, state, metrics, sizes))
    print(json.dumps(metrics), flush=True)
    print(f"shipped {out} ({sum(sizes.values()) / 1e6:.2f} MB) after {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
