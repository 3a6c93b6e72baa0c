"""A new concept, each fine-tuning method: the held-out heart taught to the toy SD, measured by the detectors.

The toy SD never saw a heart. Six instance images of hearts in two colours
(``INSTANCE_COLORS``) are its new concept; each method trains on them through pixelmill's
own trainer (``plan_campaign`` + ``run_job``, the code a campaign's job runs on a Ray
worker), and its artifact is loaded the way users load it (the DreamBooth pipeline
folder; ``apply_adapters`` for LoRA, Textual Inversion and Custom Diffusion, i.e.
diffusers' own loaders). Then, on fixed seeds:

DreamBooth trains as a user who wants the concept in new colours would set it up: each
instance image with its own prompt naming its colour (the Concept's
``instance_prompt_column``: ``"a purple {subject}"``), so the token learns the shape and the
colour words keep their meaning. Its prior is DreamBooth's own recipe in that phrasing: the
class prompt is the instance prompt with the identifier taken out ("a purple shape"), and the
class images are what the base model draws for each such prompt, each kept with its prompt
(``write_prior_class_images``; the Concept's ``class_prompt_column``).

- **learning**: the share of samples of "a photo of <subject>" the shape detector reads as a
  heart, for the base model (the same prompt: the token means nothing to it) and trained;
- **recontextualisation**: "a <new colour> <subject>" (the issue's phrasing, and the toy
  world's) in a colour none of the instance images has (``NEW_COLOR``): samples showing the
  heart *and* that colour; "a photo of a <new colour> <subject>" is reported beside it
  (``recontext_photo``): ``toy:sd`` never saw "a photo of", and reads colour words after it poorly;
- **image alignment**: mean toy-CLIP cosine between samples and the instance images, base
  against trained (the CustomConcept101 image-alignment measure, on toy CLIP);
- **prior preservation** (DreamBooth): over samples of the class prompts, the total-variation
  distance between the detectors' colour × shape distribution after training and the base
  model's, with the prior and without it (the same job otherwise).

``python -m pixelmill.toy.concepts --out DIR [--fast]`` writes ``concepts.json`` there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pixelmill.toy import world

INSTANCE_COLORS = ("purple", "orange")
NEW_COLOR = "green"
CONCEPT_SEED = 7
SAMPLE_SEED = 21
CLASS_WORD = "shape"
PROMPT_COLUMN = "instance_prompt"
"""The instances' per-image prompt column ("a purple {subject}"): the Concept's
``instance_prompt_column`` for the methods with ``"captions": True``."""
GUIDANCE = 4.0
SAMPLING_STEPS = 20

METHODS: dict[str, dict[str, Any]] = {
    # per-method learning rate and steps, chosen on this world (README "Quality": how)
    # captions: trained on the instances' per-image prompts (PROMPT_COLUMN) rather than one prompt
    # settings: further job settings of the method (the campaign's own keys)
    # prior: trained with the prior in the instances' phrasing (write_prior_class_images: sizes["prior_images"]
    # base-model images per instance prompt, the identifier taken out)
    # 2026-12-05 (trial seed 1021, 60 samples; heart / green heart / TV on "a purple shape", 0.95 without the
    # prior): without the prior, 600 steps 0.82 / 0.68; with it, 25 class images a prompt, 600 steps 0.65 / 0.37 /
    # 0.37, 1,200 steps 0.78 / 0.67 / 0.25, 1,500 steps 0.80 / 0.63 / 0.42; prior loss weight 0.5, 600 steps
    # 0.87 / 0.40 / 0.23; **50 a prompt, 1,200 steps 0.90 / 0.63 / 0.22**; every world colour ("a green shape"
    # too), 8 each, weight 0.5: 0.92 / 0.52 / 0.75. Earlier: 400 steps without 0.78 / 0.70; a prior of "a photo
    # of a shape" kept the class but drew it for "a photo of sks shape" too (0.01 hearts); "a shape" 0.82 / 0.38
    # 2026-12-05 (evening), trial seeds x 60 samples, heart / green heart / TV (mean): prior loss weight 1,
    # 1,200 steps 0.76 / 0.53 / 0.33 (four draws); **weight 0.5, 1,600 steps 0.86 / 0.74 / 0.40** (six draws,
    # lowest 0.80 / 0.67; README "Quality"); one seed (1021): weight 0.5 at 1,200 0.73 / 0.53 / 0.28, at 2,000
    # 0.95 / 0.57 / 0.32; weight 1 at 2,000 0.83 / 0.53 / 0.15; lr 1e-4 x 2,400 0.75 / 0.57 / 0.45; lr 4e-4 0.75 /
    # 0.22 / 0.47; cosine (100 warm-up) 0.42 / 0.37 / 0.40; batch 4 0.70 / 0.58 / 0.22
    "dreambooth": {"token": "sks", "learning_rate": 2e-4, "max_steps": 1600, "captions": True, "prior": True,
                   "settings": {"prior_loss_weight": 0.5}},
    # LoRA with both (3e-3, 1,000 steps) measured 2026-12-04: heart 0.43, green heart 0.23: a worse trade, not kept
    # 2026-12-04 (issue 14 trials): LoRA with both in the photo phrasing ("a photo of a purple {subject}", colour
    # class images captioned "a photo of a <colour> shape"), rank 16 on attention + proj_in/out + ff + resnet
    # conv1/conv2, 1,000 steps at 1e-3: trial seed 0.68 / 0.62, seed 21 (100 samples) heart 0.27, green heart
    # 0.26: not kept. DreamBooth with train_text_encoder (800 at 2e-4): trial seed heart 0.90, green heart 0.30
    # (green 0.52): the text encoder loses the colour words; with 16 colour class images per colour 0.77 / 0.17
    # 2026-12-05: per-image prompts, 2,000 steps at 2e-3 (trial seed 1021, 60 samples: heart 0.82, "a green sks
    # shape" 0.78 green hearts; one prompt, 1,000 at 1e-3: 0.95 / 0.43; per-image 1,000 at 1e-3: 0.18 / 0.65,
    # 2,000 at 1e-3: 0.68 / 0.63)
    "lora": {"token": "sks", "learning_rate": 2e-3, "max_steps": 2000, "captions": True},
    # 2026-12-05: one vector (600 steps at 5e-3) drew no heart (seed 21: 0.02); trial seed 1021, 40 samples,
    # heart of "a photo of <heart>" by vectors @ lr, steps: 4 @ 2e-2, 1,000 0.08; 8 @ 5e-2, 1,000 0.18;
    # 16 @ 5e-2, 1,500 0.30 (3,000: 0.43); 32 @ 5e-2, 1,500 0.53; 48 @ 5e-2, 1,500 0.60
    "textual_inversion": {"token": "<heart>", "learning_rate": 5e-2, "max_steps": 1500,
                          "settings": {"num_vectors": 48}},
    "custom_diffusion": {"token": "<heart>", "learning_rate": 1e-3, "max_steps": 600},
}
FULL = {"samples": 100, "steps_scale": 1.0, "methods": tuple(METHODS), "prior": True, "prior_images": 50}
# the CI smoke case: LoRA for a fifth of its steps, learning and alignment only (no recontext prompts)
FAST = {"samples": 16, "steps_scale": 0.2, "methods": ("lora",), "prior": False, "prior_images": 0,
        "recontext": False}


def write_instances(url: str, count: int = 6, seed: int = CONCEPT_SEED) -> list[str]:
    """``count`` heart images of world ``seed``, alternating over ``INSTANCE_COLORS``; returns their captions.

    Each row also has ``PROMPT_COLUMN``: its training prompt naming the image's colour and the
    concept, ``"a purple {subject}"`` (the Concept's ``instance_prompt_column``; the toy grammar's
    phrasing: ``toy:sd`` ignores "purple" in "a photo of a purple shape" and draws it orange)."""
    from pixelmill.toy.samples import toy_indices, write_toy_rows

    per = [toy_indices(seed, (count + len(INSTANCE_COLORS) - 1 - k) // len(INSTANCE_COLORS),
                       shape=world.HELD_OUT_SHAPE, color=c) for k, c in enumerate(INSTANCE_COLORS)]
    return write_toy_rows(url, seed, sorted(i for idx in per for i in idx),
                          {"generator": "pixelmill.toy.concepts", "concept": world.HELD_OUT_SHAPE, "seed": seed},
                          {PROMPT_COLUMN: lambda r: instance_prompt(r["color"])})


def instance_prompt(colour: str) -> str:
    """An instance image's training prompt (``PROMPT_COLUMN``): ``"a purple {subject}"``."""
    return f"a {colour} {{subject}}"


