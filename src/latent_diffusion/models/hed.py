"""lllyasviel's HED (the ControlNet extension's `ControlNetHED_Apache2`, after Xie & Tu 2015, "Holistically-Nested
Edge Detection"), behind softedge_hed, softedge_hedsafe and scribble_hed, in the layout of its file
`ControlNetHED.pth`, so it loads without key mapping.

Five VGG-like blocks of 3×3 convolutions with ReLU (64, 128, 256, 512, 512 channels; two, two, three, three, three
convolutions), each after the first behind a 2×2 max-pool; each block's 1×1 projection to one channel is an edge
map at its scale. The input is RGB in 0..255, minus a learnt per-channel offset (`norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly


class DoubleConvBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(
            *(nn.Conv2d(inputs if i == 0 else outputs, outputs, 3, padding=1) for i in range(layers))
        )
        self.projection = nn.Conv2d(outputs, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features, the one-channel edge map), both at x's size, or half of it after the max-pool."""
        if down_sampling:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1, self.block2 = DoubleConvBlock(3, 64, 2), DoubleConvBlock(64, 128, 2)
        self.block3, self.block4, self.block5 = (
            DoubleConvBlock(128, 256, 3),
            DoubleConvBlock(256, 512, 3),
            DoubleConvBlock(512, 512, 3),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) RGB 0..255 -> five edge maps (b, 1, H / 2^i, W / 2^i), i = 0..4 (the sizes halved, floored)."""
        h, first = self.block1(x - self.norm)
        maps = [first]
        for block in (self.block2, self.block3, self.block4, self.block5):
            h, edges = block(h, down_sampling=True)
            maps.append(edges)
        return maps


def hed_from_state_dict(state_dict: dict[str, torch.Tensor]) -> HED:
    """The network of a file's tensors (ValueError naming what does not fit)."""
    return load_exactly(HED, state_dict, "a ControlNet HED model")
