"""CLIP's image tower, which turns an image into the embedding an IP-Adapter conditions on.

The layout of `transformers.CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection.weight`), the
layout of the files the web UI's ControlNet extension loads (`clip_h.pth`, `clip_g.pth`, `clip_vitl.pth`) and of
IP-Adapter's `image_encoder` folders. A ViT: the image cut into patches, a class token in front, non-causal
pre-norm blocks (the text encoder's `CLIPEncoderLayer`), and

    image_embeds = visual_projection(post_layernorm(x_last[:, 0]))       the class token's final state
    penultimate  = x_{L−1}                                               the input of the last block (all tokens)
    last         = x_L                                                   all tokens, before post_layernorm

IP-Adapter and revision condition on the first; IP-Adapter's "plus" models on the second (transformers'
`hidden_states[-2]`); the T2I style adapter on the third (transformers' `last_hidden_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .text_encoder import CLIPEncoderLayer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the pixel statistics CLIP was trained with, per RGB channel
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_width: int = 5120
    activation: str = "gelu"
    patch: int = 14
    image_size: int = 224
    embed_dim: int = 1024  # the projected embedding's width


# The towers in use: OpenCLIP ViT-H/14 (SD 1.5's IP-Adapters, SDXL's "vit-h" ones), ViT-bigG/14 (SDXL's), OpenAI ViT-L/14
VIT_H = VisionConfig()
VIT_BIGG = VisionConfig(width=1664, layers=48, mlp_width=8192, embed_dim=1280)
VIT_L = VisionConfig(width=1024, layers=24, mlp_width=4096, activation="quick_gelu", embed_dim=768)


def vision_config_of(shapes: dict[str, tuple]) -> VisionConfig:
    """The config of a state dict's tensors, from their shapes (key -> shape). Every CLIP image tower in use has 16
    heads; only OpenAI's ViT-L/14 (width 1024) uses quick-GELU."""
    e = "vision_model.embeddings."
    width, _, patch, _ = shapes[e + "patch_embedding.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision_model.encoder.layers."))
    return VisionConfig(
        width=width,
        layers=layers,
        mlp_width=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        activation="quick_gelu" if width == 1024 else "gelu",
        patch=patch,
        image_size=patch * math.isqrt(shapes[e + "position_embedding.weight"][0] - 1),
        embed_dim=shapes["visual_projection.weight"][0],
    )


@dataclass
class VisionOutput:
    image_embeds: torch.Tensor  # (b, embed_dim)
    penultimate: torch.Tensor  # (b, 1 + patches, width)
    last: torch.Tensor | None = None  # (b, 1 + patches, width): the last block's output, before post_layernorm


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        patches = (cfg.image_size // cfg.patch) ** 2
        v = self.vision_model = nn.Module()
        v.embeddings = nn.Module()
        v.embeddings.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        v.embeddings.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        v.embeddings.position_embedding = nn.Embedding(1 + patches, cfg.width)
        v.pre_layrnorm = nn.LayerNorm(cfg.width)  # (sic: transformers' key)
        v.encoder = nn.Module()
        v.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.layers))
        v.post_layernorm = nn.LayerNorm(cfg.width)
        self.visual_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        """pixels: (b, 3, image_size, image_size), normalised by CLIP_MEAN and CLIP_STD."""
        v = self.vision_model
        x = v.embeddings.patch_embedding(pixels.to(self.visual_projection.weight.dtype))  # (b, width, 16, 16)
        x = x.flatten(2).transpose(1, 2)  # (b, patches, width)
        x = torch.cat([v.embeddings.class_embedding.expand(len(x), 1, -1), x], dim=1)
        x = v.pre_layrnorm(x + v.embeddings.position_embedding.weight)  # (b, 1 + patches, width)
        *layers, last = v.encoder.layers
        for layer in layers:
            x = layer(x)
        out = last(x)
        pooled = v.post_layernorm(out[:, 0])
        return VisionOutput(image_embeds=self.visual_projection(pooled), penultimate=x, last=out)
