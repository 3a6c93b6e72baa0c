"""The toy InstructPix2Pix (``toy:ip2p``): its training pairs, shipping it, and measuring its edits.

- ``pairs``: the training pairs. Captions of world ``TRAIN_PAIRS_SEED`` rendered open by
  ``pairs_quality.render_shards`` (the two stages of ``pixelmill pairs``), then the CLIP
  filter with the toy thresholds (``pairs_quality.TOY_THRESHOLDS``) applied to the stored
  scores; the kept pairs are written as a ``pairs`` dataset (the stage's schema), which
  ``pixelmill finetune configs/finetune-toy-ip2p.yaml`` trains on.
- ``ship``: the campaign's trained pipeline folder into ``pixelmill/toy/models/ip2p``: the
  UNet (fp16 safetensors), scheduler and ``model_index.json``; the text encoder, tokenizer
  and VAE are the toy SD's (``shared_components.json``), checked tensor for tensor first.
- ``evaluate``: held-out toy-world images (world ``EDIT_SEED``, training shapes), each with
  "make the <shape> <colour>" to a colour that is neither the object's nor a background
  colour of the image; edits through ``load_instruct_pix2pix_pipeline`` as users load it;
  the detectors read whether the edit shows the requested colour and keeps the shape
  (and position). The random-weight InstructPix2Pix of ``pixelmill.models.tiny`` is the
  negative control; a small grid over ``image_guidance_scale`` x ``guidance_scale``.

``python -m pixelmill.toy.ip2p pairs|ship|evaluate ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pixelmill.toy import world
from pixelmill.toy.quality import save_sheet

EDIT_SEED = 23
"""World seed of the held-out images the toy InstructPix2Pix is measured on."""
EDIT_STEPS = 20
GUIDANCE = 4.0
IMAGE_GUIDANCE = 1.5
GRID_IMAGE_GUIDANCE = (1.0, 1.5, 2.0)
GRID_GUIDANCE = (3.0, 5.0, 7.5)
SHARED = ("text_encoder", "tokenizer", "vae")
INSTRUCTIONS = ("make the {shape} {color}", "paint the {shape} {color}", "change the color of the {shape} to {color}")


def build_pairs(render_dir: Path, out_url: str, thresholds: dict[str, float], max_per_caption: int = 2) -> dict:
    """Apply the CLIP filter (``thresholds``) to every rendered sample in ``render_dir``; write the kept pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelmill.datasets.writer import write_table_dataset
    from pixelmill.tasks.p2p.stage import OUTPUT_SCHEMA, STATUS_DROPPED
    from pixelmill.tasks.pair_filter import FilterThresholds, PairScores, decide_caption

    t = FilterThresholds(**thresholds, max_per_caption=max_per_caption)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(render_dir.glob("render-*.parquet"))])
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    by_caption: dict[str, list[dict]] = {}
    for r in rows:
        by_caption.setdefault(r["parent_id"], []).append(r)
    kept = []
    for samples in by_caption.values():
        samples.sort(key=lambda r: r["sample"])
        scores = [PairScores(r["clip_image_similarity"], r["clip_direction"], r["clip_source_caption"],
                             r["clip_edited_caption"]) for r in samples]
        decision = decide_caption(scores, t)
        kept += [{**r, "rank": d.rank} for r, d in zip(samples, decision.decisions) if d.keep]
    assert all(r["status"] != STATUS_DROPPED for r in kept)
    out = pa.Table.from_pylist(kept, schema=OUTPUT_SCHEMA)
    write_table_dataset(out_url, out, "pairs", {"generator": "pixelmill.toy.ip2p", "thresholds": thresholds,
                                                "max_per_caption": max_per_caption}, rows_per_shard=1000)
    return {"rendered": len(rows), "captions": len(by_caption), "kept": len(kept),
            "captions_kept": len({r["parent_id"] for r in kept}), "thresholds": thresholds}


