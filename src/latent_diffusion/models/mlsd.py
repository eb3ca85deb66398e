"""M-LSD (Gu et al. 2022, "Towards Light-weight and Real-time Line Segment Detection"), the large model behind the
ControlNet extension's mlsd module, in the layout of its file `mlsd_large_512_fp32.pth`, so it loads without key
mapping.

A MobileNetV2 backbone (`mobilenet_v2.py`, its stride-2 convolutions padded as TensorFlow Lite does) on RGB and a
fourth channel of ones, in -1..1, up to the 96-channel stage; its outputs at 1/2, 1/4, 1/8, 1/16 and 1/16 fused top
down by four "A" blocks (1×1 convolutions of both inputs, the coarser doubled, joined) each followed by a "B" block
(two 3×3 convolutions, a residual around the first); a "C" block (a dilated 3×3, a 3×3, a 1×1) gives 16 maps at
1/2, of which the last 9 are kept: a line-centre score, then each centre's displacements to the segment's two ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly
from .mobilenet_v2 import mobilenet_v2_features

SELECTED = (1, 3, 6, 10, 13)  # the backbone's blocks whose outputs feed the decoder


def conv_bn_relu(inputs: int, outputs: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(inputs, outputs, kernel, padding=dilation * (kernel // 2), dilation=dilation)
    return nn.Sequential(conv, nn.BatchNorm2d(outputs), nn.ReLU())


class BlockTypeA(nn.Module):
    """(fine a, coarse b) -> [1×1 conv of a, 1×1 conv of b doubled (bilinear, corners aligned) where `upscale`]."""

    def __init__(self, fine: int, coarse: int, fine_out: int, coarse_out: int, upscale: bool = True):
        super().__init__()
        self.conv1, self.conv2 = conv_bn_relu(coarse, coarse_out, 1), conv_bn_relu(fine, fine_out, 1)
        self.upscale = upscale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat([self.conv2(a), b], dim=1)


class BlockTypeB(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1, self.conv2 = conv_bn_relu(inputs, inputs, 3), conv_bn_relu(inputs, outputs, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1, self.conv2 = conv_bn_relu(inputs, inputs, 3, dilation=5), conv_bn_relu(inputs, inputs, 3)
        self.conv3 = nn.Conv2d(inputs, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*mobilenet_v2_features(inputs=4, tf_padding=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """-> the outputs of blocks 1, 3, 6, 10 and 13: (16, 24, 32, 64, 96 channels at 1/2 ... 1/16)."""
        selected = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in SELECTED:
                selected.append(x)
        return selected


class MLSD(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.block15, self.block16 = BlockTypeA(64, 96, 64, 64, upscale=False), BlockTypeB(128, 64)
        self.block17, self.block18 = BlockTypeA(32, 64, 64, 64), BlockTypeB(128, 64)
        self.block19, self.block20 = BlockTypeA(24, 64, 64, 64), BlockTypeB(128, 64)
        self.block21, self.block22 = BlockTypeA(16, 64, 64, 64), BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 4, H, W) RGB and ones in -1..1, sides multiples of 16 -> (b, 9, H/2, W/2): the centre score's logit,
        then the displacements (x, y of the start, x, y of the end) in pixels of that half size."""
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]


def mlsd_from_state_dict(state_dict: dict[str, torch.Tensor]) -> MLSD:
    """The network of a file's tensors (ValueError naming what does not fit)."""
    return load_exactly(MLSD, state_dict, "an M-LSD model")
