"""PiDiNet (Su et al. 2021, "Pixel Difference Networks for Efficient Edge Detection") as the ControlNet extension
builds it for softedge_pidinet, softedge_pidisafe, scribble_pidinet and t2ia_sketch_pidi (`annotator/pidinet`:
`pidinet()`, the "carv4" table with 60 channels, dilation modules of 24 and spatial attention), in the layout of
lllyasviel's `table5_pidinet.pth`, so it loads without key mapping.

A first 3×3 pixel-difference convolution (3 -> 60 channels), then fifteen depthwise-separable blocks in four stages
(60, 120, 240, 240 channels; stages 2-4 start with a 2×2 max-pool and a 1×1 shortcut); the sixteen 3×3 convolutions
are in turn central, angular, radial pixel-difference convolutions and plain ones. Each stage's output goes through a dilation module (four dilated 3×3 convolutions,
summed) and a compact spatial attention, then to a one-channel edge map, scaled to the image; a 1×1 convolution
fuses the four. All five go through a sigmoid; the fused one is the map. The input is BGR in 0..1.

The pixel-difference convolutions, on a 3×3 kernel w:
- central ("cd"): Σ w_i (x_i - x_centre), computed as the convolution minus x_centre · Σ w_i;
- angular ("ad"): each pixel of the ring against its neighbour along the ring (the extension's "clock-wise"): the
  kernel w - w permuted (`CLOCKWISE`);
- radial ("rd"): on a 5×5 window, Σ w_i (x_outer_i - x_inner_i), each ring pixel at distance 2 against the one at
  distance 1 in its direction: a 5×5 kernel with w on the outer ring and -w on the inner one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly

KINDS = ["cd", "ad", "rd", "cv"] * 4  # "carv4": each block's convolution, init_block's first
CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]  # the ring position each 3×3 position is compared with (the centre: itself)
OUTER, INNER = [0, 2, 4, 10, 14, 20, 22, 24], [6, 7, 8, 11, 13, 16, 17, 18]  # 5×5 positions of the 8 directions


class PixelDifferenceConv2d(nn.Conv2d):
    """A 3×3 convolution (no bias) of one of the four kinds above (`kind`)."""

    def __init__(self, kind: str, inputs: int, outputs: int, groups: int = 1):
        super().__init__(inputs, outputs, 3, padding=1, groups=groups, bias=False)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.kind == "cd":
            centre = F.conv2d(x, w.sum(dim=(2, 3), keepdim=True), groups=self.groups)
            return F.conv2d(x, w, padding=1, groups=self.groups) - centre
        if self.kind == "ad":
            flat = w.flatten(2)  # (out, in, 9)
            return F.conv2d(x, (flat - flat[:, :, CLOCKWISE]).view_as(w), padding=1, groups=self.groups)
        if self.kind == "rd":
            ring = w.flatten(2)[:, :, 1:]  # (out, in, 8): the centre is not used
            kernel = w.new_zeros(w.shape[0], w.shape[1], 25)
            kernel[:, :, OUTER], kernel[:, :, INNER] = ring, -ring
            return F.conv2d(x, kernel.view(w.shape[0], w.shape[1], 5, 5), padding=2, groups=self.groups)
        return F.conv2d(x, w, padding=1, groups=self.groups)


class PDCBlock(nn.Module):
    """(max-pool 2×2 where `stride` 2) -> depthwise pixel-difference conv, ReLU, 1×1 conv; plus the input (through a
    1×1 shortcut where pooled)."""

    def __init__(self, kind: str, inputs: int, outputs: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(inputs, outputs, 1)
        self.conv1 = PixelDifferenceConv2d(kind, inputs, inputs, groups=inputs)
        self.conv2 = nn.Conv2d(inputs, outputs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1×1 conv, then four 3×3 convs dilated 5, 7, 9, 11, summed."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 1)
        self.conv2_1, self.conv2_2, self.conv2_3, self.conv2_4 = (
            nn.Conv2d(outputs, outputs, 3, dilation=d, padding=d, bias=False) for d in (5, 7, 9, 11)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: x · σ(conv3×3(conv1×1(ReLU x))) (4 channels between)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv2(self.conv1(F.relu(x))).sigmoid()


class MapReduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    def __init__(self, width: int = 60, dilation: int = 24):
        super().__init__()
        self.init_block = PixelDifferenceConv2d(KINDS[0], 3, width)
        planes = [width, 2 * width, 4 * width, 4 * width]
        inputs = width
        for stage, outputs in enumerate(planes, start=1):
            for i in range(1, 5 if stage > 1 else 4):  # (stage 1 has three blocks: init_block is its first)
                kind = KINDS[4 * (stage - 1) + i - (stage > 1)]
                stride = 2 if stage > 1 and i == 1 else 1
                setattr(self, f"block{stage}_{i}", PDCBlock(kind, inputs, outputs, stride))
                inputs = outputs
        self.dilations = nn.ModuleList(CDCM(p, dilation) for p in planes)
        self.attentions = nn.ModuleList(CSAM(dilation) for _ in planes)
        self.conv_reduces = nn.ModuleList(MapReduce(dilation) for _ in planes)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) BGR 0..1, sides multiples of 8 -> five edge probabilities (b, 1, H, W): the four stages',
        then the fused one."""
        h, w = x.shape[2:]
        x = self.init_block(x)
        edges = []
        for stage, count in enumerate((3, 4, 4, 4), start=1):
            for i in range(1, count + 1):
                x = getattr(self, f"block{stage}_{i}")(x)  # stage 1 at full size, then 1/2, 1/4, 1/8
            e = self.conv_reduces[stage - 1](self.attentions[stage - 1](self.dilations[stage - 1](x)))
            edges.append(F.interpolate(e, (h, w), mode="bilinear", align_corners=False))
        edges.append(self.classifier(torch.cat(edges, dim=1)))
        return [e.sigmoid() for e in edges]


def pidinet_from_state_dict(state_dict: dict[str, torch.Tensor]) -> PiDiNet:
    """The network of a file's tensors, a DataParallel `module.` prefix dropped (ValueError naming what does not fit)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(PiDiNet, state_dict, "a PiDiNet model")
