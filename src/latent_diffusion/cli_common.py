"""What the `ldm` command's modules share: the dtypes a flag names, the error that is bad input (one line, exit
code 2), a subcommand with the project's help format, and the flags (and help) that several commands take."""

from __future__ import annotations

import argparse

import torch

from .weights.fp8 import FP8_DTYPES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STYLES_HELP = "the web UI's styles.csv: name, prompt, negative_prompt (default: styles.csv where it exists)"
UPSCALER_DIR_HELP = (
    "upscaler models (ESRGAN, Real-ESRGAN, SwinIR, ... as spandrel reads them), named by file (default: the web "
    "UI's models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT and models/HAT where they exist)"
)


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def command(sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    return sub.add_parser(name, help=help_text, description=description, allow_abbrev=False, formatter_class=formatter)


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """fp8 weight storage, one flag per part as Forge's --unet-in-fp8-e4m3fn and --clip-in-fp8-e4m3fn."""
    for part, what in (("unet", "the U-Net's"), ("text", "the text encoders'")):
        p.add_argument(
            f"--{part}-weights-dtype",
            choices=FP8_DTYPES,
            help=f"store {what} Linear and Conv weights in this float8 format, each layer's cast to --dtype as it "
            "runs: a quarter of float32's memory for them (the web UI's 'FP8 weight'; default: --dtype)",
        )
