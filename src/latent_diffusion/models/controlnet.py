"""ControlNet (Zhang, Rao & Agrawala 2023), in the module layout of lllyasviel's `cldm.ControlNet`, so that its files
load without key mapping: a trainable copy of the U-Net's encoder and middle block (`input_blocks`, `middle_block`,
`time_embed`, SDXL's `label_emb`) that also sees a control image, and a zero-initialised 1×1 convolution after each
of its input blocks (`zero_convs`) and after its middle block (`middle_block_out`). Their outputs are what the U-Net
adds to its skip connections and middle block (`unet.ControlResiduals`).

The control image (the "hint", (b, 3, H, W) in [0, 1] at pixel size) is brought to the latent's size by
`input_hint_block`, eight 3×3 convolutions, three of them of stride 2 (H/8 × W/8), the last zero-initialised, and
added to the features after the first input block.

xinsir's ControlNet++ ("union", `controlnet-union-sdxl-1.0`) is one ControlNet for several kinds of control image;
with `union` it has the parts that tell it which kind it is given (`UnionConfig`): the kind's one-hot vector, each
number embedded sinusoidally, through `control_add_embedding` (two linears, SiLU between) into the time embedding;
and the hint's features' mean plus the kind's `task_embedding`, one token, through `transformer_layes` (CLIP's
residual attention block) and `spatial_ch_projs`, a bias per channel added to the hint's features. A union
ControlNet given no kind still adds the embedding of the all-zero vector and no bias, as the web UI's ControlNet
extension runs it. Each row is its own: xinsir's code (and diffusers') attends across the batch there, which for
rows of one control image is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .text_encoder import ResidualAttentionBlock
from .unet import ControlResiduals, TimestepEmbedSequential, UNetEncoder, timestep_embedding


@dataclass(frozen=True)
class UnionConfig:
    """A union ControlNet's extra parts, read off its file: the kinds of control image, the token's width (the
    ControlNet's model_channels), the width of each kind's sinusoidal embedding, the transformer's layers."""

    types: int = 8
    width: int = 320
    type_width: int = 256
    layers: int = 1
    heads: int = 8  # (no shape shows it, and over one token it changes nothing)
    activation: str = "quick_gelu"

    @property
    def mlp_width(self) -> int:
        return 4 * self.width


def zero_conv(channels: int) -> TimestepEmbedSequential:
    """A 1×1 convolution that starts at zero, so that a new ControlNet leaves the U-Net as it was."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class ControlNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig, hint_channels: int = 3, union: UnionConfig | None = None):
        super().__init__(cfg)
        self.union = union
        mc = cfg.model_channels
        widths = [16, 16, 32, 32, 96, 96, 256]  # stride 2 into 32, 96 and 256: H/8
        layers, previous = [], hint_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
            previous = width
        last = nn.Conv2d(previous, mc, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.input_hint_block = TimestepEmbedSequential(*layers, last)  # keys input_hint_block.0, .2, ..., .14
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in self.skip_channels)
        self.middle_block_out = zero_conv(self.channels)
        if union is not None:
            self.task_embedding = nn.Parameter(torch.zeros(union.types, union.width))
            self.transformer_layes = nn.Sequential(*(ResidualAttentionBlock(union, causal=False) for _ in range(union.layers)))  # fmt: skip
            self.spatial_ch_projs = nn.Linear(union.width, mc)
            self.control_add_embedding = nn.Module()
            self.control_add_embedding.linear_1 = nn.Linear(union.types * union.type_width, 4 * mc)
            self.control_add_embedding.linear_2 = nn.Linear(4 * mc, 4 * mc)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control_type: int | None = None,
    ) -> ControlResiduals:
        """x: the U-Net's input (b, in_channels, h, w), hint: (b, hint_channels, 8h, 8w), timesteps (b,), context and
        y as the U-Net's; control_type: a union ControlNet's kind of hint (an index; None: not given) -> one residual
        per input block and one for the middle block."""
        emb = self.embedding(timesteps, y, x)
        if self.union is not None:
            emb = emb + self.type_embedding(control_type).to(emb.dtype)
        guided_hint = self.input_hint_block(hint, emb, context)  # (b, model_channels, h, w)
        if self.union is not None and control_type is not None:
            token = guided_hint.mean(dim=(2, 3)) + self.task_embedding[control_type].to(guided_hint.dtype)  # (b, C)
            token = self.transformer_layes(token[:, None])[:, 0]  # (one token per row)
            guided_hint = guided_hint + self.spatial_ch_projs(token)[:, :, None, None]
        skips, h = [], x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            skips.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(skips=skips, middle=self.middle_block_out(h, emb, context))

    def type_embedding(self, control_type: int | None) -> torch.Tensor:
        """A union ControlNet's kind of hint -> (1, 4·model_channels): its one-hot vector (all zeros for none), each
        number's sinusoidal embedding side by side, through `control_add_embedding`."""
        one_hot = torch.zeros(self.union.types, device=self.task_embedding.device)
        if control_type is not None:
            one_hot[control_type] = 1.0
        embedded = timestep_embedding(one_hot, self.union.type_width).reshape(1, -1)  # (1, types · type_width)
        layers = self.control_add_embedding
        return layers.linear_2(F.silu(layers.linear_1(embedded.to(self.task_embedding.dtype))))
