"""The KL autoencoder (stage 1 of latent diffusion), in the layout of CompVis
`ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`.

Image (b, 3, H, W) in [-1, 1] -> encoder -> quant_conv -> a diagonal Gaussian over latents
(b, embed_dim, H/f, W/f), f = 2 ** (len(ch_mult) - 1); decode: post_quant_conv -> decoder -> image.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import vae_tiling
from .attention import attention
from .config import AutoencoderConfig


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (CompVis key names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        y = self.norm(x).flatten(2).transpose(1, 2)  # (b, h*w, c)
        # The 1x1 convolutions as matrix products on the pixels-first layout, so that q, k and v come out with
        # channels contiguous: scaled_dot_product_attention's flash and memory-efficient kernels take no other
        # layout, and the math fallback holds the whole (h*w)² attention matrix (2.4 GiB for a 1024² image).
        q, k, v = (F.linear(y, conv.weight.flatten(1), conv.bias) for conv in (self.q, self.k, self.v))
        y = attention(q, k, v, heads=1)  # (b, h*w, c)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.transpose(1, 2).unflatten(2, (h, w))  # (b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no asymmetric padding in torch conv: pad right and bottom by one, as CompVis does
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: `block.N` (the first from in_channels), (empty) `attn`, and a
    down/upsampler."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(blocks)
        )
        self.attn = nn.ModuleList()  # SD's autoencoders have no attention outside the middle block


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level, ch = Level(ch, cfg.ch * mult, cfg.num_res_blocks), cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = Middle(ch)
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, in_channels, H, W) -> (b, 2*z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Middle(ch)
        levels = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level, ch = Level(ch, cfg.ch * mult, cfg.num_res_blocks + 1), cfg.ch * mult
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)  # `up.0` is the highest resolution, as in CompVis
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(b, z_channels, h, w) -> (b, out_ch, h*f, w*f)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents; moments: (b, 2*c, h, w) = mean and log-variance stacked."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std·z, with z from `generator` or given as `noise` (b, c, h, w)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: 0.5 Σ (μ² + σ² − 1 − log σ²)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        # Reads the encoder's weights on the first `encode` where a checkpoint was loaded without them (txt2img
        # never encodes: `checkpoint.load_model(for_generation=True)`); None once they are here.
        self.load_encoder: Callable[[nn.Module], None] | None = None

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()` and the like. An encoder still in the file (`load_encoder`: meta tensors) stays there,
        to be read where the rest of the autoencoder is then, in its dtype."""
        if self.load_encoder is None:
            return super()._apply(fn, recurse)
        modules = self._modules
        self._modules = {k: m for k, m in modules.items() if k not in ("encoder", "quant_conv")}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules = modules

    def encode(self, img: torch.Tensor, batch_size: int | None = None, tiled: bool = False) -> DiagonalGaussian:
        """img: (b, 3, H, W) in [-1, 1] -> posterior over (b, embed_dim, H/f, W/f); batch_size images at a time
        (bounds the activations' memory when encoding many); tiled: in overlapping tiles (`models/vae_tiling.py`), for
        images whose activations would not fit in memory at once."""
        if self.load_encoder is not None:
            self.load_encoder(self)
            self.load_encoder = None
        f = self.cfg.downsampling_factor
        chunks = img.split(batch_size) if batch_size else [img]
        if tiled:  # tiles laid out in latent pixels (unit f), so that each starts on a whole one
            moments = [
                vae_tiling.tiled(self._moments, c, 1 / f, vae_tiling.TILE, vae_tiling.OVERLAP, unit=f) for c in chunks
            ]
            return DiagonalGaussian(torch.cat(moments).to(img.dtype))
        return DiagonalGaussian(torch.cat([self._moments(chunk) for chunk in chunks]))

    def _moments(self, img: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(img))

    def decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """z: (b, embed_dim, h, w) -> image (b, 3, h*f, w*f), about [-1, 1]; tiled: in overlapping tiles (float32)."""
        if tiled:
            return vae_tiling.tiled(self._decode, z, self.cfg.downsampling_factor, vae_tiling.TILE, vae_tiling.OVERLAP)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
