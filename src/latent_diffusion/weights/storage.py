"""Weight storage: the U-Net's and the text encoders' layer weights kept in a narrower form than the compute dtype
and made ready layer by layer as they run, so that each layer's weights exist in the compute dtype only while that
layer runs. The forms (`--unet-weights-dtype`, `--text-weights-dtype`):

- float8 (`fp8_e4m3fn`, `fp8_e5m2`: a byte a number), as the web UI's "FP8 weight" option (`opts.fp8_storage`, which
  calls `module.to(torch.float8_e4m3fn)` on every Conv2d and Linear of the model but the autoencoder) and Forge's
  `--unet-in-fp8-e4m3fn` / `--clip-in-fp8-e4m3fn` (its operations' `weights_manual_cast`);
- float16 or bfloat16 under a float32 compute dtype (two bytes): a CPU's float32 arithmetic at half its memory,
  where the CPU has no fast half-precision arithmetic of its own;
- Q8_0 (`q8_0`: GGML's blocks of 32 int8 numbers and one float16 scale, 1.06 bytes a number), quantized here at
  load as stable-diffusion.cpp's `--type q8_0` does, and dequantized by `weights/ggml_quants.py`'s layers.

Stored, in each part asked for:
- the weight and bias of every nn.Linear and nn.Conv2d (the web UI's choice; Forge and ComfyUI store these too);
  in Q8_0 the weights alone, as GGUF files keep them (a bias stays in the compute dtype), and only those whose
  numbers fill whole blocks of 32;
- OpenCLIP's fused q/k/v projection (`in_proj_weight`, `in_proj_bias`): a Linear layer in all but its name, run
  as three Linear layers in float8 by Forge and ComfyUI (the web UI's nn.MultiheadAttention keeps it in the
  compute dtype, a quarter of each attention block's weights); in float16 under Q8_0;
- under Q8_0, the text encoders' token embedding too, in float16 (stable-diffusion.cpp's `--type q8_0` stores it
  narrow as well; 72 MiB of SD 1.5's 145), its rows cast as they are looked up.
Kept in the compute dtype: the norms' scales and shifts (GroupNorm, LayerNorm: the web UI's choice; Forge's
operations store them in float8 as well, for a saving of under 0.1% of the bytes), the token embedding but under
Q8_0 and the position embeddings (the web UI and Forge both), OpenCLIP's `text_projection` and `logit_scale`, and
the whole autoencoder (but a generation pipeline keeps a half-precision file's autoencoder layers as filed, which
is exact: `autoencoder_as_filed`).

Rounding (torch's round to nearest even): e4m3fn keeps 3 bits of mantissa (steps of 2⁻³ of a value's power of two,
values to ±448, saturating beyond); e5m2 keeps 2 bits (2⁻², ±57344); float16 10 bits, bfloat16 7. A layer then
computes exactly what the compute-dtype layer computes with the weights cast back: nothing else changes.

The module tree and the state-dict keys stay as they are: a stored layer's class becomes the subclass below, whose
forward casts; `save_model` writes the float8 tensors as they are (safetensors' F8_E4M3 / F8_E5M2, as the web UI's
and ComfyUI's fp8 files have them).

Casting is cheap; a fresh tensor for its result is not, on a CPU: glibc serves allocations over 32 MB from mmap and
unmaps them when freed, so each layer's cast weight faults in fresh zeroed pages (a 1280×11520 weight: 29 ms from
float16 to a fresh float32 tensor, 3.6 ms into a reused one, on the 2-core EPYC of BENCHMARKS.md). Outside autograd
each thread casts into one buffer of its own, reused by every layer (`cast`); under autograd the backward pass
keeps the weight, so each gets its own tensor.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..models.autoencoder import AttnBlock
from ..models.ldm import LatentDiffusion
from ..models.text_encoder import MultiheadSelfAttention

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # the flags' names -> torch's
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
Q8_0 = "Q8_0"  # GGML's type name, which `load_model` takes in place of a dtype
STORAGE = {**FP8_DTYPES, **HALF_DTYPES, "q8_0": Q8_0}  # the flags' choices -> `load_model`'s *_weights_dtype


_buffers = threading.local()  # .by_kind: (device, dtype) -> this thread's reused buffer (module docstring)


def reused_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A tensor of `shape` in this thread's reused buffer for (`device`, `dtype`), valid until the next call; None
    under autograd or torch.compile, where each weight needs a tensor of its own."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    by_kind = _buffers.__dict__.setdefault("by_kind", {})
    numel, kind = math.prod(shape), (device, dtype)
    if kind not in by_kind or by_kind[kind].numel() < numel:
        by_kind.pop(kind, None)  # freed before its larger successor is made
        by_kind[kind] = torch.empty(numel, dtype=dtype, device=device)
    return by_kind[kind][:numel].view(shape)


def free_buffers() -> None:
    """Free this thread's reused buffers (the next cast makes them again): before the autoencoder decodes, so that
    its activations do not come on top of the largest weight's buffer (118 MB in float32 for SD 1.5)."""
    _buffers.__dict__.pop("by_kind", None)


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A layer's stored weight in `dtype`, for the one F.linear or convolution that is about to use it."""
    if weight.dtype == dtype:
        return weight
    out = reused_buffer(weight.shape, dtype, weight.device)
    return weight.to(dtype) if out is None else out.copy_(weight)


