"""``benchmarks/gpu.sh --dry-run``: the GPU benchmark's code, run on the CPU with tiny models.

It is what the GPU machine runs, end to end, only smaller; the figures themselves mean
nothing here (no timing is asserted), but they must all be there, and the stage and the
bare loop must have made the same number of same-size images from the same work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    from tests.helpers.benchmarks import load_benchmark

    return load_benchmark("gpu_edit")


def test_peak_by_device_name():
    bench = _load_bench()
    assert bench.dense_bf16_peak("NVIDIA H200") == 989.0
    assert bench.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA L4", "Tesla T4"):
        assert bench.dense_bf16_peak(unknown) is None


def test_dry_run_writes_every_figure_and_both_loops_make_the_same_images(tmp_path):
    out = tmp_path / "gpu-bench.json"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "unused")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage / bare" in proc.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["peak_bf16_dense_tflops"] is None
    settings = report["settings"]
    steps, strength = settings["steps"], settings["strength"]
    assert set(report["workloads"]) == {"sdedit", "ip2p"}
    for kind, w in report["workloads"].items():
        images = w["images"]
        assert images == w["batch_size"] * settings["batches"] > 0
        assert set(w["tflop_per_row"]) == {"unet", "vae_encode", "vae_decode"}
        assert all(v > 0 for v in w["tflop_per_row"].values())
        # the UNet rows the pipelines really ran: steps run x guidance rows x images
        steps_run, rows_per_image = (int(steps * strength), 2) if kind == "sdedit" else (steps, 3)
        for name in ("stage", "bare"):
            r = w[name]
            assert r["rows"] == r["ok"] == images, (kind, name, r)
            assert r["sizes"] == [[settings["resolution"]] * 2]
            assert r["forwards"] == {"unet": images * steps_run * rows_per_image,
                                     "vae_encode": images, "vae_decode": images}
            for key in ("images_per_s", "tflops_unet", "tflops_unet_vae", "tflop_unet", "tflop_unet_vae"):
                assert r[key] > 0, (kind, name, key)
            assert r["tflops_unet_vae"] > r["tflops_unet"]
            assert r["peak_share_unet"] is None and r["peak_share_unet_vae"] is None  # no peak for a CPU
        assert w["stage_over_bare"] > 0
        assert "decode overlapped with the next batch" in w["tuning"]
        assert w["attention"] == ["AttnProcessor2_0"]  # PyTorch SDPA


def test_dry_run_unet_sweep_times_every_kernel_choice_and_the_stage_takes_the_fastest(tmp_path):
    out = tmp_path / "gpu-bench.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out),
                           "--unet-sweep", "--attention", "best", "--fuse-qkv", "best", "--no-bare",
                           "--workloads", "sdedit", "--baseline-stage"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sweep = report["unet_sweep"]
    eager = sweep["eager"]
    assert [(r["attention"], r["fuse_qkv"]) for r in eager[:4]] == [(k, False) for k in
                                                                      ("auto", "cudnn", "flash", "efficient")]
    assert eager[4]["fuse_qkv"] is True and sweep["compiled"] == []  # a dry run compiles nothing
    for r in eager:
        assert r["forward_seconds"] > 0 and abs(sum(r["profile"]["share_by_kind"].values()) - 1) < 0.01, r
    fastest = min(eager, key=lambda r: r["forward_seconds"])
    assert sweep["best_eager"] == {"attention": fastest["attention"], "fuse_qkv": fastest["fuse_qkv"]}
    assert report["settings"]["attention"] == fastest["attention"]
    w = report["workloads"]["sdedit"]
    assert (w["attention_setting"], w["fuse_qkv"]) == (fastest["attention"], fastest["fuse_qkv"])
    assert w["stage"]["ok"] == w["images"] and w["bare"] == {"skipped": "--no-bare"}
    # the same-run baseline exists exactly when the chosen settings are not the defaults
    assert ("sdedit:default-speed" in report["workloads"]) == ((fastest["attention"], fastest["fuse_qkv"])
                                                               != ("auto", False))


def test_kernel_kinds():
    from tests.helpers.benchmarks import load_benchmark

    bench_unet = load_benchmark("gpu_unet")
    assert bench_unet.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert bench_unet.kind_of("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert bench_unet.kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert bench_unet.kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "matmul"
    assert bench_unet.kind_of("triton_red_fused_native_group_norm_0") == "triton (fused norm/elementwise)"


def test_finetune_dry_run_compares_both_bf16_loops_and_writes_the_figures(tmp_path):
    """``gpu.sh --finetune --dry-run``: the GPU fine-tuning comparison's code path (bf16 mixed precision: the
    scripts' bf16 weights against pixelmill's half frozen weights) on the CPU with the benchmark UNet."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--finetune", "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bf16 mixed precision" in proc.stdout and "target >= 1.3x" in proc.stdout
    report = json.loads((tmp_path / "gpu-finetune.json").read_text())
    assert report["precision"] == "bf16" and report["device"] == "cpu"
    lora = report["results"]["lora"]
    assert set(lora["train_peak_mb"]) == {"baseline", "pixelmill", "pixelmill-nocache"}
    assert all(mb > 0 for mb in lora["train_peak_mb"].values())
    verdict = lora["vs_baseline"]["pixelmill"]
    assert verdict["steps_per_s"] > 0 and verdict["train_peak"] > 0
    assert verdict["met"] == (verdict["steps_per_s"] >= 1.3 and verdict["train_peak"] <= 1.0)
