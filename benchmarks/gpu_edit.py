"""GPU throughput of pixelmill's edit stage against the bare diffusers loop (run by ``benchmarks/gpu.sh``).

Two workloads, each on an SD 1.5-shaped pipeline with random weights built here from
SD 1.5's config dimensions (UNet 320/640/1280/1280, 859.5M parameters; VAE
128/256/512/512; CLIP ViT-L/14 text encoder, 12 layers of 768; speed does not depend on
the weights) and saved as a diffusers folder, so the stage loads it the way it loads any
checkpoint:

* ``sdedit``: img2img at 512 px, strength 0.8 of 50 steps (40 run), guidance 7.5;
* ``ip2p``: InstructPix2Pix (8-channel UNet input) at 512 px, 50 steps, guidance 7.5 and
  image guidance 1.5 (three UNet rows per image and step).

For each, over the same drawn PNG images and at the same batch size:

* ``stage``: pixelmill's edit stage called in this process, as ``tasks/stage.py``'s
  ``run_stage_inline`` calls it (build, ``setup()``, call on an Arrow table; no Ray, no
  Prefect), with bf16, channels-last, ``torch.compile`` of the UNet and VAE, ``batch_size: auto``
  (from free GPU memory), the VAE decode overlapped with the next batch's denoising (a
  worker thread and a second CUDA stream) and image decode/PNG encode on CPU threads;
* ``bare``: the plain diffusers loop (decode the PNGs, ``pipe(...)`` with one generator
  per row, PNG-encode the outputs), run by a pipeline of the same class built on the
  stage's own modules, so both drive the same bf16, channels-last, compiled networks and
  differ only in the loop around them.

Each run is one untimed warm-up batch (the stage's pays the compile; the bare loop's runs 5
steps on the already compiled modules), then ``--batches`` timed batches; dynamo's caches
are reset between workloads, as each would run in its own worker. Work is counted, not
assumed: hooks on the UNet, the VAE encoder and the VAE decoder count the rows each ran
over the timed part, and the FLOPs of one row of each are measured with torch's
``FlopCounterMode`` on a meta-device copy of the model at the run's resolution (for SD 1.5
at 512 px: UNet 0.803, VAE encode 1.117, decode 2.515 TFLOP, the anchors' figures).
TFLOP/s is printed for the UNet alone and for UNet + VAE; the share of the GPU's dense
bf16 peak (by device name: H100 SXM and H200 989, A100 312 TFLOP/s; otherwise n/a) is
given for both; text encoder FLOPs are not counted.

``--dry-run`` runs the same code on the CPU with pixelmill's tiny test pipelines, 64-px
images, 4 steps, batch 2, float32 (this CPU emulates bf16 convolutions, ten times slower)
and no compile (inductor's CPU compile of even the tiny UNet takes minutes; ``--compile
unet`` runs it) in well under a minute: a check of the script, not a measurement (its
figures mean nothing).

    bash benchmarks/gpu.sh [--dry-run] [--out FILE] [--batches 3] [--batch auto] [--compile unet]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ANCHOR_TFLOP = {"unet": 0.803, "vae_encode": 1.117, "vae_decode": 2.515}
"""TFLOP of one 512-px SD 1.5 forward (``shared/anchors.md``, Speed limits), to check the measured ones against."""

PEAK_BF16_DENSE_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
"""Dense bf16 peak by device-name substring: H100/H200 SXM and A100 (the NVL and PCIe H100/H200 parts differ)."""

WORKLOADS = ("sdedit", "ip2p")


def dense_bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak in TFLOP/s of a GPU by its name, or None when it is not known here."""
    name = device_name.upper()
    if "NVL" in name or ("H100" in name and "PCIE" in name):
        return None
    for key, peak in PEAK_BF16_DENSE_TFLOPS:
        if key in name:
            return peak
    return None


