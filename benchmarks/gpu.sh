#!/usr/bin/env bash
# GPU throughput of pixelmill's edit stage against the bare diffusers loop, on one GPU, in under 8 minutes:
# SDEdit (img2img, strength 0.8, 50 steps) and InstructPix2Pix (50 steps) at 512 px on SD 1.5-shaped
# random-weight models, bf16, channels-last, torch.compile; images/s, TFLOP/s and share of the bf16 peak,
# printed and written as JSON. What it does and how it counts: benchmarks/gpu_edit.py's docstring.
#
# The stage runs in this process (no Ray, no Prefect), so a machine needs only Python 3.11+ with torch,
# transformers, pyarrow, fsspec, numpy, Pillow, PyYAML, huggingface_hub and safetensors, plus what
# .whl/ carries: diffusers and its importlib_metadata, pydantic, and open_clip_torch (only for the CLIP
# tokenizer's BPE file; never imported). The wheels are fetched once where PyPI is reachable, at the
# versions of cluster/constraints.txt, for CPython 3.12 on x86-64 Linux (about 11 MiB; .whl/ is ignored
# by git):
#
#     bash benchmarks/gpu.sh --fetch-wheels          # or: make gpu-wheels
#
# then, on the GPU machine, from the repository root (wheels are installed into /tmp/pixelmill-site and
# put on PYTHONPATH when the interpreter lacks diffusers or pydantic):
#
#     bash benchmarks/gpu.sh [--out FILE] [--batch auto|N] [--batches 3] [--compile unet|unet+vae|off]
#
# The JSON goes to --out, else $OUT/gpu-bench.json, else ./gpu-bench.json; it is rewritten after every
# run, so a run stopped by the time limit (PIXELMILL_GPU_TIMEOUT, default 450 s) keeps what finished.
# Anywhere, the same code on the CPU with tiny models (a check of the script, in under a minute):
#
#     bash benchmarks/gpu.sh --dry-run [--out FILE]
#
# Fine-tuning on the same GPU (benchmarks/finetune.py: pixelmill's trainer against the diffusers + PEFT
# loop of the example scripts, both under bf16 mixed precision, on SD 1.5's shapes at 512 px, batch 4;
# steps/s and peak GPU memory; about 3 minutes for LoRA), its JSON in $OUT/gpu-finetune.json; any
# finetune.py option after it (e.g. --methods lora,dreambooth --compile); --dry-run runs it on the CPU:
#
#     bash benchmarks/gpu.sh --finetune [--dry-run] [finetune.py options]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# What the GPU machine lacks (distribution names as in cluster/constraints.txt).
WHEELS=(diffusers importlib_metadata lazy-importer pydantic pydantic_core annotated-types typing-inspection
        typing_extensions open_clip_torch)

pinned() {  # NAME -> NAME==VERSION from the lock (names compared as pip normalises them)
    local want
    want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
    awk -F'==' -v want="$want" '{ n = tolower($1); gsub(/[_.]/, "-", n); if (n == want) { print $0; exit } }' \
        "$ROOT/cluster/constraints.txt"
}

if [ "${1:-}" = "--fetch-wheels" ]; then
    specs=()
    for name in "${WHEELS[@]}"; do
        spec="$(pinned "$name")"
        [ -n "$spec" ] || { echo "gpu.sh: $name is not in cluster/constraints.txt" >&2; exit 1; }
        specs+=("$spec")
    done
    mkdir -p "$ROOT/.whl"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "${specs[@]}"
    ls -1 "$ROOT/.whl"
    du -sh "$ROOT/.whl"
    exit 0
fi

if ! "$PYTHON" -c "import diffusers, pydantic" >/dev/null 2>&1; then
    if ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        echo "gpu.sh: $PYTHON has no diffusers/pydantic and .whl/ has no wheels: run 'bash benchmarks/gpu.sh" \
             "--fetch-wheels' where PyPI is reachable, and bring .whl/ along" >&2
        exit 1
    fi
    SITE="${PIXELMILL_SITE:-/tmp/pixelmill-site}"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$ROOT"/.whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--finetune" ]; then
    shift
    FT=(--device cuda --precision bf16 --unet sd15 --resolution 512 --batch 4 --warmup 3 --steps 10 --mem-steps 2
        --methods lora --json "${OUT:-.}/gpu-finetune.json")
    if [ "${1:-}" = "--dry-run" ]; then
        shift
        FT=(--device cpu --precision bf16 --unet bench --vae light --resolution 64 --batch 2 --warmup 1 --steps 2
            --mem-steps 1 --threads 1 --methods lora --json "${OUT:-.}/gpu-finetune.json")
    fi
    exec timeout "${PIXELMILL_GPU_TIMEOUT:-450}" "$PYTHON" "$ROOT/benchmarks/finetune.py" "${FT[@]}" "$@"
fi
exec timeout "${PIXELMILL_GPU_TIMEOUT:-450}" "$PYTHON" "$ROOT/benchmarks/gpu_edit.py" "$@"