def _pipeline(model: str):
    from diffusers import StableDiffusionPipeline

    from pixelmill.models.loading import resolve_model_name

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_name(model), safety_checker=None,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_pipeline(method: str, artifacts: str, base: str = "toy:sd"):
    """The trained model as users load it: DreamBooth's pipeline folder, or the base with the adapter."""
    from pixelmill.models.adapters import apply_adapters

    if method == "dreambooth":
        return _pipeline(artifacts)
    pipe = _pipeline(base)
    apply_adapters(pipe, [{"path": artifacts}])
    return pipe


def campaign_settings(root: Path, base: str = "toy:sd") -> dict[str, Any]:
    """The campaign keys every toy-world training job shares: output, model and the job defaults."""
    return {"output": str(root), "model": base,
            "defaults": {"resolution": world.IMAGE_SIZE, "train_batch_size": 2, "checkpoint_every": 100_000,
                         "center_crop": True, "random_flip": False, "cache_latents": True,
                         "cache_text_embeddings": True, "seed": 0}}


def run_campaign_job(root: Path, concepts: dict[str, dict[str, Any]], job: dict[str, Any],
                     base: str = "toy:sd") -> tuple[str, dict[str, Any]]:
    """One job over ``concepts`` (name -> Concept fields) through the trainer a campaign job runs on a
    Ray worker (``plan_campaign`` + ``run_job``); returns (the artifacts folder, the job's record)."""
    from pixelmill.config import CampaignConfig
    from pixelmill.tasks.train.job import run_job
    from pixelmill.tasks.train.plan import plan_campaign

    cfg = {**campaign_settings(root, base), "concepts": concepts, "jobs": [job]}
    spec = plan_campaign(CampaignConfig.model_validate(cfg)).jobs[0].spec
    record = run_job(spec)
    return spec["dir"].rstrip("/") + "/artifacts", record


