"""Orchestration at scale: Prefect + Ray overhead per input shard of a bulk edit, and what stays bounded.

The same rows are edited twice in one runtime (a local Ray and a Prefect server of its own,
started once): split into about ``--shards`` input shards (a few tiny rows each: the
many-shard case) and into ``--few`` shards (the baseline). Both runs do the same stage
calls on the same rows, so what the many-shard run costs beyond the baseline, less the
difference of their stage calls' own time (recorded inside the run), is the orchestration
cost of the extra shards: Ray Data's tasks and blocks, the per-shard commits of the
output, the driver's accounting. Divided by the extra shards, that is the overhead per
shard (target, issue #17: <= 50 ms).

Bounded state: the Prefect server's database (its size before and after each run: a stage
is one Prefect task whatever its shard count, so it must not grow with shards) and the Ray
object store (its peak use during each run, sampled every 0.5 s, against its capacity).

    python benchmarks/orchestration.py [--rows 4000] [--shards 1000] [--few 8]

Rows are 32 px images, edited by the tiny SD img2img model (1 step at 32 px): the stage
call is cheap, so orchestration dominates. Figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_images(folder: Path, n: int) -> None:
    """n tiny drawn images (32x32 PNGs)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img-{i:05d}.png")


def buckets_for(rows: int, shards: int) -> int:
    """Hash buckets that leave about ``shards`` non-empty ones for ``rows`` rows (empty ones are not written)."""
    import math

    if shards >= rows:
        return rows
    b = shards
    while b * (1 - math.exp(-rows / b)) < shards:
        b += 1
    return b


class ObjectStorePeak:
    """Samples the Ray object store's use (plasma bytes) in a thread; ``peak`` is the largest seen."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self.capacity = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        m = re.search(r"Plasma memory usage (\d+) MiB", text)
        return int(m.group(1)) * 2**20 if m else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.sample())
            except Exception:  # noqa: BLE001 - a missed sample only
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> ObjectStorePeak:
        import ray

        self.capacity = int(ray.cluster_resources().get("object_store_memory", 0))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--shards", type=int, default=1000, help="input shards of the many-shard run (about)")
    p.add_argument("--few", type=int, default=8, help="input shards of the baseline run")
    p.add_argument("--workdir", default=None)
    p.add_argument("--rounds", type=int, default=2, help="few/many pairs, alternated (the tests' tiny run: 1)")
    args = p.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pixelmill-orch-"))
    root.mkdir(parents=True, exist_ok=True)
    from pixelmill.config import EditConfig
    from pixelmill.datasets import Dataset
    from pixelmill.datasets.importer import import_folder
    from pixelmill.models import save_tiny_img2img
    from pixelmill.runtime import Runtime

    model = save_tiny_img2img(root / "model")
    if not (root / "files").exists():
        make_images(root / "files", args.rows)
    inputs = {}
    for name, shards in (("many", args.shards), ("few", args.few)):
        url = str(root / f"images-{name}")
        if not Path(url).exists():
            import_folder(str(root / "files"), url, num_buckets=buckets_for(args.rows, shards))
        inputs[name] = (url, len(Dataset.open(url).shard_names()))

    results = {}
    with Runtime(home=root / "home", lazy_ray=False):
        from pixelmill.flows.bulk_edit import bulk_edit_flow

        db = root / "home" / "prefect.db"

        def config(name: str, url: str, limit: int | None = None):
            return EditConfig.model_validate(dict(
                input=url, output=str(root / f"out-{name}"), model=model, prompt="a painting", strength=0.5,
                steps=2, resolution=32, batch_size=8, caption_column=None, placement={"workers": 1}, limit=limit))

        # untimed: the first flow run in a process pays one-off costs (imports, Prefect's flow registration)
        bulk_edit_flow(config("warm-up", inputs["few"][0], limit=2).model_dump(mode="json"), show_progress=False)
        rounds = [("few", "many")] + [(f"few{k}", f"many{k}") for k in range(2, args.rounds + 1)]
        for name in [n for pair in rounds for n in pair]:  # alternated: a load change hits both
            kind = name.rstrip("0123456789")
            url, n_shards = inputs[kind]
            cfg = config(name, url)
            before = db.stat().st_size
            t = time.perf_counter()
            with ObjectStorePeak() as store:
                s = bulk_edit_flow(cfg.model_dump(mode="json"), show_progress=False)
            wall = time.perf_counter() - t
            assert s.rows_out + s.rejects == args.rows, s
            results[name] = dict(shards=n_shards, wall=wall, calls=s.timing["calls"],
                                 call_s=s.timing["call_seconds"], setup_s=s.timing["setup_seconds"],
                                 db_growth=db.stat().st_size - before, store_peak=store.peak,
                                 store_capacity=store.capacity)
            r = results[name]
            print(f"  {name:<6} {n_shards:5d} shards  wall {wall:7.1f} s  stage calls {r['calls']:5d} "
                  f"({r['call_s']:6.1f} s)  set-up {r['setup_s']:5.1f} s  "
                  f"Prefect db +{r['db_growth'] / 2**20:5.2f} MiB  "
                  f"object store peak {store.peak / 2**20:6.1f} of {store.capacity / 2**20:,.0f} MiB", flush=True)
    per_shard = []
    for few, many in rounds:
        a, b = results[few], results[many]
        extra = (b["wall"] - b["setup_s"] - b["call_s"]) - (a["wall"] - a["setup_s"] - a["call_s"])
        per_shard.append(extra / (b["shards"] - a["shards"]))
    ms = sorted(1000 * x for x in per_shard)
    print(f"orchestration overhead per extra shard: {', '.join(f'{x:.1f}' for x in ms)} ms "
          f"(target <= 50 ms; {args.rows} rows; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    growth = max(r["db_growth"] for r in results.values()) / 2**20
    print(f"Prefect database growth per run: at most {growth:.2f} MiB whatever the shard count "
          f"(one Prefect task per stage); object store peak: at most "
          f"{max(r['store_peak'] for r in results.values()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
