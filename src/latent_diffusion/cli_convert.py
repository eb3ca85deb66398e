"""`ldm convert`: a checkpoint's U-Net as a GGUF file in city96's layout (`weights/gguf_convert.py`), for
`--unet-gguf` here and ComfyUI-GGUF's loader. Every check is made before the first tensor is read; the file is
written whole or not at all."""

from __future__ import annotations

import argparse
from pathlib import Path

from .weights.gguf_convert import QUANTS, convert_to_gguf

CONVERT_HELP = (
    "Write a checkpoint's U-Net (a whole .safetensors or .ckpt, or a U-Net alone) as a GGUF file in city96's layout, "
    "the one ComfyUI-GGUF reads: the U-Net's keys without model.diffusion_model., architecture sd1 (SD 1.x, 2.x) or "
    "sdxl. Norms, biases and tensors of at most 1,024 numbers stay F32; a layer whose rows are not whole blocks "
    "falls back to F16. Load it with --unet-gguf beside the checkpoint, which brings the VAE and text encoders. "
    "Types are those the gguf package quantizes; K-quants (Q4_K, ...) need llama.cpp's quantizer."
)


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint's U-Net as a quantized GGUF file (city96's layout)",
        description=CONVERT_HELP,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the checkpoint (.safetensors or .ckpt) whose U-Net is converted")
    p.add_argument("--to", required=True, choices=["gguf"], help="the output format")
    p.add_argument("--quant", default="Q8_0", choices=QUANTS, help="the GGML type of the U-Net's layer weights")
    p.add_argument("--out", help="the .gguf file to write (default: MODEL's name with -QUANT.gguf, beside it)")
    p.add_argument("--quiet", action="store_true", help="no summary line")


def cmd_convert(args) -> None:
    source = Path(args.model)
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}-{args.quant}.gguf")
    result = convert_to_gguf(source, out, args.quant)
    if not args.quiet:
        types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda item: -item[1]))
        print(f"wrote {result.path} ({result.architecture}, {result.bytes / 2**20:.1f} MiB of tensors): {types}")
