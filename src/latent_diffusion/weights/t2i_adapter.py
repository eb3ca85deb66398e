"""T2I-Adapter files (`models/t2i_adapter.py`): TencentARC's original layout as it is, diffusers' mapped onto it.

- TencentARC's original layout, keys `conv_in`, `body.N.block1`, ... (full) or `body.N.in_conv`, `body.N.body.M.block1`,
  `body.N.out_conv` (light), sometimes under an `adapter.` prefix that their loader strips too:
  `t2iadapter_*_sd14v1.pth`, `t2iadapter_*_sd15v2.pth`, the SDXL `adapter-xl-*.pth`, and the single-condition
  CoAdapters `coadapter-{sketch,canny,depth,color}-sd15v1.pth`, which are plain full and light adapters (TencentARC's
  `app_coadapter.py` builds them with `get_adapters`, and the web UI's extension loads them alone).
- diffusers' `T2IAdapter` (`adapter.conv_in`, `adapter.body.N.in_conv`, `adapter.body.N.resnets.M.block1`, ...; its
  `adapter_type` full_adapter, full_adapter_xl or light_adapter): diffusers nests the full adapter's blocks per level,
  where TencentARC's list is flat (`body.{N · num_res_blocks + M}`), and calls the light adapter's `body` `resnets`.

The architecture is read off the keys and shapes: the unshuffle factor and the hint's channels from conv_in's (or the
light adapter's first in_conv's) input width, c·f² with c in (1, 3) and f in (8, 16); each level's width from its
first block; the blocks per level from their count (four levels: the U-Net takes four features).
The style adapter (`t2iadapter_style_sd14v1.pth`, `style_embedding`, ...) is a `models/style_adapter.StyleAdapter`.
Refused, each in one line: the CoAdapter fuser, the never-released `sk=False` variant.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch

from ..models.style_adapter import StyleAdapter, style_adapter_config
from ..models.t2i_adapter import Adapter, AdapterLight, T2IAdapterConfig, build_t2i_adapter
from .checkpoint import empty_modules, mismatch
from .reader import CheckpointError, read_state_dict


class T2IAdapterError(CheckpointError):
    """A file that is not a T2I-Adapter this project builds; the message names the file and the reason."""


def _refusal(keys: set[str]) -> str | None:
    """Why a T2I-Adapter-family file is not loaded, or None."""
    if "task_embedding" in keys:
        return "a CoAdapter fuser (it reweights several adapters' features); the coadapter-<condition> files load alone"
    if any(k.endswith(".skep.weight") for k in keys):
        return "a full adapter with shortcut convolutions (TencentARC's sk=False), which no released adapter has"
    return None


def is_t2i_adapter_state_dict(keys: Iterable[str]) -> bool:
    """Whether keys are a T2I-Adapter's, in either layout; True also for the files `load_t2i_adapter` refuses with
    their reason (style adapter, CoAdapter fuser), so that a caller sorting files sends them there."""
    keys = {k.removeprefix("adapter.") for k in keys}
    full = "conv_in.weight" in keys and ("body.0.block1.weight" in keys or "body.0.resnets.0.block1.weight" in keys)
    light = "body.0.in_conv.weight" in keys and "body.0.out_conv.weight" in keys
    return full or light or "style_embedding" in keys or _refusal(keys) is not None


def _count(sd: dict, pattern: str) -> int:
    """How many distinct numbers fill the `(\\d+)` of `pattern` across the keys."""
    return len({m.group(1) for k in sd if (m := re.fullmatch(pattern, k))})


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' `T2IAdapter` keys (`adapter.` already stripped) -> TencentARC's:

    full:  body.N.resnets.M.* -> body.{N · num_res_blocks + M}.*
           body.N.in_conv.*   -> body.{N · num_res_blocks}.in_conv.*
    light: body.N.resnets.M.* -> body.N.body.M.*  (body.N.in_conv and body.N.out_conv unchanged)
    """
    light = "conv_in.weight" not in sd
    per_level = _count(sd, r"body\.0\.resnets\.(\d+)\.block1\.weight")
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level, block, rest = int(m[1]), int(m[2]), m[3]
            key = f"body.{level}.body.{block}.{rest}" if light else f"body.{level * per_level + block}.{rest}"
        elif not light and (m := re.fullmatch(r"body\.(\d+)\.in_conv\.(.+)", key)):
            key = f"body.{int(m[1]) * per_level}.in_conv.{m[2]}"
        out[key] = value
    return out


def _unshuffle(in_channels: int, name) -> tuple[int, int]:
    """conv_in's input width -> (unshuffle factor, hint channels): 64 or 192 for SD (8² · 1 or 3), 256 or 768 (SDXL)."""
    for factor in (8, 16):
        for channels in (1, 3):
            if in_channels == channels * factor**2:
                return factor, channels
    raise T2IAdapterError(
        f"{name}: its first convolution takes {in_channels} channels, no 1- or 3-channel hint unshuffled by 8 or 16"
    )


