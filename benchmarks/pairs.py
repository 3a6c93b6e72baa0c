"""Prompt-to-Prompt pair rendering: both branches in one batch against two sequential passes.

All variants render the same pairs (same prompts, seeds, p and CFG per pair) with the same
SD-shaped pipeline (benchmark UNet, block widths 32/64/128 on 32×32 latents, SD 1.x heads,
random weights: speed does not depend on weights), the same DDIM steps and the same torch
threads, in one invocation, alternating runs so that machine load hits them alike:

- batched (pixelmill): ``render_pairs``: [uncond_src, uncond_edit, cond_src, cond_edit] in
  one UNet call per step; shared self-attention runs as SDPA on the source's Q/K (no map
  materialised);
- batched, explicit maps: the same batch, but the self-attention maps are materialised
  and copied (what a map-copying processor does);
- sequential: a source pass that records its self-attention maps for the shared steps,
  then an edited pass that replays them (two UNet calls of half the batch per step, and
  the maps held in memory between the passes).

The sequential result is checked against the batched one (same latents up to rounding).

    python benchmarks/pairs.py [--pairs 2 --steps 6 --threads 2 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pixelmill.tasks.p2p import (  # noqa: E402
    AttentionController,
    P2PController,
    _sdpa,
    ddim_denoise,
    decode_latents,
    initial_latents,
    render_pairs,
)


def build_pipeline():
    """An SD-shaped text-to-image pipeline with the benchmark UNet (32/64/128, 32×32 latents)."""
    from diffusers import StableDiffusionPipeline

    from pixelmill.models.tiny import TINY_CROSS_ATTENTION_DIM, build_sd_unet_for_benchmark, build_tiny_sd_components

    comps = build_tiny_sd_components()
    comps["unet"] = build_sd_unet_for_benchmark(block_out_channels=(32, 64, 128), sample_size=32,
                                                cross_attention_dim=TINY_CROSS_ATTENTION_DIM)
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RecordSelfAttention(AttentionController):
    """Source pass: plain attention, keeping each sharing pair's self-attention maps."""

    def __init__(self, p_values, steps: int) -> None:
        self.p, self.steps, self.n = list(p_values), steps, len(p_values)
        self.maps: dict[tuple[int, str, int], torch.Tensor] = {}

    def attend(self, attn, layer, is_cross, query, key, value, mask):
        share = [i for i, p in enumerate(self.p) if self.step < p * self.steps]
        if is_cross or not share:
            return _sdpa(query, key, value, mask, attn.scale)
        probs = attn.get_attention_scores(query, key, mask)
        b = probs.view(2, self.n, attn.heads, *probs.shape[1:])
        for i in share:
            self.maps[(self.step, layer, i)] = b[:, i].clone()
        return torch.bmm(probs, value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.maps.values())


class ReplaySelfAttention(AttentionController):
    """Edited pass: the recorded source maps replace the edited branch's on the shared steps."""

    def __init__(self, recorded: RecordSelfAttention) -> None:
        self.rec = recorded

    def attend(self, attn, layer, is_cross, query, key, value, mask):
        n = self.rec.n
        share = [i for i in range(n) if (self.step, layer, i) in self.rec.maps]
        if is_cross or not share:
            return _sdpa(query, key, value, mask, attn.scale)
        if len(share) == n:
            probs = torch.stack([self.rec.maps[(self.step, layer, i)] for i in range(n)], 1)
        else:
            probs = attn.get_attention_scores(query, key, mask).view(2, n, attn.heads, *query.shape[1:2], -1)
            probs = probs.clone()
            for i in share:
                probs[:, i] = self.rec.maps[(self.step, layer, i)]
        return torch.bmm(probs.reshape(-1, *probs.shape[-2:]), value)


def sequential(pipe, src, ed, seeds, ps, cfgs, steps, size):
    """Two passes: source (recording maps), then edited (replaying them). Returns (latents, map bytes)."""
    with torch.no_grad():
        x = initial_latents(pipe, seeds, size, size, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma
        rec = RecordSelfAttention(ps, steps)
        c, u = pipe.encode_prompt(list(src), pipe.unet.device, 1, True)
        lat_s = ddim_denoise(pipe, x, c, u, cfgs, steps, rec)
        decode_latents(pipe, lat_s)
        c, u = pipe.encode_prompt(list(ed), pipe.unet.device, 1, True)
        lat_e = ddim_denoise(pipe, x, c, u, cfgs, steps, ReplaySelfAttention(rec))
        decode_latents(pipe, lat_e)
    return torch.stack([lat_s, lat_e], 1), rec.nbytes()


def batched_explicit(pipe, src, ed, seeds, ps, cfgs, steps, size):
    """One batch, self-attention maps materialised and copied."""
    n = len(src)
    with torch.no_grad():
        x = initial_latents(pipe, seeds, size, size, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma
        c, u = pipe.encode_prompt(list(src) + list(ed), pipe.unet.device, 1, True)
        lat = ddim_denoise(pipe, torch.cat([x, x]), c, u, list(cfgs) * 2, steps,
                           P2PController(ps, steps, explicit_maps=True))
        decode_latents(pipe, lat)
    return lat.view(2, n, *lat.shape[1:]).transpose(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2, help="pairs per UNet batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_pipeline()
    size = 32 * pipe.vae_scale_factor
    n = args.pairs
    src = [f"a photo of a cat number {i}" for i in range(n)]
    ed = [f"a photo of a dog number {i}" for i in range(n)]
    seeds = list(range(n))
    ps = [0.1 + 0.8 * i / max(1, n - 1) for i in range(n)]
    cfgs = [7.5 + 7.5 * i / max(1, n - 1) for i in range(n)]
    params = sum(x.numel() for x in pipe.unet.parameters()) / 1e6
    print(f"bench: SD-shaped UNet 32/64/128 ({params:.1f}M params), 32x32 latents, {n} pairs per batch, "
          f"{args.steps} DDIM steps, p {[round(x, 2) for x in ps]}, cfg {[round(x, 2) for x in cfgs]}, "
          f"{args.threads} threads, CPU" + (" (CUDA present, unused)" if torch.cuda.is_available() else ""))

    runs = {
        "batched (pixelmill, SDPA on shared Q/K)": lambda: render_pairs(
            pipe, src, ed, seeds, ps, cfgs, args.steps, size, size).latents,
        "batched, explicit maps": lambda: batched_explicit(pipe, src, ed, seeds, ps, cfgs, args.steps, size),
        "sequential (record, then replay)": lambda: _keep_bytes(
            sequential(pipe, src, ed, seeds, ps, cfgs, args.steps, size)),
    }
    map_bytes = 0

    def _keep_bytes(out):
        nonlocal map_bytes
        map_bytes = out[1]
        return out[0]

    results = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs to compare
    ref = results["batched (pixelmill, SDPA on shared Q/K)"]
    for name, lat in results.items():
        print(f"  max |latent - batched| {name:40s} {float((lat - ref).abs().max()):.2e}")
    del results
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = n / min(times["sequential (record, then replay)"])
    for name, ts in times.items():
        best, med = n / min(ts), n / statistics.median(ts)
        print(f"{name:42s} {best:7.3f} pairs/s (median {med:7.3f})   ratio to sequential {best / base:5.2f}x")
    print(f"sequential pass holds {map_bytes / 2**20:.0f} MiB of self-attention maps between its passes "
          f"({map_bytes / n / 2**20:.0f} MiB per pair); the batched pass holds none")


if __name__ == "__main__":
    main()
