"""Depth Anything (Yang et al. 2024, v1 and v2): relative depth from one image, the network behind the ControlNet
extension's depth_anything and depth_anything_v2 modules, in the layout of its files (`depth_anything_vitl14.pth`,
`depth_anything_v2_vitl.safetensors`: keys `pretrained.*` for the encoder, `depth_head.*` for the decoder), so they
load without key mapping.

- **Encoder** (`pretrained`): DINOv2's ViT with 14-pixel patches, a class token, learnt positions for 37×37 patches
  (bicubically resized to the image's grid, as DINOv2 does, with its 0.1 offset) and pre-norm blocks whose two
  branches are each scaled by a learnt vector (layer scale). Four blocks' outputs, normed, are the decoder's inputs:
  v1 takes the last four, v2 blocks spread through the depth (4, 11, 17, 23 of ViT-L's 24).
- **Decoder** (`depth_head`, DPT, Ranftl et al. 2021): each of the four token grids (b, dim, h/14, w/14) projected
  by 1×1 and resized to 4×, 2×, 1× and ½× the grid; then from the coarsest, each fused into the next finer one
  (residual convolution units, 2× bilinear upsampling, align_corners); two convolutions and upsampling to the
  input's size give the depth, ReLU'd (larger: nearer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .exact_load import load_exactly
from .vit_layers import Mlp, SelfAttention

PATCH = 14


@dataclass(frozen=True)
class DepthAnythingConfig:
    width: int = 1024  # ViT-L
    depth: int = 24
    features: int = 256  # the decoder's width
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    grid: int = 37  # the learnt positions' side (518-pixel images)
    taps: tuple[int, ...] = (4, 11, 17, 23)  # the blocks the decoder reads (v2's; v1: the last four)

    @property
    def heads(self) -> int:
        return self.width // 64  # 64 channels a head in every DINOv2


# v2's blocks per encoder width (`DepthAnythingV2.intermediate_layer_idx`); v1 reads the last four of every size
V2_TAPS = {384: (2, 5, 8, 11), 768: (2, 5, 8, 11), 1024: (4, 11, 17, 23), 1536: (9, 19, 29, 39)}


def config_from_state_dict(state_dict: dict[str, torch.Tensor], version: int) -> DepthAnythingConfig:
    """The sizes of a file's tensors, and the blocks its version reads."""
    width = state_dict["pretrained.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("pretrained.blocks."))
    projects = tuple(state_dict[f"depth_head.projects.{i}.weight"].shape[0] for i in range(4))
    return DepthAnythingConfig(
        width=width,
        depth=depth,
        features=state_dict["depth_head.scratch.layer1_rn.weight"].shape[0],
        out_channels=projects,
        grid=math.isqrt(state_dict["pretrained.pos_embed"].shape[1] - 1),
        taps=V2_TAPS.get(width, ()) if version == 2 else tuple(range(depth - 4, depth)),
    )


# ---- the encoder: DINOv2 --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (b, 3, H, W) -> (b, H/14 · W/14, width)


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + γ₁·attn(norm₁ x), then + γ₂·mlp(norm₂ x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = SelfAttention(width, heads), Mlp(width)
        self.ls1, self.ls2 = LayerScale(width), LayerScale(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.width))  # (DINOv2's training only; in the files)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def positions(self, rows: int, columns: int) -> torch.Tensor:
        """The learnt positions for a rows × columns grid: (1, 1 + rows·columns, width). DINOv2's resize: bicubic by
        the factors (rows + 0.1)/grid and (columns + 0.1)/grid (the offset keeps the floor of the size right)."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if rows == columns == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, width, grid, grid)
        scale = ((rows + 0.1) / grid, (columns + 0.1) / grid)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).flatten(1, 2)  # (1, rows·columns, width)
        return torch.cat([pos[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def taps(self, x: torch.Tensor, blocks: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The normed outputs of `blocks` for images x (b, 3, H, W), each as (patch tokens (b, H/14 · W/14, width),
        class token (b, width)) (`get_intermediate_layers(x, n, return_class_token=True)`)."""
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.positions(x.shape[2] // PATCH, x.shape[3] // PATCH)
        found = []
        for i, block in enumerate(self.blocks[: max(blocks) + 1]):
            tokens = block(tokens)
            if i in blocks:
                normed = self.norm(tokens)
                found.append((normed[:, 1:], normed[:, 0]))
        return found


# ---- the decoder: DPT ----------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    """x + conv₂(relu(conv₁(relu x)))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """The coarser path plus the refined finer map, refined again, upsampled (to `size`, else 2×), 1×1."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, path: torch.Tensor, finer: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if finer is not None:
            path = path + self.resConfUnit1(finer)
        path = self.resConfUnit2(path)
        resize = {"scale_factor": 2} if size is None else {"size": size}
        return self.out_conv(F.interpolate(path, **resize, mode="bilinear", align_corners=True))


class DPTHead(nn.Module):
    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        c, f = cfg.out_channels, cfg.features
        self.projects = nn.ModuleList(nn.Conv2d(cfg.width, channels, 1) for channels in c)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], 4, stride=4),
                nn.ConvTranspose2d(c[1], c[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], 3, stride=2, padding=1),
            ]
        )
        s = self.scratch = nn.Module()
        for i in range(4):
            setattr(s, f"layer{i + 1}_rn", nn.Conv2d(c[i], f, 3, padding=1, bias=False))
            setattr(s, f"refinenet{i + 1}", FeatureFusionBlock(f))
        s.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        s.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity()
        )

    def forward(self, taps: list[tuple[torch.Tensor, torch.Tensor]], rows: int, columns: int) -> torch.Tensor:
        s, maps = self.scratch, []
        for i, (tokens, _) in enumerate(taps):  # (the class token is not read: use_clstoken=False in every file)
            grid = tokens.transpose(1, 2).reshape(len(tokens), -1, rows, columns)  # (b, width, rows, columns)
            maps.append(getattr(s, f"layer{i + 1}_rn")(self.resize_layers[i](self.projects[i](grid))))
        path = s.refinenet4(maps[3], size=maps[2].shape[2:])
        path = s.refinenet3(path, maps[2], size=maps[1].shape[2:])
        path = s.refinenet2(path, maps[1], size=maps[0].shape[2:])
        path = s.refinenet1(path, maps[0])  # (b, features, 8·rows, 8·columns)
        out = F.interpolate(s.output_conv1(path), (rows * PATCH, columns * PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(out)  # (b, 1, 14·rows, 14·columns)


class DepthAnything(nn.Module):
    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.cfg = cfg
        self.pretrained = DinoVisionTransformer(cfg)
        self.depth_head = DPTHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) normalized images, sides multiples of 14 -> (b, H, W) relative depth (inverse: near is more)."""
        rows, columns = x.shape[2] // PATCH, x.shape[3] // PATCH
        return F.relu(self.depth_head(self.pretrained.taps(x, self.cfg.taps), rows, columns)).squeeze(1)


def depth_anything_from_state_dict(state_dict: dict[str, torch.Tensor], version: int) -> DepthAnything:
    """The network of a file's tensors (ValueError naming what does not fit)."""
    needed = ["pretrained.cls_token", "pretrained.pos_embed", "pretrained.blocks.0.attn.qkv.weight"]
    needed += [f"depth_head.projects.{i}.weight" for i in range(4)] + ["depth_head.scratch.layer1_rn.weight"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"not a Depth Anything model (no {missing[0]})")
    cfg = config_from_state_dict(state_dict, version)
    if cfg.width % 64 or not cfg.taps or min(cfg.taps) < 0 or max(cfg.taps) >= cfg.depth:
        raise ValueError(f"no Depth Anything v{version} encoder of width {cfg.width} and {cfg.depth} blocks")
    return load_exactly(lambda: DepthAnything(cfg), state_dict, "a Depth Anything model")
