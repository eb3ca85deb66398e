"""GGUF files, read with the gguf package (a memory map of the file and its header; nothing in it is run), in the
original checkpoint layout, for `load_model` (`weights/checkpoint.py`). Two layouts:

- city96's U-Nets (ComfyUI-GGUF's `tools/convert.py`, then its patched llama.cpp quantizer): the U-Net alone,
  `general.architecture` "sd1" (SD 1.x and 2.x alike) or "sdxl" (base and refiner), the U-Net's keys without
  `model.diffusion_model.`; a weight of at least 512 numbers whose last dimension is not a multiple of 256 (the
  3×3 convolutions) is stored reshaped to (n/256, 256), its shape in `comfy.gguf.orig_shape.<key>`. The rest of
  the model (autoencoder, text encoders) comes from a checkpoint beside it, as in ComfyUI.
- stable-diffusion.cpp's whole models (`sd -M convert`): no architecture key; the names of the checkpoint it was
  made from, or, with `--convert-name` (and always, in its older versions), its own names for the text encoders:
  `cond_stage_model.transformer.text_model.*` in transformers' CLIP names for every first text encoder, OpenCLIP
  ones included (SD 2.x, the SDXL refiner: a fused `self_attn.in_proj`), `cond_stage_model.1.*` for SDXL's second.
  Those are renamed back here. It leaves out OpenCLIP's `logit_scale`, which generation never reads: it is filled
  in with ln 100, the clamp trained CLIP models reach.

Tensors keep the file's storage (`Stored`): quantized ones as uint8 blocks, which `weights/ggml_quants.py`'s layers
dequantize as they run; F16, BF16 and F32 ones as torch tensors.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.config import preset
from ..models.family import EMA, FAMILIES, UNET, VAE, Family, family_of_keys
from . import ggml_quants
from .reader import CheckpointError, first_line
from .storage import CAST

ARCHITECTURES = ("sd1", "sdxl")  # city96's names of the U-Nets this project builds (sd1: SD 1.x and 2.x)
ORIG_SHAPE = "comfy.gguf.orig_shape."  # + key: a reshaped tensor's shape (city96's metadata)
GGUF_MAGIC = b"GGUF"


@dataclass
class Stored:
    """One tensor of a GGUF file, as it is stored."""

    data: torch.Tensor  # uint8 blocks of a quantized type (a view of the file), or a float tensor of `shape`
    qtype: str  # its GGML type: "Q8_0", "F16", ... (`ggml_quants.BLOCKS`)
    shape: torch.Size  # its shape in the model


def is_gguf(path: str | os.PathLike) -> bool:
    """A `.gguf` name, or a file that starts with GGUF's magic."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | os.PathLike) -> dict[str, Stored]:
    """A GGUF file's tensors by their key in the original layout (a city96 U-Net's under `model.diffusion_model.`).
    CheckpointError, one line, for a file that is not GGUF, of another architecture, or with a tensor of a GGML
    type this project does not dequantize."""
    path = Path(path)
    reader = _reader(path)
    field = reader.get_field("general.architecture")
    architecture = str(field.contents()) if field is not None else None
    if architecture is not None and architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: a GGUF file of architecture {architecture!r}; this project reads Stable Diffusion U-Nets "
            "in city96's layout (sd1, sdxl) and stable-diffusion.cpp's whole SD 1.x, 2.x and SDXL models"
        )
    tensors = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in ggml_quants.BLOCKS:
            raise CheckpointError(
                f"{path}: its tensor {t.name} is {qtype}, a GGML type this project does not read "
                f"(it reads {', '.join(ggml_quants.BLOCKS)})"
            )
        field = reader.get_field(ORIG_SHAPE + t.name)
        try:
            shape = torch.Size(field.contents() if field is not None else reversed(t.shape.tolist()))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: its {ORIG_SHAPE}{t.name} is not a shape") from None
        if math.prod(shape) != int(t.n_elements):
            raise CheckpointError(f"{path}: {t.name} holds {t.n_elements} numbers, not those of its shape {shape}")
        tensors[t.name] = Stored(_tensor(t.data, qtype, shape), qtype, shape)
    tensors = _our_names(tensors, architecture, path)
    if architecture is not None and (architecture == "sdxl") != (UNET + "label_emb.0.0.weight" in tensors):
        has = "has" if architecture == "sd1" else "has no"
        raise CheckpointError(f"{path}: its architecture is {architecture!r}, but its U-Net {has} SDXL's label_emb")
    return tensors