def train(method: str, root: Path, instances: str, steps_scale: float = 1.0, class_data: str | None = None,
          base: str = "toy:sd", class_prompt_column: str | None = None) -> tuple[str, dict[str, Any]]:
    """Train ``method`` on the instances (with the prior when ``class_data`` is given, each class image
    with its own prompt from ``class_prompt_column`` when given); returns (the artifacts folder, the
    job's record)."""
    m = METHODS[method]
    concept = {"instance_data": instances, "token": m["token"], "class_word": CLASS_WORD}
    if m.get("captions"):
        concept["instance_prompt_column"] = PROMPT_COLUMN
    settings: dict[str, Any] = {"learning_rate": m["learning_rate"],
                                "max_steps": max(10, int(m["max_steps"] * steps_scale)), **m.get("settings", {})}
    if method in ("dreambooth", "custom_diffusion") or class_data is not None:
        settings["with_prior_preservation"] = class_data is not None
        if class_data is not None:
            concept["class_data"] = class_data
            settings["num_class_images"] = len(_read_ids(class_data))
            if class_prompt_column:
                concept["class_prompt_column"] = class_prompt_column
    return run_campaign_job(root, {"concept": concept},
                            {"name": method, "method": method, "concepts": ["concept"], "settings": settings}, base)


def _read_ids(url: str) -> list[str]:
    from pixelmill.datasets import Dataset

    return Dataset.open(url).to_table(["id"])["id"].to_pylist()


def subject(method: str) -> str:
    from pixelmill.config.campaign import Concept

    return Concept(instance_data="-", token=METHODS[method]["token"], class_word=CLASS_WORD).subject(method)


def sample(pipe, prompt: str, n: int, seed: int = SAMPLE_SEED) -> list:
    from pixelmill.toy.quality import generate

    return generate(pipe, [prompt] * n, GUIDANCE, SAMPLING_STEPS, seed=seed)


class BaseSamples:
    """The base model's samples, drawn once per (prompt, count, seed): DreamBooth and LoRA name the
    concept alike, and the prior comparison asks again for what the methods already drew."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self._drawn: dict[tuple[str, int, int], list] = {}

    def __call__(self, prompt: str, n: int, seed: int = SAMPLE_SEED) -> list:
        key = (prompt, n, seed)
        if key not in self._drawn:
            self._drawn[key] = sample(self.pipe, prompt, n, seed)
        return self._drawn[key]


def read(images) -> list:
    from pixelmill.toy.detect import detect

    return [detect(im) for im in images]


def share(found, shape: str | None = None, color: str | None = None) -> float:
    hits = [(shape is None or d.shape == shape) and (color is None or d.color == color) for d in found]
    return round(sum(hits) / max(1, len(hits)), 4)


def tv_distance(a, b) -> float:
    """Total-variation distance between two samples' colour × shape distributions."""
    ca, cb = Counter((d.color, d.shape) for d in a), Counter((d.color, d.shape) for d in b)
    na, nb = max(1, sum(ca.values())), max(1, sum(cb.values()))
    return round(0.5 * sum(abs(ca[k] / na - cb[k] / nb) for k in set(ca) | set(cb)), 4)


