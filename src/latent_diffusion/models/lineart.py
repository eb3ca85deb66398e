"""The line-art generators behind the ControlNet extension's lineart modules, in the layouts of their files, so they
load without key mapping:

- `LineartGenerator` (lineart_realistic `sk_model.pth`, lineart_coarse `sk_model2.pth`; from "Learning to generate
  line drawings that convey geometry and semantics", Chan et al. 2022): a CycleGAN ResNet generator with three
  residual blocks: a 7×7 convolution, two stride-2 convolutions (64 -> 128 -> 256 channels), the blocks, two
  transposed convolutions back, a 7×7 convolution to one channel and a sigmoid; reflection padding, instance norm
  without weights. Input RGB in 0..1; output 1 on white, 0 on lines.
- `UnetGenerator` (lineart_anime `netG.pth`): pix2pix's U-Net of 8 levels (each a 4×4 stride-2 convolution down and
  a transposed one up, the input joined to the way back), 64 to 512 channels, instance norm without weights, a tanh.
  Input RGB in -1..1, sides multiples of 256; output white (1) away from lines.
"""

from __future__ import annotations

import torch
from torch import nn

from .exact_load import load_exactly


def norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels)  # (no weights, no running statistics)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        first = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels), nn.ReLU()]
        self.conv_block = nn.Sequential(*first, nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    def __init__(self, blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), norm(64), nn.ReLU())
        down = [nn.Conv2d(64, 128, 3, 2, 1), norm(128), nn.ReLU(), nn.Conv2d(128, 256, 3, 2, 1), norm(256), nn.ReLU()]
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*(ResidualBlock(256) for _ in range(blocks)))
        up = [nn.ConvTranspose2d(256, 128, 3, 2, 1, output_padding=1), norm(128), nn.ReLU()]
        up += [nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1), norm(64), nn.ReLU()]
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB 0..1, sides multiples of 4 -> (b, 1, H, W) in 0..1."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class UnetLevel(nn.Module):
    """One level of the U-Net: down (leaky ReLU 0.2, 4×4 stride-2 convolution, norm), the inner levels, up (ReLU, 4×4
    stride-2 transposed convolution, norm), joined to the leaky ReLU of its input. The innermost has no inner level
    and no norm on the way down; the outermost takes the image (no activation or norm before its convolution) and
    ends in a tanh, with no join. `model` holds the layers in the file's order.

    The join takes leaky_relu(x), not x: pix2pix's leaky ReLU works in place, so the input it joins has been through
    it by then."""

    def __init__(
        self,
        outer: int,
        inner: int,
        inputs: int | None = None,
        inside: nn.Module | None = None,
        outermost: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(inputs or outer, inner, 4, 2, 1)
        up = nn.ConvTranspose2d(inner if inside is None else inner * 2, outer, 4, 2, 1)
        if outermost:
            layers = [down, inside, nn.ReLU(), up, nn.Tanh()]
        elif inside is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, norm(inner), inside, nn.ReLU(), up, norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        x = self.model[0](x)  # (the leaky ReLU)
        return torch.cat([x, self.model[1:](x)], dim=1)


class UnetGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        level = UnetLevel(512, 512)  # the innermost, at 1/256
        for _ in range(3):
            level = UnetLevel(512, 512, inside=level)
        for outer in (256, 128, 64):
            level = UnetLevel(outer, outer * 2, inside=level)
        self.model = UnetLevel(1, 64, inputs=3, inside=level, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) RGB -1..1, sides multiples of 256 -> (b, 1, H, W) in -1..1."""
        return self.model(x)


def lineart_from_state_dict(state_dict: dict[str, torch.Tensor]) -> LineartGenerator:
    """lineart's or lineart_coarse's network of a file's tensors (ValueError naming what does not fit)."""
    return load_exactly(LineartGenerator, state_dict, "a line-art generator")


def lineart_anime_from_state_dict(state_dict: dict[str, torch.Tensor]) -> UnetGenerator:
    """lineart_anime's network of a file's tensors, a DataParallel `module.` prefix dropped (ValueError naming what
    does not fit)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(UnetGenerator, state_dict, "an anime line-art U-Net")
