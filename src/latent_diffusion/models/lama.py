"""LaMa (Suvorov et al. 2022, "Resolution-robust Large Mask Inpainting with Fourier Convolutions"): the inpainting
network the ControlNet extension's inpaint_only+lama fills the mask with before the diffusion starts, in the layout of
lllyasviel's `ControlNetLama.pth` (big-lama's generator, keys `model.N...`), so the file loads without key mapping.

The generator (big-lama's config): a 7×7 convolution, three stride-2 downsamplings, 18 residual blocks of fast
Fourier convolutions (Chi et al. 2020) at 1/8 of the size, three transposed convolutions back up, a 7×7 convolution
and a sigmoid. A fast Fourier convolution splits its channels into a local part (ordinary 3×3 convolutions) and a
global part (a 1×1 convolution on the image's 2-D Fourier transform: every output pixel sees the whole image), each
feeding both parts of its output; here 3/4 of the channels are global. Batch norms run with their stored statistics.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class FourierUnit(nn.Module):
    """A 1×1 convolution in the frequency domain: the real FFT's real and imaginary parts as channels (re, im per
    channel), through the convolution, batch norm and ReLU, and back. (b, c, h, w) -> (b, c, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = torch.fft.rfft2(x.float(), norm="ortho")  # (b, c, h, w/2 + 1) complex
        f = torch.view_as_real(f).permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, -1)  # (b, 2c, h, w/2 + 1)
        f = F.relu(self.bn(self.conv_layer(f.to(x.dtype)))).float().view(b, c, 2, h, -1)
        return torch.fft.irfft2(torch.complex(f[:, :, 0], f[:, :, 1]), s=(h, w), norm="ortho").to(x.dtype)


class SpectralTransform(nn.Module):
    """The global-to-global path: 1×1 down to half the width, a Fourier unit with a skip around it, 1×1 back up."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.fu = FourierUnit(half)
        self.conv2 = nn.Conv2d(half, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """A fast Fourier convolution: (local, global) parts in -> (local, global) parts out, each out part the sum of
    what both in parts give it (a part of no channels is None; a path between parts where either has none is left
    out). Local paths are convolutions with reflected borders; the global-to-global path is spectral."""

    def __init__(self, cin: int, cout: int, kernel: int, ratio_in: float, ratio_out: float, stride=1, padding=0):
        super().__init__()
        gin, gout = int(cin * ratio_in), int(cout * ratio_out)
        lin, lout = cin - gin, cout - gout

        def conv(i: int, o: int) -> nn.Conv2d | None:
            return nn.Conv2d(i, o, kernel, stride, padding, bias=False, padding_mode="reflect") if i and o else None

        self.convl2l, self.convl2g, self.convg2l = conv(lin, lout), conv(lin, gout), conv(gin, lout)
        self.convg2g = SpectralTransform(gin, gout) if gin and gout else None
        self.local_out, self.global_out = lout, gout

    def forward(self, x_l: torch.Tensor | None, x_g: torch.Tensor | None):
        def part(size: int, paths: tuple) -> torch.Tensor | None:
            terms = [path(x) for path, x in paths if path is not None and x is not None]
            return sum(terms[1:], terms[0]) if size else None

        return (
            part(self.local_out, ((self.convl2l, x_l), (self.convg2l, x_g))),
            part(self.global_out, ((self.convl2g, x_l), (self.convg2g, x_g))),
        )


class FFCNormAct(nn.Module):
    """A fast Fourier convolution, then batch norm and ReLU on each part. A tensor in is all local."""

    def __init__(self, cin: int, cout: int, kernel: int, ratio_in: float, ratio_out: float, stride=1, padding=0):
        super().__init__()
        self.ffc = FFC(cin, cout, kernel, ratio_in, ratio_out, stride, padding)
        gout = int(cout * ratio_out)
        self.bn_l = nn.BatchNorm2d(cout - gout) if cout - gout else None
        self.bn_g = nn.BatchNorm2d(gout) if gout else None

    def forward(self, x):
        x_l, x_g = self.ffc(*(x if isinstance(x, tuple) else (x, None)))
        return (None if x_l is None else F.relu(self.bn_l(x_l)), None if x_g is None else F.relu(self.bn_g(x_g)))


class FFCResBlock(nn.Module):
    """Two fast Fourier convolutions (3×3 locally) with a skip around them, on both parts."""

    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.conv1 = FFCNormAct(width, width, 3, ratio, ratio, padding=1)
        self.conv2 = FFCNormAct(width, width, 3, ratio, ratio, padding=1)

    def forward(self, x: tuple) -> tuple:
        x_l, x_g = self.conv2(self.conv1(x))
        return x[0] + x_l, x[1] + x_g


class JoinParts(nn.Module):
    """(local, global) -> one tensor, the local channels first."""

    def forward(self, x: tuple) -> torch.Tensor:
        return torch.cat(x, dim=1)


class LaMa(nn.Module):
    """The generator: (image (b, 3, H, W) in [0, 1], mask (b, 1, H, W), 1 = fill) -> its picture (b, 3, H, W) in
    [0, 1], the image's masked pixels unseen. H and W must be multiples of 2^downsamplings."""

    def __init__(self, in_channels=4, out_channels=3, channels=64, downsamplings=3, blocks=18, ratio=0.75):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCNormAct(in_channels, channels, 7, 0, 0)]
        for i in range(downsamplings):  # (the last one splits off the global part)
            ratio_out = ratio if i == downsamplings - 1 else 0
            layers.append(FFCNormAct(channels * 2**i, channels * 2 ** (i + 1), 3, 0, ratio_out, stride=2, padding=1))
        width = channels * 2**downsamplings
        layers += [*(FFCResBlock(width, ratio) for _ in range(blocks)), JoinParts()]
        for i in range(downsamplings):
            c = width // 2**i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), nn.BatchNorm2d(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([image * (1 - mask), mask], dim=1))


def lama_from_state_dict(sd: dict[str, torch.Tensor]) -> LaMa:
    """A LaMa generator with a state dict's sizes and weights (ValueError in one line for one that is not LaMa's)."""
    first = sd.get("model.1.ffc.convl2l.weight")
    if first is None or first.dim() != 4 or first.shape[-1] != 7:
        raise ValueError("not a LaMa generator (no 7×7 first convolution model.1.ffc.convl2l)")
    down = 0
    while f"model.{2 + down}.ffc.convl2l.weight" in sd:
        down += 1
    blocks = len({m.group(1) for k in sd if (m := re.match(r"model\.(\d+)\.conv1\.", k))})
    spectral = sd.get(f"model.{2 + down}.conv1.ffc.convg2g.conv1.0.weight")
    if not down or not blocks or spectral is None:
        raise ValueError("not a LaMa generator (no downsamplings or no Fourier residual blocks)")
    width = first.shape[0] * 2**down
    out = sd.get(f"model.{2 + down + blocks + 1 + 3 * down + 1}.weight")
    model = LaMa(
        first.shape[1], 3 if out is None else out.shape[0], first.shape[0], down, blocks, spectral.shape[1] / width
    )
    try:
        missing, _ = model.load_state_dict(sd, strict=False)  # (others' keys ignored, as the extension loads it)
    except RuntimeError as e:  # a weight of another shape
        raise ValueError(f"not a LaMa generator of this layout: {str(e).splitlines()[-1].strip()}") from None
    if missing:
        raise ValueError(f"not a LaMa generator of this layout: {len(missing)} weights missing, such as {missing[0]}")
    return model.eval()
