"""Bulk-edit throughput: the pixelmill flow against a bare diffusers loop, in one invocation.

Both run the same SD-shaped pipeline (UNet block widths 64/128/256 on 64×64 latents,
i.e. 512-px images, random weights: speed does not depend on weights), the same images,
steps, strength, guidance and batch size, with the same CPU threads. The two alternate in
``--rounds`` rounds (bare, then flow), so load from other processes lands on both alike;
each ratio is a round's, and the median is printed.

The flow's steady state is measured inside the run: the stage actor times each of its
calls (model loading excluded; decode, every batch and PNG encode included, the first
batch's warm-up too, which the bare loop leaves out: the ratio errs against pixelmill).
What the run costs beyond that is its fixed cost: flow wall time minus the actor's set-up
(model load) and its calls (Prefect flow and task runs, Ray Data start, planning,
commit). Runtime start-up (Ray + Prefect server, once per command) is printed apart;
``benchmarks/startup.py`` measures it cold and warm.

    python benchmarks/bulk_edit.py [--rows 6 --rounds 3 --batch 2 --threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_pipeline(out: Path, cross_dim: int = 32) -> str:
    """Save an SD-shaped img2img pipeline with a benchmark-sized UNet and an 8× VAE."""
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline

    from pixelmill.models.tiny import build_sd_unet_for_benchmark, build_tiny_sd_components

    comps = build_tiny_sd_components()
    comps["unet"] = build_sd_unet_for_benchmark(block_out_channels=(64, 128, 256), cross_attention_dim=cross_dim)
    comps["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), sample_size=512,
    )
    StableDiffusionImg2ImgPipeline(**comps).save_pretrained(str(out), safe_serialization=True)
    return str(out)


def make_images(folder: Path, n: int) -> None:
    """n drawn 512×512 images (all one size, so batches are full)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = Image.new("RGB", (512, 512), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 400, 2)
            d.rectangle([int(x), int(y), int(x) + 100, int(y) + 100],
                        fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        im.save(folder / f"img-{i:04d}.png")
        (folder / f"img-{i:04d}.txt").write_text("colored squares")


def bare_loop(model: str, dataset: str, n: int, batch: int, steps: int, strength: float, threads: int) -> float:
    """Images/s of a plain diffusers loop (decode, resize, pipe, PNG encode), after one warm-up batch."""
    import torch
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    from pixelmill.datasets import Dataset

    torch.set_num_threads(threads)
    pipe = AutoPipelineForImage2Image.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    rows = Dataset.open(dataset).to_table(["id", "image"]).to_pylist()[: n + batch]

    def run(chunk):
        images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB").resize((512, 512)) for r in chunk]
        gens = [torch.Generator().manual_seed(i) for i in range(len(chunk))]
        out = pipe(prompt=["a watercolor painting"] * len(chunk), image=images, strength=strength,
                   num_inference_steps=steps, guidance_scale=7.5, generator=gens).images
        for im in out:
            im.save(io.BytesIO(), "PNG")

    run(rows[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(batch, n + batch, batch):
        run(rows[i : i + batch])
    return n / (time.perf_counter() - t)


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6, help="images per measured run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from pixelmill.config import EditConfig
    from pixelmill.datasets.importer import import_folder
    from pixelmill.runtime import Runtime

    root = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    model = build_pipeline(root / "model")
    make_images(root / "files", args.rows + args.batch)
    import_folder(str(root / "files"), str(root / "images"), num_buckets=1)
    print(f"bench: SD-shaped UNet 64/128/256, 512-px images, {args.steps} steps x strength {args.strength}, "
          f"batch {args.batch}, {args.threads} threads; {args.rows} images per run, {args.rounds} rounds")

    t0 = time.perf_counter()
    with Runtime(home=root / "home", num_cpus=args.threads, lazy_ray=False):
        startup = time.perf_counter() - t0
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        rounds = []
        for r in range(args.rounds):
            bare = bare_loop(model, str(root / "images"), args.rows, args.batch, args.steps, args.strength,
                             args.threads)
            cfg = EditConfig(input=str(root / "images"), output=str(root / f"out-{r}"), model=model,
                             prompt="a watercolor painting", strength=args.strength, steps=args.steps,
                             resolution=512, batch_size=args.batch, limit=args.rows, workers=1,
                             num_cpus_per_worker=args.threads, caption_column=None)
            t = time.perf_counter()
            s = bulk_edit_flow(cfg.model_dump(), show_progress=False)
            wall = time.perf_counter() - t
            assert s.rows_out == args.rows and s.timing["calls"] >= 1, s
            steady = args.rows / s.timing["call_seconds"]
            fixed = wall - s.timing["call_seconds"] - s.timing["setup_seconds"]
            rounds.append(dict(bare=bare, flow=steady, ratio=steady / bare, fixed=fixed, wall=wall,
                               setup=s.timing["setup_seconds"]))
            print(f"round {r + 1}: bare {bare:.4f} images/s, flow steady {steady:.4f} images/s "
                  f"(ratio {steady / bare:.3f}); flow run {wall:.1f} s = model load {s.timing['setup_seconds']:.1f} s"
                  f" + stage calls {s.timing['call_seconds']:.1f} s + fixed {fixed:.1f} s")

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    print(f"bare diffusers loop:        {med('bare'):.4f} images/s (median)")
    print(f"pixelmill flow (steady):    {med('flow'):.4f} images/s (median, timed inside the stage)")
    print(f"ratio flow / bare:          {med('ratio'):.3f}   (median of {len(rounds)} paired rounds; "
          f"range {min(x['ratio'] for x in rounds):.3f}-{max(x['ratio'] for x in rounds):.3f}; target >= 0.95)")
    print(f"fixed cost per flow run:    {med('fixed'):.1f} s beyond loading the model once "
          f"(median; Prefect runs, Ray Data and actor start, plan, commit; target <= 3 s)")
    print(f"model load in the actor:    {med('setup'):.1f} s (median)")
    print(f"runtime start-up:           {startup:.1f} s (local Ray + Prefect API server started together, cold)")


if __name__ == "__main__":
    main()
