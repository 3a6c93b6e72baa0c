"""Custom Diffusion with two *object* concepts in one scene: joint training against naive merges.

The paper composes two objects (a pet and a chair) in one image; the one-object toy world can only
compose an object with an attribute (``custom_diffusion_quality``). Here the base is
``toy:sd-two`` (``two_objects``: the toy SD fine-tuned to draw 64 x 32 scenes, one object per
half, "a red circle and a purple star"), and the two concepts are two objects:

- ``<heart>``: the held-out heart (never drawn by either toy SD) in four colours
  (``custom_diffusion_quality.HEART_COLORS``, two images each), taught as "a {colour} <heart>";
- ``<star1>``: one particular object of a known kind, eight purple stars, taught as "a <star1> star"
  (the paper's "a <new1> chair"); ``--second square1``: eight green squares, "a <square1> square"
  (``SECONDS``).

Instance images are the one-object world's (32 x 32). Three jobs run through pixelmill's trainer
(``plan_campaign`` + ``run_job``): both concepts jointly (``JOINT_STEPS``), and each alone
(``SINGLE_STEPS``); the single models are merged naively (``sum``: W0 + dA + dB, ``average``:
(WA + WB) / 2; ``custom_diffusion_quality.merged_pipeline``). Every model draws "a red <heart> and a
<star1> star" (and the reverse order) at 64 x 32; the detectors read each half
(``two_objects.detect_halves``). "Both" = a heart in the heart's half and a purple star in the
star's. Each concept's own prompt is drawn at 32 x 32, and the base draws the same scene with
known words ("a red circle and a purple star") as the ceiling of what composing can reach.

``--scenes`` trains on scenes instead (after both one-image designs drew no scene with both
objects): each instance image pasted into a 64 x 32 scene beside a known object
(``SCENES_PER_INSTANCE`` scenes each, the instance left in half of them, the companion on the
instance's background in a colour of its own and never of the second concept's kind), captioned
"a red <heart> and a blue circle"; every job trains at ``resolution: [64, 32]`` with Custom
Diffusion's prior: ``PRIOR_SCENES`` real two-object scenes per concept (world ``SCENE_SEED``, each
with its caption), as the paper regularises with 200 retrieved real images per concept. The scene
"a red <heart> and a <star1> star" is still never shown: no training scene holds both concepts.
A first scene run with the one-image settings (K/V, 1,200 / 600 steps) learnt no heart (alone 0.09,
joint 0.00 both); heart-only ``--pilot`` jobs read on the trial seed then chose ``SCENE_TRAINING``
(README "Quality" has both runs and the pilot table).

``python -m pixelmill.toy.custom_diffusion_pair --out DIR [--second square1] [--scenes] [--fast]``
writes ``custom_diffusion_pair.json`` and sample sheets there;
``... --out DIR --pilot [--train crossattn] [--steps N] [--lr LR] [--no-prior]`` runs one pilot job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pixelmill.toy import world
from pixelmill.toy.custom_diffusion_quality import HEART_COLORS, LEARNING_RATE, REPORT_SEED, WORLD_SEED, merged_pipeline
from pixelmill.toy.two_objects import HEIGHT, WIDTH, detect_halves, draw, two_object_row

BASE = "toy:sd-two"
HEART: dict[str, Any] = {"token": "<heart>", "wanted": [{"shape": "heart", "color": c} for c in HEART_COLORS],
                         "per": 2, "template": "a {color} {token}"}
SECONDS: dict[str, dict[str, str]] = {
    "star1": {"shape": "star", "color": "purple"},
    "square1": {"shape": "square", "color": "green"},
}
"""The second concept, one particular object of a known kind (eight instances, "a <star1> star"). ``star1`` is
the reported design, chosen first; ``square1`` was registered before the final figures, when a look at an
unfinished toy:sd-two drew "a red circle and a purple star" right in 1 of 40 (small purple stars came out as
blobs the detector reads as circles): a square is the shape toy SD draws best."""
JOINT_STEPS, SINGLE_STEPS = 1200, 600
SEED = REPORT_SEED
"""Sample seed of the reported figures (41); a first look at an unfinished toy:sd-two used 43."""
SCENE_SEED = 78
"""World of the prior's real two-object scenes (toy:sd-two was trained on world 77 and is read on 99)."""
PRIOR_SCENES = 200
SCENES_PER_INSTANCE = 4
SCENE_TRAINING = {"train": "crossattn", "joint_steps": 2400, "single_steps": 1200}
"""``--scenes`` jobs: all of cross-attention (K, V, Q, out) for twice the steps, chosen on heart-only pilot jobs
(``pilot``) after a first scene comparison with K/V at 1,200 / 600 steps learnt no heart, before the reported one."""
FULL = {"samples": 100, "steps_scale": 1.0}
FAST = {"samples": 8, "steps_scale": 0.05}


