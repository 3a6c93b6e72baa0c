"""Where an SD 1.5 UNet forward's time goes on one GPU, and which speed settings shorten it.

Run by ``gpu_edit.py --unet-sweep`` before the stage runs (``benchmarks/gpu.sh --unet-sweep``).
The UNet alone (SD 1.5 shape, random bf16 weights, channels-last), on the batch the stage
runs (``rows`` = images × 2 for classifier-free guidance) of 64 × 64 latents and 77 text
tokens, for each setting the edit stage's ``speed:`` offers that changes the UNet's kernels:

* ``attention``: the SDPA kernel preferred (``auto`` = PyTorch's choice, ``cudnn``,
  ``flash``, ``efficient``), applied as the stage applies it (``models/speed.py``);
* ``fuse_qkv``: fused query/key/value projections (diffusers' ``fuse_qkv_projections``).

Eager variants are cheap (seconds each) and are all measured; torch.compile'd ones cost a
compile each (about a minute for this UNet), so only the stage's default (``auto``, not
fused) and the fastest eager setting are compiled. Each measurement: 3 untimed forwards,
then ``repeats`` forwards timed with CUDA events (median). One forward of each is profiled
(``torch.profiler``): CUDA kernel time by kind (attention, convolution, matrix product,
normalisation/elementwise from inductor's Triton kernels, other) and the top kernels, so
the figures say where the time goes. TFLOP/s use the counted FLOPs of one row.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_attn", "mha")),
         ("convolution", ("conv", "implicit", "fprop", "dgrad", "wgrad", "winograd")),
         ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "sm90_xmma", "sm80_xmma")),
         ("triton (fused norm/elementwise)", ("triton",)),
         ("norm/elementwise (eager)", ("norm", "elementwise", "vectorized", "reduce", "silu", "gelu", "softmax")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def unet_inputs(unet, rows: int, device: str, side: int = 64):
    import torch

    from pixelmill.models.speed import dummy_unet_inputs

    kw = dummy_unet_inputs(unet, rows, side, 77, device)
    g = torch.Generator(device=device).manual_seed(0)
    kw["sample"] = torch.randn(kw["sample"].shape, generator=g, device=device, dtype=unet.dtype)
    kw["sample"] = kw["sample"].contiguous(memory_format=torch.channels_last)
    kw["encoder_hidden_states"] = torch.randn(kw["encoder_hidden_states"].shape, generator=g, device=device,
                                              dtype=unet.dtype)
    kw["timestep"] = torch.tensor(500, device=device)
    return kw


def time_forward(forward, kwargs: dict[str, Any], repeats: int, device: str) -> float:
    """Median seconds of one forward (after 3 untimed ones): by CUDA events, or the wall clock on a CPU."""
    import torch

    cuda = device.startswith("cuda")
    with torch.no_grad():
        for _ in range(3):
            forward(**kwargs, return_dict=False)
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward(**kwargs, return_dict=False)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                forward(**kwargs, return_dict=False)
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_forward(forward, kwargs: dict[str, Any], device: str, top: int = 8) -> dict[str, Any]:
    """Kernel time of one forward by kind, and the ``top`` kernels (CUDA kernels; aten ops on a CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        forward(**kwargs, return_dict=False)
        if cuda:
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) if cuda else e.self_cpu_time_total
        if us and e.key and not e.key.startswith(("cudaLaunch", "cudaStream", "ProfilerStep")):
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + us / 1e6
    total = sum(per_kernel.values()) or 1.0
    kinds: dict[str, float] = {}
    for k, s in per_kernel.items():
        kinds[kind_of(k)] = kinds.get(kind_of(k), 0.0) + s
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"kernel_seconds": total,
            "share_by_kind": {k: round(v / total, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"kernel": k[:160], "share": round(v / total, 4)} for k, v in ranked]}


def build_unet(device: str, in_channels: int = 4):
    """SD 1.5's UNet on a GPU; on a CPU (a dry run of the script) the tiny test UNet in float32."""
    import torch

    from pixelmill.models.tiny import build_sd_unet_for_benchmark, tiny_unet_config

    if not device.startswith("cuda"):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**tiny_unet_config(in_channels)).eval()
    with torch.device(device):
        unet = build_sd_unet_for_benchmark(block_out_channels=(320, 640, 1280, 1280), in_channels=in_channels,
                                           dtype=torch.bfloat16, device=device)
    return unet.eval().to(memory_format=torch.channels_last)


