"""ControlNet (Zhang, Rao & Agrawala 2023), in the module layout of lllyasviel's `cldm.ControlNet`, so that its files
load without key mapping: a trainable copy of the U-Net's encoder and middle block (`input_blocks`, `middle_block`,
`time_embed`, SDXL's `label_emb`) that also sees a control image, and a zero-initialised 1×1 convolution after each
of its input blocks (`zero_convs`) and after its middle block (`middle_block_out`). Their outputs are what the U-Net
adds to its skip connections and middle block (`unet.ControlResiduals`).

The control image (the "hint", (b, 3, H, W) in [0, 1] at pixel size) is brought to the latent's size by
`input_hint_block`, eight 3×3 convolutions, three of them of stride 2 (H/8 × W/8), the last zero-initialised, and
added to the features after the first input block.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import UNetConfig
from .unet import ControlResiduals, TimestepEmbedSequential, UNetEncoder


def zero_conv(channels: int) -> TimestepEmbedSequential:
    """A 1×1 convolution that starts at zero, so that a new ControlNet leaves the U-Net as it was."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class ControlNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig, hint_channels: int = 3):
        super().__init__(cfg)
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

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> ControlResiduals:
        """x: the U-Net's input (b, in_channels, h, w), hint: (b, hint_channels, 8h, 8w), timesteps (b,), context and
        y as the U-Net's -> one residual per input block and one for the middle block."""
        emb = self.embedding(timesteps, y, x)
        guided_hint = self.input_hint_block(hint, emb, context)  # (b, model_channels, h, w)
        skips, h = [], x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            skips.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(skips=skips, middle=self.middle_block_out(h, emb, context))