def gguf_package(path):
    """The gguf package, imported only where a GGUF file is read or written (it is an optional extra)."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            f"{path}: GGUF files need the gguf package (pip install 'latent_diffusion[gguf]')"
        ) from None
    return gguf


def _reader(path: Path):
    gguf = gguf_package(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader's ValueError, or numpy's on a truncated file
        if unknown := re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e)):
            raise CheckpointError(
                f"{path}: a tensor of an unknown GGML quantization type ({unknown.group(1)})"
            ) from None
        raise CheckpointError(f"{path}: not a readable GGUF file ({first_line(e)})") from None


def _tensor(array, qtype: str, shape: torch.Size) -> torch.Tensor:
    """The reader's numpy view of the file as a torch tensor (no copy): blocks as they are, floats in `shape`."""
    with warnings.catch_warnings():  # the mapping is read-only, and nothing here writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(array)
    if qtype == "BF16":  # the reader gives its bytes
        return data.view(torch.bfloat16).reshape(shape)
    return data.reshape(shape) if qtype in ggml_quants.FLOATS else data


# Names -------------------------------------------------------------------------------------------------------------

SDCPP_CLIP = "cond_stage_model.transformer.text_model."  # stable-diffusion.cpp's first text encoder, ...
SDCPP_CLIP2 = "cond_stage_model.1.transformer.text_model."  # ... and SDXL's second
SDCPP_FUSED = SDCPP_CLIP + "encoder.layers.0.self_attn.in_proj.weight"  # the first is OpenCLIP
# stable-diffusion.cpp's names of OpenCLIP's text weights (transformers' CLIP names) -> OpenCLIP's
OPENCLIP_NAMES = (
    ("final_layer_norm.", "ln_final."),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("embeddings.token_embedding.", "token_embedding."),
    ("text_projection.weight", "text_projection"),
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.in_proj.weight", ".attn.in_proj_weight"),
    (".self_attn.in_proj.bias", ".attn.in_proj_bias"),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)
LOGIT_SCALE = math.log(100)  # CLIP's contrastive temperature at its clamp, where trained models end


def _our_names(tensors: dict[str, Stored], architecture: str | None, path: Path) -> dict[str, Stored]:
    """The file's keys in the original layout: city96's bare U-Net keys under `model.diffusion_model.`,
    stable-diffusion.cpp's text encoders renamed back (the module docstring)."""
    if "input_blocks.0.0.weight" in tensors:
        return {UNET + k: v for k, v in tensors.items()}
    if UNET + "input_blocks.0.0.weight" not in tensors:
        first = ", ".join(list(tensors)[:3]) or "no tensors"
        raise CheckpointError(f"{path}: no Stable Diffusion U-Net in this GGUF file (first keys: {first})")
    if architecture is not None:
        return tensors
    if SDCPP_FUSED in tensors or any(k.startswith(SDCPP_CLIP2) for k in tensors):
        tensors = {_renamed(k, tensors): v for k, v in tensors.items()}
    for prefix in {k.removesuffix("text_projection") for k in tensors if k.endswith(".model.text_projection")}:
        scale = torch.tensor(LOGIT_SCALE)
        tensors.setdefault(prefix + "logit_scale", Stored(scale, "F32", scale.shape))
    return tensors


def _renamed(key: str, tensors: dict) -> str:
    """One key of stable-diffusion.cpp's text-encoder names in the original layout."""
    if key.startswith(SDCPP_CLIP2):
        return "conditioner.embedders.1.model." + _openclip(key.removeprefix(SDCPP_CLIP2))
    if not key.startswith(SDCPP_CLIP):
        return key
    rest = key.removeprefix(SDCPP_CLIP)
    if SDCPP_FUSED not in tensors:  # CLIP ViT-L: SD 1.x's as it is, SDXL base's first
        xl = any(k.startswith(SDCPP_CLIP2) for k in tensors)
        return "conditioner.embedders.0.transformer.text_model." + rest if xl else key
    refiner = UNET + "label_emb.0.0.weight" in tensors
    return ("conditioner.embedders.0.model." if refiner else "cond_stage_model.model.") + _openclip(rest)


def _openclip(name: str) -> str:
    for theirs, ours in OPENCLIP_NAMES:
        name = name.replace(theirs, ours)
    return name


# A U-Net beside a checkpoint ---------------------------------------------------------------------------------------


def unet_of(tensors: dict[str, Stored], path) -> dict[str, Stored]:
    """The U-Net's tensors of a GGUF file (city96's U-Net alone, or the U-Net of a whole model)."""
    unet = {k: v for k, v in tensors.items() if k.startswith(UNET)}
    if not unet:
        raise CheckpointError(f"{path}: no U-Net weights in this GGUF file")
    return unet


def is_unet_alone(tensors: dict[str, Stored]) -> bool:
    return not any(k.startswith(VAE) for k in tensors)


