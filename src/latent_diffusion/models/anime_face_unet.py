"""The anime face segmenter behind seg_anime_face (siyeong0's Anime-Face-Segmentation, the `UNet` of the ControlNet
extension's `annotator/anime_face_segment`), in the layout of its file `UNet.pth`, so it loads without key mapping.

A U-Net on MobileNetV2 (Sandler et al. 2018): torchvision's `mobilenet_v2().features[0:17]` in five encoder stages
(at 1/2, 1/4, 1/8, 1/16 and 1/32 of the image: 16, 24, 32, 96 and 160 channels); four decoder stages, each a nearest
doubling, a 3×3 convolution, instance norm and leaky ReLU (0.1), then bilinear (corners aligned) to the size of the
encoder stage it is joined to; a last doubling and convolution to 7 classes, softmax over them. The input is RGB in
0..1, not normalized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly

CLASSES = 7  # background, hair, eye, mouth, face, skin, clothes


def conv_bn_relu6(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: a convolution without bias padded by kernel // 2, batch norm, ReLU6."""
    conv = nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(outputs), nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion by `expand` (none at 1), a 3×3 depthwise convolution with the stride, a
    linear 1×1 projection; plus the input where the stride is 1 and the channels stay."""

    def __init__(self, inputs: int, outputs: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        layers = [conv_bn_relu6(inputs, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)]
        self.conv = nn.Sequential(*layers, nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features() -> list[nn.Module]:
    """torchvision's `mobilenet_v2().features[0:17]` (width 1): the stem, then the blocks of its table (expansion,
    channels, repeats, first stride) up to the 160-channel ones."""
    layers, inputs = [conv_bn_relu6(3, 32, 3, stride=2)], 32
    for expand, outputs, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]:  # fmt: skip
        for i in range(repeats):
            layers.append(InvertedResidual(inputs, outputs, stride if i == 0 else 1, expand))
            inputs = outputs
    return layers


def decoder_stage(inputs: int, outputs: int) -> nn.Sequential:
    """Nearest doubling, 3×3 convolution, instance norm (no weights), leaky ReLU (0.1); the file's dropout, a no-op
    in eval, is left out (it holds no weights)."""
    conv = nn.Conv2d(inputs, outputs, 3, padding=1)
    return nn.Sequential(nn.Upsample(scale_factor=2.0), conv, nn.InstanceNorm2d(outputs), nn.LeakyReLU(0.1))


class AnimeFaceUNet(nn.Module):
    def __init__(self):
        super().__init__()
        f = mobilenet_v2_features()
        self.en_block0, self.en_block1, self.en_block2 = (
            nn.Sequential(*f[0:2]),
            nn.Sequential(*f[2:4]),
            nn.Sequential(*f[4:7]),
        )
        self.en_block3, self.en_block4 = nn.Sequential(*f[7:14]), nn.Sequential(*f[14:17])
        self.de_block4, self.de_block3 = decoder_stage(160, 96), decoder_stage(96 * 2, 32)
        self.de_block2, self.de_block1 = decoder_stage(32 * 2, 24), decoder_stage(24 * 2, 16)
        self.de_block0 = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(16 * 2, CLASSES, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB 0..1 -> (b, 7, H', W') class probabilities, H' = 2·ceil(H/2) (W' alike)."""
        e0 = self.en_block0(x)  # (b, 16, H/2, W/2), sizes rounded up at each halving
        e1 = self.en_block1(e0)  # (b, 24, H/4, W/4)
        e2 = self.en_block2(e1)  # (b, 32, H/8, W/8)
        e3 = self.en_block3(e2)  # (b, 96, H/16, W/16)
        d = self.de_block4(self.en_block4(e3))  # (b, 96, ~H/16, ~W/16): 1/32 doubled
        for skip, stage in [(e3, self.de_block3), (e2, self.de_block2), (e1, self.de_block1), (e0, self.de_block0)]:
            d = F.interpolate(d, size=skip.shape[2:], mode="bilinear", align_corners=True)
            d = stage(torch.cat([d, skip], dim=1))
        return d.softmax(dim=1)


def anime_face_unet_from_state_dict(state_dict: dict[str, torch.Tensor]) -> AnimeFaceUNet:
    """The network of a file's tensors, a DataParallel `module.` prefix dropped (ValueError naming what does not fit)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(AnimeFaceUNet, state_dict, "an anime face segmenter")
