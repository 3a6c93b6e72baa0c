"""Custom Diffusion on the toy world: two concepts jointly against two merged single-concept models.

The toy images hold one object, so "both concepts in one image" cannot be two objects. The
two concepts are the two things the detectors read from one object:

- ``<heart>``, a **shape** concept: the held-out heart (``world.HELD_OUT_SHAPE``, never drawn by
  the toy SD), in four colours (``HEART_COLORS``) so the token does not also mean a colour;
- ``<hue>``, a **colour** concept: blue (``HUE_COLOR``) circles, squares, triangles and stars,
  taught as "a photo of a <hue> shape" (the toy SD knows blue, never the token).

"A photo of a <hue> <heart>" shows both when the detectors read a blue heart; base rates for
all prompts are measured with the base model. Each job runs through pixelmill's trainer
(``plan_campaign`` + ``run_job``); the artifacts load with ``apply_adapters`` (diffusers' own
loaders). The merge is the naive one: the single-concept models' cross-attention K/V
*deltas* from the base added (``sum``: W0 + dA + dB) or averaged (``average``: (WA + WB) / 2),
and both tokens' embeddings loaded; pixelmill's ``apply_adapters`` refuses two Custom
Diffusion adapters, so the merge is built here, on one loaded adapter. The paper's own merge
(constrained optimisation, closed form: ``optimised_pipeline``) is measured beside them, and
``--class-images N`` trains every job with the prior (N base-model images of "a photo of a shape").

``python -m pixelmill.toy.custom_diffusion_quality --out DIR [--fast]`` writes
``custom_diffusion.json`` there (the retrieval-prior campaign is in
``custom_diffusion_prior.py``); ``--trial NAME`` runs one of the README's further trial designs
(``TRIALS``: the toy grammar's per-image prompts, a purple hue, initializers, a prior in that grammar)
and writes ``custom_diffusion_trial-NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pixelmill.toy import world
from pixelmill.toy.concepts import CLASS_WORD, _pipeline, read, run_campaign_job, sample, share

HEART_COLORS = ("red", "green", "yellow", "orange")
HUE_COLOR = "blue"
WORLD_SEED = 31
"""World seed of both concepts' instance images."""
REPORT_SEED = 41
"""Sample seed of the reported figures; settings were chosen on ``TRIAL_SEED``."""
TRIAL_SEED = 43
CONCEPTS: dict[str, dict[str, Any]] = {
    "heart": {"token": "<heart>", "class_word": CLASS_WORD},
    "hue": {"token": "<hue>", "class_word": CLASS_WORD, "instance_prompt": "a photo of a {token} {class}"},
}
PROMPTS = {"heart": "a photo of a <heart>", "hue": "a photo of a <hue> shape", "both": "a photo of a <hue> <heart>"}
LEARNING_RATE = 1e-3
SINGLE_STEPS = 600
JOINT_STEPS = 1200
"""Joint training gets both single jobs' steps (the paper: 250 single, 500 for two concepts)."""
REG_SEED, REG_CAPTIONS = 14, 200
"""The optimisation merge's regularization captions: the first 200 of world seed 14 (toy-grammar captions)."""
FULL = {"samples": 100, "steps_scale": 1.0, "trial": True}
FAST = {"samples": 12, "steps_scale": 0.05}


def write_concept(url: str, which: str, per: int = 2, seed: int = WORLD_SEED) -> list[str]:
    """Instance images: ``heart``, ``per`` hearts of each ``HEART_COLORS``; ``hue``, ``per`` blue
    objects of each training shape. Returns their captions."""
    from pixelmill.toy.samples import toy_indices, write_toy_rows

    if which == "heart":
        wanted = [dict(shape=world.HELD_OUT_SHAPE, color=c) for c in HEART_COLORS]
    else:
        wanted = [dict(shape=s, color=HUE_COLOR) for s in world.TRAIN_SHAPES]
    return write_toy_rows(url, seed, sorted(i for w in wanted for i in toy_indices(seed, per, **w)),
                          {"generator": "pixelmill.toy.custom_diffusion_quality", "concept": which, "seed": seed})