def build_sd15_folder(out: Path, in_channels: int, device: str) -> str:
    """Save a random-weight SD 1.5-shaped pipeline (bf16 safetensors): img2img, or InstructPix2Pix with 8 channels."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInstructPix2PixPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from pixelmill.models.tiny import build_sd_unet_for_benchmark, sd_scheduler_config
    from pixelmill.models.tokenizer import (
        BOS_TOKEN_ID,
        EOS_TOKEN_ID,
        MODEL_MAX_LENGTH,
        VOCAB_SIZE,
        build_clip_tokenizer,
    )

    with torch.device(device):  # initialise on the GPU: seconds instead of a minute of CPU init
        unet = build_sd_unet_for_benchmark(block_out_channels=(320, 640, 1280, 1280), in_channels=in_channels,
                                           dtype=torch.bfloat16, device=device)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=MODEL_MAX_LENGTH, vocab_size=VOCAB_SIZE, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID))
    parts = dict(unet=unet, vae=vae.to(torch.bfloat16).eval(), text_encoder=text.to(torch.bfloat16).eval(),
                 tokenizer=build_clip_tokenizer(), scheduler=DDIMScheduler(**sd_scheduler_config()),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = StableDiffusionInstructPix2PixPipeline if in_channels == 8 else StableDiffusionImg2ImgPipeline
    cls(**parts).save_pretrained(str(out), safe_serialization=True)
    del parts
    torch.cuda.empty_cache()
    return str(out)


def build_model(kind: str, root: Path, dry_run: bool, device: str) -> str:
    from pixelmill.models.tiny import save_tiny_img2img, save_tiny_instruct_pix2pix

    folder = root / kind
    if dry_run:
        return (save_tiny_instruct_pix2pix if kind == "ip2p" else save_tiny_img2img)(folder)
    return build_sd15_folder(folder, 8 if kind == "ip2p" else 4, device)


def drawn_pngs(n: int, size: int) -> list[bytes]:
    """n drawn size×size PNG images (rectangles on a colour), all one size so every batch is full."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            draw.rectangle([x, y, x + size // 5, y + size // 5], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def image_table(pngs: list[bytes], start: int, count: int):
    """Rows ``start .. start+count`` as the stage's input table (``id``, ``image``)."""
    import pyarrow as pa

    from pixelmill.datasets.images import IMAGE_TYPE

    rows = [{"id": f"img-{i:05d}", "image": {"bytes": pngs[i], "path": None}} for i in range(start, start + count)]
    return pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("image", IMAGE_TYPE)]))


class WorkCounter:
    """Rows run through the UNet, the VAE encoder and the VAE decoder, counted by forward pre-hooks.

    The stage compiles modules' ``forward``, so the hooks run outside compiled code; they
    are kept out of any graph all the same (``torch.compiler.disable``).
    """

    PARTS = {"unet": ("unet",), "vae_encode": ("vae", "encoder"), "vae_decode": ("vae", "decoder")}

    def __init__(self, pipe: Any) -> None:
        import torch

        self.rows = dict.fromkeys(self.PARTS, 0)
        for part, path in self.PARTS.items():
            module = pipe
            for name in path:
                module = getattr(module, name)

            @torch.compiler.disable
            def count(_module, args, kwargs, part=part):
                x = args[0] if args else next(iter(kwargs.values()))
                self.rows[part] += int(x.shape[0])

            module.register_forward_pre_hook(count, with_kwargs=True)

    def reset(self) -> None:
        self.rows = dict.fromkeys(self.PARTS, 0)


def forward_tflop(pipe: Any, resolution: int) -> dict[str, float]:
    """TFLOP of one row through the UNet, the VAE encoder and the VAE decoder at ``resolution``.

    Counted by ``FlopCounterMode`` on meta-device copies built from the models' configs
    (no memory, no compile, nothing run on the device).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    side = resolution // pipe.vae_scale_factor
    tokens = pipe.tokenizer.model_max_length
    with torch.device("meta"):
        unet = type(pipe.unet).from_config(unet_cfg)
        vae = type(pipe.vae).from_config(vae_cfg)
        x = torch.empty(1, unet_cfg.in_channels, side, side)
        text = torch.empty(1, tokens, unet_cfg.cross_attention_dim)
        z = torch.empty(1, vae_cfg.latent_channels, side, side)
        image = torch.empty(1, 3, resolution, resolution)
    out = {}
    with torch.no_grad():
        for part, run in (("unet", lambda: unet(x, torch.tensor(1, device="meta"), encoder_hidden_states=text)),
                          ("vae_encode", lambda: vae.encoder(image)), ("vae_decode", lambda: vae.decode(z))):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            out[part] = counter.get_total_flops() / 1e12
    return out


def stage_config(kind: str, model: str, a: argparse.Namespace, device: str, attention: str = "auto",
                 fuse_qkv: bool = False) -> dict[str, Any]:
    from pixelmill.config import EditConfig

    text = {"instruction": "make it a watercolor painting"} if kind == "ip2p" else {"prompt": "a watercolor painting"}
    return EditConfig(
        input="benchmark", output="benchmark", method="instruct_pix2pix" if kind == "ip2p" else "sdedit",
        model=model, **text, strength=a.strength, steps=a.steps, guidance_scale=7.5, image_guidance_scale=1.5,
        resolution=a.resolution, batch_size="auto" if a.batch == "auto" else int(a.batch), caption_column=None,
        device=device, dtype=a.dtype, seed=0,
        speed={"channels_last": True, "compile": a.compile, "overlap_decode": True, "io_threads": a.io_threads,
               "attention": attention, "fuse_qkv": fuse_qkv},
    ).model_dump()


def apply_recipe(pipe: Any) -> None:
    """diffusers' published compile recipe (its "accelerate inference" guide), applied for an experiment."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
    pipe.fuse_qkv_projections()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_stage(stage, pngs, batch: int, batches: int, counter: WorkCounter, device: str) -> dict[str, Any]:
    """Warm-up batch, then ``batches`` timed batches through the stage (one call, as a shard is)."""
    t = time.perf_counter()
    stage(image_table(pngs, 0, batch))
    synchronize(device)
    warmup = time.perf_counter() - t
    counter.reset()
    table = image_table(pngs, batch, batch * batches)
    t = time.perf_counter()
    out = stage(table)
    synchronize(device)
    seconds = time.perf_counter() - t
    from pixelmill.datasets.images import decode_image

    rows = out.to_pylist()
    sizes = sorted({decode_image(r["edited_image"]).size for r in rows if r["status"] == "ok"})
    return {"seconds": seconds, "warmup_seconds": warmup, "rows": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows), "sizes": [list(s) for s in sizes],
            "errors": sorted({r["error"] for r in rows if r["status"] != "ok"})[:3]}


