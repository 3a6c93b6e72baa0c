"""Train the toy CLIP on toy-world images and captions, and ship it with its model card.

A small contrastive loop of pixelmill's own: open_clip's ``ClipLoss`` (symmetric
InfoNCE, learnable temperature) on image/caption pairs, plus a text-text geometry term
that pulls captions naming the same colour and shape above ``--same-margin`` cosine and
pushes captions differing in either below ``--diff-margin``, so that the 0.85 caption
retrieval threshold separates "same object" from "another object". Each row brings a
second caption from another template for that term.

Resumable: every ``--checkpoint-minutes`` the model, AdamW state and step go to
``--work`` (safetensors + JSON, written atomically); rerunning the same command resumes.
Batches depend only on (seed, step), so a resumed run sees the batches it would have
seen. One thread by default (other work shares the machine). At the end the weights go
to ``--out`` in fp16 (``open_clip_config.json`` + ``open_clip_model.safetensors``), are
loaded back through ``pixelmill.models.load_clip`` and measured on held-out rows, and
``MODEL_CARD.md`` + ``metrics.json`` are written beside them::

    nohup python -m pixelmill.toy.train_clip --out pixelmill/toy/models/clip > clip-train.log 2>&1 &
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
import torch.nn.functional as F

from pixelmill.toy import clip as toy_clip
from pixelmill.toy import world

DEFAULT_WORK = Path(".pixelmill") / "toy-train" / "clip"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(toy_clip.PACKAGED_CLIP), help="folder for the shipped model")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints and the training log")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--geometry-weight", type=float, default=10.0)
    p.add_argument("--same-margin", type=float, default=0.92)
    p.add_argument("--diff-margin", type=float, default=0.75)
    p.add_argument("--hard-from-step", type=int, default=None,
                   help="from this step on, average each geometry hinge over its violating pairs only")
    p.add_argument("--pool-rows", type=int, default=60000, help="training rows of world seed 1")
    p.add_argument("--eval-rows", type=int, default=1000, help="held-out rows of world seed 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--max-minutes", type=float, default=38.0,
                   help="stop training (and ship what there is) after this much training time")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace, seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to zero at ``--steps`` or at ``--max-minutes`` of
    training, whichever comes first (a busy machine still ends on an annealed model)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = max((step - args.warmup) / max(1, args.steps - args.warmup), seconds / (args.max_minutes * 60))
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if plain else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def geometry_loss(text: torch.Tensor, keys: torch.Tensor, same_margin: float, diff_margin: float,
                  hard: bool = False) -> torch.Tensor:
    """Squared hinges on caption-caption cosines: same (colour, shape) >= ``same_margin``,
    different <= ``diff_margin``.

    ``hard``: each hinge is averaged over the pairs that violate it, not over all pairs, so
    a few confusable pairs (a heart and a circle of one colour) are not diluted by the
    thousands of pairs already far apart."""
    cos = text @ text.T
    same = keys[:, None] == keys[None, :]
    off_diagonal = ~torch.eye(len(keys), dtype=torch.bool)
    pull = F.relu(same_margin - cos)[same & off_diagonal]
    push = F.relu(cos - diff_margin)[~same]
    if hard:
        pull, push = pull[pull > 0], push[push > 0]
    zero = cos.new_zeros(())
    return (pull.pow(2).mean() if pull.numel() else zero) + (push.pow(2).mean() if push.numel() else zero)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(work: Path, model: torch.nn.Module, opt: torch.optim.AdamW, state: dict[str, Any]) -> None:
    """Model and AdamW moments as safetensors, step and timing as JSON (JSON last: it marks completeness)."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"exp_avg.{names[id(p)]}"] = st["exp_avg"].contiguous()
                tensors[f"exp_avg_sq.{names[id(p)]}"] = st["exp_avg_sq"].contiguous()
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write(work / "checkpoint.safetensors", lambda t: save_file(tensors, str(t)))
    _atomic_write(work / "checkpoint.json", lambda t: t.write_text(json.dumps(state, indent=2)))


