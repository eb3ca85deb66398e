"""EfficientNet-B5 (Tan & Le 2019) as Ross Wightman's gen-efficientnet builds `tf_efficientnet_b5_ap`, in its layout
(`conv_stem`, `bn1`, `blocks.<stage>.<block>.conv_dw`, ..., `conv_head`, `bn2`): the encoder of DSINE (`dsine.pt`)
and of BAE's normals (`scannet.pt`), read without key mapping.

The TensorFlow port: batch norms with eps 1e-3, Swish, and convolutions padded as TensorFlow's "SAME" (a stride-2
convolution pads one pixel less on the top and left than on the bottom and right where the side is even). B5 scales
B0's widths by 1.6 (rounded to multiples of 8) and its depths by 2.2 (rounded up): the table below is the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STEM, HEAD = 48, 2048
# Per stage: kernel, first stride, expansion, output channels, blocks. Stage 0 is depthwise-separable (expansion 1).
STAGES = [(3, 1, 1, 24, 3), (3, 2, 6, 40, 5), (5, 2, 6, 64, 5), (3, 2, 6, 128, 7), (5, 1, 6, 176, 7), (5, 2, 6, 304, 9), (3, 1, 6, 512, 3)]  # fmt: skip


class SameConv2d(nn.Conv2d):
    """nn.Conv2d padded as TensorFlow's "SAME" for the input's size: out = ceil(in / stride); the padding split with
    the extra pixel on the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
        return super().forward(F.pad(x, pads))


def conv(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A "SAME" convolution: padded statically (kernel // 2 each side) at stride 1, as gen-efficientnet does."""
    if stride == 1:
        return nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, groups=groups, bias=bias)
    return SameConv2d(inputs, outputs, kernel, stride, groups=groups, bias=bias)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class SqueezeExcite(nn.Module):
    """x · σ(expand(swish(reduce(mean of x over the image)))); `reduced` = a quarter of the block's input channels."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class DepthwiseSeparable(nn.Module):
    """Stage 0's block: depthwise conv, BN, Swish, squeeze-excite, 1×1 conv, BN (no activation); plus the input
    where the shape stays."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw, self.bn1 = conv(inputs, inputs, kernel, stride, groups=inputs), bn(inputs)
        self.se = SqueezeExcite(inputs, inputs // 4)
        self.conv_pw, self.bn2 = conv(inputs, outputs, 1), bn(outputs)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return x + y if self.residual else y


class InvertedResidual(nn.Module):
    """MBConv: 1×1 expansion, BN, Swish; depthwise conv, BN, Swish; squeeze-excite; linear 1×1 projection, BN;
    plus the input where the shape stays."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expand: int):
        super().__init__()
        middle = inputs * expand
        self.conv_pw, self.bn1 = conv(inputs, middle, 1), bn(middle)
        self.conv_dw, self.bn2 = conv(middle, middle, kernel, stride, groups=middle), bn(middle)
        self.se = SqueezeExcite(middle, inputs // 4)
        self.conv_pwl, self.bn3 = conv(middle, outputs, 1), bn(outputs)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn2(self.conv_dw(F.silu(self.bn1(self.conv_pw(x))))))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return x + y if self.residual else y


class EfficientNetB5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = conv(3, STEM, 3, stride=2), bn(STEM)
        stages, inputs = [], STEM
        for kernel, stride, expand, outputs, count in STAGES:
            blocks = []
            for i in range(count):
                step = stride if i == 0 else 1
                if expand == 1:
                    blocks.append(DepthwiseSeparable(inputs, outputs, kernel, step))
                else:
                    blocks.append(InvertedResidual(inputs, outputs, kernel, step, expand))
                inputs = outputs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = conv(inputs, HEAD, 1), bn(HEAD)  # (bn2 is in the file; DSINE reads before it)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) -> each stage's output (1/2, 1/4, 1/8, 1/16, 1/16, 1/32, 1/32 of the size), then conv_head's
        (b, 2048, H/32, W/32), before its batch norm."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        stages = []
        for stage in self.blocks:
            x = stage(x)
            stages.append(x)
        return [*stages, self.conv_head(x)]


class Encoder(nn.Module):
    """The network as DSINE's and BAE's encoders hold it (`original_model`, its pooling and classifier removed)."""

    def __init__(self):
        super().__init__()
        self.original_model = EfficientNetB5()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(x)