def design(second: str = "star1") -> dict[str, Any]:
    """The two concepts, each one's own prompt, and the scene prompts, for the ``second`` object."""
    if second not in SECONDS:
        raise ValueError(f"unknown second concept {second!r}: one of {', '.join(SECONDS)}")
    obj = SECONDS[second]
    token = f"<{second}>"
    concepts = {"heart": HEART, second: {"token": token, "wanted": [obj], "per": 8,
                                         "template": "a {token} " + obj["shape"]}}
    return {
        "second": second, "object": obj, "concepts": concepts,
        "single": {"heart": "a red <heart>", second: f"a {token} {obj['shape']}"},
        "scenes": {"both": f"a red <heart> and a {token} {obj['shape']}",
                   "reversed": f"a {token} {obj['shape']} and a red <heart>",
                   "known_words": f"a red circle and a {obj['color']} {obj['shape']}"},
    }


def instance_indices(c: dict[str, Any], seed: int = WORLD_SEED) -> list[int]:
    """Rows of world ``seed`` that are concept ``c``'s instance images (``per`` of each wanted object)."""
    from pixelmill.toy.samples import toy_indices

    return sorted(i for w in c["wanted"] for i in toy_indices(seed, c["per"], **w))


def write_concept(url: str, c: dict[str, Any], seed: int = WORLD_SEED) -> None:
    from pixelmill.toy.samples import write_toy_rows

    write_toy_rows(url, seed, instance_indices(c, seed),
                   {"generator": "pixelmill.toy.custom_diffusion_pair", "concept": c["token"]},
                   {"prompt": lambda r, c=c: c["template"].format(color=r["color"], token=c["token"])})


def scene_rows(c: dict[str, Any], avoid: str, seed: int = WORLD_SEED,
               per: int = SCENES_PER_INSTANCE) -> list[dict[str, Any]]:
    """Concept ``c``'s instance images, each in ``per`` 64 x 32 scenes beside a known object that is not
    an ``avoid`` (the second concept's kind): rows ``id``, ``image`` (PNG), ``prompt``, ``side`` of the instance."""
    from dataclasses import replace

    from PIL import Image

    from pixelmill.datasets.images import encode_image

    shapes = [x for x in world.TRAIN_SHAPES if x != avoid]
    rows = []
    for i in instance_indices(c, seed):
        image, _, obj = world.make_row(seed, i)
        phrase = c["template"].format(color=obj.color, token=c["token"])
        for k in range(per):
            rng = np.random.default_rng([seed, i, k, 5])
            colors = [x for x in world.COLORS if x not in (obj.color, obj.background)]
            other = replace(world.sample_object(rng, shapes), color=colors[rng.integers(len(colors))],
                            background=obj.background, background2=None, split=None)
            halves = [image, world.render(other, rng)]
            words = [phrase, f"a {other.color} {other.shape}"]
            left = k % 2 == 0
            if not left:
                halves.reverse()
                words.reverse()
            scene = Image.new("RGB", (WIDTH, HEIGHT))
            scene.paste(halves[0], (0, 0))
            scene.paste(halves[1], (HEIGHT, 0))
            rows.append({"id": f"{i}-{k}", "image": encode_image(scene),
                         "prompt": world._articles(" and ".join(words)), "side": "left" if left else "right"})
    return rows


def prior_rows(start: int, count: int = PRIOR_SCENES, seed: int = SCENE_SEED) -> list[dict[str, Any]]:
    """Real two-object scenes ``start .. start + count - 1`` of world ``seed`` with their captions."""
    from pixelmill.datasets.images import encode_image

    return [{"id": f"{seed}-{j}", "image": encode_image(image), "prompt": caption}
            for j in range(start, start + count) for image, caption, _ in [two_object_row(seed, j)]]


def write_rows(url: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    import pyarrow as pa

    from pixelmill.datasets.images import IMAGE_TYPE
    from pixelmill.datasets.writer import write_table_dataset

    schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE), ("prompt", pa.string())]
                       + [(k, pa.string()) for k in rows[0] if k not in ("id", "image", "prompt")])
    write_table_dataset(url, pa.Table.from_pylist(rows, schema=schema), "toy-scenes", meta)


