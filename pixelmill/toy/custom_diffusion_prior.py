"""Retrieval from a toy pool as Custom Diffusion's real prior, end to end in one campaign.

What a user runs, in order: a LAION-style pool of toy-world images (the first ``POOL_ROWS``
rows of world ``POOL_SEED``: images served over HTTP on 127.0.0.1, captions from the world's
grammar) embedded with ``pixelmill pool build --clip toy:clip``; then ``pixelmill finetune``
on one campaign config with a ``retrieve`` section (class prompt "a photo of a star",
``RETRIEVAL_THRESHOLD``) and two Custom Diffusion jobs on the same concept: ``<star1>``, six
purple stars ("a photo of a <star1> star"), one with ``class_data: retrieval`` and the prior
on, one without. Then, on fixed seeds, read by the detectors:

- **retrieval**: the retrieved images' shapes (the class prompt asks for a star) and colours;
- **learning**: "a photo of a <star1> star" read as a purple star, base against each job;
- **class preservation**: over samples of the class prompt, the total-variation distance of the
  colour × shape distribution from the base model's, and the share of stars, without and with
  the retrieved prior.

The toy CLIP's caption similarity of a colourless "a photo of a star" to star captions is
0.64–0.9 (median 0.78) and to every other caption at most 0.68 (1,000 captions of world seed
14); the paper's 0.85 would keep one star caption in six, the bright ones, so the campaign
asks for 0.7 (no non-star caption above it on seed 14; the pool here is seed 15).

``python -m pixelmill.toy.custom_diffusion_prior --out DIR [--fast]`` writes
``custom_diffusion_prior.json`` there.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pixelmill.toy import world
from pixelmill.toy.concepts import (
    BaseSamples,
    _pipeline,
    campaign_settings,
    read,
    sample,
    share,
    trained_pipeline,
    tv_distance,
)
from pixelmill.toy.custom_diffusion_quality import REPORT_SEED, TRIAL_SEED

POOL_SEED = 15
CONCEPT_SEED = 31
CONCEPT_COLOR = "purple"
CLASS_SHAPE = "star"
TOKEN = "<star1>"
CLASS_PROMPT = "a photo of a star"
CONCEPT_PROMPT = f"a photo of a {TOKEN} star"
RETRIEVAL_THRESHOLD = 0.7
LEARNING_RATE = 1e-3
FULL = {"pool_rows": 1000, "class_images": 50, "steps": 600, "samples": 100, "trial": True}
FAST = {"pool_rows": 120, "class_images": 4, "steps": 12, "samples": 8, "trial": False}


def write_pool_source(folder: str, base_url: str, out_url: str, rows: int, seed: int = POOL_SEED) -> int:
    """Rows ``0 .. rows-1`` of world ``seed`` as PNG files in ``folder`` and the dataset ``pixelmill pool
    build`` embeds (``id``, ``caption``, ``url`` = ``base_url`` + file name, ``image``, ``shape``, ``color``)."""
    from pixelmill.datasets import storage
    from pixelmill.datasets.writer import write_table_dataset
    from pixelmill.toy.dataset import toy_row_id

    storage.makedirs(folder)
    out = []
    for index in range(rows):
        image, caption, obj = world.make_row(seed, index)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        name = f"toy-{seed}-{index:05d}.png"
        Path(folder, name).write_bytes(buf.getvalue())
        out.append({"id": toy_row_id(seed, index), "caption": caption, "url": f"{base_url.rstrip('/')}/{name}",
                    "image": {"bytes": buf.getvalue(), "path": name}, "shape": obj.shape, "color": obj.color})
    write_table_dataset(out_url, pa.Table.from_pylist(out), "images", {"toy_pool": "first rows", "seed": seed})
    return rows


def write_concept(url: str, count: int = 6, seed: int = CONCEPT_SEED) -> list[str]:
    """The concept's instance images: the first ``count`` purple stars of world ``seed``."""
    from pixelmill.toy.samples import toy_indices, write_toy_rows

    return write_toy_rows(url, seed, toy_indices(seed, count, shape=CLASS_SHAPE, color=CONCEPT_COLOR),
                          {"generator": "pixelmill.toy.custom_diffusion_prior", "seed": seed})