def check_family(unet: dict[str, Stored], checkpoint: dict[str, torch.Tensor], unet_path, checkpoint_path) -> None:
    """CheckpointError, one line, when the GGUF U-Net is of another family than the checkpoint that brings the
    text encoders: its projections (convolutions in SD 1.x, linear after), the width of the text it attends to
    and its vector input (SDXL) against those of the checkpoint's family and text encoders."""
    family = family_of_keys(checkpoint.keys())
    if family is None:
        return  # not a Stable Diffusion checkpoint: `load_model`'s own check says so
    widths = [_text_width(checkpoint, prefix) for prefix in family.text_prefixes]
    if None in widths:
        return  # an incomplete text encoder: `load_model`'s key check names what is missing
    stock = preset(family.preset).unet
    wanted = (stock.use_linear_in_transformer, sum(widths), stock.adm_in_channels is not None)
    proj_in = next((v for k, v in unet.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((v for k, v in unet.items() if k.endswith(".attn2.to_k.weight")), None)
    if proj_in is None or to_k is None:
        raise CheckpointError(f"{unet_path}: a U-Net without cross-attention, of no family this project builds")
    has = (len(proj_in.shape) == 2, to_k.shape[1], UNET + "label_emb.0.0.weight" in unet)
    if has != wanted:
        made_for = next((f.title for f in FAMILIES if _signature(f) == has), "another model")
        raise CheckpointError(
            f"{unet_path}: a U-Net for {made_for} ({_describe(has)}), not for the {family.title} checkpoint "
            f"{checkpoint_path} beside it ({_describe(wanted)})"
        )


def _text_width(sd: dict[str, torch.Tensor], prefix: str) -> int | None:
    """A text encoder's width (its token embedding's, in CLIP's or OpenCLIP's names), None without one."""
    keys = [k for k in (prefix + "embeddings.token_embedding.weight", prefix + "token_embedding.weight") if k in sd]
    return sd[keys[0]].shape[1] if keys else None


def _signature(family: Family) -> tuple[bool, int, bool]:
    unet = preset(family.preset).unet
    return unet.use_linear_in_transformer, family.context_dim, unet.adm_in_channels is not None


def _describe(signature: tuple[bool, int, bool]) -> str:
    linear, width, vector = signature
    kind = "linear" if linear else "convolution"
    return f"{kind} projections, text {width} wide{', a vector input' if vector else ''}"


def without_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors but its U-Net's (and their EMA copies): those come from the GGUF file."""
    return {k: v for k, v in sd.items() if not k.startswith((UNET, EMA))}


def shapes(tensors: dict[str, Stored]) -> dict[str, torch.Tensor]:
    """Meta tensors of the stored tensors' shapes, to read the architecture off and check the keys against."""
    return {k: torch.empty(v.shape, device="meta") for k, v in tensors.items()}


# Into a model ------------------------------------------------------------------------------------------------------


def weights(model: nn.Module, tensors: dict[str, Stored], expected: dict, device, dtype) -> dict[str, torch.Tensor]:
    """The state-dict tensors of the GGUF keys that `expected` holds, the layers they go into made ready for them:

    - a Linear or Conv2d weight of a quantized type: its blocks, on `device`; the layer dequantizes as it runs
      (`ggml_quants.quantize_layer`);
    - one of a narrower float type than `dtype` (F16 or BF16 under float32): as stored; the layer casts as it runs
      (`storage.CAST`'s layers);
    - everything else (norms, biases, embeddings, a wider float, and the whole autoencoder, whose attention reads
      its convolutions' weights itself, as `weights/storage.py` keeps it): dequantized or cast to `dtype` now.
    A tensor takes the expected shape, which has its numbers (stable-diffusion.cpp stores SDXL's linear
    proj_in/proj_out as (c, c, 1, 1))."""
    out = {}
    for key, t in tensors.items():
        if key not in expected:
            continue  # a key `load_model` ignores (a schedule buffer)
        owner, _, name = key.rpartition(".")
        layer = model.get_submodule(owner)
        shape = expected[key].shape
        is_layer_weight = type(layer) in CAST and name == "weight" and not key.startswith(VAE)
        if is_layer_weight and t.qtype in ggml_quants.QUANTIZED:
            ggml_quants.quantize_layer(layer, t.qtype, shape, dtype)
            out[key] = t.data.to(device)
        elif is_layer_weight and t.data.dtype.itemsize < dtype.itemsize:
            layer.__class__ = CAST[type(layer)]
            out[key] = t.data.to(device).reshape(shape)
        else:
            out[key] = ggml_quants.dequantize(t.data, t.qtype, shape, dtype).to(device)
    return out
