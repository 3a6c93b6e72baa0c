"""Two-object scenes for the toy world, and ``toy:sd-two``: the toy SD's UNet fine-tuned to draw them.

Custom Diffusion's multi-concept claim is about composing two *objects* in one image (a pet and
a chair). The one-object world cannot show that: a second concept there can only be an attribute
of the one object. A two-object scene is 64 x 32 pixels: object 1 in the left 32 x 32 half,
object 2 in the right, each drawn as the one-object world draws its object (same sizes and
positions within its half, distinct colours, one neutral background), captioned
"a red circle and a purple star" (30 %: "... on a gray background"). The frozen detectors read
each half on its own (``detect_halves``).

``toy:sd-two`` starts from ``toy:sd`` and fine-tunes the whole UNet, two of every three batches
on two-object scenes (12,000 rows, world seed 77) and one on one-object rows (8,000, world seed
11, the toy SD's training world) so it keeps drawing one object at 32 x 32; the heart is never
drawn. It ships only its UNet (fp16) and scheduler; the VAE, text encoder and tokenizer are
``toy:sd``'s (``shared_components.json``). The loop is a plain epsilon-prediction loop over
cached VAE posteriors and text embeddings (the trainer core's aspect buckets would resize 64 x 32
scenes), batch 32, AdamW, 10 % of captions dropped, gradient norm clipped at 1, the learning rate
warming up over 200 steps then following a cosine to zero at ``--minutes`` of training. Every 4
minutes the UNet and AdamW state go to ``--work``; rerunning resumes::

    nohup python -m pixelmill.toy.two_objects --work .pixelmill/toy-train/sd-two --minutes 105 > two.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pixelmill.toy import world

HEIGHT, WIDTH = world.IMAGE_SIZE, 2 * world.IMAGE_SIZE
TWO_SEED, ONE_SEED, EVAL_SEED = 77, 11, 99
DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "sd-two"
SHARED = ("text_encoder", "tokenizer", "vae")


def two_object_row(seed: int, index: int, shapes=world.TRAIN_SHAPES):
    """Scene ``index`` of world ``seed``: ``(64x32 image, caption, ((shape, colour) left, (shape, colour) right))``."""
    from PIL import Image

    rng = np.random.default_rng([int(seed), int(index), 3])
    colors = list(world.COLORS)
    c1 = colors[rng.integers(len(colors))]
    rest = [c for c in colors if c != c1]
    c2 = rest[rng.integers(len(rest))]
    neutrals = list(world.NEUTRALS)
    bg = neutrals[rng.integers(len(neutrals))]
    canvas = np.empty((HEIGHT, WIDTH, 3), np.float32)
    canvas[:] = world._jittered(rng, world.BACKGROUND_COLORS[bg])
    objects = []
    for k, color in enumerate((c1, c2)):
        obj = world.sample_object(rng, shapes)  # its shape, size and place in its half; colour set above
        x0, y0, x1, y1 = obj.box
        alpha = world.shape_coverage(obj.shape, (x0 + HEIGHT * k, y0, x1 + HEIGHT * k, y1), HEIGHT, WIDTH)[..., None]
        canvas = canvas * (1 - alpha) + world._jittered(rng, world.COLORS[color]) * alpha
        objects.append((obj.shape, color))
    caption = f"a {c1} {objects[0][0]} and a {c2} {objects[1][0]}"
    if rng.random() < 0.3:
        caption += f" on a {bg} background"
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    return image, world._articles(caption), tuple(objects)


def detect_halves(image):
    """The detectors' reading of the left and the right half of a 64x32 scene."""
    from pixelmill.toy.detect import detect

    a = np.asarray(image.convert("RGB"))
    half = a.shape[1] // 2
    return detect(a[:, :half]), detect(a[:, half:])


def draw(pipe, prompts: list[str], width: int, seed: int, guidance: float | None = None, steps: int | None = None):
    """``pipe``'s images of ``prompts`` at 32 px high and ``width`` wide, one seeded generator for the batch."""
    import torch

    from pixelmill.toy.concepts import GUIDANCE, SAMPLING_STEPS

    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, guidance_scale=GUIDANCE if guidance is None else guidance,
                num_inference_steps=steps or SAMPLING_STEPS, height=HEIGHT, width=width, generator=g).images


