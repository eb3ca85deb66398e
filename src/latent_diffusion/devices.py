"""`--device` names -> torch devices, checked before any work is done."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps; ValueError naming the problem otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps is not available here")
    return device
