"""Edit-actor memory against shard size: streamed calls (the default) against whole-shard calls.

One input shard of N noise images (incompressible PNGs, so a shard's bytes are what they
look like) is edited by the bulk-edit flow with a tiny random-weight img2img model, once
with the stage's default ``rows_per_call`` (a shard streams through the actor 256 rows at
a time) and once with ``rows_per_call: N`` (the whole shard in one call, as before
streaming). Each run's stage actor reports its process's peak resident memory (the
``worker_peak_rss_mb`` of the run's timing); the table prints it per N, and the growth
from the smallest N for each mode (target: streamed within 20%).

    python benchmarks/edit_memory.py [--sizes 100,1000,10000 --px 96]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_noise_images(folder: Path, n: int, px: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(folder / f"img-{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,10000", help="rows per shard, comma-separated")
    p.add_argument("--px", type=int, default=96, help="input image side")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sizes = sorted(int(x) for x in args.sizes.split(","))

    from pixelmill.config import EditConfig
    from pixelmill.datasets.importer import import_folder
    from pixelmill.models import save_tiny_img2img
    from pixelmill.runtime import Runtime

    root = Path(tempfile.mkdtemp(prefix="pixelmill-mem-"))
    model = save_tiny_img2img(root / "model")
    make_noise_images(root / "files", sizes[-1], args.px)
    import_folder(str(root / "files"), str(root / "images"), num_buckets=1)
    print(f"bench: tiny img2img, {args.px}-px noise PNGs edited at 64 px, one input shard of N rows; "
          f"{args.threads} threads")
    results: dict[tuple[str, int], float] = {}
    with Runtime(home=root / "home", num_cpus=args.threads, lazy_ray=False):
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        for n in sizes:
            for mode, per_call in (("streamed", None), ("whole shard", n)):
                cfg = EditConfig(input=str(root / "images"), output=str(root / f"out-{mode[0]}-{n}"), model=model,
                                 prompt="a painting", strength=0.5, steps=2, resolution=64, batch_size=16,
                                 limit=n, caption_column=None,
                                 placement={"cpus": args.threads, "rows_per_call": per_call})
                t = time.perf_counter()
                s = bulk_edit_flow(cfg.model_dump(), show_progress=False)
                assert s.rows_out == n, s
                results[(mode, n)] = s.timing["worker_peak_rss_mb"]
                print(f"  {n:>6} rows, {mode:<11}: actor peak RSS {results[(mode, n)]:8.1f} MB "
                      f"({s.timing['calls']} call(s), {time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{'rows per shard':>15} {'streamed MB':>12} {'whole-shard MB':>15}")
    for n in sizes:
        print(f"{n:>15} {results[('streamed', n)]:>12.1f} {results[('whole shard', n)]:>15.1f}")
    for mode in ("streamed", "whole shard"):
        growth = results[(mode, sizes[-1])] / results[(mode, sizes[0])]
        print(f"{mode}: peak at {sizes[-1]} rows / at {sizes[0]} rows = {growth:.2f}"
              + ("   (target <= 1.20)" if mode == "streamed" else ""))


if __name__ == "__main__":
    main()