def load_checkpoint(work: Path, model: torch.nn.Module, opt: torch.optim.AdamW) -> dict[str, Any] | None:
    """Restore a checkpoint written by ``save_checkpoint``; None when there is none."""
    from safetensors.torch import load_file

    if not (work / "checkpoint.json").is_file():
        return None
    state = json.loads((work / "checkpoint.json").read_text())
    tensors = load_file(str(work / "checkpoint.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in model.named_parameters():
        if f"exp_avg.{name}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(state["step"])), "exp_avg": tensors[f"exp_avg.{name}"],
                            "exp_avg_sq": tensors[f"exp_avg_sq.{name}"]}
    return state


def save_shipped(model: torch.nn.Module, out: Path) -> None:
    """Write the open_clip folder: config + fp16 safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(toy_clip.toy_clip_config(), indent=2) + "\n")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def training_data(work: Path, pool_rows: int, tokenizer) -> tuple[torch.Tensor, ...]:
    """``(images, caption tokens, second-caption tokens, keys)`` of the training rows,
    cached in ``work`` so that a resumed run does not draw them again."""
    from safetensors.torch import load_file, save_file

    cache = work / f"pool-{toy_clip.TRAIN_SEED}-{pool_rows}.safetensors"
    if cache.is_file():
        t = load_file(str(cache))
        return t["pixels"], t["captions"], t["alts"], t["keys"]
    t0 = time.time()
    rows = toy_clip.make_rows(toy_clip.TRAIN_SEED, 0, pool_rows)
    t = {"pixels": torch.from_numpy(rows.images).contiguous(), "captions": tokenizer(rows.captions).contiguous(),
         "alts": tokenizer(rows.alt_captions).contiguous(), "keys": torch.from_numpy(rows.keys).contiguous()}
    _atomic_write(cache, lambda p: save_file(t, str(p)))
    print(f"data: {pool_rows} training rows in {time.time() - t0:.0f}s", flush=True)
    return t["pixels"], t["captions"], t["alts"], t["keys"]


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) and return the final training state."""
    from open_clip.loss import ClipLoss

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    work = Path(args.work)
    log = (work / "log.jsonl")
    work.mkdir(parents=True, exist_ok=True)
    model = toy_clip.build_toy_clip(seed=args.seed)
    opt = make_optimizer(model, args)
    state = load_checkpoint(work, model, opt) or {"step": 0, "train_seconds": 0.0}
    if state["step"]:
        print(f"resumed from step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)", flush=True)
    tokenizer = toy_clip.toy_tokenizer()
    images, captions, alts, keys = training_data(work, args.pool_rows, tokenizer)
    evals = toy_clip.make_rows(toy_clip.EVAL_SEED, 0, min(500, args.eval_rows))
    loss_fn = ClipLoss()
    model.train()
    last_ckpt = time.time()
    session_start, trained_before = time.time(), state["train_seconds"]
    while state["step"] < args.steps:
        step = state["step"]
        elapsed = trained_before + time.time() - session_start
        if elapsed > args.max_minutes * 60:
            print(f"time limit reached at step {step}", flush=True)
            break
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        lr = lr_at(step, args, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr
        img = model.encode_image(toy_clip.images_to_tensor(images[idx].numpy()), normalize=True)
        txt = model.encode_text(torch.cat([captions[idx], alts[idx]]), normalize=True)
        scale = model.logit_scale.exp()
        contrastive = loss_fn(img, txt[: args.batch], scale)
        hard = args.hard_from_step is not None and step >= args.hard_from_step
        geometry = geometry_loss(txt, torch.cat([keys[idx], keys[idx]]), args.same_margin, args.diff_margin, hard)
        loss = contrastive + args.geometry_weight * geometry
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        state["step"] = step + 1
        state["train_seconds"] = trained_before + time.time() - session_start
        record: dict[str, Any] = {}
        if state["step"] % args.log_every == 0 or state["step"] == 1:
            record = {"step": state["step"], "loss": round(loss.item(), 4), "clip": round(contrastive.item(), 4),
                      "geometry": round(geometry.item(), 5), "logit_scale": round(scale.item(), 2),
                      "lr": round(lr, 7), "minutes": round(state["train_seconds"] / 60, 2)}
        if state["step"] % args.eval_every == 0:
            record.update({"step": state["step"], **{f"eval_{k}": round(v, 4) for k, v in
                           toy_clip.evaluate(model, tokenizer, evals).as_dict().items()}})
        if record:
            with log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(work, model, opt, state)
            last_ckpt = time.time()
    save_checkpoint(work, model, opt, state)
    save_shipped(model, Path(args.out))
    return state


def measure_shipped(out: Path, eval_rows: int) -> toy_clip.ClipMetrics:
    """Load the shipped folder through pixelmill's model loading and measure it on held-out rows."""
    from pixelmill.models import load_clip

    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip(str(out.resolve()), device="cpu")
    rows = toy_clip.make_rows(toy_clip.EVAL_SEED, 0, eval_rows)
    return toy_clip.evaluate(model, tokenizer, rows, preprocess=preprocess)


def model_card(args: argparse.Namespace, state: dict[str, Any], metrics: toy_clip.ClipMetrics, size: int) -> str:
    """The MODEL_CARD.md text."""
    m = metrics
    cfg = toy_clip.MODEL_CFG
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    ok = (m.recall_at_1 >= 0.9 and m.pair_accuracy >= 0.95 and m.agreeing_above >= 0.95
          and m.differing_below >= 0.95)
    command = "python -m pixelmill.toy.train_clip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    hard_note = ("" if args.hard_from_step is None else
                 f"; from step {args.hard_from_step} on, each hinge averaged over its violating pairs only"
                 " (hard negatives: confusable captions such as a heart and a circle of one colour)")
    return f"""# toy CLIP (pixelmill toy world)

A small open_clip `CLIP` trained from scratch by pixelmill's own contrastive loop
(`pixelmill/toy/train_clip.py`, open_clip's `ClipLoss` + a text-text geometry term) on
toy-world images (`pixelmill/toy/world.py`: {world.IMAGE_SIZE}x{world.IMAGE_SIZE}, one shape of
{", ".join(world.SHAPES)} in {", ".join(world.COLORS)}, plain or two-tone backgrounds) and
their grammar captions. It knows only this world: it is a test and demo model, not a
general image-text model. Every figure below is a toy-world number.

## Load it

`pixelmill.models.load_clip("toy:clip")`, or by path, `load_clip("<this folder>")`
(open_clip `local-dir:` layout: `open_clip_config.json` + `open_clip_model.safetensors`);
anywhere a config takes a `clip_model`. Tokenizer: open_clip's `SimpleTokenizer` (the
real CLIP BPE, 49,408 tokens, bundled with open_clip), context length {t["context_length"]}.

## Architecture

- image: ViT, {v["image_size"]} px, patch {v["patch_size"]}, width {v["width"]}, {v["layers"]} layers,
  {v["width"] // v["head_width"]} heads, MLP ratio {v["mlp_ratio"]}
- text: causal transformer, width {t["width"]}, {t["layers"]} layers, {t["heads"]} heads, MLP ratio
  {t["mlp_ratio"]}, pooled at the end token
- embedding dimension {cfg["embed_dim"]}; {size / 1e6:.2f} MB of fp16 safetensors

## Training

- command: `{command}`
- data: {args.pool_rows} rows of world seed {toy_clip.TRAIN_SEED} (all five shapes), a second
  caption per row from another template for the geometry term
- {state["step"]} steps of batch {args.batch}, AdamW lr {args.lr} (warm-up {args.warmup}, cosine),
  weight decay {args.weight_decay}; loss = ClipLoss + {args.geometry_weight} x geometry (squared
  hinges: same colour and shape >= {args.same_margin} cosine, else <= {args.diff_margin}){hard_note}
- wall time: {state["train_seconds"] / 60:.1f} minutes of training on {args.threads} CPU thread(s)

## Measured (held out: the first {m.captions} rows of world seed {toy_clip.EVAL_SEED})

Loaded back from this folder with `pixelmill.models.load_clip` (fp32 on CPU, open_clip's
eval preprocessing); the gallery of each caption is the {m.captions} images of the same rows.
{"All targets met." if ok else "NOT ALL TARGETS MET: see the table."}

| measure | target | measured |
|---|---|---|
| text->image recall@1 (top image: caption's colour and shape), {m.captions} captions | >= 0.9 | {m.recall_at_1:.4f} |
| ... colour only / shape only | | {m.color_recall_at_1:.4f} / {m.shape_recall_at_1:.4f} |
| caption pairs right at 0.85 (>= 0.85 iff same colour, shape), {m.pairs} | >= 0.95 | {m.pair_accuracy:.4f} |
| ... same colour and shape: cos >= 0.85 ({m.agreeing_pairs} pairs) | >= 0.95 | {m.agreeing_above:.4f} |
| ... colour or shape differs: cos < 0.85 ({m.differing_pairs} pairs) | >= 0.95 | {m.differing_below:.4f} |
| ... one of colour, shape differs ({m.one_attribute_differing_pairs}) | | {m.one_attribute_differing_below:.4f} |
| mean caption cosine, same / different colour and shape | | {m.mean_cos_agreeing:.3f} / {m.mean_cos_differing:.3f} |

## Retrain

Retraining adds the weights' size to the repository's history: retrain rarely.

    nohup {command} > clip-train.log 2>&1 &
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    state = train(args)
    out = Path(args.out)
    metrics = measure_shipped(out, args.eval_rows)
    size = (out / WEIGHTS_NAME).stat().st_size
    (out / "metrics.json").write_text(json.dumps({**metrics.as_dict(), "steps": state["step"],
                                                  "train_minutes": round(state["train_seconds"] / 60, 2),
                                                  "weights_bytes": size}, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(args, state, metrics, size))
    print(json.dumps(metrics.as_dict()), flush=True)
    print(f"shipped {out} ({size / 1e6:.2f} MB) after {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