def train_cd(root: Path, concepts: dict[str, dict[str, Any]], steps: int, lr: float = LEARNING_RATE,
             class_images: int = 0) -> tuple[str, dict[str, Any]]:
    """One Custom Diffusion job over ``concepts`` (name -> Concept fields) through the trainer a campaign
    job runs (with the prior when ``class_images``: the concepts name their ``class_data``); returns
    (the artifacts folder, the job's record)."""
    return run_campaign_job(root, concepts, {
        "name": "cd", "method": "custom_diffusion", "concepts": list(concepts),
        "settings": {"learning_rate": lr, "max_steps": steps, "with_prior_preservation": class_images > 0,
                     **({"num_class_images": class_images} if class_images else {})}})


def cd_weights(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from pixelmill.models.adapters import CD_FILE

    return {k: v for k, v in load_file(str(Path(folder) / CD_FILE)).items() if v.numel()}


def merged_pipeline(a: str, b: str, how: str = "sum", base: str = "toy:sd"):
    """The base with ``a``'s adapter loaded, its K/V then replaced by the naive merge with ``b``'s
    (``sum``: W0 + dA + dB; ``average``: (WA + WB) / 2) and ``b``'s token embedding loaded."""
    import torch

    from pixelmill.models.adapters import apply_adapters

    pipe = _pipeline(base)
    apply_adapters(pipe, [{"path": a}])
    wa, wb = cd_weights(a), cd_weights(b)
    if set(wa) != set(wb):
        raise ValueError("the two Custom Diffusion files train different layers")
    procs = pipe.unet.attn_processors
    unet_state = pipe.unet.state_dict()
    with torch.no_grad():
        for key in wa:
            proc_name, param = key.split(".processor.", 1)[0] + ".processor", key.split(".processor.", 1)[1]
            layer = proc_name[: -len(".processor")]
            # to_k_custom_diffusion.weight -> the layer's own to_k.weight (the base W0)
            w0 = unet_state[f"{layer}.{param.replace('_custom_diffusion', '')}"]
            merged = w0 + (wa[key] - w0) + (wb[key] - w0) if how == "sum" else (wa[key] + wb[key]) / 2
            dict(procs[proc_name].named_parameters())[param].copy_(merged.to(w0.dtype))
    tokens = json.loads((Path(b) / "tokens.json").read_text())
    for token in tokens:
        pipe.load_textual_inversion(b, weight_name=f"{token}.safetensors")
    return pipe


def _features(pipe, prompt: str):
    """The text encoder's output rows for ``prompt``'s tokens up to its end token (what K/V see)."""
    import torch

    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    length = int((ids[0] == pipe.tokenizer.eos_token_id).nonzero()[0]) + 1
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0, :length].float()


def optimised_pipeline(a: str, b: str, prompts: dict[str, str], reg_captions: list[str], base: str = "toy:sd"):
    """The paper's merge by constrained optimisation: per K/V matrix, ``W = argmin ||(W - W0) C_reg^T||`` subject
    to ``W C^T = V`` (C: the two concepts' training-prompt features, V: what each fine-tuned matrix makes of
    them), in closed form ``W0 + (V - W0 C^T)(C M C^T)^+ C M``, ``M = (C_reg^T C_reg)^-1``."""
    import torch

    pipe = merged_pipeline(a, b, "sum", base)  # both tokens loaded; K/V are replaced below
    wa, wb = cd_weights(a), cd_weights(b)
    ca, cb = _features(pipe, prompts["a"]), _features(pipe, prompts["b"])
    reg = torch.cat([_features(pipe, c) for c in reg_captions])
    c = torch.cat([ca, cb])
    m = torch.linalg.inv(reg.T @ reg + 1e-4 * torch.eye(reg.shape[1]))
    proj = torch.linalg.pinv(c @ m @ c.T) @ c @ m
    procs, unet_state = pipe.unet.attn_processors, pipe.unet.state_dict()
    with torch.no_grad():
        for key in wa:
            proc_name, param = key.split(".processor.", 1)
            w0 = unet_state[f"{proc_name}.{param.replace('_custom_diffusion', '')}"].float()
            target = torch.cat([ca @ wa[key].float().T, cb @ wb[key].float().T])  # (rows, out)
            merged = w0 + (target.T - w0 @ c.T) @ proj
            dict(procs[proc_name + ".processor"].named_parameters())[param].copy_(merged)
    return pipe