class _Pipe:
    """Just enough of a pipeline for ``tune_pipeline``: a UNet (its VAE is not measured here)."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.vae = None

    def fuse_qkv_projections(self) -> None:
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        self.unet.fuse_qkv_projections()
        self.unet.set_attn_processor(FusedAttnProcessor2_0())


def measure(device: str, rows: int, tflop_per_row: float, peak: float | None, attention: str, fuse_qkv: bool,
            compile: bool, repeats: int) -> dict[str, Any]:
    import torch

    from pixelmill.models.speed import tune_pipeline

    torch._dynamo.reset()
    cuda = device.startswith("cuda")
    pipe = _Pipe(build_unet(device))
    t = time.perf_counter()
    done = tune_pipeline(pipe, compile="unet" if compile else "off", attention=attention, fuse_qkv=fuse_qkv)
    kwargs = unet_inputs(pipe.unet, rows, device, 64 if cuda else 8)
    with torch.no_grad():
        pipe.unet.forward(**kwargs, return_dict=False)
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    seconds = time_forward(pipe.unet.forward, kwargs, repeats, device)
    tflops = rows * tflop_per_row / seconds  # 0 in a dry run (its FLOPs are not counted)
    out = {"attention": attention, "fuse_qkv": fuse_qkv, "compile": compile, "rows": rows, "tuning": done,
           "first_forward_seconds": round(first, 2), "forward_seconds": round(seconds, 5),
           "tflops": round(tflops, 1), "peak_share": round(tflops / peak, 4) if peak else None,
           "profile": profile_forward(pipe.unet.forward, kwargs, device)}
    del pipe, kwargs
    if cuda:
        torch.cuda.empty_cache()
    return out


def sweep(device: str, rows: int, tflop_per_row: float, peak: float | None, budget_s: float, save,
          repeats: int = 10, compiled: bool = True) -> dict[str, Any]:
    """Eager variants, then (``compiled``) compiled default and compiled best; returns the report (also
    passed to ``save`` after each measurement)."""
    started = time.perf_counter()
    report: dict[str, Any] = {"rows": rows, "latent": [64, 64], "tokens": 77, "tflop_per_row": tflop_per_row,
                              "eager": [], "compiled": []}

    def run(section: str, attention: str, fuse: bool, compiled: bool) -> None:
        label = f"{'compiled' if compiled else 'eager':8s} attention={attention:9s} fuse_qkv={fuse!s:5s}"
        try:
            r = measure(device, rows, tflop_per_row, peak, attention, fuse, compiled, repeats)
        except Exception as e:  # a kernel this GPU or torch lacks: recorded, the sweep goes on
            r = {"attention": attention, "fuse_qkv": fuse, "compile": compiled,
                 "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  unet {label}: {r['error']}", flush=True)
        else:
            kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["profile"]["share_by_kind"].items())
            share = f"{100 * r['peak_share']:.1f}% of peak" if r["peak_share"] else "n/a"
            print(f"  unet {label}: {1000 * r['forward_seconds']:.1f} ms/forward of {rows} rows, "
                  f"{r['tflops']:.0f} TFLOP/s ({share}); first call {r['first_forward_seconds']:.1f} s; "
                  f"kernel time: {kinds}", flush=True)
        report[section].append(r)
        save(report)

    for attention in ("auto", "cudnn", "flash", "efficient"):
        run("eager", attention, False, False)
    ok = [r for r in report["eager"] if "error" not in r]
    best_attention = min(ok, key=lambda r: r["forward_seconds"])["attention"] if ok else "auto"
    run("eager", best_attention, True, False)
    ok = [r for r in report["eager"] if "error" not in r]
    best = min(ok, key=lambda r: r["forward_seconds"]) if ok else {"attention": "auto", "fuse_qkv": False}
    report["best_eager"] = {"attention": best["attention"], "fuse_qkv": best["fuse_qkv"]}
    for attention, fuse in (("auto", False), (best["attention"], best["fuse_qkv"])) if compiled else ():
        if report["compiled"] and (attention, fuse) == ("auto", False):
            continue
        if time.perf_counter() - started > budget_s:
            report["compiled"].append({"attention": attention, "fuse_qkv": fuse, "skipped": "over budget"})
            continue
        run("compiled", attention, fuse, True)
    done = [r for r in report["compiled"] if "forward_seconds" in r]
    if done:
        report["best_compiled"] = {k: min(done, key=lambda r: r["forward_seconds"])[k]
                                   for k in ("attention", "fuse_qkv")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    save(report)
    return report
