"""The U-Net's transformer on feature maps: self-attention, cross-attention on the text, GEGLU feed-forward.

Key names follow CompVis `ldm/modules/attention.py` (`transformer_blocks.N.attn1`, `ff.net.0.proj`, ...).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x·W ⊙ gelu(x·V), with W and V stacked in one projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention on the context, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (b, h*w, dim), context: (b, 77, context_dim) -> (b, h*w, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (a residual).

    SD 1.x projects in and out with 1x1 convolutions, SD 2.x with Linear layers on the tokens
    (`use_linear`); the two are the same map, stored with different weight shapes.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (b, c, h, w), context: (b, 77, context_dim) -> (b, c, h, w)."""
        h, w = x.shape[2:]
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # (b, c, h, w), copied into the standard layout: the transposed view is channels-last in memory, and on the
        # CPU every convolution after it ran slower on that (SDXL's U-Net step: 20 % slower)
        x = x.transpose(1, 2).unflatten(2, (h, w)).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