class ImageAlignment:
    """Mean toy-CLIP cosine between images and the instance images (as the campaign report measures it)."""

    def __init__(self, clip: str, instances: str) -> None:
        from pixelmill.datasets import Dataset
        from pixelmill.datasets.images import decode_image
        from pixelmill.tasks.metrics import ClipScorer

        self.scorer = ClipScorer(clip, device="cpu")
        images = [decode_image(b).convert("RGB")
                  for b in Dataset.open(instances).to_table(["image"])["image"].to_pylist()]
        self.ref = self.scorer.images(images)

    def __call__(self, images) -> float:
        return round(float((self.scorer.images(images) @ self.ref.T).mean()), 4)


def prior_prompts() -> list[str]:
    """The prior's class prompts: each instance prompt with the identifier taken out ("a purple shape")."""
    return [instance_prompt(c).format(subject=CLASS_WORD) for c in INSTANCE_COLORS]


def write_prior_class_images(url: str, base: BaseSamples, per_prompt: int, seed: int = SAMPLE_SEED) -> str:
    """DreamBooth's class images in the instances' phrasing: ``per_prompt`` samples of the base model for
    each of ``prior_prompts()``, each captioned with its prompt (``caption``: the Concept's
    ``class_prompt_column``). What the base model draws: no heart (it cannot), no instance image."""
    from pixelmill.samples import write_image_dataset

    images, captions = [], []
    for prompt in prior_prompts():
        images += base(prompt, per_prompt, seed=seed + 3000)
        captions += [prompt] * per_prompt
    return write_image_dataset(url, images, captions)


def measure_method(method: str, root: Path, instances: str, n: int, steps_scale: float, base: BaseSamples, align,
                   class_data: str | None = None, tag: str = "", seed: int = SAMPLE_SEED,
                   class_prompt_column: str | None = None, recontext: bool = True) -> dict[str, Any]:
    """Train one method, then its learning, recontextualisation (unless ``recontext`` is false: the
    fast case) and alignment figures against the base."""
    t0 = time.perf_counter()
    artifacts, record = train(method, root / (method + tag), instances, steps_scale, class_data,
                              class_prompt_column=class_prompt_column)
    seconds = time.perf_counter() - t0
    pipe = trained_pipeline(method, artifacts)
    who = subject(method)
    plain, coloured, photo = f"a photo of {who}", f"a {NEW_COLOR} {who}", f"a photo of a {NEW_COLOR} {who}"
    base_plain, got_plain = base(plain, n, seed), sample(pipe, plain, n, seed)
    rb, rt = read(base_plain), read(got_plain)
    out = {"method": method, "prior": bool(class_data),
           "steps": record.get("step"),
           "learning_rate": METHODS[method]["learning_rate"], **METHODS[method].get("settings", {}),
           "train_seconds": round(seconds, 1),
           "instance_prompts": "per image" if METHODS[method].get("captions") else "one",
           "prompt": plain, "samples": n,
           "base_heart": share(rb, world.HELD_OUT_SHAPE), "heart": share(rt, world.HELD_OUT_SHAPE),
           "pipeline": pipe, "images": got_plain[:8]}
    if recontext:
        got_col = sample(pipe, coloured, n, seed)
        cb, ct = read(base(coloured, n, seed)), read(got_col)
        pb, pt = read(base(photo, n, seed)), read(sample(pipe, photo, n, seed))
        out.update({"recontext_prompt": coloured, "base_recontext": share(cb, world.HELD_OUT_SHAPE, NEW_COLOR),
                    "recontext": share(ct, world.HELD_OUT_SHAPE, NEW_COLOR),
                    "recontext_colour": share(ct, color=NEW_COLOR), "recontext_heart": share(ct, world.HELD_OUT_SHAPE),
                    "recontext_photo_prompt": photo,
                    "base_recontext_photo": share(pb, world.HELD_OUT_SHAPE, NEW_COLOR),
                    "recontext_photo": share(pt, world.HELD_OUT_SHAPE, NEW_COLOR),
                    "recontext_photo_colour": share(pt, color=NEW_COLOR), "images": got_plain[:8] + got_col[:8]})
    if align is not None:
        out["base_alignment"], out["alignment"] = align(base_plain), align(got_plain)
    return out


