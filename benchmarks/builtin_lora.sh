#!/usr/bin/env bash
# Reproduce the built-in LoRA (src/latent_diffusion/assets/shapes-star.safetensors), which teaches the built-in model
# a shape it never saw, the five-pointed star; time it, and score it. These are the exact commands that produced the
# shipped file.
#
#     bash benchmarks/builtin_lora.sh [outdir]      # default runs/builtin-lora (BENCHMARKS.md: times and scores)
#
# Training: `ldm train --lora` on the built-in model (frozen), adapters of rank 8 in its U-Net's transformer blocks
#           and its text encoder, on 8000 shapes of which half are stars (the other half the three shapes it knows,
#           so that it keeps drawing them as before), captions in the shapes set's wordings.
# Scoring: `ldm eval --shape star` with the LoRA: 200 star prompts in each of the six prompt forms, the shape read
#          back from the pixels (a star fills a third of its box, a triangle half); and `ldm eval` of the other
#          shapes with and without the LoRA, to show that they keep their scores.
set -euo pipefail
OUT=${1:-runs/builtin-lora}
LDM=${LDM:-.venv/bin/ldm}
mkdir -p "$OUT"

start=$(date +%s)
nice -n 19 "$LDM" train --lora 8 --train-text-encoder --outdir "$OUT" --shapes star,star,star,circle,square,triangle \
    --shapes-count 8000 --steps 2000 --batch-size 32 --lr 1e-3 --warmup 100 --lr-schedule cosine --quiet
end=$(date +%s)
echo "training: $((end - start)) s"
nice -n 19 "$LDM" eval --lora "$OUT/lora.safetensors" --shape star --count 200 --quiet --json "$OUT/eval-star.json"
nice -n 19 "$LDM" eval --lora "$OUT/lora.safetensors" --count 200 --quiet --json "$OUT/eval-with.json"
nice -n 19 "$LDM" eval --count 200 --quiet --json "$OUT/eval-without.json"
echo "wrote $OUT/lora.safetensors; to ship it: cp $OUT/lora.safetensors src/latent_diffusion/assets/shapes-star.safetensors"
