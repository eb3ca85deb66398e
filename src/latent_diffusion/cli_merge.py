"""`ldm merge`: the web UI's Checkpoint Merger on files (`weights/merge.py`), with SuperMerger's block weights.
Every check is made before the first tensor is read; the result is written whole or not at all."""

from __future__ import annotations

import argparse
import time

from .weights.merge import MODES, MergeOptions, merge_checkpoints

MERGE_HELP = (
    "Merge two or three checkpoints as the web UI's Checkpoint Merger: weighted sum (1-α)·A + α·B, add difference "
    "A + α·(B-C), or no interpolation (A alone: to bake in a VAE, save in float16 or drop weights). Keys whose name "
    "contains 'model' are merged; A's other keys are kept, keys only B has are left out. An inpainting or "
    "instruct-pix2pix A takes a normal B (the 4 latent input channels are merged). Checkpoints of different "
    "families are refused. Tensors are streamed one at a time from .safetensors files (a .ckpt is loaded whole), "
    "so memory stays far below one model. The output carries A's (then B's, C's) metadata, A's config and the web "
    "UI's merge recipe (sd_merge_recipe, sd_merge_models)."
)


def add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge checkpoints, as the web UI's Checkpoint Merger",
        description=MERGE_HELP,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="A, B (weighted sum), C (add difference)")
    p.add_argument("--mode", choices=MODES, default="weighted-sum", help="the web UI's interpolation method")
    p.add_argument("--alpha", type=float, default=0.3, help="the web UI's multiplier M")
    p.add_argument("--out", required=True, help="the merged .safetensors file")
    p.add_argument(
        "--block-weights",
        metavar="ALPHAS",
        help="SuperMerger's block weights: 25 comma-separated αs for IN00-IN11, M00, OUT00-OUT11 of the U-Net, or "
        "26 with BASE (the text encoder, VAE) first; without BASE those keys take --alpha",
    )
    p.add_argument("--float16", action="store_true", help="save the merged (float32) tensors as float16")
    p.add_argument("--bake-vae", metavar="FILE", help="a VAE file whose weights replace first_stage_model.*")
    p.add_argument("--discard-weights", default="", metavar="REGEX", help="leave out keys this expression matches")
    p.add_argument("--drop-ema", action="store_true", help="leave out the EMA weights (model_ema.*)")
    p.add_argument("--no-copy-metadata", action="store_true", help="do not copy the models' own metadata")
    p.add_argument("--no-recipe", action="store_true", help="do not write the merge recipe (sd_merge_recipe)")
    p.add_argument("--quiet", action="store_true", help="no summary line")


def cmd_merge(args) -> None:
    options = MergeOptions(
        mode=args.mode,
        alpha=args.alpha,
        block_weights=args.block_weights,
        float16=args.float16,
        bake_vae=args.bake_vae,
        discard_weights=args.discard_weights,
        drop_ema=args.drop_ema,
        copy_metadata=not args.no_copy_metadata,
        recipe=not args.no_recipe,
    )
    start = time.perf_counter()
    result = merge_checkpoints(args.models, args.out, options)
    if not args.quiet:
        kind = " (inpainting)" if result.is_inpainting else " (instruct-pix2pix)" if result.is_instruct_pix2pix else ""
        print(
            f"wrote {result.path}{kind}: {result.tensors} tensors, {result.merged} merged, "
            f"{result.discarded} left out, in {time.perf_counter() - start:.1f} s"
        )
