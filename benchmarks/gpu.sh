#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run, most wanted first, each step ours beside diffusers in one process
# (the scripts' own comparisons). A step that would not finish before the deadline is left out and says so.
#
#   bash benchmarks/gpu.sh [SECONDS] [LOG] [FROM]   # default 540 s; the log also goes to stdout
#
# FROM: begin at the first benchmark step whose command line contains it (a second call on a warm machine goes
# on where the first one's deadline stopped it); the two steps that name the machine always run.
#
# diffusers must be importable (on a machine without the test extras: PYTHONPATH holding its wheel's install).
set -uo pipefail
budget=${1:-540}
log=${2:-/dev/null}
from=${3:-}
deadline=$(($(date +%s) + budget))
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NEEDED_SECONDS COMMAND...: run it if that much time is left, under a timeout of what is left
    local need=$1 left=$((deadline - $(date +%s)))
    shift
    local what="$*"
    if [[ -n $from && $what != *"$from"* ]]; then
        echo "=== ${what//$'\n'/ }: before '$from', not run" | tee -a "$log"
        return
    fi
    from=""
    echo "=== ${what//$'\n'/ } ($left s left)" | tee -a "$log"
    if ((left < need)); then
        echo "skipped: needs about $need s" | tee -a "$log"
        return
    fi
    local start=$(date +%s)
    timeout "$left" "$@" 2>&1 | grep -v -e "should be kept in float32" -e "^\s*$" | tee -a "$log"
    echo "--- exit ${PIPESTATUS[0]}, $(($(date +%s) - start)) s" | tee -a "$log"
}

start_at=$from from=""  # the machine's name and versions, always
step 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 5 "$PY" -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
from=$start_at
# Not measured yet, or changed since the last run (BENCHMARKS.md says which), most wanted first:
# sampling no longer waits on the GPU between steps (new, untried on a GPU): the waits torch reports, per step;
step 30 "$PY" benchmarks/step_syncs.py
# goal 1, the compiled guided step, both sides (CUDA graphs), and which kinds of kernel take our 9.3 ms;
step 150 "$PY" benchmarks/unet_step.py --size 512 --compile --profile
# its two likeliest levers, both sides, profiled so each shows in its own kind of kernel: NHWC convolutions (cuDNN's
# tensor-core kernels work in NHWC) and cuDNN's attention (flash pads SD 1.5's 40-channel heads to 64);
step 150 "$PY" benchmarks/unet_step.py --size 512 --compile --profile --channels-last --sdpa-backend cudnn
# goal 3, the overflow checks' cost per decode (now with the kernels loaded first), and goal 4's decodes;
step 45 "$PY" benchmarks/vae_tiling.py --size 2048
# goal 6, the compiled training step;
step 200 "$PY" benchmarks/train_step.py --latent 64 --batch 32 --precision bf16 --fused --compile --tiny-steps 0
# goal 1's start: a second process from an aot_compile artifact of the U-Net (the cache path's 38.4 s measured on
# 2026-11-28), whether aot_compile keeps CUDA graphs, and (cProfile) where that process's first request goes;
step 150 "$PY" benchmarks/compiled_start.py --precompiled --cprofile
# and what that gains where a step is shortest: batch 1, 50 steps, compiled;
step 120 "$PY" benchmarks/txt2img.py --compile
# goal 6's channels-last (on this project's CPU: no gain), eager, batch 32;
step 90 "$PY" benchmarks/train_step.py --latent 64 --batch 32 --precision bf16 --fused --channels-last --tiny-steps 0
# Measured on 2026-11-28: goal 5 (batch 8 compiled), goal 2 (loading), float16 against float32.
step 200 "$PY" benchmarks/txt2img.py --batch 8 --steps 20 --iters 2 --compile
step 60 "$PY" benchmarks/load.py --device cuda
step 60 "$PY" benchmarks/reduced_precision.py --dtype float16
# The eager figures, measured on 2026-11-27 and 2026-11-28.
step 40 "$PY" benchmarks/unet_step.py --size 512
step 60 "$PY" benchmarks/txt2img.py --batch 8 --steps 20 --iters 2
step 60 "$PY" benchmarks/train_step.py --latent 64 --batch 32 --precision bf16 --fused --tiny-steps 0
step 60 "$PY" benchmarks/train_step.py --latent 64 --batch 8 --precision bf16 --fused --checkpointing --tiny-steps 0
