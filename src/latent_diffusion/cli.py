"""The `ldm` command: one entry point, one subcommand per job. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, preset
from .latent_diffusion import LatentDiffusion

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


def describe(model: LatentDiffusion) -> str:
    cfg = model.cfg
    return (
        f"variant {cfg.variant} ({cfg.parameterization}-prediction), {model.dtype}, {model.device}\n"
        f"  U-Net        model.diffusion_model   {count(model.model)}  in_channels={cfg.unet.in_channels}"
        f" model_channels={cfg.unet.model_channels} channel_mult={cfg.unet.channel_mult}\n"
        f"  autoencoder  first_stage_model       {count(model.first_stage_model)}"
        f"  {model.first_stage_model.downsampling_factor}x smaller per side, scale_factor={cfg.scale_factor}\n"
        f"  text         cond_stage_model        {count(model.cond_stage_model)}  {cfg.text.kind}"
        f" width={cfg.text.width} layers={cfg.text.layers} ({cfg.text.layer} layer)"
    )


def cmd_info(args) -> None:
    model = load_model(args.ckpt, args.config, device=args.device, dtype=DTYPES[args.dtype], ema=args.ema or None)
    print(f"{args.ckpt}: {describe(model)}")


@torch.no_grad()
def cmd_demo(args) -> None:
    """Until generation lands: build the tiny preset, save it, load it back, and run each part once."""
    outdir = Path(args.outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {outdir}: {e.strerror}") from None
    torch.manual_seed(args.seed)
    path = outdir / "tiny-random.safetensors"
    save_model(LatentDiffusion(preset("tiny")), path)
    print(f"wrote a tiny model with random weights (the real architecture at small widths): {path}")

    start = time.perf_counter()
    model = load_model(path)
    print(f"loaded it in {time.perf_counter() - start:.2f} s: {describe(model)}")

    start = time.perf_counter()
    context = model.get_text_conditioning([args.prompt])
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    latent = model.autoencoder_encode(image)
    t = torch.tensor([500])
    noise = torch.randn_like(latent)
    noisy = model.alphas_cumprod[t].sqrt() * latent + (1 - model.alphas_cumprod[t]).sqrt() * noise
    prediction = model(noisy, t, context)
    decoded = model.autoencoder_decode(latent)
    print(
        f"prompt {args.prompt!r} -> context {tuple(context.shape)}; image {tuple(image.shape)} -> latent "
        f"{tuple(latent.shape)}; U-Net at t=500 -> {tuple(prediction.shape)}; decode -> {tuple(decoded.shape)} "
        f"({time.perf_counter() - start:.2f} s)"
    )
    print("Image generation arrives with the samplers; `ldm info CKPT` describes any Stable Diffusion checkpoint.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent diffusion (Stable Diffusion) in the original checkpoint layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="load a checkpoint and describe it",
        description="Load a .safetensors or .ckpt Stable Diffusion checkpoint (SD 1.x, 2.x, inpainting) and "
        "print its variant and parts. Without --config the architecture is read off the keys.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    info.add_argument("ckpt", help="checkpoint file (.safetensors or .ckpt)")
    info.add_argument("--config", help="CompVis inference YAML (optional)")
    info.add_argument("--ema", action="store_true", help="load the model_ema.* U-Net weights")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", default="float32", choices=DTYPES)
    info.set_defaults(run=cmd_info)

    demo = sub.add_parser(
        "demo",
        help="save, load and run the tiny model once",
        description=f"Build the tiny preset (one of {', '.join(PRESETS)}) with random weights, save it, load it "
        "back and run text encoder, autoencoder and U-Net once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--outdir", default="out", help="folder for the checkpoint")
    demo.add_argument("--prompt", default="a small red circle on a blue background")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, UsageError, ValueError) as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