def campaign(root: Path, pool: str, instances: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The campaign config: retrieval first, then Custom Diffusion with and without the retrieved prior."""
    base = campaign_settings(root / "campaign")
    concept = {"instance_data": instances, "token": TOKEN, "class_word": CLASS_SHAPE,
               "instance_prompt": "a photo of a {token} {class}"}
    settings = {"learning_rate": LEARNING_RATE, "max_steps": sizes["steps"]}
    return {**base, "clip_model": "toy:clip",
            "runtime": {"num_cpus": 1},  # one job at a time: this machine's two cores are shared
            "retrieve": {"prompts": [CLASS_PROMPT], "pool": pool, "num_images": sizes["class_images"],
                         "threshold": RETRIEVAL_THRESHOLD, "resolution": world.IMAGE_SIZE,
                         # 32 px shapes: stored losslessly (JPEG, even at 95, moves a few edge pixels)
                         "image_format": "png",
                         "download": {"allow_loopback": True, "timeout": 5, "retries": 1}},
            "concepts": {"star1": {**concept, "class_data": "retrieval"}, "star1-noprior": concept},
            "jobs": [{"name": "cd-retrieval-prior", "method": "custom_diffusion", "concepts": ["star1"],
                      "settings": {**settings, "with_prior_preservation": True,
                                   "num_class_images": sizes["class_images"]}},
                     {"name": "cd-no-prior", "method": "custom_diffusion", "concepts": ["star1-noprior"],
                      "settings": {**settings, "with_prior_preservation": False}}],
            "eval": {"prompts": ["a photo of {concept} star"], "samples_per_prompt": 1, "steps": 10,
                     "guidance_scale": 4.0}}


def _cli(args: list[str], log: Path, timeout: float) -> float:
    """``pixelmill ARGS`` as a user runs it (one torch thread); returns its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "pixelmill.cli", *args], env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"pixelmill {' '.join(args)} failed ({proc.returncode}); see {log}: "
                           + log.read_text()[-2000:])
    return round(time.perf_counter() - t0, 1)


