"""UniFormer-S with an UperNet head (Li et al. 2022; Xiao et al. 2018): the ADE20K segmenter behind the ControlNet
extension's seg_ufade20k (lllyasviel's `upernet_global_small.pth`, an mmsegmentation checkpoint: keys `backbone.*`,
`decode_head.*`, and an auxiliary head used only in training), in that layout, so the file loads without key mapping.

- **Backbone** (`backbone`): four stages at 1/4, 1/8, 1/16 and 1/32 of the image, each entered by a patch embedding
  (a strided convolution and a LayerNorm). Every block first adds a depthwise 3×3 convolution of its input (a
  position encoding). Stages 1 and 2 mix locally: BatchNorm, 1×1, a depthwise 5×5 ("attention" as a convolution),
  1×1, then a convolutional MLP. Stages 3 and 4 attend globally (64 channels a head) with an MLP, pre-LayerNorm.
  Each stage's output is LayerNorm'd for the head.
- **Head** (`decode_head`, UperNet): pyramid pooling of the last stage (1, 2, 3, 6 cells, each 1×1, upsampled back),
  a feature pyramid top-down (1×1 laterals, bilinear upsampling), 3×3 convolutions, all four levels upsampled to
  the finest and fused by a 3×3 convolution, then a 1×1 to the 150 classes. Every convolution is followed by
  BatchNorm and ReLU (mmcv's `ConvModule`), the last one excepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly
from .vit_layers import Mlp, SelfAttention


@dataclass(frozen=True)
class UniFormerConfig:
    widths: tuple[int, int, int, int] = (64, 128, 320, 512)  # UniFormer-S
    depths: tuple[int, int, int, int] = (3, 4, 8, 3)
    channels: int = 512  # the head's width
    classes: int = 150  # ADE20K
    head_width: int = 64  # channels an attention head


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> UniFormerConfig:
    """The sizes of a file's tensors."""
    widths = tuple(state_dict[f"backbone.patch_embed{i}.proj.weight"].shape[0] for i in range(1, 5))
    depths = tuple(
        1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith(f"backbone.blocks{i}.")), default=-1)
        for i in range(1, 5)
    )
    head = state_dict["decode_head.conv_seg.weight"].shape
    return UniFormerConfig(widths, depths, channels=head[1], classes=head[0])


# ---- the backbone ---------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """A strided convolution, then LayerNorm over channels (eps 1e-5): (b, c, H, W) -> (b, width, H/s, W/s)."""

    def __init__(self, inputs: int, width: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(inputs, width, stride, stride=stride)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CMlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(width, 4 * width, 1), nn.Conv2d(4 * width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CBlock(nn.Module):
    """Local mixing: x + pos(x); + 1×1(dw5×5(1×1(BN x))); + mlp(BN x)."""

    def __init__(self, width: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm1, self.norm2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        self.conv1, self.conv2 = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)
        self.attn = nn.Conv2d(width, width, 5, padding=2, groups=width)
        self.mlp = CMlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class SABlock(nn.Module):
    """Global attention: x + pos(x); then over the tokens (b, H·W, c), + attn(LN x), + mlp(LN x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = SelfAttention(width, heads), Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (b, h·w, c)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UniFormer(nn.Module):
    def __init__(self, cfg: UniFormerConfig):
        super().__init__()
        inputs = (3, *cfg.widths[:3])
        for i, (entering, width, depth, stride) in enumerate(zip(inputs, cfg.widths, cfg.depths, (4, 2, 2, 2)), 1):
            setattr(self, f"patch_embed{i}", PatchEmbed(entering, width, stride))
            local = i <= 2
            blocks = (CBlock(width) if local else SABlock(width, width // cfg.head_width) for _ in range(depth))
            setattr(self, f"blocks{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(width, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, 3, H, W) -> the four stages' normed outputs, (b, widthᵢ, H/4/2ⁱ, W/4/2ⁱ)."""
        outputs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
            outputs.append(getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return outputs


# ---- the head -------------------------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """mmcv's ConvModule as configured here: a convolution without bias, BatchNorm, ReLU."""

    def __init__(self, inputs: int, outputs: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    POOL_SCALES = (1, 2, 3, 6)

    def __init__(self, cfg: UniFormerConfig):
        super().__init__()
        c, top = cfg.channels, cfg.widths[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, c, 1)) for scale in self.POOL_SCALES
        )
        self.bottleneck = ConvModule(top + len(self.POOL_SCALES) * c, c, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(width, c, 1) for width in cfg.widths[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(c, c, 3) for _ in cfg.widths[:-1])
        self.fpn_bottleneck = ConvModule(len(cfg.widths) * c, c, 3)
        self.conv_seg = nn.Conv2d(c, cfg.classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The four stages' outputs -> class logits (b, classes, H/4, W/4)."""
        top = features[-1]
        pooled = [_resize(pool(top), top.shape[2:]) for pool in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(x, outs[0].shape[2:]) for x in outs[1:]]
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class UperNetUniFormer(nn.Module):
    def __init__(self, cfg: UniFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = UniFormer(cfg)
        self.decode_head = UPerHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) normalized images -> class logits (b, classes, H, W) (mmseg's `encode_decode`)."""
        return _resize(self.decode_head(self.backbone(x)), x.shape[2:])


def segmenter_from_state_dict(state_dict: dict[str, torch.Tensor]) -> UperNetUniFormer:
    """The network of an mmsegmentation checkpoint's tensors (its `state_dict`; the auxiliary head's left out);
    ValueError naming what does not fit."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("auxiliary_head.")}
    needed = [f"backbone.patch_embed{i}.proj.weight" for i in range(1, 5)] + ["decode_head.conv_seg.weight"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"not an UperNet UniFormer segmenter (no {missing[0]})")
    cfg = config_from_state_dict(state_dict)
    if any(width % cfg.head_width for width in cfg.widths[2:]) or 0 in cfg.depths:
        raise ValueError(f"not an UperNet UniFormer segmenter (stages {cfg.widths} wide, {cfg.depths} deep)")
    return load_exactly(lambda: UperNetUniFormer(cfg), state_dict, "an UperNet UniFormer segmenter")
