"""The denoising U-Net, in the module layout of CompVis `ldm/modules/diffusionmodules/openaimodel.py`.

Conditioning enters in two places: the cross-attention `context` (b, n, context_dim) of every
SpatialTransformer, and an optional vector `y` (b, adm_in_channels) that `label_emb` maps into the time
embedding (CompVis's `num_classes="sequential"`; SDXL's pooled text and size embeddings). Channel
concatenation (inpainting) happens before the U-Net, in `ldm.DiffusionWrapper`.

input_blocks.0 is the stem convolution; each following input block is a ResBlock (+ SpatialTransformer) or
a Downsample; the middle block is ResBlock, SpatialTransformer, ResBlock; each output block takes the
concatenation of the running features and one saved skip, and ends a level with an Upsample.
Sequential indices are kept so that keys such as `input_blocks.1.0.in_layers.2.weight` resolve.

Control models (ControlNet, T2I-Adapter) add to its features without changing its module tree (`ControlResiduals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig
from .spatial_transformer import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017), cos half first: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_grid(latent: tuple[int, int], n: int) -> tuple[int, int]:
    """The (h, w) of a U-Net layer of n = h·w places: the latent's (h, w) halved, rounding up as the strided
    convolutions do, until it has n (ValueError where no level has)."""
    h, w = latent
    while h * w > n and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n:
        raise ValueError(f"no level of a {latent[1]}x{latent[0]} latent has {n} places")
    return h, w


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the time embedding, GroupNorm-SiLU-conv, plus a (1x1-projected) skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (b, c, h, w), emb: (b, emb_channels) -> (b, out_channels, h, w)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """Nearest-neighbour 2x, or to `size`: the size of the next skip, which is odd when the input side
        is not divisible by 2 ** (levels - 1) (e.g. 520 px = 65 latents -> 33 -> 17: up to 33, not 34)."""
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands each layer what it needs: the time embedding, the text context, or nothing."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class ControlResiduals:
    """What control models add to the U-Net's features, summed over the units (the web UI's ControlNet extension adds
    each unit's into one total):

        skips:    one per input block, added to that block's skip connection as the decoder takes it (ControlNet, as
                  lllyasviel's ControlledUnetModel), or None
        middle:   added to the middle block's output (ControlNet; SDXL's T2I-Adapter's last feature), or None
        features: {input block i: added to the running features after block i, before its skip is kept} (T2I-Adapter)

    Each tensor is (b, c, h, w) at its block's width and size; an addend of another size is resized (nearest) first,
    as the extension's `aligned_adding` does for sides that are not multiples of 64.
    """

    skips: list[torch.Tensor | None] | None = None
    middle: torch.Tensor | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        def add(a, b):
            return b if a is None else a if b is None else a + b

        skips = [add(a, b) for a, b in zip(self.skips, other.skips)] if self.skips and other.skips else None
        features = {i: add(self.features.get(i), other.features.get(i)) for i in self.features.keys() | other.features}
        return ControlResiduals(skips or self.skips or other.skips, add(self.middle, other.middle), features)


def add_residual(h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """h + residual, the residual resized (nearest) where its side differs by the rounding of odd sizes; one of
    1×1 (a pooled ControlNet's) is added at every place."""
    if residual is None:
        return h
    if residual.shape[-2:] not in (h.shape[-2:], (1, 1)):
        residual = F.interpolate(residual, size=h.shape[-2:], mode="nearest")
    return h + residual


class UNetEncoder(nn.Module):
    """The time embedding, the input blocks and the middle block: the U-Net's first half, which a ControlNet copies
    (`controlnet.py`). -> self.skip_channels (each input block's width), self.channels and self.ds (the width and
    downsampling factor at the bottom)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_channels = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        if cfg.adm_in_channels:  # nested Sequential: keys `label_emb.0.0.weight`, as CompVis
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
                )
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]
        ch, ds = mc, 1  # current width and downsampling factor
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_channels, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_channels, ch),
            self.transformer(ch, cfg.transformer_depth[-1]),
            ResBlock(ch, emb_channels, ch),
        )
        self.channels, self.ds = ch, ds

    def transformer(self, ch: int, depth: int) -> SpatialTransformer:
        cfg = self.cfg
        if cfg.num_head_channels is not None:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        else:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

    def embedding(self, timesteps: torch.Tensor, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The time embedding (b, 4·model_channels), plus y's through `label_emb` where the model takes y."""
        timesteps = torch.as_tensor(timesteps, device=like.device).expand(like.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(like.dtype))
        if (y is not None) != bool(self.cfg.adm_in_channels):
            raise ValueError(f"this U-Net takes {'a' if self.cfg.adm_in_channels else 'no'} vector conditioning y")
        return emb if y is None else emb + self.label_emb(y)


class UNetModel(UNetEncoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc = cfg.model_channels
        emb_channels = mc * 4
        skip_channels, ch, ds = list(self.skip_channels), self.channels, self.ds
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.checkpointing = False  # training: recompute each block's activations in the backward pass

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: ControlResiduals | None = None,
    ) -> torch.Tensor:
        """x: (b, in_channels, h, w), timesteps: (b,) or scalar, context: (b, n, context_dim), y: (b, adm_in_channels),
        control: what control models add (`ControlResiduals`) -> (b, out_channels, h, w).

        Any h and w work; sides that are not multiples of 2 ** (len(channel_mult) - 1) are upsampled to the
        size of the matching skip connection.
        """
        emb = self.embedding(timesteps, y, x)

        def run(block, *args):
            if self.checkpointing and torch.is_grad_enabled():
                return checkpoint(block, *args, use_reentrant=False)
            return block(*args)

        control = control or ControlResiduals()
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = add_residual(run(block, h, emb, context), control.features.get(i))
            skips.append(h)
        h = add_residual(run(self.middle_block, h, emb, context), control.middle)
        skip_residuals = list(control.skips or [None] * len(skips))
        for block in self.output_blocks:
            h = torch.cat([h, add_residual(skips.pop(), skip_residuals.pop())], dim=1)
            h = run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
