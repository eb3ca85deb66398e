"""MangaLineExtraction's network (Li et al. 2017, "Deep Extraction of Manga Structural Lines"; the `res_skip` of
the ControlNet extension's `annotator/manga_line`), behind lineart_anime_denoise, in the layout of its file
`erika.pth`, so it loads without key mapping.

A residual U-Net on a grey image: five stages of pre-activation residual blocks (batch norm, leaky ReLU, convolution)
at 24, 48, 96, 192 and 384 channels, each of the last four halving the size in its last block; four upsampling
stages back, each added to the encoder stage of its size; two more blocks at 16 channels and a 1×1 convolution to
one channel. The input is grey in 0..255, not normalized; the output is a drawing, black lines on white (about 255);
255 minus it, white lines on black, is the map.
"""

from __future__ import annotations

import torch
from torch import nn

from .exact_load import load_exactly


class BnReluConv(nn.Module):
    """Batch norm (eps 1e-3), leaky ReLU (0.2), a convolution padded to keep the size (at `stride` 1), and where
    `upsample` a nearest doubling after it. `model` holds them, as in the file."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        layers = [
            nn.BatchNorm2d(inputs, eps=1e-3),
            nn.LeakyReLU(0.2),
            nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2),
        ]
        self.model = nn.Sequential(*layers, *([nn.Upsample(scale_factor=2.0)] if upsample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Shortcut(nn.Module):
    """x + y, x brought to y's channels and size first by a 1×1 convolution (and a nearest doubling where `upsample`)
    where they differ."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.model = None
        if inputs != outputs or stride != 1:
            layers = [nn.Conv2d(inputs, outputs, 1, stride)]
            self.model = nn.Sequential(*layers, *([nn.Upsample(scale_factor=2.0)] if upsample else []))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x if self.model is None else self.model(x)) + y


class BasicBlock(nn.Module):
    """Two BnReluConvs (the first with the stride, or the doubling where `upsample`), plus the shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = BnReluConv(inputs, outputs, 3, stride, upsample)
        self.residual = BnReluConv(outputs, outputs, 3)
        self.shortcut = Shortcut(inputs, outputs, stride, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x, self.residual(self.conv1(x)))


class Stage(nn.Module):
    """`count` BasicBlocks in `model`: the first from `inputs` channels; `halve`: the last at stride 2; `upsample`: the
    first doubles the size."""

    def __init__(self, inputs: int, outputs: int, count: int, halve: bool = False, upsample: bool = False):
        super().__init__()
        blocks = []
        for i in range(count):
            stride = 2 if halve and i == count - 1 else 1
            blocks.append(BasicBlock(inputs if i == 0 else outputs, outputs, stride, upsample and i == 0))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MangaLineNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.block0 = Stage(1, 24, 2)
        self.block1, self.block2 = Stage(24, 48, 3, halve=True), Stage(48, 96, 5, halve=True)
        self.block3, self.block4 = Stage(96, 192, 7, halve=True), Stage(192, 384, 12, halve=True)
        self.block5, self.block6 = Stage(384, 192, 7, upsample=True), Stage(192, 96, 5, upsample=True)
        self.block7, self.block8 = Stage(96, 48, 3, upsample=True), Stage(48, 24, 2, upsample=True)
        self.res1, self.res2, self.res3, self.res4 = (
            Shortcut(192, 192),
            Shortcut(96, 96),
            Shortcut(48, 48),
            Shortcut(24, 24),
        )
        self.block9 = Stage(24, 16, 2)
        self.conv15 = BnReluConv(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, H, W) grey 0..255, sides multiples of 16 -> (b, 1, H, W), about 255 away from lines."""
        x0 = self.block0(x)  # (b, 24, H, W)
        x1 = self.block1(x0)  # (b, 48, H/2, W/2)
        x2 = self.block2(x1)  # (b, 96, H/4, W/4)
        x3 = self.block3(x2)  # (b, 192, H/8, W/8)
        x = self.block4(x3)  # (b, 384, H/16, W/16)
        x = self.res1(x3, self.block5(x))
        x = self.res2(x2, self.block6(x))
        x = self.res3(x1, self.block7(x))
        x = self.res4(x0, self.block8(x))  # (b, 24, H, W)
        return self.conv15(self.block9(x))


def manga_line_from_state_dict(state_dict: dict[str, torch.Tensor]) -> MangaLineNetwork:
    """The network of a file's tensors, a DataParallel `module.` prefix dropped (ValueError naming what does not fit)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(MangaLineNetwork, state_dict, "a MangaLineExtraction model")
