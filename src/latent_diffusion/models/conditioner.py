"""SDXL's conditioner, in the layout of generative-models' `GeneralConditioner` (keys `conditioner.embedders.N.*`).

The embedders, in the config's order: the text encoders (base: CLIP ViT-L/14, then OpenCLIP ViT-bigG/14; the
refiner: ViT-bigG only), then one weightless embedder per micro-conditioning input. Their outputs are joined as
generative-models joins them:

    crossattn = [text_1 | text_2]                        (b, 77·k, 768 + 1280)   along the feature axis
    vector    = [pooled | emb(h, w) | emb(top, left) | emb(target h, w)]   (b, 1280 + 6·256)

where emb embeds each number sinusoidally (`unet.timestep_embedding`, 256 wide) and concatenates them.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MICRO_CONDITIONING, LatentDiffusionConfig
from .text_encoder import TextEncoder
from .unet import timestep_embedding


class MicroConditioningEmbedder(nn.Module):
    """generative-models' ConcatTimestepEmbedderND: k numbers per image -> k sinusoidal embeddings, concatenated.
    It has no weights; it is a module so that the embedders' indices match the original's."""

    def __init__(self, name: str, width: int):
        super().__init__()
        self.name, self.width = name, width

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """values: (b, k) -> (b, k·width)."""
        return timestep_embedding(values.flatten(), self.width).reshape(len(values), -1)


class Conditioner(nn.Module):
    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__()
        self.embedders = nn.ModuleList(
            [TextEncoder(t) for t in cfg.texts]
            + [MicroConditioningEmbedder(m, cfg.micro_conditioning_width) for m in cfg.micro_conditioning]
        )

    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [e for e in self.embedders if isinstance(e, TextEncoder)]

    def vector(self, pooled: torch.Tensor, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """pooled: (b, p) text, micro: name -> (b, k) numbers (every input of the config) -> y (b, adm_in_channels)."""
        parts = [pooled]
        for e in self.embedders:
            if isinstance(e, MicroConditioningEmbedder):
                values = micro[e.name].to(pooled.device, torch.float32)
                assert values.shape == (len(pooled), MICRO_CONDITIONING[e.name]), (e.name, values.shape)
                parts.append(e(values).to(pooled.dtype))
        return torch.cat(parts, dim=1)