def run_bare(pipe, kind: str, pngs, batch: int, batches: int, a: argparse.Namespace, counter: WorkCounter,
             device: str) -> dict[str, Any]:
    """The plain diffusers loop over the same images: decode PNGs, one pipeline call per batch, encode PNGs.

    Its warm-up batch runs 5 steps (same shapes; the modules were compiled by the stage's run).
    """
    import torch
    from PIL import Image

    def run(start: int, steps: int) -> list[tuple[int, int]]:
        images = [Image.open(io.BytesIO(pngs[i])).convert("RGB") for i in range(start, start + batch)]
        gens = [torch.Generator().manual_seed(i) for i in range(start, start + batch)]
        if kind == "ip2p":
            out = pipe(prompt=["make it a watercolor painting"] * batch, image=images, num_inference_steps=steps,
                       guidance_scale=7.5, image_guidance_scale=1.5, generator=gens).images
        else:
            out = pipe(prompt=["a watercolor painting"] * batch, image=images, strength=a.strength,
                       num_inference_steps=steps, guidance_scale=7.5, generator=gens).images
        for im in out:
            im.save(io.BytesIO(), "PNG")
        return [im.size for im in out]

    t = time.perf_counter()
    run(0, min(5, a.steps))
    synchronize(device)
    warmup = time.perf_counter() - t
    counter.reset()
    t = time.perf_counter()
    sizes = []
    for k in range(batches):
        sizes += run(batch * (k + 1), a.steps)
    synchronize(device)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "warmup_seconds": warmup, "rows": len(sizes), "ok": len(sizes),
            "sizes": [list(s) for s in sorted(set(sizes))], "errors": []}


def figures(run: dict[str, Any], rows: dict[str, int], tflop: dict[str, float], peak: float | None) -> dict[str, Any]:
    """images/s, counted forwards, TFLOP and TFLOP/s (UNet; UNet + VAE) and shares of the peak."""
    unet = rows["unet"] * tflop["unet"]
    vae = rows["vae_encode"] * tflop["vae_encode"] + rows["vae_decode"] * tflop["vae_decode"]
    s = run["seconds"]
    out = {**run, "images_per_s": run["rows"] / s, "forwards": dict(rows),
           "tflop_unet": unet, "tflop_unet_vae": unet + vae,
           "tflops_unet": unet / s, "tflops_unet_vae": (unet + vae) / s}
    out["peak_share_unet"] = out["tflops_unet"] / peak if peak else None
    out["peak_share_unet_vae"] = out["tflops_unet_vae"] / peak if peak else None
    return out


def share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_run(kind: str, name: str, r: dict[str, Any]) -> None:
    print(f"  {kind:6s} {name:5s}: {r['images_per_s']:8.3f} images/s  "
          f"UNet {r['tflops_unet']:8.2f} TFLOP/s ({share(r['peak_share_unet'])} of peak)  "
          f"UNet+VAE {r['tflops_unet_vae']:8.2f} TFLOP/s ({share(r['peak_share_unet_vae'])})  "
          f"[{r['rows']} images in {r['seconds']:.1f} s; warm-up {r['warmup_seconds']:.1f} s; "
          f"UNet rows {r['forwards']['unet']}]", flush=True)