def scene_scores(pipe, n: int = 100, seed: int = EVAL_SEED) -> dict[str, float]:
    """Held-out two-object captions (world ``seed``) and one-object captions (world 12): the share of
    scenes with both halves right (shape and colour), of halves right, and of one-object images right."""
    items = [two_object_row(seed, i) for i in range(n)]
    both = each = 0
    for image, (_, _, objects) in zip(draw(pipe, [c for _, c, _ in items], WIDTH, 1000), items):
        got = tuple((d.shape, d.color) for d in detect_halves(image))
        both += got == objects
        each += (got[0] == objects[0]) + (got[1] == objects[1])
    from pixelmill.toy.detect import detect

    rows = [world.make_row(12, i, world.TRAIN_SHAPES) for i in range(n)]
    ok = 0
    for image, (_, _, obj) in zip(draw(pipe, [r[1] for r in rows], HEIGHT, 2000), rows):
        d = detect(image)
        ok += d.shape == obj.shape and d.color == obj.color
    return {"scenes": n, "two_both_right": both / n, "two_halves_right": each / (2 * n), "one_right": ok / n}


# -- training -----------------------------------------------------------------------------------
def _encode(vae, images) -> tuple[Any, Any]:
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            pixels = torch.stack([torch.from_numpy(np.asarray(x, np.float32) / 127.5 - 1).permute(2, 0, 1)
                                  for x in images[i:i + 256]])
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _embed(tokenizer, text_encoder, prompts: list[str]):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), 256):
            ids = tokenizer(prompts[i:i + 256], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out.append(text_encoder(ids)[0])
    return torch.cat(out)


def train(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``args.base``'s UNet on the mix; returns (the pipeline with the trained UNet, state)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from pixelmill.models.loading import resolve_model_name

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_name(args.base), safety_checker=None,
                                                   use_safetensors=True)
    vae, unet, te, tok = pipe.vae.float(), pipe.unet.float(), pipe.text_encoder.float(), pipe.tokenizer
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    t0 = time.time()
    two = [two_object_row(TWO_SEED, i) for i in range(args.two)]
    one = [world.make_row(ONE_SEED, i, world.TRAIN_SHAPES) for i in range(args.one)]
    data = {}
    for name, rows in (("two", two), ("one", one)):
        mean, std = _encode(vae, [r[0] for r in rows])
        data[name] = (mean, std, _embed(tok, te, [r[1] for r in rows]))
    empty = _embed(tok, te, [""])[0]
    scale = vae.config.scaling_factor
    print(f"caches: {len(two)} scenes, {len(one)} one-object rows in {time.time() - t0:.0f}s", flush=True)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    state: dict[str, Any] = {"step": 0, "seconds": 0.0}
    ckpt, meta = work / "ckpt.safetensors", work / "ckpt.json"
    if meta.is_file():
        state = json.loads(meta.read_text())
        saved = load_file(str(ckpt))
        unet.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("unet.")})
        adam_step = json.loads((work / "opt.json").read_text())["step"]
        for i, p in enumerate(params):
            if f"m.{i}" in saved:
                opt.state[p] = {"step": torch.tensor(float(adam_step)), "exp_avg": saved[f"m.{i}"],
                                "exp_avg_sq": saved[f"v.{i}"]}
        print(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} min trained)", flush=True)

    def checkpoint() -> None:
        tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
        adam_step = 0
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st:
                tensors[f"m.{i}"], tensors[f"v.{i}"] = st["exp_avg"].contiguous(), st["exp_avg_sq"].contiguous()
                adam_step = int(st["step"])
        tmp = Path(str(ckpt) + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(ckpt)
        (work / "opt.json").write_text(json.dumps({"step": adam_step}))
        meta.write_text(json.dumps(state))

    unet.train()
    total = args.minutes * 60
    log = open(work / "log.jsonl", "a")
    start, before, last = time.time(), state["seconds"], time.time()
    losses: list[float] = []
    while before + time.time() - start <= total:
        elapsed, step = before + time.time() - start, state["step"]
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / total)))
        for group in opt.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(step)
        mean, std, emb_all = data["two" if step % 3 != 2 else "one"]
        idx = torch.randint(len(mean), (args.batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch,), generator=gen)
        emb = emb_all[idx].clone()
        emb[torch.rand(args.batch, generator=gen) < 0.1] = empty
        loss = F.mse_loss(unet(noise_schedule.add_noise(latents, noise, t), t, emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        state["step"], state["seconds"] = step + 1, before + time.time() - start
        if state["step"] % 100 == 0:
            log.write(json.dumps({"step": state["step"], "loss": round(sum(losses) / len(losses), 5), "lr": lr,
                                  "minutes": round(state["seconds"] / 60, 2)}) + "\n")
            log.flush()
            losses = []
        if time.time() - last > 240:
            checkpoint()
            last = time.time()
    checkpoint()
    unet.eval()
    return pipe, state


# -- shipping -----------------------------------------------------------------------------------
def ship(pipe, out: Path, base: str = "toy:sd") -> int:
    """Write the UNet (fp16), scheduler and model index to ``out``, naming ``base`` for the rest; returns bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("unet", "scheduler"):
        shutil.rmtree(out / stale, ignore_errors=True)
    pipe.unet.save_config(str(out / "unet"))
    weights = {k: v.to(torch.float16).contiguous() for k, v in pipe.unet.state_dict().items()}
    save_file(weights, str(out / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    pipe.scheduler.save_config(str(out / "scheduler"))
    from pixelmill.models.loading import resolve_model_name

    shutil.copy2(Path(resolve_model_name(base)) / "model_index.json", out / "model_index.json")
    (out / "shared_components.json").write_text(
        json.dumps({"components": {n: base.removeprefix("toy:") for n in SHARED}}, indent=1) + "\n")
    return (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


def model_card(args: argparse.Namespace, state: dict[str, Any], metrics: dict[str, Any]) -> str:
    command = "python -m pixelmill.toy.two_objects " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    m, b = metrics["trained"], metrics["base"]
    return f"""# toy:sd-two

`toy:sd` (the toy Stable Diffusion) with its UNet fine-tuned to draw two-object scenes: 64 x 32
pixels, one object per 32 x 32 half, captioned "a red circle and a purple star"
(`pixelmill/toy/two_objects.py`). It keeps drawing one object at 32 x 32. Only the UNet
({metrics["unet_bytes"] / 1e6:.2f} MB, fp16) and the scheduler are here; the VAE, text encoder and
tokenizer are `toy:sd`'s (`shared_components.json`). A toy for pixelmill's quality tests, not
a model of anything: trained on synthetic shapes, never on the held-out heart.

## Training
- From `{args.base}`; {state["step"]:,} steps of batch {args.batch} in {state["seconds"] / 60:.0f} min
  ({args.two:,} scenes of world {TWO_SEED} in two of every three batches, {args.one:,} one-object
  rows of world {ONE_SEED} in the third), AdamW lr {args.lr:g} (warm-up 200 steps, cosine to zero at
  {args.minutes:g} min), 10 % of captions dropped, {args.threads} torch thread(s).
- Command: `{command}`

## Measured (guidance 4, 20 DDIM steps; detectors on each half)
| | toy:sd-two | toy:sd |
| --- | --- | --- |
| held-out scenes (world {EVAL_SEED}), both halves right | {m["two_both_right"]:.2f} | {b["two_both_right"]:.2f} |
| halves right | {m["two_halves_right"]:.2f} | {b["two_halves_right"]:.2f} |
| one-object prompts (world 12) right | {m["one_right"]:.2f} | {b["one_right"]:.2f} |

{metrics["scenes"]} prompts each; chance for a half is 1/{len(world.COLORS) * len(world.TRAIN_SHAPES)}.
`samples.png`: the first 16 held-out scenes (16, not 32: the toy models share 40 MB).
"""


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m pixelmill.toy.two_objects", description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="checkpoints and log (rerunning resumes)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where to ship the model (default: %(default)s)")
    p.add_argument("--base", default="toy:sd")
    p.add_argument("--minutes", type=float, default=105.0, help="training time; the cosine ends there")
    p.add_argument("--two", type=int, default=12000, help="two-object scenes")
    p.add_argument("--one", type=int, default=8000, help="one-object rows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", type=int, default=100, help="held-out prompts of each kind to measure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, state = train(args)
    out = Path(args.out)
    size = ship(pipe, out, args.base)
    pipe.set_progress_bar_config(disable=True)
    from pixelmill.toy.concepts import _pipeline

    metrics = {"scenes": args.eval, "trained": scene_scores(pipe, args.eval),
               "base": scene_scores(_pipeline(args.base), args.eval), "unet_bytes": size,
               "steps": state["step"], "train_minutes": round(state["seconds"] / 60, 2)}
    from PIL import Image

    from pixelmill.toy.quality import save_sheet

    sheet = Image.new("RGB", (WIDTH * 8, HEIGHT * 2))
    items = [two_object_row(EVAL_SEED, i) for i in range(16)]
    for i, image in enumerate(draw(pipe, [c for _, c, _ in items], WIDTH, 1000)):
        sheet.paste(image, ((i % 8) * WIDTH, (i // 8) * HEIGHT))
    save_sheet(sheet, out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(args, state, metrics))
    print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