def ship(artifacts: Path, out: Path, base: str = "toy:sd") -> dict[str, Any]:
    """Copy the trained UNet (fp16), scheduler and model index into ``out``; the rest is ``base``'s.

    Raises:
        ValueError: a shared component of the trained pipeline differs from ``base``'s.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from pixelmill.models.loading import TOY_MODELS_DIR, resolve_model_name

    base_dir = Path(resolve_model_name(base))
    checked = {}
    for name in SHARED:
        for src in sorted((artifacts / name).glob("*")):
            twin = base_dir / name / src.name
            if src.suffix == ".safetensors":
                a, b = load_file(str(src)), load_file(str(twin))
                if a.keys() != b.keys() or any(not torch.equal(a[k].float(), b[k].float()) for k in a):
                    raise ValueError(f"{name}/{src.name}: the trained pipeline's differs from {base}'s")
                checked[f"{name}/{src.name}"] = len(a)
            elif src.suffix == ".json":  # saving may add defaults: every setting of the base's must be the same
                a, b = json.loads(twin.read_text()), json.loads(src.read_text())
                differ = [k for k, v in a.items() if not k.startswith("_") and b.get(k, v) != v]
                if differ:
                    raise ValueError(f"{name}/{src.name} differs from {base}'s in {differ}")
                checked[f"{name}/{src.name}"] = "same settings"
            elif src.read_bytes() != twin.read_bytes():
                raise ValueError(f"{name}/{src.name} differs from {base}'s")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("unet", "scheduler"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "unet").mkdir()
    shutil.copy2(artifacts / "unet" / "config.json", out / "unet" / "config.json")
    weights = load_file(str(artifacts / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()},
              str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    shutil.copytree(artifacts / "scheduler", out / "scheduler")
    shutil.copy2(artifacts / "model_index.json", out / "model_index.json")
    other = base_dir.name if base_dir.parent == TOY_MODELS_DIR else base.removeprefix("toy:")
    (out / "shared_components.json").write_text(json.dumps({"components": {n: other for n in SHARED}}, indent=1)
                                                + "\n")
    return {"checked": checked, "unet_tensors": len(weights)}


def edit_items(n: int, seed: int = EDIT_SEED) -> list[dict[str, Any]]:
    """``n`` held-out images (training shapes) with an instruction to a new colour (not the object's,
    not a background colour), the instruction wording and colour drawn per row."""
    import numpy as np

    items = []
    for i in range(n):
        image, caption, obj = world.make_row(seed, i, world.TRAIN_SHAPES)
        rng = np.random.default_rng([seed, i, 1])
        taken = {obj.color, obj.background, obj.background2}
        target = str(rng.choice([c for c in world.COLORS if c not in taken]))
        wording = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        items.append({"image": image, "caption": caption, "shape": obj.shape, "color": obj.color,
                      "position": obj.position, "background": obj.background, "target": target,
                      "instruction": wording.format(shape=obj.shape, color=target)})
    return items


def edit(pipe, items: list[dict[str, Any]], guidance: float, image_guidance: float, steps: int = EDIT_STEPS,
         seed: int = 0, size: int = world.IMAGE_SIZE, chunk: int = 30) -> list:
    """The edited images (batched, seeded per chunk), at ``size`` (resized back to the toy size)."""
    import torch
    from PIL import Image

    out = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        g = torch.Generator().manual_seed(seed + start)
        with torch.no_grad():
            images = pipe(prompt=[it["instruction"] for it in part],
                          image=[it["image"].resize((size, size), Image.BICUBIC) for it in part],
                          num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                          generator=g).images
        out += [im.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.BICUBIC) for im in images]
    return out


def score(images, items: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of edits showing the requested colour, keeping the shape, keeping the position (3x3 cell),
    keeping the background (its first colour), and both colour and shape; plus the share still showing
    the source colour."""
    from pixelmill.toy.detect import detect

    n = len(items)
    hits = {"color": 0, "shape": 0, "position": 0, "background": 0, "both": 0, "source_color": 0}
    for im, it in zip(images, items):
        d = detect(im)
        hits["background"] += d.background == it["background"]
        hits["color"] += d.color == it["target"]
        hits["shape"] += d.shape == it["shape"]
        hits["position"] += d.position == it["position"]
        hits["both"] += d.color == it["target"] and d.shape == it["shape"]
        hits["source_color"] += d.color == it["color"]
    return {k: round(v / n, 4) for k, v in hits.items()}


