"""BAE's surface normals (Bae, Budvytis & Cipolla 2021, "Estimating and Exploiting the Aleatoric Uncertainty in
Surface Normal Estimation"), the `NNET` behind the ControlNet extension's normal_bae, in the layout of its file
`scannet.pt` (`encoder.original_model.*`, `decoder.*`), so it loads without key mapping.

An EfficientNet-B5 encoder (`efficientnet.py`); a decoder of four upsampling stages (bilinear, corners aligned, to
the encoder stage of the size; joined to it; twice a 3×3 convolution, batch norm and leaky ReLU) from 1/32 to 1/2
of the image. A 3×3 convolution gives (n, κ) at 1/8: a normal and its concentration. Then three times: the features
and the prediction doubled in size (bilinear, corners aligned), joined, and an MLP per pixel (1×1 convolutions)
gives (n, κ) at twice the size, up to the image's. Each (n, κ) is normalized: n to unit length, κ = ELU(κ) + 1.01.
The training-time sampling of uncertain pixels is not used: at test time every pixel goes through the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet import Encoder
from .exact_load import load_exactly


class UpSampleBN(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, padding=1),
            nn.BatchNorm2d(outputs),
            nn.LeakyReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1),
            nn.BatchNorm2d(outputs),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def pixel_mlp(inputs: int) -> nn.Sequential:
    """Four 1×1 convolutions (as Conv1d over the flattened pixels) with ReLU between: inputs -> 128 -> 128 -> 128 -> 4."""
    layers = [
        nn.Conv1d(inputs, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, nn.Conv1d(128, 4, 1))


def normalized(x: torch.Tensor) -> torch.Tensor:
    """(b, 4, ...) -> the normal (first three) divided by its length (+1e-10), κ = ELU(κ) + 1 + 0.01."""
    nx, ny, nz, kappa = x.split(1, dim=1)
    length = torch.sqrt(nx**2.0 + ny**2.0 + nz**2.0) + 1e-10  # (summed as BAE sums it: the same last bits)
    return torch.cat([nx / length, ny / length, nz / length, F.elu(kappa) + 1.0 + 0.01], dim=1)


def doubled(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048, 2048, 1)
        self.up1, self.up2 = UpSampleBN(2048 + 176, 1024), UpSampleBN(1024 + 64, 512)
        self.up3, self.up4 = UpSampleBN(512 + 40, 256), UpSampleBN(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4, self.out_conv_res2, self.out_conv_res1 = (
            pixel_mlp(512 + 4),
            pixel_mlp(256 + 4),
            pixel_mlp(128 + 4),
        )

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """The encoder's outputs -> (b, 4, H, W): the unit normal and κ at the image's size."""
        x = self.up1(self.conv2(stages[-1]), stages[4])  # (b, 1024, H/16, W/16)
        x8 = self.up2(x, stages[2])  # (b, 512, H/8, W/8)
        x4 = self.up3(x8, stages[1])  # (b, 256, H/4, W/4)
        x2 = self.up4(x4, stages[0])  # (b, 128, H/2, W/2)
        prediction = normalized(self.out_conv_res8(x8))  # (b, 4, H/8, W/8)
        for features, mlp in [(x8, self.out_conv_res4), (x4, self.out_conv_res2), (x2, self.out_conv_res1)]:
            joined = torch.cat([doubled(features), doubled(prediction)], dim=1)  # (b, c + 4, h, w), twice the size
            b, c, h, w = joined.shape
            prediction = normalized(mlp(joined.view(b, c, h * w))).view(b, 4, h, w)
        return prediction


class NormalBae(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(), Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) normalized with ImageNet's statistics, sides multiples of 32 -> (b, 4, H, W): n and κ."""
        return self.decoder(self.encoder(x))


def normal_bae_from_state_dict(state_dict: dict[str, torch.Tensor]) -> NormalBae:
    """The network of a file's tensors: the checkpoint keeps them under `model` (read as `model.` keys), maybe with a
    DataParallel `module.` prefix; both dropped (ValueError naming what does not fit)."""
    state_dict = {k.removeprefix("model.").removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(NormalBae, state_dict, "a BAE normal model")
