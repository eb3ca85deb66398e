"""TEED (Soria et al. 2023, "Tiny and Efficient Model for the Edge Detection Generalization"): a 58 k-parameter edge
detector, behind the ControlNet extension's softedge_teed (`7_model.pth`) and softedge_anyline (MistoLine's
`MTEED.pth`, the same network retrained), in the layout of those files, so they load without key mapping.

Three stages at 1/2, 1/2 and 1/4 of the image (two 3×3 convolutions at stride 2; two more; a max-pool, a skip from
the first stage and one dense layer), each turned by 1×1 convolutions and transposed convolutions into a one-channel
edge map at full size; the three maps are fused by depthwise convolutions ("double fusion") into a fourth. The
activation is Smish, x · tanh(ln(1 + σ(x))). The input is RGB in 0..255, not normalized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly


def smish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.log(1 + torch.sigmoid(x)))


class Smish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class DoubleConvBlock(nn.Module):
    def __init__(self, inputs: int, middle: int, outputs: int, stride: int = 1, activation: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, middle, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(middle, outputs, 3, padding=1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(smish(self.conv1(x)))
        return smish(x) if self.activation else x


class SingleConvBlock(nn.Module):
    """A 1×1 convolution (with a stride), no activation."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DenseLayer(nn.Sequential):
    """(x, skip) -> ((conv₂(smish(conv₁(smish x))) + skip) / 2, skip); conv₁ pads 2 and conv₂ none: same size."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, padding=2)
        self.smish1 = Smish()
        self.conv2 = nn.Conv2d(outputs, outputs, 3)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip = pair
        return 0.5 * (super().forward(smish(x)) + skip), skip


class UpConvBlock(nn.Module):
    """`scale` doublings, each a 1×1 convolution (to 16 channels, the last to 1), Smish and a transposed convolution."""

    def __init__(self, inputs: int, scale: int):
        super().__init__()
        layers = []
        for i in range(scale):
            outputs = 1 if i == scale - 1 else 16
            kernel, padding = 2**scale, (0, 0, 1, 3, 7)[scale]
            layers += [nn.Conv2d(inputs, outputs, 1), Smish(), nn.ConvTranspose2d(outputs, outputs, kernel, 2, padding)]
            inputs = outputs
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class DoubleFusion(nn.Module):
    """The three maps (b, 3, H, W) -> (b, 1, H, W): two depthwise convolutions (3 -> 24 -> 24 channels), their sum
    over channels, Smish."""

    def __init__(self):
        super().__init__()
        self.DWconv1 = nn.Conv2d(3, 24, 3, padding=1, groups=3)
        self.DWconv2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.DWconv1(smish(x))
        second = self.DWconv2(smish(first))
        return smish((first + second).sum(1, keepdim=True))


class TEED(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = DoubleConvBlock(3, 16, 16, stride=2)
        self.block_2 = DoubleConvBlock(16, 32, 32, activation=False)
        self.dblock_3 = nn.Sequential()
        self.dblock_3.add_module("denselayer1", DenseLayer(32, 48))
        self.side_1 = SingleConvBlock(16, 32, 2)
        self.pre_dense_3 = SingleConvBlock(32, 48, 1)
        self.up_block_1, self.up_block_2, self.up_block_3 = UpConvBlock(16, 1), UpConvBlock(32, 1), UpConvBlock(48, 2)
        self.block_cat = DoubleFusion()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) RGB 0..255, sides multiples of 4 -> four edge maps (b, 1, H, W): the three stages', fused."""
        block_1 = self.block_1(x)  # (b, 16, H/2, W/2)
        block_2 = self.block_2(block_1)  # (b, 32, H/2, W/2)
        block_2_down = F.max_pool2d(block_2, 3, stride=2, padding=1)  # (b, 32, H/4, W/4)
        block_3, _ = self.dblock_3((block_2_down + self.side_1(block_1), self.pre_dense_3(block_2_down)))
        maps = [self.up_block_1(block_1), self.up_block_2(block_2), self.up_block_3(block_3)]
        return [*maps, self.block_cat(torch.cat(maps, dim=1))]


def teed_from_state_dict(state_dict: dict[str, torch.Tensor]) -> TEED:
    """The network of a file's tensors (ValueError naming what does not fit)."""
    return load_exactly(TEED, state_dict, "a TEED model")