def measure_prior(root: Path, instances: str, n: int, steps_scale: float, base: BaseSamples,
                  with_prior: dict[str, Any], seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """DreamBooth with the prior (``with_prior``: the measured job) and the same job without it: how far the
    class prompts' outputs drift from the base model's (``n`` samples split over ``prior_prompts()``), and the
    generic "a photo of a shape" beside them."""
    without = measure_method("dreambooth", root, instances, n, steps_scale, base, None, tag="-noprior", seed=seed)
    tv_seed = seed + 2000
    prompts = prior_prompts()
    per = max(1, n // len(prompts))

    def drawn(pipe, prompt_list, k):
        return [d for p in prompt_list for d in read(base(p, k, tv_seed) if pipe is None else
                                                     sample(pipe, p, k, tv_seed))]

    reference = drawn(None, prompts, per)
    photo = f"a photo of a {CLASS_WORD}"
    photo_ref = drawn(None, [photo], n)
    return {"class_prompts": prompts, "class_images_per_prompt": with_prior["class_images_per_prompt"],
            "samples": per * len(prompts), "steps": with_prior["steps"],
            "tv_without_prior": tv_distance(reference, drawn(without["pipeline"], prompts, per)),
            "tv_with_prior": tv_distance(reference, drawn(with_prior["pipeline"], prompts, per)),
            "photo_prompt": photo,
            "photo_tv_without_prior": tv_distance(photo_ref, drawn(without["pipeline"], [photo], n)),
            "photo_tv_with_prior": tv_distance(photo_ref, drawn(with_prior["pipeline"], [photo], n)),
            "heart_without_prior": without["heart"], "recontext_without_prior": without["recontext"],
            "heart_with_prior": with_prior["heart"], "recontext_with_prior": with_prior["recontext"]}


def measure_concepts(out: Path, sizes: dict[str, Any], clip: str | None = "toy:clip",
                     seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """Every method in ``sizes['methods']`` on the held-out heart, sampled on ``seed`` (another seed than
    ``SAMPLE_SEED`` for trial runs that choose settings); writes ``out/concepts.json``."""
    import torch

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "concept-runs"
    shutil.rmtree(work, ignore_errors=True)
    instances = str(work / "instances")
    captions = write_instances(instances)
    base = BaseSamples(_pipeline("toy:sd"))
    align = ImageAlignment(clip, instances) if clip else None
    results = {}
    per_prompt = sizes.get("prior_images", 0)
    # the prior's class images, drawn once for every method that trains with the prior
    prior_url = (write_prior_class_images(str(work / "class-images"), base, per_prompt, seed)
                 if per_prompt and any(METHODS[m].get("prior") for m in sizes["methods"]) else None)
    for method in sizes["methods"]:
        class_url = prior_url if METHODS[method].get("prior") else None
        prior_images = per_prompt if class_url else 0
        results[method] = measure_method(method, work, instances, sizes["samples"], sizes["steps_scale"],
                                         base, align, class_url, seed=seed,
                                         class_prompt_column="caption" if class_url else None,
                                         recontext=sizes.get("recontext", True))
        results[method]["class_images_per_prompt"] = prior_images
    prior = None
    if sizes.get("prior") and results.get("dreambooth", {}).get("prior"):
        prior = measure_prior(work, instances, sizes["samples"], sizes["steps_scale"], base,
                              results["dreambooth"], seed=seed)
    doc = {"concept": world.HELD_OUT_SHAPE, "instance_colours": list(INSTANCE_COLORS), "new_colour": NEW_COLOR,
           "sample_seed": seed,
           "instance_captions": captions, "guidance": GUIDANCE, "sampling_steps": SAMPLING_STEPS,
           "methods": {k: {f: v for f, v in r.items() if f not in ("pipeline", "images")} for k, r in results.items()},
           "prior": prior}
    (out / "concepts.json").write_text(json.dumps(doc, indent=1) + "\n")
    doc["images"] = {k: r["images"] for k, r in results.items()}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Teach the toy SD the held-out heart with each method; measure it.")
    parser.add_argument("--out", default="quality-report")
    parser.add_argument("--fast", action="store_true", help="LoRA only, fewer steps and samples")
    parser.add_argument("--methods", help="comma-separated methods (default: the size's)")
    parser.add_argument("--no-prior", action="store_true",
                        help="skip the prior-preservation comparison (the second DreamBooth job, without the prior)")
    parser.add_argument("--sample-seed", type=int, default=SAMPLE_SEED,
                        help=f"sampling seed (trial runs choosing settings use another than {SAMPLE_SEED})")
    args = parser.parse_args(argv)
    sizes = dict(FAST if args.fast else FULL)
    if args.methods:
        sizes["methods"] = tuple(m for m in args.methods.split(",") if m)
    if args.no_prior:
        sizes["prior"] = False
    doc = measure_concepts(Path(args.out), sizes, seed=args.sample_seed)
    doc.pop("images")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