def default_out() -> str:
    return str(Path(os.environ["OUT"]) / "gpu-bench.json") if os.environ.get("OUT") else "gpu-bench.json"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("PIXELMILL_GPU_DRY_RUN") == "1",
                   help="CPU, tiny models, a few steps: checks the script in under a minute "
                        "(or PIXELMILL_GPU_DRY_RUN=1)")
    p.add_argument("--out", default=None, help="JSON file to write (default: $OUT/gpu-bench.json, or ./gpu-bench.json)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--batch", default=None, help="images per batch, or auto (default: auto; 2 with --dry-run)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per run (default 3; 2 with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="default 50; 4 with --dry-run")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--compile", default=None, choices=["off", "unet", "unet+vae"],
                   help="default unet+vae (the fastest measured); off with --dry-run (a CPU compile takes minutes)")
    p.add_argument("--io-threads", type=int, default=None)
    p.add_argument("--recipe", action="store_true",
                   help="also apply diffusers' published torch.compile recipe to the stage's pipeline before its "
                        "first call: fused QKV projections and inductor's conv_1x1_as_mm, coordinate-descent "
                        "tuning, no epilogue fusion (an experiment; longer compile)")
    p.add_argument("--no-bare", action="store_true", help="run only the stage (no bare diffusers loop)")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient", "best"],
                   help="the stage's speed.attention (best: the UNet sweep's fastest; needs --unet-sweep)")
    p.add_argument("--fuse-qkv", default="off", choices=["off", "on", "best"],
                   help="the stage's speed.fuse_qkv (best: as the UNet sweep's fastest)")
    p.add_argument("--unet-sweep", action="store_true",
                   help="first time the UNet alone under each attention kernel and QKV fusion, eager and "
                        "compiled, with a kernel-time profile of each (benchmarks/gpu_unet.py)")
    p.add_argument("--baseline-stage", action="store_true",
                   help="after the workloads, run the first one again with the default attention and no fusion "
                        "(a same-run baseline for the chosen settings)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no further run after this many seconds (default 400; gpu.sh stops the process at 450)")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.batch = a.batch or ("2" if dry else "auto")
    a.batches = a.batches or (2 if dry else 3)
    a.steps = a.steps or (4 if dry else 50)
    a.compile = a.compile or ("off" if dry else "unet+vae")
    a.io_threads = a.io_threads if a.io_threads is not None else (2 if dry else min(8, os.cpu_count() or 1))
    a.budget_s = a.budget_s or (120.0 if dry else 400.0)
    a.resolution = 64 if dry else 512
    a.dtype = "float32" if dry else "bfloat16"
    a.out = a.out or default_out()
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    started = time.perf_counter()
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if a.dry_run:
        device, name = "cpu", f"CPU ({platform.processor() or platform.machine()})"
        torch.set_num_threads(1)  # tiny models run fastest on one thread, and one cannot be oversubscribed
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --dry-run for the CPU check")
    else:
        device, name = "cuda", torch.cuda.get_device_name(0)
    peak = None if a.dry_run else dense_bf16_peak(name)
    report: dict[str, Any] = {
        "device": name, "dry_run": a.dry_run, "peak_bf16_dense_tflops": peak,
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "settings": {"resolution": a.resolution, "steps": a.steps, "strength": a.strength, "guidance_scale": 7.5,
                     "image_guidance_scale": 1.5, "dtype": a.dtype, "compile": a.compile, "channels_last": True,
                     "overlap_decode": True, "recipe": a.recipe, "io_threads": a.io_threads, "batches": a.batches,
                     "batch": a.batch},
        "flop_basis": "counted rows x FlopCounterMode TFLOP per row; tflops_unet = UNet only, tflops_unet_vae adds "
                      "VAE encode and decode; text encoder not counted",
        "workloads": {},
    }

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))

    dry = " (DRY RUN: tiny models on the CPU, the figures mean nothing)" if a.dry_run else ""
    print(f"gpu bench: {name}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"peak {peak or 'n/a'} TFLOP/s bf16 dense{dry}", flush=True)
    from pixelmill.tasks.edit import InstructPix2PixEditor, SDEditEditor

    root = Path(tempfile.mkdtemp(prefix="pixelmill-gpu-bench-"))
    attention, fuse = a.attention, a.fuse_qkv == "on"
    if a.unet_sweep:
        import gpu_unet

        def save_sweep(part: dict[str, Any]) -> None:
            report["unet_sweep"] = part
            save()

        rows = 2 * (2 if a.dry_run else 32)
        print(f"UNet sweep: {rows} rows per forward (the stage's batch of {rows // 2} with guidance)", flush=True)
        tflop = ANCHOR_TFLOP["unet"] if not a.dry_run else 0.0
        sweep = gpu_unet.sweep(device, rows, tflop, peak, a.budget_s / 2, save_sweep,
                               repeats=3 if a.dry_run else 10, compiled=a.compile != "off")
        best = sweep.get("best_compiled") or sweep.get("best_eager") or {"attention": "auto", "fuse_qkv": False}
        if attention == "best":
            attention = best["attention"]
        if a.fuse_qkv == "best":
            fuse = bool(best["fuse_qkv"])
    elif "best" in (a.attention, a.fuse_qkv):
        sys.exit("--attention best / --fuse-qkv best need --unet-sweep")
    report["settings"].update(attention=attention, fuse_qkv=fuse)
    runs = [(kind, kind, attention, fuse) for kind in a.workloads.split(",") if kind]
    if a.baseline_stage and runs and (attention, fuse) != ("auto", False):
        runs.append((runs[0][0] + ":default-speed", runs[0][0], "auto", False))
    for key, kind, attention, fuse in runs:
        if time.perf_counter() - started > a.budget_s:
            report["workloads"][key] = {"skipped": f"over the {a.budget_s:.0f} s budget"}
            save()
            continue
        t = time.perf_counter()
        model = build_model(kind, root, a.dry_run, device)
        config = stage_config(kind, model, a, device, attention, fuse)
        stage = (InstructPix2PixEditor if kind == "ip2p" else SDEditEditor)(config)
        stage.setup()
        if a.recipe:
            apply_recipe(stage.pipe)
        built = time.perf_counter() - t
        batch = stage.batch_size
        tflop = forward_tflop(stage.pipe, a.resolution)
        counter = WorkCounter(stage.pipe)
        pngs = drawn_pngs(batch * (a.batches + 1), a.resolution)
        processors = sorted({type(p).__name__ for p in stage.pipe.unet.attn_processors.values()})
        entry: dict[str, Any] = {"workload": kind, "attention_setting": attention, "fuse_qkv": fuse,
                                 "batch_size": batch, "images": batch * a.batches, "tflop_per_row": tflop,
                                 "anchor_tflop_per_row": ANCHOR_TFLOP, "tuning": stage.tuning,
                                 "attention": processors, "build_and_setup_seconds": built}
        report["workloads"][key] = entry
        print(f"{key}: batch {batch}, {a.batches} timed batches; {'; '.join(stage.tuning)}; "
              f"attention processors {processors}; "
              f"TFLOP per row {json.dumps({k: round(v, 4) for k, v in tflop.items()})}; "
              f"model built and stage set up in {built:.1f} s", flush=True)
        if not a.dry_run and abs(tflop["unet"] - ANCHOR_TFLOP["unet"]) > 0.01 * ANCHOR_TFLOP["unet"]:
            print(f"  note: measured UNet TFLOP {tflop['unet']:.4f} differs from the anchor's {ANCHOR_TFLOP['unet']}")
        entry["stage"] = figures(run_stage(stage, pngs, batch, a.batches, counter, device), counter.rows, tflop, peak)
        print_run(key, "stage", entry["stage"])
        save()
        if a.no_bare:
            entry["bare"] = {"skipped": "--no-bare"}
        elif time.perf_counter() - started > a.budget_s:
            entry["bare"] = {"skipped": f"over the {a.budget_s:.0f} s budget"}
        else:
            bare = type(stage.pipe)(**stage.pipe.components, requires_safety_checker=False)
            bare.set_progress_bar_config(disable=True)
            entry["bare"] = figures(run_bare(bare, kind, pngs, batch, a.batches, a, counter, device), counter.rows,
                                    tflop, peak)
            entry["stage_over_bare"] = entry["stage"]["images_per_s"] / entry["bare"]["images_per_s"]
            print_run(key, "bare", entry["bare"])
            print(f"  {key:6s} stage / bare: {entry['stage_over_bare']:.3f}", flush=True)
            del bare
        save()
        del stage, counter
        torch._dynamo.reset()  # the next workload compiles as a fresh worker would (static shapes)
        if device == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    save()
    print(f"wrote {a.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