def t2i_adapter_config(sd: dict[str, torch.Tensor], name="state dict") -> T2IAdapterConfig:
    """The architecture of an adapter in TencentARC's layout, read off its keys and shapes."""
    if "conv_in.weight" in sd:
        factor, hint_channels = _unshuffle(sd["conv_in.weight"].shape[1], name)
        blocks = _count(sd, r"body\.(\d+)\.block1\.weight")
        if blocks == 0 or blocks % 4:
            raise T2IAdapterError(f"{name}: a full T2I-Adapter with {blocks} blocks, not four levels' worth")
        per_level = blocks // 4
        return T2IAdapterConfig(
            kind="full",
            channels=tuple(sd[f"body.{level * per_level}.block1.weight"].shape[0] for level in range(4)),
            num_res_blocks=per_level,
            hint_channels=hint_channels,
            sdxl=factor == 16,
            kernel_size=sd["body.0.block2.weight"].shape[-1],
            conv_downsample=any(k.endswith(".down_opt.op.weight") for k in sd),
        )
    factor, hint_channels = _unshuffle(sd["body.0.in_conv.weight"].shape[1], name)
    if factor != 8:
        raise T2IAdapterError(f"{name}: a light T2I-Adapter with SDXL's unshuffle (16); light adapters are SD 1.x's")
    levels = _count(sd, r"body\.(\d+)\.out_conv\.weight")
    return T2IAdapterConfig(
        kind="light",
        channels=tuple(sd[f"body.{level}.out_conv.weight"].shape[0] for level in range(levels)),
        num_res_blocks=_count(sd, r"body\.0\.body\.(\d+)\.block1\.weight"),
        hint_channels=hint_channels,
    )


def t2i_adapter_from_state_dict(
    sd: dict[str, torch.Tensor], *, device="cpu", dtype: torch.dtype = torch.float32, name="state dict"
) -> Adapter | AdapterLight | StyleAdapter:
    """An adapter (in eval mode) from a state dict in either layout (the style adapter too). Raises T2IAdapterError
    with one line."""
    keys = {k.removeprefix("adapter.") for k in sd}
    if problem := _refusal(keys):
        raise T2IAdapterError(f"{name}: {problem}")
    if not is_t2i_adapter_state_dict(keys):
        sample = ", ".join(sorted(sd)[:3])
        raise T2IAdapterError(
            f"{name}: not a T2I-Adapter: no conv_in and body.0.block1 (full) nor body.0.in_conv and body.0.out_conv "
            f"(light) keys (first keys: {sample})"
        )
    sd = {k.removeprefix("adapter."): v for k, v in sd.items()}
    if "style_embedding" in sd:
        return _style_adapter(sd, device, dtype, name)
    if any(".resnets." in k for k in sd):
        sd = from_diffusers(sd)
    try:
        cfg = t2i_adapter_config(sd, name)
    except KeyError as e:
        raise T2IAdapterError(f"{name}: an incomplete T2I-Adapter: it has no {e.args[0]}") from None
    if len(cfg.channels) != 4:
        raise T2IAdapterError(f"{name}: a T2I-Adapter with {len(cfg.channels)} levels; the U-Net takes 4 features")
    with empty_modules():
        model = build_t2i_adapter(cfg)
    if problem := mismatch(model.state_dict(), sd, also_fits=lambda *_: False, ignorable=None):
        raise T2IAdapterError(f"{name}: does not fit the {cfg.kind} T2I-Adapter its keys describe: {problem}")
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def _style_adapter(sd: dict[str, torch.Tensor], device, dtype: torch.dtype, name) -> StyleAdapter:
    try:
        cfg = style_adapter_config({k: tuple(v.shape) for k, v in sd.items()})
    except KeyError as e:
        raise T2IAdapterError(f"{name}: an incomplete T2I style adapter: it has no {e.args[0]}") from None
    except ValueError as e:
        raise T2IAdapterError(f"{name}: not a T2I style adapter: {e}") from None
    with empty_modules():
        model = StyleAdapter(cfg)
    if problem := mismatch(model.state_dict(), sd, also_fits=lambda *_: False, ignorable=None):
        raise T2IAdapterError(f"{name}: does not fit the T2I style adapter its keys describe: {problem}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_t2i_adapter(
    path: str | os.PathLike, *, device="cpu", dtype: torch.dtype = torch.float32
) -> Adapter | AdapterLight | StyleAdapter:
    """A T2I-Adapter from a .safetensors, .pth or .bin file, in TencentARC's or diffusers' layout (read with the safe
    reader: no code from the file runs). Raises T2IAdapterError (a ValueError) with one line naming the file."""
    sd, _ = read_state_dict(path)
    return t2i_adapter_from_state_dict(sd, device=device, dtype=dtype, name=path)
