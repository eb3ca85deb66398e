"""A vision transformer's self-attention and MLP in timm's layout (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`),
as DINOv2 (`depth_anything.py`) and UniFormer (`uniformer.py`) name them in their files.

    attn(x) = proj(softmax(q kᵀ/√d) v)   with q, k, v = qkv(x) split in three, heads of d channels
    mlp(x) = fc2(GELU(fc1(x)))           fc1 widening 4×
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, width) -> (b, n, width)."""
        return self.proj(attention(*self.qkv(x).chunk(3, dim=-1), self.heads))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
