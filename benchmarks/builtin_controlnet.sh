#!/usr/bin/env bash
# Reproduce the built-in ControlNet (src/latent_diffusion/assets/shapes-control.safetensors) from the built-in model,
# time it, and measure its control adherence against the model without it. These are the exact commands that
# produced the shipped file.
#
#     bash benchmarks/builtin_controlnet.sh [outdir]      # default runs/builtin-controlnet (BENCHMARKS.md: times)
#
# Training: `ldm train-controlnet` with lllyasviel's recipe (the ControlNet a copy of the built-in U-Net's encoder, zero
#           convolutions, the base frozen, half the prompts dropped) on 8000 shapes, each shape's mask its control
#           image: 9000 steps of batch 32, AdamW at 1e-3 after 100 warm-up steps, cosine decay, the x0 error
#           weighted clamp(SNR, 1, 5) (`--min-snr-gamma 5 --min-snr-floor 1`; the plain v loss weighs it SNR + 1):
#           the noisiest timesteps, where the layout is decided, keep their weight, the least noisy ones lose theirs;
#           then, from that file (`--controlnet`), 3000 more steps at 2e-4, the same otherwise
# Scoring: `ldm eval --controlnet` on 200 seen and 200 held-out (prompt, control image) pairs in each of the two
#          prompt forms that name neither position nor size ("a red circle", "a red circle on a blue background"),
#          each image's control image the mask of the prompt's shape; then the same with --control-weight 0 (the
#          model alone, the ControlNet's residuals times 0), the baseline.
set -euo pipefail
OUT=${1:-runs/builtin-controlnet}
LDM=${LDM:-.venv/bin/ldm}
mkdir -p "$OUT"

start=$(date +%s)
nice -n 19 "$LDM" train-controlnet --outdir "$OUT/first" --steps 9000 --batch-size 32 --shapes-count 8000 \
    --lr 1e-3 --lr-schedule cosine --min-snr-gamma 5 --min-snr-floor 1 --quiet
nice -n 19 "$LDM" train-controlnet --outdir "$OUT" --controlnet "$OUT/first/controlnet.safetensors" --steps 3000 \
    --batch-size 32 --shapes-count 8000 --lr 2e-4 --lr-schedule cosine --min-snr-gamma 5 --min-snr-floor 1 --quiet
end=$(date +%s)
echo "training: $((end - start)) s"
nice -n 19 "$LDM" eval --controlnet "$OUT/controlnet.safetensors" --count 200 --quiet --json "$OUT/eval.json"
nice -n 19 "$LDM" eval --controlnet "$OUT/controlnet.safetensors" --control-weight 0 --count 200 --quiet \
    --json "$OUT/eval-without.json"
echo "wrote $OUT/controlnet.safetensors; to ship it: cp $OUT/controlnet.safetensors" \
    "src/latent_diffusion/assets/shapes-control.safetensors"
