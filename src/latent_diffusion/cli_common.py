"""What the `ldm` command's modules share: the dtypes a flag names, the error that is bad input (one line, exit
code 2), a subcommand with the project's help format, the flags (and help) that several commands take, and a
model's description (`ldm info`, `ldm demo`)."""

from __future__ import annotations

import argparse
import sys

import torch

from .devices import computes_natively, emulated_warning
from .models.ldm import LatentDiffusion
from .weights.ggml_quants import parameter_count, storage
from .weights.storage import STORAGE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = [*DTYPES, "auto"]
DTYPE_HELP = (
    "the compute dtype (default: float16 on cuda, float32 elsewhere, as the web UI; auto: float16 on cuda, bfloat16 "
    "on a CPU that computes it natively (AVX-512 BF16 or AMX: about twice float32's speed), else float32)"
)
STYLES_HELP = "the web UI's styles.csv: name, prompt, negative_prompt (default: styles.csv where it exists)"
CLIP_VISION_DIR_HELP = (
    "the CLIP image towers that IP-Adapter, T2I style adapter and revision units need, clip_h.pth, clip_g.pth and "
    "clip_vitl.pth as the ControlNet extension names them (default: models/clip_vision where it exists)"
)
ANNOTATOR_DIR_HELP = (
    "the annotator weights of the preprocessors that need them (lineart, softedge_hed, normal_bae, ..., run here; "
    "depth_midas, openpose, ... through the controlnet_aux package): lllyasviel/Annotators' files, or the extension's "
    "annotator/downloads folder (default: models/annotators where it exists)"
)
UPSCALER_DIR_HELP = (
    "upscaler models (ESRGAN, Real-ESRGAN, SwinIR, ... as spandrel reads them), named by file (default: the web "
    "UI's models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT and models/HAT where they exist)"
)


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype (DTYPE_HELP) on `device`; a warning where the device would only emulate the dtype named (auto never
    picks one)."""
    if name == "auto" and device.type == "cpu":
        name = "bfloat16" if computes_natively(torch.bfloat16, device) else "float32"
    dtype = DTYPES.get(name, torch.float16 if device.type == "cuda" else torch.float32)
    if not computes_natively(dtype, device):
        print(emulated_warning(dtype, device), file=sys.stderr)
    return dtype


def command(sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    return sub.add_parser(name, help=help_text, description=description, allow_abbrev=False, formatter_class=formatter)


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """Weight storage, one flag per part as Forge's --unet-in-fp8-e4m3fn and --clip-in-fp8-e4m3fn."""
    for part, what in (("unet", "the U-Net's"), ("text", "the text encoders'")):
        p.add_argument(
            f"--{part}-weights-dtype",
            choices=STORAGE,
            help=f"store {what} Linear and Conv weights in this form, each layer's cast to --dtype as it runs: "
            "float8 (a quarter of float32's memory: the web UI's 'FP8 weight'), float16 or bfloat16 (half), or q8_0 "
            "(GGML's 8-bit blocks, quantized at load: a quarter, and closer to float32 than float8) (default: --dtype)",
        )


def count(module: torch.nn.Module) -> str:
    return f"{parameter_count(module) / 1e6:.1f} M"


def describe(model: LatentDiffusion) -> str:
    cfg = model.cfg
    lines = [
        f"variant {cfg.variant} ({cfg.family.title}, {cfg.parameterization}-prediction), {model.dtype}, {model.device}",
        f"  U-Net        model.diffusion_model   {count(model.model)}  in_channels={cfg.unet.in_channels}"
        f" model_channels={cfg.unet.model_channels} channel_mult={cfg.unet.channel_mult}"
        + (f" vector y={cfg.unet.adm_in_channels}" if cfg.unet.adm_in_channels else ""),
        f"  autoencoder  first_stage_model       {count(model.first_stage_model)}"
        f"  {cfg.autoencoder.downsampling_factor}x smaller per side, scale_factor={cfg.scale_factor}",
    ]
    xl = bool(cfg.micro_conditioning)
    for i, (t, encoder) in enumerate(zip(cfg.texts, model.text_encoders)):
        where = f"conditioner.embedders.{i}" if xl else "cond_stage_model"
        lines.append(
            f"  text         {where:<23} {count(encoder)}  {t.kind} width={t.width} layers={t.layers} ({t.layer}"
            f" layer{'' if t.final_norm else ', no final norm'}){', pooled into y' if t.pooled else ''}"
            + ("; no text_projection or logit_scale in the file (unused)" if not t.projection else "")
        )
    for part, module in (("U-Net", model.unet), *(("text", e) for e in model.text_encoders)):
        if found := storage(module):
            types = ", ".join(f"{n} {t}" for t, n in sorted(found.items(), key=lambda item: -item[1]))
            lines.append(f"  {part} layers in GGUF blocks, dequantized as they run: {types}")
    if xl:
        lines.append(
            f"  micro-conditioning ({cfg.micro_conditioning_width} wide each): {', '.join(cfg.micro_conditioning)}"
        )
    return "\n".join(lines)