class CastLinear(nn.Linear):
    """nn.Linear with its weight and bias stored in another dtype than its input's, cast to the input's as it
    runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cast(self.weight, x.dtype), _cast(self.bias, x))


class CastConv2d(nn.Conv2d):
    """nn.Conv2d with its weight and bias stored in another dtype than its input's, cast as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast(self.weight, x.dtype), _cast(self.bias, x))


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


CAST = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def stored_keys(
    model: LatentDiffusion, unet: torch.dtype | str | None = None, text: torch.dtype | str | None = None
) -> dict[str, torch.dtype | str]:
    """The state-dict keys stored apart from the compute dtype when the U-Net is stored in `unet` and the text
    encoders in `text` (a `STORAGE` value; None: the compute dtype) -> the dtype of each, or Q8_0. ValueError for
    any other storage."""
    for part, storage in (("the U-Net's", unet), ("the text encoders'", text)):
        if storage is not None and storage not in STORAGE.values():
            names = ", ".join(map(str, STORAGE.values()))
            raise ValueError(f"{part} weights can be stored in {names}, not {storage}")
    where = {id(module): name for name, module in model.named_modules()}
    parts = [(model.unet, unet)] + [(encoder, text) for encoder in model.text_encoders]
    keys = {}
    for root, storage in parts:
        if storage is None:
            continue
        for path, module in root.named_modules():
            token_embedding = storage == Q8_0 and path.endswith("token_embedding")
            if isinstance(module, (nn.Linear, nn.Conv2d, MultiheadSelfAttention)) or token_embedding:
                prefix = f"{where[id(root)]}.{path}" if path else where[id(root)]
                for name, p in module.named_parameters(recurse=False):
                    keys[f"{prefix}.{name}"] = _form(module, name, p, storage)
    return {k: form for k, form in keys.items() if form is not None}


def _form(module: nn.Module, name: str, p: torch.Tensor, storage: torch.dtype | str) -> torch.dtype | str | None:
    """How one parameter of a stored layer is kept: `storage`, or under Q8_0 (module docstring) Q8_0, float16, or
    None for the compute dtype."""
    if storage != Q8_0:
        return storage
    if isinstance(module, (MultiheadSelfAttention, nn.Embedding)):
        return torch.float16
    return Q8_0 if name == "weight" and p.numel() % 32 == 0 else None


def autoencoder_as_filed(autoencoder: nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """For a generation pipeline: the autoencoder's Linear and Conv weights and biases that `sd` (a file's tensors)
    holds in float16 or bfloat16 where the compute dtype is float32 -> that dtype, to keep them in. Cast to float32
    as each layer runs, they are the numbers float32 copies would be, at half the memory (0.1 GB of SD's decoder),
    for one cast per layer and decode (the attention blocks' 1x1 convolutions, which their block runs as matrix
    products, stay in float32: 4 MB). Not for training, whose optimizer wants float32 weights. `sd`'s keys are the
    whole model's (`first_stage_model.*`)."""
    if dtype != torch.float32:
        return {}
    attention = {id(m) for block in autoencoder.modules() if isinstance(block, AttnBlock) for m in block.children()}
    forms = {}
    for path, module in autoencoder.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in attention:  # (it runs their weights)
            for name, _ in module.named_parameters(recurse=False):
                key = f"first_stage_model.{path}.{name}"
                if key in sd and sd[key].dtype in HALF_DTYPES.values():
                    forms[key] = sd[key].dtype
    return forms


def cast_as_they_run(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every Linear and Conv2d layer whose weight is stored in another dtype than `dtype`, the compute dtype,
    cast it to its input's dtype as it runs (OpenCLIP's attention casts its own `in_proj_weight`). A weight not read
    yet (a meta tensor: `load_model(for_generation=True)`) will be read in `dtype`."""
    for module in model.modules():
        if type(module) in CAST and module.weight.dtype != dtype and not module.weight.is_meta:
            module.__class__ = CAST[type(module)]


def stores_fp8(model: nn.Module) -> bool:
    """Whether any weight of the model is stored in float8 (the infotext's "FP8 weight")."""
    return any(is_fp8(p.dtype) for p in model.parameters())


def check_device(device: torch.device | str) -> None:
    """ValueError in one line unless torch can store float8 numbers on `device` and cast them to float32 there (CPU
    and CUDA can; MPS cannot, which is why the web UI turns its fp8 option off there)."""
    try:
        _round_trip(device)
    except (RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"fp8 weight storage: this torch cannot hold float8 numbers on {device} ({reason})") from None


def _round_trip(device: torch.device | str) -> torch.Tensor:
    return torch.ones(2, device=device).to(torch.float8_e4m3fn).to(torch.float8_e5m2).float()
