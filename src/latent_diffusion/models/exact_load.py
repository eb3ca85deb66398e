"""A network built from a file's tensors exactly: every key and shape the network's, nothing more, the first misfit
said in one line. Built on the meta device and given the file's tensors (no copy, no random init to discard)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def load_exactly(build: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """build() with `state_dict`'s tensors, in float32, in eval mode; ValueError "not {what}: ..." where they do not
    fit (torch's first complaint: missing, unexpected or wrong-shape keys)."""
    with torch.device("meta"):
        model = build()
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"not {what}: {lines[min(1, len(lines) - 1)][:200]}") from None
    return model.float().eval()
