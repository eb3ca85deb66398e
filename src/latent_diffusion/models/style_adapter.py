"""TencentARC's T2I style adapter (`t2iadapter_style_sd14v1.pth`; `StyleAdapter` in their
`ldm/modules/encoders/adapter.py`): an image's CLIP ViT-L/14 tokens become a few tokens in the text encoder's width,
which are appended to the prompt's context, so every cross-attention of the U-Net attends to the image's style.

    x = [CLIP tokens (b, 257, 1024) ; style embedding (b, 8, 1024)]
    x = transformer(ln_pre(x))          3 open_clip blocks, 8 heads, quick-GELU, not causal
    tokens = ln_post(x[:, −8:]) @ proj   (b, 8, 768)

The CLIP tokens are the tower's last hidden state, before its final layer norm (`VisionOutput.last`). Keys as in the
file: `style_embedding`, `ln_pre`, `transformer_layes.N` (sic) with `nn.MultiheadAttention`'s `attn.in_proj_weight`,
`ln_post`, `proj`. The shapes give the config; only SD 1.x's 768-wide context has a released model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .text_encoder import ResidualAttentionBlock


@dataclass(frozen=True)
class StyleAdapterConfig:
    width: int = 1024  # the CLIP tokens' width
    context_dim: int = 768  # the text encoder's
    heads: int = 8
    layers: int = 3
    tokens: int = 8
    activation: str = "quick_gelu"

    @property
    def mlp_width(self) -> int:
        return 4 * self.width


def style_adapter_config(shapes: dict[str, tuple]) -> StyleAdapterConfig:
    """The config of a file's tensors, from their shapes (key -> shape); no shape shows the heads: 8, as in the one
    released model (TencentARC's and the extension's loaders fix them too). KeyError naming a key it lacks,
    ValueError for shapes it cannot have."""
    embedding, proj = shapes["style_embedding"], shapes["proj"]
    numbers = {k.split(".")[1] for k in shapes if k.startswith("transformer_layes.")}
    if not numbers:
        raise KeyError("transformer_layes.0")
    if len(embedding) != 3 or embedding[0] != 1 or embedding[1] < 1 or len(proj) != 2 or proj[0] != embedding[2]:
        raise ValueError(
            f"style_embedding {tuple(embedding)} is not (1, tokens, width) or proj {tuple(proj)} not (width, context)"
        )
    if not all(n.isdigit() for n in numbers):
        raise ValueError(f"transformer_layes.{sorted(numbers)[0]} is not a numbered layer")
    return StyleAdapterConfig(embedding[2], proj[1], layers=1 + max(map(int, numbers)), tokens=embedding[1])


class StyleAdapter(nn.Module):
    def __init__(self, cfg: StyleAdapterConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.style_embedding = nn.Parameter(torch.randn(1, cfg.tokens, cfg.width) * scale)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer_layes = nn.Sequential(*(ResidualAttentionBlock(cfg, causal=False) for _ in range(cfg.layers)))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.randn(cfg.width, cfg.context_dim) * scale)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, width) CLIP tokens -> (b, tokens, context_dim)."""
        x = clip_tokens.to(self.proj.dtype)
        x = torch.cat([x, self.style_embedding.expand(len(x), -1, -1)], dim=1)  # (b, n + tokens, width)
        x = self.transformer_layes(self.ln_pre(x))
        return self.ln_post(x[:, -self.cfg.tokens :]) @ self.proj