def save_strip(items: list[dict[str, Any]], edited, path: Path, cols: int = 16) -> None:
    """Inputs over their edits, ``cols`` per row pair (the model card's ``samples.png``)."""
    from PIL import Image

    n, k = world.IMAGE_SIZE, min(len(items), len(edited))
    rows = (k + cols - 1) // cols
    grid = Image.new("RGB", (cols * n, 2 * rows * n), "white")
    for i in range(k):
        x, y = (i % cols) * n, (i // cols) * 2 * n
        grid.paste(items[i]["image"], (x, y))
        grid.paste(edited[i], (x, y + n))
    save_sheet(grid, path)


def load(model: str):
    from pixelmill.models.loading import load_instruct_pix2pix_pipeline

    return load_instruct_pix2pix_pipeline(model, device="cpu", dtype="float32", safety_checker=False)


def evaluate(model: str = "toy:ip2p", n: int = 120, grid: bool = True, control: bool = True,
             out: Path | None = None) -> dict[str, Any]:
    """The edit measurement (module docstring); writes ``out/ip2p.json`` when ``out`` is given."""
    import tempfile

    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    items = edit_items(n)
    pipe = load(model)
    doc: dict[str, Any] = {"model": model, "images": n, "seed": EDIT_SEED, "steps": EDIT_STEPS,
                           "chance_color": round(1 / len(world.COLORS), 4),
                           "chance_shape": round(1 / len(world.SHAPES), 4)}
    doc["identity"] = score([it["image"] for it in items], items)
    doc["default"] = {"guidance_scale": GUIDANCE, "image_guidance_scale": IMAGE_GUIDANCE,
                      **score(edit(pipe, items, GUIDANCE, IMAGE_GUIDANCE), items)}
    if grid:
        doc["grid"] = [{"image_guidance_scale": ig, "guidance_scale": g,
                        **(doc["default"] if (g, ig) == (GUIDANCE, IMAGE_GUIDANCE)
                           else score(edit(pipe, items, g, ig), items))}
                       for ig in GRID_IMAGE_GUIDANCE for g in GRID_GUIDANCE]
    if control:
        from pixelmill.models.tiny import save_tiny_instruct_pix2pix

        with tempfile.TemporaryDirectory() as tmp:
            rand = load(save_tiny_instruct_pix2pix(Path(tmp) / "ip2p"))
            doc["random_weights"] = {"model": "pixelmill.models.tiny instruct-pix2pix (random, 64x64)",
                                     **score(edit(rand, items, GUIDANCE, IMAGE_GUIDANCE, size=64), items)}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ip2p.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The toy InstructPix2Pix: pairs, ship, evaluate.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs", help="filter rendered samples into the training pairs dataset")
    p.add_argument("--render", default=".pixelmill/ip2p/render")
    p.add_argument("--out", default=".pixelmill/ip2p/pairs")
    p.add_argument("--calibrate", action="store_true", help="calibrate the thresholds on these samples first")
    s = sub.add_parser("ship", help="the trained campaign job's artifacts -> pixelmill/toy/models/ip2p")
    s.add_argument("artifacts")
    s.add_argument("--out", default=str(Path(__file__).parent / "models" / "ip2p"))
    e = sub.add_parser("evaluate")
    e.add_argument("--model", default="toy:ip2p")
    e.add_argument("-n", type=int, default=120)
    e.add_argument("--no-grid", action="store_true")
    e.add_argument("--out", default="quality-report")
    args = parser.parse_args(argv)
    if args.cmd == "pairs":
        from pixelmill.toy import pairs_quality as pq

        thresholds = pq.TOY_THRESHOLDS
        if args.calibrate:
            import pyarrow as pa
            import pyarrow.parquet as pqt

            table = pa.concat_tables([pqt.read_table(f) for f in sorted(Path(args.render).glob("render-*.parquet"))])
            judged = pq.judge(table)
            cal = pq.calibrate(judged)
            print(json.dumps({"unfiltered": pq.summary(judged, None), "paper": pq.summary(judged, pq.PAPER),
                              "calibrated": cal}, indent=1))
            thresholds = cal["thresholds"]
        print(json.dumps(build_pairs(Path(args.render), args.out, thresholds), indent=1))
    elif args.cmd == "ship":
        print(json.dumps(ship(Path(args.artifacts), Path(args.out)), indent=1))
    else:
        print(json.dumps(evaluate(args.model, args.n, grid=not args.no_grid, out=Path(args.out)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
