"""Bulk-edit throughput: the pixelmill flow against a bare diffusers loop, in one invocation.

Both run the same SD-shaped pipeline (UNet block widths 64/128/256 on 64×64 latents,
i.e. 512-px images, random weights: speed does not depend on weights), the same images,
steps, strength, guidance and batch size, with the same CPU threads. The flow's
steady-state throughput is measured by difference (a run over N2 rows minus a run over
N1 rows), which cancels the per-run fixed costs (actor start, model load); those and the
runtime start-up (Ray + Prefect server) are printed separately.

    python benchmarks/bulk_edit.py [--n1 4 --n2 8 --threads 2]
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=4)
    p.add_argument("--n2", type=int, default=10)
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
    make_images(root / "files", args.n2 + args.batch)
    import_folder(str(root / "files"), str(root / "images"), num_buckets=1)
    print(f"bench: SD-shaped UNet 64/128/256, 512-px images, {args.steps} steps x strength {args.strength}, "
          f"batch {args.batch}, {args.threads} threads; flow rows {args.n1} and {args.n2}")

    bare = bare_loop(model, str(root / "images"), args.n2 - args.n1, args.batch, args.steps, args.strength,
                     args.threads)
    print(f"bare diffusers loop:        {bare:.4f} images/s")

    t0 = time.perf_counter()
    with Runtime(home=root / "home", num_cpus=args.threads):
        startup = time.perf_counter() - t0
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        times = {}
        for n in (args.n1, args.n2):
            cfg = EditConfig(input=str(root / "images"), output=str(root / f"out-{n}"), model=model,
                             prompt="a watercolor painting", strength=args.strength, steps=args.steps,
                             resolution=512, batch_size=args.batch, limit=n, workers=1,
                             num_cpus_per_worker=args.threads, caption_column=None)
            t = time.perf_counter()
            s = bulk_edit_flow(cfg.model_dump(), show_progress=False)
            times[n] = time.perf_counter() - t
            assert s.rows_out == n, s
    steady = (args.n2 - args.n1) / (times[args.n2] - times[args.n1])
    fixed = times[args.n1] - args.n1 / steady
    print(f"pixelmill flow (steady):    {steady:.4f} images/s")
    print(f"ratio flow / bare:          {steady / bare:.3f}   (target >= 0.9)")
    print(f"fixed cost per flow run:    {fixed:.1f} s (actor start, model load, Prefect task round trips)")
    print(f"runtime start-up:           {startup:.1f} s (local Ray + Prefect API server, once per command)")
    print(f"flow wall times:            {args.n1} rows {times[args.n1]:.1f} s, {args.n2} rows {times[args.n2]:.1f} s")


if __name__ == "__main__":
    main()
