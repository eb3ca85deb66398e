"""T2I-Adapter (Mou et al. 2023), in the module layout of TencentARC's `ldm/modules/encoders/adapter.py` (and of the
web UI's ControlNet extension, `scripts/adapter.py`), so that their files load without key mapping.

An adapter turns a control image (the "hint": a sketch, edges, depth, pose, a colour palette) into one feature map
per level of the U-Net's encoder; the U-Net adds them to its running features (`unet.ControlResiduals.features`),
each scaled by the unit's weight. Unlike a ControlNet it sees neither the latent nor the timestep nor the prompt, so
its features are computed once per image, not once per step.

    hint (b, c, H, W) in [0, 1] --PixelUnshuffle(f)--> (b, c·f², H/f, W/f) --levels--> [(b, channels[i], h_i, w_i)]

The hint is the image at the generation's pixel size, RGB in [0, 1] (the extension's `get_pytorch_control`: uint8 /
255); one-channel adapters (sketch, canny, lineart) take its first channel. Preprocessors (edges, the colour adapter's
64×-pixelated palette) are not here.

- `Adapter` (the "full" adapter, ~77M parameters at SD's widths): `conv_in`, then `num_res_blocks` residual blocks
  per level (`body.N`, flat: N = level · num_res_blocks + block). A level's first block downsamples (average pool, or
  a stride-2 convolution `down_opt.op` in files trained so) and widens (`in_conv`, where the width changes).
  SD 1.x/2.x: unshuffle 8, a downsample before each level after the first: features at 1/8, 1/16, 1/32, 1/64 of the
  image, the U-Net's four levels. SDXL (TencentARC's `Adapter_XL`): unshuffle 16 and a downsample before level 2 only:
  1/16, 1/16, 1/32, 1/32, where SDXL's first downsample, second and third levels and middle block are.
- `AdapterLight` (TencentARC's `Adapter_light`, the colour adapter, ~18M): per level an `extractor`, a 1×1 convolution
  down to a quarter of the width, `num_res_blocks` residual blocks there, a 1×1 convolution back up; SD only.

Odd sizes halve rounding down (2×2 average pool), as in TencentARC's and the extension's code, where diffusers
rounds up (`ceil_mode=True`); the U-Net resizes an addend whose size differs (`unet.add_residual`, nearest), as the
extension's `aligned_adding` does.

Not here: the style adapter (`StyleAdapter`: CLIP vision tokens appended to the prompt, not features) and the
CoAdapter fuser (`CoAdapterFuser`: a transformer that reweights several adapters' features); their files are refused
by `weights/t2i_adapter.py`. TencentARC's `sk=False` variant (a `skep` convolution on each block's shortcut) was never
released and is not built either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import ControlResiduals


@dataclass(frozen=True)
class T2IAdapterConfig:
    """An adapter's architecture, read off a file's keys by `weights/t2i_adapter.py`.

    kind:            "full" (`Adapter`) or "light" (`AdapterLight`)
    channels:        each level's output width: (320, 640, 1280, 1280) for SD 1.x and SDXL
    num_res_blocks:  residual blocks per level: 2 (full), 4 (light)
    hint_channels:   1 for sketch, canny and lineart adapters, 3 for the others (depth, pose, segmentation, colour)
    sdxl:            SDXL's unshuffle (16) and downsampling (before level 2 only); full adapters only
    kernel_size:     of the full adapter's `in_conv` and `block2` (1 in every released file)
    conv_downsample: the full adapter downsamples with a stride-2 convolution (`down_opt.op`), not an average pool
    """

    kind: str = "full"
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    hint_channels: int = 3
    sdxl: bool = False
    kernel_size: int = 1
    conv_downsample: bool = False

    @property
    def unshuffle(self) -> int:
        return 16 if self.sdxl else 8

    def downsamples(self, level: int) -> bool:
        """Whether a level's first block halves the size: every level after the first, SDXL's level 2 only."""
        return level == 2 if self.sdxl else level > 0


class Downsample(nn.Module):
    """Half the size: a 2×2 average pool, or a stride-2 3×3 convolution (`op`, the key TencentARC's files use)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResnetBlock(nn.Module):
    """The full adapter's block: [downsample], [1×1 widen], then x + conv(ReLU(conv3×3(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel_size: int = 1, conv_downsample: bool = False):
        super().__init__()
        pad = kernel_size // 2
        self.down_opt = Downsample(in_c, conv_downsample) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c, kernel_size, padding=pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, in_c, h, w) -> (b, out_c, h or h/2, w or w/2)."""
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


def unshuffle_hint(hint: torch.Tensor, channels: int, factor: int) -> torch.Tensor:
    """(b, 3 or `channels`, H, W) -> (b, channels·factor², H/factor, W/factor).

    A one-channel adapter given an RGB hint takes its first channel, as the extension does (`PlugableAdapter`: its
    hints are greyscale images stored as three equal channels)."""
    if hint.shape[1] != channels:
        if channels != 1 or hint.shape[1] != 3:
            raise ValueError(f"this T2I-Adapter takes a hint of {channels} channel(s), not {hint.shape[1]}")
        hint = hint[:, :1]
    if hint.shape[-2] % factor or hint.shape[-1] % factor:
        raise ValueError(
            f"this T2I-Adapter takes a hint whose sides are multiples of {factor}, "
            f"not {hint.shape[-1]}x{hint.shape[-2]}"
        )
    return F.pixel_unshuffle(hint, factor)


class Adapter(nn.Module):
    """The full T2I-Adapter (TencentARC's `Adapter`, and `Adapter_XL` with cfg.sdxl)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.hint_channels * cfg.unshuffle**2, ch[0], 3, padding=1)
        self.body = nn.ModuleList(
            ResnetBlock(
                ch[max(level - 1, 0)] if r == 0 else ch[level],
                ch[level],
                down=r == 0 and cfg.downsamples(level),
                kernel_size=cfg.kernel_size,
                conv_downsample=cfg.conv_downsample,
            )
            for level in range(len(ch))
            for r in range(cfg.num_res_blocks)
        )

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """hint (b, 3 or hint_channels, H, W) in [0, 1] -> one feature per level, (b, channels[i], h_i, w_i)."""
        x = self.conv_in(unshuffle_hint(hint, self.cfg.hint_channels, self.cfg.unshuffle))
        features = []
        for level in range(len(self.cfg.channels)):
            for block in self.body[level * self.cfg.num_res_blocks : (level + 1) * self.cfg.num_res_blocks]:
                x = block(x)
            features.append(x)
        return features


class ResnetBlockLight(nn.Module):
    """The light adapter's block: x + conv3×3(ReLU(conv3×3(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """One level of the light adapter: [average pool], 1×1 to inner width, residual blocks, 1×1 to out width."""

    def __init__(self, in_c: int, inner: int, out_c: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down_opt = Downsample(in_c, use_conv=False) if down else None
        self.in_conv = nn.Conv2d(in_c, inner, 1)
        self.body = nn.Sequential(*(ResnetBlockLight(inner) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(inner, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, in_c, h, w) -> (b, out_c, h or h/2, w or w/2)."""
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class AdapterLight(nn.Module):
    """The light T2I-Adapter (TencentARC's `Adapter_light`): keys `body.N.in_conv`, `body.N.body.M.block1`, ..."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        if cfg.sdxl:
            raise ValueError("the light T2I-Adapter exists for SD 1.x only (unshuffle 8, a downsample per level)")
        self.cfg = cfg
        ch = cfg.channels
        widths = [cfg.hint_channels * cfg.unshuffle**2, *ch]
        self.body = nn.ModuleList(
            Extractor(widths[i], ch[i] // 4, ch[i], cfg.num_res_blocks, down=i > 0) for i in range(len(ch))
        )

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """hint (b, 3 or hint_channels, H, W) in [0, 1] -> one feature per level, (b, channels[i], H/8/2^i, W/8/2^i)."""
        x = unshuffle_hint(hint, self.cfg.hint_channels, self.cfg.unshuffle)
        features = []
        for extractor in self.body:
            x = extractor(x)
            features.append(x)
        return features


def build_t2i_adapter(cfg: T2IAdapterConfig) -> Adapter | AdapterLight:
    if cfg.kind not in ("full", "light"):
        raise ValueError(f"T2I-Adapter kind must be 'full' or 'light', not {cfg.kind!r}")
    return Adapter(cfg) if cfg.kind == "full" else AdapterLight(cfg)


def t2i_residuals(
    features: Sequence[torch.Tensor], scales: float | Sequence[float], *, sdxl: bool, num_res_blocks: int = 2
) -> ControlResiduals:
    """An adapter's four features, each times its scale, placed where the web UI's ControlNet extension adds them
    (`scripts/hook.py`: `t2i_injection = [3, 5, 8] if is_sdxl else [2, 5, 8, 11]`, SDXL's fourth into the middle
    block's output), which is where TencentARC's own U-Nets add them (`(id + 1) % 3 == 0` in their `openaimodel.py`).

    scales: one weight, or one per feature: the extension's "soft injection" is weight · (0.25, 0.62, 0.825, 1.0).
    SD 1.x/2.x: after the last block of each level. SDXL: after the first downsample (its first feature is already at
    1/2 the latent's size), after the last blocks of levels 1 and 2, and onto the middle block.
    num_res_blocks: the U-Net's (2 in every SD family; the indices above): for tiny test models.
    """
    if len(features) != 4:
        raise ValueError(f"a T2I-Adapter gives the U-Net 4 features, not {len(features)}")
    scales = [float(scales)] * 4 if isinstance(scales, (int, float)) else list(scales)
    if len(scales) != 4:
        raise ValueError(f"T2I-Adapter scales: one weight or 4, not {len(scales)}")
    scaled = [f * s for f, s in zip(features, scales)]
    step = num_res_blocks + 1  # input blocks per level: its ResBlocks and the downsample that follows
    if sdxl:
        return ControlResiduals(features=dict(zip((step, 2 * step - 1, 3 * step - 1), scaled[:3])), middle=scaled[3])
    return ControlResiduals(features={(level + 1) * step - 1: f for level, f in enumerate(scaled)})
