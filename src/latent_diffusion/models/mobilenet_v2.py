"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout (`features.<i>`, each block's `conv.<j>`), the backbone of
the anime face segmenter (`anime_face_unet.py`) and of M-LSD (`mlsd.py`), whose files hold it so.

M-LSD's port pads its stride-2 convolutions as TensorFlow Lite does (`tf_padding`: none on the top and left, one on
the bottom and right) where torchvision pads one on every side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# expansion, channels, blocks, first stride: torchvision's table, stopping before the 160-channel stage
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
LAST_STAGE = (6, 160, 3, 2)


class ConvBNReLU6(nn.Sequential):
    """A convolution without bias, batch norm, ReLU6; padded by kernel // 2, or where `tf_padding` and the stride is 2,
    by one pixel on the bottom and right only."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1, tf_padding=False):
        self.tf_padding = tf_padding and stride == 2
        padding = 0 if self.tf_padding else kernel // 2
        conv = nn.Conv2d(inputs, outputs, kernel, stride, padding, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(outputs), nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.tf_padding else x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion by `expand` (none at 1), a 3×3 depthwise convolution with the stride, a
    linear 1×1 projection; plus the input where the stride is 1 and the channels stay."""

    def __init__(self, inputs: int, outputs: int, stride: int, expand: int, tf_padding: bool = False):
        super().__init__()
        hidden = inputs * expand
        layers = [ConvBNReLU6(inputs, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden, tf_padding=tf_padding)]
        self.conv = nn.Sequential(*layers, nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features(
    inputs: int = 3, settings: list[tuple[int, int, int, int]] = SETTINGS, tf_padding: bool = False
) -> list[nn.Module]:
    """torchvision's `features` (width 1) up to the stages of `settings`: the stem (a stride-2 3×3 convolution from
    `inputs` channels to 32), then the blocks of each stage."""
    layers, channels = [ConvBNReLU6(inputs, 32, 3, stride=2, tf_padding=tf_padding)], 32
    for expand, outputs, repeats, stride in settings:
        for i in range(repeats):
            layers.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expand, tf_padding))
            channels = outputs
    return layers