def readout(pipe, n: int, seed: int) -> dict[str, Any]:
    """Each prompt's samples read by the detectors: heart / blue / blue heart shares."""
    out: dict[str, Any] = {}
    for key, prompt in PROMPTS.items():
        found = read(sample(pipe, prompt, n, seed))
        out[key] = {"heart": share(found, world.HELD_OUT_SHAPE), "blue": share(found, color=HUE_COLOR),
                    "blue_heart": share(found, world.HELD_OUT_SHAPE, HUE_COLOR)}
    return out


def measure_composition(out: Path, sizes: dict[str, Any], seed: int = REPORT_SEED,
                        lr: float = LEARNING_RATE) -> dict[str, Any]:
    """Train joint and single-concept Custom Diffusion, merge the singles, read every prompt; writes
    ``out/custom_diffusion.json``."""
    import torch

    from pixelmill.toy.concepts import trained_pipeline

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "cd-runs"
    shutil.rmtree(work, ignore_errors=True)
    data = {k: str(work / f"instances-{k}") for k in CONCEPTS}
    captions = {k: write_concept(data[k], k) for k in CONCEPTS}
    concepts = {k: {**CONCEPTS[k], "instance_data": data[k]} for k in CONCEPTS}
    n, scale, class_images = sizes["samples"], sizes["steps_scale"], sizes.get("class_images", 0)
    if class_images:  # the prior as DreamBooth and Custom Diffusion's generated variant: the base model's images
        from pixelmill.samples import write_image_dataset

        class_prompt = f"a photo of a {CLASS_WORD}"
        write_image_dataset(str(work / "class-images"), sample(_pipeline("toy:sd"), class_prompt, class_images,
                                                               REPORT_SEED + 1000), [class_prompt] * class_images)
        concepts = {k: {**c, "class_data": str(work / "class-images")} for k, c in concepts.items()}
    single_steps, joint_steps = max(10, int(SINGLE_STEPS * scale)), max(20, int(JOINT_STEPS * scale))
    seconds, folders = {}, {}
    for name, subset, steps in (("joint", concepts, joint_steps), ("heart", {"heart": concepts["heart"]},
                                single_steps), ("hue", {"hue": concepts["hue"]}, single_steps)):
        t0 = time.perf_counter()
        folders[name], _ = train_cd(work / name, subset, steps, lr, class_images)
        seconds[name] = round(time.perf_counter() - t0, 1)
    models = {"base": _pipeline("toy:sd"), "joint": trained_pipeline("custom_diffusion", folders["joint"]),
              "heart only": trained_pipeline("custom_diffusion", folders["heart"]),
              "hue only": trained_pipeline("custom_diffusion", folders["hue"]),
              "merged (sum)": merged_pipeline(folders["heart"], folders["hue"], "sum"),
              "merged (average)": merged_pipeline(folders["heart"], folders["hue"], "average"),
              "merged (optimisation)": optimised_pipeline(
                  folders["heart"], folders["hue"], {"a": PROMPTS["heart"], "b": PROMPTS["hue"]},
                  [world.make_row(REG_SEED, i)[1] for i in range(REG_CAPTIONS)])}
    rows = {name: readout(pipe, n, seed) for name, pipe in models.items()}
    trial = {name: readout(pipe, n, TRIAL_SEED) for name, pipe in models.items()} if sizes.get("trial") else None
    doc = {"concepts": {k: {**CONCEPTS[k], "instance_captions": captions[k]} for k in CONCEPTS},
           "prompts": PROMPTS, "samples": n, "sample_seed": seed, "learning_rate": lr,
           "steps": {"single": single_steps, "joint": joint_steps}, "train_seconds": seconds,
           "class_images": class_images,
           "merge": "sum: W0 + (WA - W0) + (WB - W0); average: (WA + WB) / 2 (K/V of every cross-attention "
                    "layer); both tokens' embeddings loaded; optimisation: the paper's closed form over the two "
                    "training prompts' features, regularised by 200 toy captions", "models": rows,
           "trial_seed": TRIAL_SEED if trial else None, "trial": trial}
    (out / "custom_diffusion.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


PURPLE = "purple"
TRIAL_BASE: dict[str, Any] = {
    "a": {"token": "<heart>", "template": "a {color} {token}",
          "wanted": [{"shape": world.HELD_OUT_SHAPE, "color": c} for c in HEART_COLORS]},
    "b": {"token": "<hue>", "template": "a {token} {shape}",
          "wanted": [{"shape": s, "color": PURPLE} for s in world.TRAIN_SHAPES]},
    "joint_steps": 1200, "single_steps": 600, "lr": LEARNING_RATE, "samples": 40, "seed": TRIAL_SEED,
    "prompts": {"a": "a <heart>", "b": "a <hue> shape", "both": "a <hue> <heart>",
                "known_colour": "a purple <heart>", "known_shape": "a <hue> circle"},
    "want": {"a": {"shape": world.HELD_OUT_SHAPE}, "b": {"color": PURPLE},
             "both": {"shape": world.HELD_OUT_SHAPE, "color": PURPLE},
             "known_colour": {"shape": world.HELD_OUT_SHAPE, "color": PURPLE},
             "known_shape": {"shape": "circle", "color": PURPLE}},
}
"""The README's trial designs: the toy grammar's per-image prompts ("a red <heart>", "a <hue> circle"), a purple hue
(the base model draws unknown tokens blue), 40 samples of the trial seed."""
PRIOR_SEED = 5000
"""Sample seed of the trials' prior images (prompt i: ``PRIOR_SEED + i``)."""
GRAMMAR_PRIOR = {"prompts": [f"a {c} {s}" for c in world.COLORS for s in world.TRAIN_SHAPES], "per": 4}
COLOUR_AFTER = {"a": {"template": "a {token}"}, "b": {"template": "a {shape} in {token}"},
                "prompts": {"b": "a star in <hue>", "both": "a <heart> in <hue>", "known_shape": "a circle in <hue>"}}
TRIALS: dict[str, dict[str, Any]] = {
    "rare": {},
    "rare-prior": {"prior": GRAMMAR_PRIOR},
    "hue-from-red": {"b": {"initializer_token": "red"}},
    "hue-from-red-heart-from-circle": {"a": {"initializer_token": "circle"}, "b": {"initializer_token": "red"}},
    "hue-from-red-2x-steps": {"b": {"initializer_token": "red"}, "joint_steps": 2400, "single_steps": 1200},
    "hue-from-red-crossattn": {"b": {"initializer_token": "red"}, "settings": {"train": "crossattn"}},
    "colour-after": COLOUR_AFTER,
    "colour-after-prior": {**COLOUR_AFTER, "prior": GRAMMAR_PRIOR},
}
"""``--trial NAME``: each design as overrides of ``TRIAL_BASE`` (concepts ``a``/``b`` and ``prompts`` merged key by
key)."""


def trial_design(name: str) -> dict[str, Any]:
    if name not in TRIALS:
        raise ValueError(f"unknown trial {name!r}; the trials are: {', '.join(TRIALS)}")
    over = TRIALS[name]
    design = {**TRIAL_BASE, **{k: v for k, v in over.items() if k not in ("a", "b", "prompts")}}
    for key in ("a", "b", "prompts"):
        design[key] = {**TRIAL_BASE[key], **over.get(key, {})}
    return design


def trial_prompt(template: str, row: dict[str, Any], token: str) -> str:
    return template.format(color=row["color"], shape=row["shape"], token=token)


def run_trial(name: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """One README trial: joint and single-concept Custom Diffusion on ``trial_design(name)`` (its top-level keys
    replaced by ``overrides``: the tests' small version), the single jobs merged (sum, average and, unless Q/out
    train too, the paper's optimisation), every prompt read by the detectors. Writes
    ``out/custom_diffusion_trial-NAME.json``."""
    from collections import Counter

    from pixelmill.toy.samples import toy_indices, write_toy_rows

    d = {**trial_design(name), **overrides}
    work = out / f"cd-trial-{name}"
    shutil.rmtree(work, ignore_errors=True)
    concepts = {}
    for key in ("a", "b"):
        c, url = d[key], str(work / f"instances-{key}")
        idx = sorted(i for w in c["wanted"] for i in toy_indices(WORLD_SEED, c.get("per", 2), **w))
        write_toy_rows(url, WORLD_SEED, idx, {"generator": "pixelmill.toy.custom_diffusion_quality", "trial": name},
                       {"instance_prompt": lambda r, c=c: trial_prompt(c["template"], r, c["token"])})
        concepts[key] = {"instance_data": url, "token": c["token"], "class_word": CLASS_WORD,
                         "instance_prompt_column": "instance_prompt",
                         **({"initializer_token": c["initializer_token"]} if c.get("initializer_token") else {})}
    prior = d.get("prior")
    settings: dict[str, Any] = {"learning_rate": d["lr"], "with_prior_preservation": bool(prior),
                                **d.get("settings", {})}
    if prior:
        from pixelmill.samples import write_image_dataset

        base, images, captions = _pipeline("toy:sd"), [], []
        for i, prompt in enumerate(prior["prompts"]):
            images += sample(base, prompt, prior["per"], PRIOR_SEED + i)
            captions += [prompt] * prior["per"]
        write_image_dataset(str(work / "class-images"), images, captions)
        for c in concepts.values():
            c.update(class_data=str(work / "class-images"), class_prompt_column="caption")
        settings.update(num_class_images=len(images), prior_loss_weight=1.0)
    folders = {}
    for job, subset, steps in (("joint", concepts, d["joint_steps"]), ("a", {"a": concepts["a"]}, d["single_steps"]),
                               ("b", {"b": concepts["b"]}, d["single_steps"])):
        folders[job], _ = run_campaign_job(work / job, subset, {
            "name": "cd", "method": "custom_diffusion", "concepts": list(subset),
            "settings": {"max_steps": steps, **settings}})
    from pixelmill.toy.concepts import trained_pipeline

    models = {"base": lambda: _pipeline("toy:sd"), **{
        job: (lambda job=job: trained_pipeline("custom_diffusion", folders[job])) for job in ("joint", "a", "b")},
        "merged (sum)": lambda: merged_pipeline(folders["a"], folders["b"], "sum"),
        "merged (average)": lambda: merged_pipeline(folders["a"], folders["b"], "average")}
    if d.get("settings", {}).get("train") != "crossattn":  # the closed form is over text features: K/V only
        models["merged (optimisation)"] = lambda: optimised_pipeline(
            folders["a"], folders["b"], {"a": d["prompts"]["a"], "b": d["prompts"]["b"]},
            [world.make_row(REG_SEED, i)[1] for i in range(REG_CAPTIONS)])
    rows = {}
    for model, make in models.items():
        pipe, rows[model] = make(), {}
        for key, prompt in d["prompts"].items():
            found, want = read(sample(pipe, prompt, d["samples"], d["seed"])), d["want"][key]
            rows[model][key] = {"wanted": share(found, want.get("shape"), want.get("color")),
                                "colors": dict(Counter(str(f.color) for f in found)),
                                "shapes": dict(Counter(str(f.shape) for f in found))}
    doc = {"trial": name, "design": d, "models": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"custom_diffusion_trial-{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description="Custom Diffusion: two concepts jointly vs naively merged.")
    parser.add_argument("--out", default="quality-report")
    parser.add_argument("--fast", action="store_true", help="a few steps and samples")
    parser.add_argument("--seed", type=int, default=REPORT_SEED, help=f"sample seed (trials: {TRIAL_SEED})")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--class-images", type=int, default=None,
                        help="train with the prior: this many base-model images of 'a photo of a shape'")
    parser.add_argument("--trial", choices=tuple(TRIALS),
                        help="run one of the README's trial designs instead (TRIALS: the toy grammar, a purple hue)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.trial:
        print(json.dumps(run_trial(args.trial, Path(args.out)), indent=1))
        return 0
    sizes = dict(FAST if args.fast else FULL)
    if args.class_images is not None:
        sizes["class_images"] = args.class_images
    doc = measure_composition(Path(args.out), sizes, args.seed, args.lr)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