def run_campaign(work: Path, sizes: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Pool source served on 127.0.0.1 → ``pixelmill pool build`` → ``pixelmill finetune`` (both CLIs)."""
    import yaml

    from pixelmill.samples import LoopbackFileServer

    web = work / "web"
    instances = str(work / "instances")
    captions = write_concept(instances)
    seconds = {}
    with LoopbackFileServer(str(web)) as server:
        rows = write_pool_source(str(web / "toy"), server.base_url + "/toy", str(work / "pool-src"),
                                 sizes["pool_rows"])
        home = ["--home", str(work / "home")]
        seconds["pool_build"] = _cli(["pool", "build", str(work / "pool-src"), "--clip", "toy:clip",
                                      "--image-column", "", "--out", str(work / "pool"), *home],
                                     work / "pool-build.log", timeout)
        cfg = campaign(work, str(work / "pool"), instances, sizes)
        path = work / "campaign.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        seconds["finetune"] = _cli(["finetune", str(path), "--json", *home], work / "finetune.log", timeout)
    return {"config": cfg, "config_path": str(path), "pool_rows": rows, "instance_captions": captions,
            "cli_seconds": seconds}


def job_artifacts(cfg: dict[str, Any]) -> dict[str, str]:
    """Each job's artifacts folder, from the campaign's results table."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(cfg["output"]) / "results.parquet")).to_pylist()
    out = {}
    for r in table:
        if r["status"] != "finished":
            raise RuntimeError(f"job {r['name']} {r['status']}")
        out[r["name"]] = str(Path(r["job_dir"]) / "artifacts")
    return out


def retrieved_figures(cfg: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """The retrieved images as the detectors read them (the class prompt asks for a star), and the readings."""
    from PIL import Image

    from pixelmill.datasets import Dataset
    from pixelmill.datasets.images import decode_image

    url = str(Path(cfg["output"]) / "retrieval" / "images")
    rows = Dataset.open(url).to_table(["image", "caption", "url"]).to_pylist()
    found = read([decode_image(r["image"]).convert("RGB") for r in rows])
    # the same images as served (PNG): the stored ones must read the same
    web = Path(cfg["output"]).parent / "web" / "toy"
    source = read([Image.open(web / r["url"].rsplit("/", 1)[1]).convert("RGB") for r in rows])
    return {"images": len(rows), "star": share(found, CLASS_SHAPE), "star_as_served": share(source, CLASS_SHAPE),
            "caption_names_star": round(sum(world.parse_caption(r["caption"])["shape"] == CLASS_SHAPE
                                            for r in rows) / max(1, len(rows)), 4),
            "colours": dict(Counter(d.color for d in found).most_common())}, found


def class_readout(found) -> dict[str, Any]:
    return {"star": share(found, CLASS_SHAPE), "colours": dict(Counter(d.color for d in found).most_common())}


def measure_prior(out: Path, sizes: dict[str, Any], seed: int = REPORT_SEED, reuse: bool = False) -> dict[str, Any]:
    """The campaign (``reuse``: the one already in ``out``), then its figures; writes
    ``out/custom_diffusion_prior.json``."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    work = out / "cd-prior-run"
    if reuse:
        run = json.loads((work / "run.json").read_text())
        run["config"] = yaml.safe_load((work / "campaign.yaml").read_text())
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run = run_campaign(work, sizes)
        (work / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "config"}, indent=1))
    cfg = run["config"]
    jobs = job_artifacts(cfg)
    retrieved, real = retrieved_figures(cfg)
    n = sizes["samples"]
    base = BaseSamples(_pipeline("toy:sd"))
    seeds = [seed] + ([TRIAL_SEED] if sizes.get("trial") else [])
    figures: dict[str, Any] = {}
    for s in seeds:
        ref_class = read(base(CLASS_PROMPT, n, s + 2000))
        fig = {"base": {"concept_purple_star": share(read(base(CONCEPT_PROMPT, n, s)), CLASS_SHAPE, CONCEPT_COLOR),
                        "class": class_readout(ref_class), "class_tv_to_retrieved": tv_distance(real, ref_class)}}
        for name, folder in jobs.items():
            pipe = trained_pipeline("custom_diffusion", folder)
            concept = read(sample(pipe, CONCEPT_PROMPT, n, s))
            klass = read(sample(pipe, CLASS_PROMPT, n, s + 2000))
            fig[name] = {"concept_purple_star": share(concept, CLASS_SHAPE, CONCEPT_COLOR),
                         "concept_star": share(concept, CLASS_SHAPE), "class": class_readout(klass),
                         "class_tv_to_base": tv_distance(ref_class, klass),
                         "class_tv_to_retrieved": tv_distance(real, klass)}
        figures[str(s)] = fig
    doc = {"class_prompt": CLASS_PROMPT, "concept_prompt": CONCEPT_PROMPT, "threshold": RETRIEVAL_THRESHOLD,
           "pool_seed": POOL_SEED, "pool_rows": run["pool_rows"], "class_images": sizes["class_images"],
           "steps": sizes["steps"], "learning_rate": LEARNING_RATE, "samples": n, "sample_seed": seed,
           "trial_seed": TRIAL_SEED if sizes.get("trial") else None, "cli_seconds": run["cli_seconds"],
           "instance_captions": run["instance_captions"], "retrieved": retrieved,
           "figures": figures[str(seed)], "trial": figures.get(str(TRIAL_SEED))}
    (out / "custom_diffusion_prior.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description="Retrieval as Custom Diffusion's prior, one campaign, toy world.")
    parser.add_argument("--out", default="quality-report")
    parser.add_argument("--fast", action="store_true", help="a small pool, a few steps and samples")
    parser.add_argument("--reuse", action="store_true", help="measure the campaign already run in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    doc = measure_prior(Path(args.out), FAST if args.fast else FULL, reuse=args.reuse)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
