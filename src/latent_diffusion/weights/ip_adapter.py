"""IP-Adapter files and the CLIP image towers they need (`models/ip_adapter.py`, `models/clip_vision.py`).

- IP-Adapter: tencent-ailab's `.bin` (a pickle of {"image_proj": {...}, "ip_adapter": {...}}, read without running
  code and flattened to `image_proj.*`, `ip_adapter.*` by the reader) or its `.safetensors` with those keys. The
  kind is read off the keys as the web UI's ControlNet extension reads it: `image_proj.proj.3` full face, `latents`
  plus, `proj` base; its widths off the shapes. FaceID files (`image_proj.proj.0/.2` and `norm`; plus with a
  `perceiver_resampler`, v2 where the file's name says "v2", as the extension reads it) and InstantID's (a resampler
  taking a 512-wide identity, where the extension reads "instant_id" in the file's name) take InsightFace's identity
  of a face.
- CLIP image tower: transformers' `CLIPVisionModelWithProjection` keys (the extension's `clip_h.pth`, `clip_g.pth`,
  IP-Adapter's `image_encoder/model.safetensors`; a whole `CLIPModel`'s file, its text tower left out), kept in
  float32 as the extension runs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..models.clip_vision import CLIPVisionModelWithProjection, vision_config_of
from ..models.ip_adapter import IDENTITY_WIDTH, IPAdapter, IPAdapterConfig
from .checkpoint import empty_modules, mismatch
from .reader import CheckpointError, read_state_dict

P = "image_proj."


def is_ip_adapter_state_dict(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any(k.startswith("ip_adapter.") for k in keys) and any(k.startswith(P) for k in keys)


def ip_adapter_config(shapes: dict[str, tuple], name) -> IPAdapterConfig:
    """The config of an IP-Adapter's tensors (key -> shape); CheckpointError naming `name` for one not built here."""
    suffix = ".to_k_ip.weight"
    layers = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("ip_adapter.") and k.endswith(suffix))
    if not layers:
        raise CheckpointError(f"{name}: an IP-Adapter without ip_adapter.N.to_k_ip weights")
    widths = tuple(shapes[f"ip_adapter.{n}{suffix}"][0] for n in layers)
    context = shapes[f"ip_adapter.{layers[0]}{suffix}"][1]
    kind = dict(layers=tuple(layers), widths=widths, context_dim=context)
    if P + "proj.3.weight" in shapes:
        return IPAdapterConfig("full", embed_dim=shapes[P + "proj.0.weight"][1], tokens=257, **kind)
    if P + "norm.weight" in shapes and P + "proj.2.weight" in shapes:
        out, embed = shapes[P + "proj.2.weight"][0], shapes[P + "proj.0.weight"][1]
        if P + "perceiver_resampler.proj_in.weight" in shapes:  # (the identity and CLIP's states; v2 by its name)
            clip = shapes[P + "perceiver_resampler.proj_in.weight"][1]
            shortcut = "v2" in Path(name).name
            return IPAdapterConfig("faceid_plus", embed_dim=clip, tokens=out // context, shortcut=shortcut, **kind)
        return IPAdapterConfig("faceid", embed_dim=embed, tokens=out // context, **kind)
    if P + "latents" in shapes:
        _, queries, dim = shapes[P + "latents"]
        embed = shapes[P + "proj_in.weight"][1]
        kind["kind"] = "instantid" if embed == IDENTITY_WIDTH else "plus"  # (no CLIP tower is 512 wide)
        return IPAdapterConfig(embed_dim=embed, tokens=queries, resampler_dim=dim, **kind)
    if P + "proj.weight" in shapes:
        out, embed = shapes[P + "proj.weight"]
        return IPAdapterConfig("base", embed_dim=embed, tokens=out // context, **kind)
    raise CheckpointError(f"{name}: an IP-Adapter whose image projection is of no known kind")


def load_ip_adapter(path: str | os.PathLike, device=None, dtype=torch.float32) -> IPAdapter:
    """An IP-Adapter file, on `device` in `dtype`. CheckpointError in one line for a file that does not fit."""
    sd, _ = read_state_dict(path)
    cfg = ip_adapter_config({k: tuple(v.shape) for k, v in sd.items()}, path)
    with empty_modules():
        adapter = IPAdapter(cfg)
    expected = adapter.state_dict()
    if problem := mismatch(expected, sd, lambda *_: False, ignorable=None):
        raise CheckpointError(f"{path}: not an IP-Adapter of the {cfg.kind} kind: {problem}")
    adapter.load_state_dict({k: sd[k].to(device, dtype) for k in expected}, assign=True)
    return adapter.eval().requires_grad_(False)


def load_clip_vision(path: str | os.PathLike, device=None) -> CLIPVisionModelWithProjection:
    """A CLIP image tower in float32. CheckpointError in one line for a file that is not one."""
    sd, _ = read_state_dict(path)
    # the image tower's keys (a whole CLIPModel's file holds its text tower too); not the buffer old files saved
    sd = {
        k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection.")) and "position_ids" not in k
    }
    needed = ("vision_model.embeddings.patch_embedding.weight", "visual_projection.weight")
    if not all(k in sd for k in needed):
        raise CheckpointError(f"{path}: not a CLIP image tower (no {' or '.join(k for k in needed if k not in sd)})")
    with empty_modules():
        tower = CLIPVisionModelWithProjection(vision_config_of({k: tuple(v.shape) for k, v in sd.items()}))
    expected = tower.state_dict()
    if problem := mismatch(expected, sd, lambda *_: False, ignorable=None):
        raise CheckpointError(f"{path}: not a CLIP image tower: {problem}")
    tower.load_state_dict({k: sd[k].to(device, torch.float32) for k in expected}, assign=True)
    return tower.eval().requires_grad_(False)
