#!/usr/bin/env bash
# Reproduce the built-in LoRA (src/latent_diffusion/assets/shapes-corners.safetensors), which teaches the built-in
# model places it never saw a shape at, the four corners; time it, and score it. These are the exact commands that
# produced the shipped file.
#
#     bash benchmarks/builtin_lora.sh [outdir]      # default runs/builtin-lora (BENCHMARKS.md: times and scores)
#
# Training: `ldm train --lora` on the built-in model (frozen), adapters of rank 8 in its U-Net's transformer blocks
#           and its text encoder, on 8000 shapes drawn at the four corners and at the five places the model knows,
#           each of those named twice (so that it keeps drawing them as before: 4 draws in 14 are corners), captions
#           in the shapes set's wordings ("in the top left corner", "at the bottom right", tags "top left").
# Scoring: `ldm eval --corners` with the LoRA and without it: 200 seen and 200 held-out prompts in each of the two
#          forms that name a position, positions read among all nine places; and `ldm eval` (the five places, all
#          six forms) with and without the LoRA, to show that the rest keeps its scores.
set -euo pipefail
OUT=${1:-runs/builtin-lora}
LDM=${LDM:-.venv/bin/ldm}
mkdir -p "$OUT"

start=$(date +%s)
nice -n 19 "$LDM" train --lora 8 --train-text-encoder --outdir "$OUT" --shapes-count 8000 \
    --positions "top left,top right,bottom left,bottom right,left,right,top,bottom,center,left,right,top,bottom,center" \
    --steps 7000 --batch-size 32 --lr 1e-3 --warmup 100 --lr-schedule cosine --quiet
end=$(date +%s)
echo "training: $((end - start)) s"
for with in "--lora $OUT/lora.safetensors" ""; do
    name=$([ -n "$with" ] && echo with || echo without)
    # shellcheck disable=SC2086
    nice -n 19 "$LDM" eval $with --corners --count 200 --quiet --json "$OUT/corners-$name.json"
    # shellcheck disable=SC2086
    nice -n 19 "$LDM" eval $with --count 200 --quiet --json "$OUT/eval-$name.json"
done
echo "wrote $OUT/lora.safetensors; to ship it: cp $OUT/lora.safetensors" \
    "src/latent_diffusion/assets/shapes-corners.safetensors"
