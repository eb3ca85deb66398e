"""The anime face segmenter behind seg_anime_face (siyeong0's Anime-Face-Segmentation, the `UNet` of the ControlNet
extension's `annotator/anime_face_segment`), in the layout of its file `UNet.pth`, so it loads without key mapping.

A U-Net on MobileNetV2 (`mobilenet_v2.py`): torchvision's `mobilenet_v2().features[0:17]` in five encoder stages
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
from .mobilenet_v2 import LAST_STAGE, SETTINGS, mobilenet_v2_features

CLASSES = 7  # background, hair, eye, mouth, face, skin, clothes


def decoder_stage(inputs: int, outputs: int) -> nn.Sequential:
    """Nearest doubling, 3×3 convolution, instance norm (no weights), leaky ReLU (0.1); the file's dropout, a no-op
    in eval, is left out (it holds no weights)."""
    conv = nn.Conv2d(inputs, outputs, 3, padding=1)
    return nn.Sequential(nn.Upsample(scale_factor=2.0), conv, nn.InstanceNorm2d(outputs), nn.LeakyReLU(0.1))


class AnimeFaceUNet(nn.Module):
    def __init__(self):
        super().__init__()
        f = mobilenet_v2_features(settings=[*SETTINGS, LAST_STAGE])  # features[0:17]
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
