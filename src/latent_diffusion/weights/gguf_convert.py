"""A checkpoint's U-Net written as a GGUF file in city96's layout (`ldm convert --to gguf`): what ComfyUI-GGUF's
`tools/convert.py` and its patched llama.cpp quantizer make, so that ComfyUI's GGUF loader and
`load_model(unet_gguf=...)` read it. Written with the gguf package's writer and its quantizers.

The file: `general.architecture` "sd1" (SD 1.x and 2.x) or "sdxl" (base and refiner), the U-Net's keys without
`model.diffusion_model.`, `general.file_type` and `general.quantization_version`. Each tensor, as city96's tools
store it:
- at most 1-D, or at most 1,024 numbers (biases, norms, small convolutions): F32 (his converter keeps a float16
  file's as F16; F32 holds them exactly either way);
- at least 2-D with at least 512 numbers, a multiple of 256, and a last dimension that is not one: reshaped to
  (n/256, 256), its shape in `comfy.gguf.orig_shape.<key>`, so that the 3×3 convolutions fit whole blocks;
- then the type asked for where each row is whole blocks, else F16 (the quantizer's fallback); the feed-forward
  output (`ff.net.2`) one step finer for Q4_0 (→ Q4_1) and Q5_0 (→ Q5_1), the quantizer's rule for it.

The gguf package quantizes Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 (and writes F16, BF16, F32); it has no quantizer for the
K-quants (Q2_K to Q6_K, dequantizers only), so those are not offered here: llama.cpp's quantizer makes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from ..models.family import UNET
from .architecture import infer_unet
from .gguf_files import gguf_package, is_gguf
from .reader import CheckpointError, read_state_dict

QUANTS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")  # what the gguf package writes
FINER_FF = {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}  # city96's quantizer's type for the feed-forward output
SMALL = 1024  # numbers: kept in F32
REARRANGE = 256  # the row width a reshaped weight gets (a K-quant super-block)


@dataclass
class Converted:
    path: Path
    architecture: str  # "sd1" or "sdxl"
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensors written in it
    bytes: int = 0  # tensor data written


def convert_to_gguf(source: str | os.PathLike, out: str | os.PathLike, quant: str = "Q8_0") -> Converted:
    """Write the U-Net of `source` (a whole checkpoint, or a U-Net alone with or without `model.diffusion_model.`)
    as a GGUF file of `quant` at `out`, whole or not at all. CheckpointError (one line, nothing written) for an
    unknown type, an output that is not a `.gguf` in an existing folder, or a source with no U-Net this project
    builds."""
    source, out = Path(source), Path(out)
    gguf = gguf_package(out)
    if quant not in QUANTS:
        raise CheckpointError(f"{quant}: not a type the gguf package writes; choose one of {', '.join(QUANTS)}")
    if out.suffix.lower() != ".gguf" or not out.parent.is_dir() or out.resolve() == source.resolve():
        raise CheckpointError(f"{out}: the output must be a new .gguf file in an existing folder")
    unet = _unet(source)
    architecture = "sdxl" if "label_emb.0.0.weight" in unet else "sd1"
    writer = gguf.GGUFWriter(path=None, arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[{"F32": "ALL_F32"}.get(quant, f"MOSTLY_{quant}")])
    result = Converted(out, architecture)
    for key, tensor in unet.items():
        data = tensor.float().numpy()
        if _rearranged(data):
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
            data = data.reshape(-1, REARRANGE)
        qtype = _type(key, data, quant)
        stored = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        writer.add_tensor(key, stored, raw_dtype=gguf.GGMLQuantizationType[qtype])
        result.types[qtype] = result.types.get(qtype, 0) + 1
        result.bytes += stored.nbytes
    with atomic_write(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return result


def _unet(source: Path) -> dict[str, torch.Tensor]:
    """The U-Net's tensors of a checkpoint or a U-Net file, by key without `model.diffusion_model.`."""
    if source.is_file() and is_gguf(source):
        raise CheckpointError(f"{source}: already a GGUF file; convert takes a .safetensors or .ckpt checkpoint")
    sd, _ = read_state_dict(source)
    if any(k.startswith(UNET) for k in sd):
        unet = {k.removeprefix(UNET): v for k, v in sd.items() if k.startswith(UNET)}
    elif "input_blocks.0.0.weight" in sd:
        unet = {k: v for k, v in sd.items() if "." in k}  # a U-Net alone
    else:
        raise CheckpointError(f"{source}: no Stable Diffusion U-Net (model.diffusion_model.*) to convert")
    try:
        infer_unet({UNET + k: v for k, v in unet.items()}, heads=(1, None))  # heads leave no trace in the shapes
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: its U-Net is of no architecture this project builds ({e})") from None
    if bad := [k for k, v in unet.items() if not v.is_floating_point()]:
        raise CheckpointError(f"{source}: {bad[0]} is not a floating-point tensor")
    return unet


def _rearranged(data: np.ndarray) -> bool:
    """city96's reshape to rows of 256 (the module docstring)."""
    n = data.size
    return data.ndim > 1 and n >= 512 and n % REARRANGE == 0 and data.shape[-1] % REARRANGE != 0


def _type(key: str, data: np.ndarray, quant: str) -> str:
    """The GGML type a tensor is written in (the module docstring)."""
    if data.ndim <= 1 or data.size <= SMALL:
        return "F32"
    qtype = FINER_FF.get(quant, quant) if key.endswith(".ff.net.2.weight") else quant
    block_size = 1 if qtype in ("F32", "F16", "BF16") else 32
    return qtype if data.shape[-1] % block_size == 0 else "F16"
