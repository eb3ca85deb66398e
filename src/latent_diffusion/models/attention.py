"""The one attention function. The U-Net's self- and cross-attention, the autoencoder's mid-block
attention and the text encoders' causal self-attention all call it.

softmax(q kᵀ / √d) v for all heads at once, through `scaled_dot_product_attention` (a fused kernel:
no Python loop over heads and no full attention matrix in memory where a flash/efficient kernel applies).
"""

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """q: (b, n, h*d), k and v: (b, m, h*d) -> (b, n, h*d)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).flatten(2)  # (b, n, h*d)


class CrossAttention(nn.Module):
    """Multi-head attention of x on a context (on x itself when context is None). CompVis key names."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))  # Sequential: key `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, n, query_dim), context: (b, m, context_dim) -> (b, n, query_dim)."""
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))