def scene_concept(out: Path, name: str, c: dict[str, Any], avoid: str, first_prior: int,
                  prior_scenes: int = PRIOR_SCENES) -> dict[str, Any]:
    """Concept ``c``'s scenes and its prior of real scenes (from scene ``first_prior``) written under ``out``
    (kept when there); returns its campaign Concept."""
    url, prior = str(out / "scenes" / name), str(out / "prior" / name)
    meta = {"generator": "pixelmill.toy.custom_diffusion_pair", "concept": c["token"]}
    if not Path(url).exists():
        write_rows(url, scene_rows(c, avoid), {**meta, "per_instance": SCENES_PER_INSTANCE})
    if not Path(prior).exists():
        write_rows(prior, prior_rows(first_prior, prior_scenes), {**meta, "world": SCENE_SEED})
    return {"instance_data": url, "token": c["token"], "class_word": "shape", "instance_prompt_column": "prompt",
            "class_data": prior, "class_prompt_column": "prompt"}


def pilot(out: Path, train: str = "crossattn_kv", steps: int = SINGLE_STEPS, lr: float = LEARNING_RATE,
          prior: bool = True, samples: int = 40, base: str = BASE) -> dict[str, Any]:
    """One heart-only scene job and how often it draws the heart, read on ``TRIAL_SEED`` (never the report's
    seed): alone at 32 x 32, and in the left / right half of a scene beside a known object. How
    ``SCENE_TRAINING`` was chosen; writes ``pilot-<train>-<steps>-<lr>[-noprior].json`` in ``out``."""
    from pixelmill.toy.concepts import run_campaign_job, trained_pipeline
    from pixelmill.toy.custom_diffusion_quality import TRIAL_SEED
    from pixelmill.toy.detect import detect

    tag = f"{train}-{steps}-{lr:g}" + ("" if prior else "-noprior")
    out.mkdir(parents=True, exist_ok=True)
    concept = scene_concept(out, "heart", HEART, "star", 0)
    if not prior:
        concept = {k: v for k, v in concept.items() if k not in ("class_data", "class_prompt_column")}
    settings = {"learning_rate": lr, "max_steps": steps, "train": train, "resolution": [WIDTH, HEIGHT],
                "with_prior_preservation": prior, **({"num_class_images": PRIOR_SCENES} if prior else {})}
    t0 = time.time()
    folder, _ = run_campaign_job(out / f"runs-{tag}", {"heart": concept},
                                 {"name": "cd", "method": "custom_diffusion", "concepts": ["heart"],
                                  "settings": settings}, base=base)
    res: dict[str, Any] = {"pilot": tag, "seed": TRIAL_SEED, "samples": samples,
                           "train_seconds": round(time.time() - t0, 1)}
    pipe = trained_pipeline("custom_diffusion", folder, base)
    pipe.set_progress_bar_config(disable=True)
    res["alone"] = sum(detect(im).shape == "heart" for im in draw(pipe, ["a red <heart>"] * samples, HEIGHT,
                                                                   TRIAL_SEED)) / samples
    for key, prompt, half in (("left", "a red <heart> and a green square", 0),
                              ("right", "a blue circle and a red <heart>", 1)):
        images = draw(pipe, [prompt] * samples, WIDTH, TRIAL_SEED)
        res[key] = sum(detect_halves(im)[half].shape == "heart" for im in images) / samples
    (out / f"pilot-{tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res), flush=True)
    return res


def _is(d, obj: dict[str, str]) -> bool:
    return d.shape == obj["shape"] and d.color == obj["color"]


def read_scenes(images, obj: dict[str, str], second: str, heart_left: bool = True) -> dict[str, float]:
    """Shares of scenes with the heart in its half, the second object in its half, and both."""
    n = len(images)
    heart = other = both = 0
    for image in images:
        left, right = detect_halves(image)
        h, s = (left, right) if heart_left else (right, left)
        heart += h.shape == "heart"
        other += _is(s, obj)
        both += h.shape == "heart" and _is(s, obj)
    return {"heart": heart / n, second: other / n, "both": both / n}


def read_single(images, obj: dict[str, str], second: str) -> dict[str, float]:
    from pixelmill.toy.detect import detect

    ds = [detect(im) for im in images]
    return {"heart": sum(d.shape == "heart" for d in ds) / len(ds), second: sum(_is(d, obj) for d in ds) / len(ds)}


def sheet(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    from pixelmill.toy.quality import save_sheet

    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, ((len(images) + cols - 1) // cols) * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    save_sheet(grid, path)


def run(out: Path, samples: int = 100, steps_scale: float = 1.0, base: str = BASE, seed: int = SEED,
        second: str = "star1", scenes: bool = False, prior_scenes: int = PRIOR_SCENES) -> dict[str, Any]:
    """Train the three jobs, build the five models, draw and read; returns the figures (also in ``out``).
    ``scenes``: instance images in scenes and a prior of real scenes, at 64 x 32 (the module's doc)."""
    from pixelmill.toy.concepts import _pipeline, run_campaign_job, trained_pipeline

    d = design(second)
    obj = d["object"]
    out.mkdir(parents=True, exist_ok=True)
    concepts = {}
    settings: dict[str, Any] = {"learning_rate": LEARNING_RATE, "with_prior_preservation": scenes}
    joint_steps, single_steps = JOINT_STEPS, SINGLE_STEPS
    if scenes:
        settings.update(resolution=[WIDTH, HEIGHT], num_class_images=prior_scenes, train=SCENE_TRAINING["train"])
        joint_steps, single_steps = SCENE_TRAINING["joint_steps"], SCENE_TRAINING["single_steps"]
    for k, (name, c) in enumerate(d["concepts"].items()):
        if scenes:
            concepts[name] = scene_concept(out, name, c, obj["shape"], k * prior_scenes, prior_scenes)
            continue
        url = str(out / "instances" / name)
        if not Path(url).exists():
            write_concept(url, c)
        concepts[name] = {"instance_data": url, "token": c["token"], "class_word": "shape",
                          "instance_prompt_column": "prompt"}
    folders, seconds = {}, {}
    joint, single = max(1, round(joint_steps * steps_scale)), max(1, round(single_steps * steps_scale))
    for job, names, steps in (("joint", list(concepts), joint), ("heart", ["heart"], single),
                              (second, [second], single)):
        t0 = time.time()
        folders[job], _ = run_campaign_job(out / "runs" / job, {n: concepts[n] for n in names}, {
            "name": "cd", "method": "custom_diffusion", "concepts": names,
            "settings": {**settings, "max_steps": steps}},
            base=base)
        seconds[job] = round(time.time() - t0, 1)
    models = {
        "base": lambda: _pipeline(base),
        "joint": lambda: trained_pipeline("custom_diffusion", folders["joint"], base),
        "sum": lambda: merged_pipeline(folders["heart"], folders[second], "sum", base),
        "average": lambda: merged_pipeline(folders["heart"], folders[second], "average", base),
        "heart only": lambda: trained_pipeline("custom_diffusion", folders["heart"], base),
        f"{second} only": lambda: trained_pipeline("custom_diffusion", folders[second], base),
    }
    res: dict[str, Any] = {"base": base, "second": second, "object": obj, "samples": samples, "seed": seed,
                           "data": "scenes" if scenes else "one-object images",
                           "prior_scenes": prior_scenes if scenes else 0,
                           "trained": settings.get("train", "crossattn_kv"),
                           "joint_steps": joint, "single_steps": single, "train_seconds": seconds,
                           "prompts": {**d["single"], **d["scenes"]},
                           "models": {}}
    for name, make in models.items():
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        got: dict[str, Any] = {}
        for key, prompt in d["single"].items():
            got[key] = read_single(draw(pipe, [prompt] * samples, HEIGHT, seed), obj, second)
        for key, prompt in d["scenes"].items():
            images = draw(pipe, [prompt] * samples, WIDTH, seed)
            if key == "known_words":
                left_right = [detect_halves(im) for im in images]
                got[key] = {"both": sum(a.shape == "circle" and a.color == "red" and _is(b, obj)
                                        for a, b in left_right) / samples}
            else:
                got[key] = read_scenes(images, obj, second, heart_left=key == "both")
            if key == "both":
                sheet(images[:32], out / f"{name.replace(' ', '-')}-both.png")
        res["models"][name] = got
        print(json.dumps({"model": name, **got}), flush=True)
    (out / "custom_diffusion_pair.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m pixelmill.toy.custom_diffusion_pair",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--fast", action="store_true", help="a few steps and samples: that it runs, not what it says")
    p.add_argument("--samples", type=int)
    p.add_argument("--base", default=BASE, help="a two-object model (default: %(default)s)")
    p.add_argument("--second", default="star1", choices=sorted(SECONDS),
                   help="the second object concept (default: %(default)s, the reported design)")
    p.add_argument("--scenes", action="store_true",
                   help="instance images in 64 x 32 scenes and a prior of real scenes (the module's doc)")
    p.add_argument("--pilot", action="store_true", help="one heart-only scene job, read on the trial seed (pilot)")
    p.add_argument("--train", default="crossattn_kv", choices=("crossattn_kv", "crossattn"), help="--pilot's")
    p.add_argument("--steps", type=int, default=SINGLE_STEPS, help="--pilot's (default: %(default)s)")
    p.add_argument("--lr", type=float, default=LEARNING_RATE, help="--pilot's (default: %(default)s)")
    p.add_argument("--no-prior", action="store_true", help="--pilot without the prior of real scenes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pilot:
        pilot(Path(args.out), args.train, args.steps, args.lr, not args.no_prior, args.samples or 40, args.base)
        return 0
    settings = dict(FAST if args.fast else FULL)
    if args.samples:
        settings["samples"] = args.samples
    run(Path(args.out), base=args.base, second=args.second, scenes=args.scenes, **settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
