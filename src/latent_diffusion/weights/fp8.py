"""fp8 weight storage: the U-Net's and the text encoders' layer weights kept in float8 (1 byte a number) and cast to
the compute dtype layer by layer as they run, as the web UI's "FP8 weight" option (`opts.fp8_storage`, which calls
`module.to(torch.float8_e4m3fn)` on every Conv2d and Linear of the model but the autoencoder) and Forge's
`--unet-in-fp8-e4m3fn` / `--clip-in-fp8-e4m3fn` (its operations' `weights_manual_cast`) do. Each layer's weights
exist in the compute dtype only while that layer runs.

Stored in float8, in each part asked for:
- the weight and bias of every nn.Linear and nn.Conv2d (the web UI's choice; Forge and ComfyUI store these too);
- OpenCLIP's fused q/k/v projection (`in_proj_weight`, `in_proj_bias`): a Linear layer in all but its name, run
  as three Linear layers in float8 by Forge and ComfyUI (the web UI's nn.MultiheadAttention keeps it in the
  compute dtype, a quarter of each attention block's weights).
Kept in the compute dtype: the norms' scales and shifts (GroupNorm, LayerNorm: the web UI's choice; Forge's
operations store them in float8 as well, for a saving of under 0.1% of the bytes), the token and position
embeddings (the web UI and Forge both), OpenCLIP's `text_projection` and `logit_scale`, and the whole autoencoder.

Rounding (torch's round to nearest even): e4m3fn keeps 3 bits of mantissa (steps of 2⁻³ of a value's power of two,
values to ±448, saturating beyond); e5m2 keeps 2 bits (2⁻², ±57344). A layer then computes exactly what the
compute-dtype layer computes with the weights float8(W) cast back: nothing else changes.

The module tree and the state-dict keys stay as they are: a stored layer's class becomes the subclass below, whose
forward casts; `save_model` writes the float8 tensors as they are (safetensors' F8_E4M3 / F8_E5M2, as the web UI's
and ComfyUI's fp8 files have them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ldm import LatentDiffusion
from ..models.text_encoder import MultiheadSelfAttention

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # the flags' names -> torch's


class CastLinear(nn.Linear):
    """nn.Linear with its weight and bias stored in another dtype than its input's (float8), cast to the input's as
    it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x))


class CastConv2d(nn.Conv2d):
    """nn.Conv2d with its weight and bias stored in another dtype than its input's (float8), cast as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), _cast(self.bias, x))


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


CAST = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def stored_keys(
    model: LatentDiffusion, unet: torch.dtype | None = None, text: torch.dtype | None = None
) -> dict[str, torch.dtype]:
    """The state-dict keys stored in float8 when the U-Net is stored in `unet` and the text encoders in `text`
    (None: the compute dtype) -> the float8 dtype of each. ValueError for a dtype that is not a float8 one."""
    for part, dtype in (("the U-Net's", unet), ("the text encoders'", text)):
        if dtype is not None and not is_fp8(dtype):
            names = " or ".join(map(str, FP8_DTYPES.values()))
            raise ValueError(f"{part} weights can be stored in {names}, not {dtype}")
    where = {id(module): name for name, module in model.named_modules()}
    parts = [(model.unet, unet)] + [(encoder, text) for encoder in model.text_encoders]
    keys = {}
    for root, dtype in parts:
        if dtype is None:
            continue
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, MultiheadSelfAttention)):
                prefix = f"{where[id(root)]}.{path}" if path else where[id(root)]
                keys |= {f"{prefix}.{name}": dtype for name, _ in module.named_parameters(recurse=False)}
    return keys


def cast_as_they_run(model: nn.Module) -> None:
    """Make every Linear and Conv2d layer whose weight is float8 cast it to its input's dtype as it runs (OpenCLIP's
    attention casts its own `in_proj_weight`)."""
    for module in model.modules():
        if type(module) in CAST and is_fp8(module.weight.dtype):
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
