"""The web UI's hires fix: a txt2img image made at width × height, enlarged, and drawn again at the larger size by a
second pass of img2img over it (its `StableDiffusionProcessingTxt2Img`, `calculate_target_resolution` and
`sample_hr_pass`).

The enlargement is either a latent mode (`LATENT_MODES`: the latent itself interpolated, nothing decoded) or an
image upscaler (the first pass decoded to 8-bit pixels, enlarged as a picture, and encoded again). The second pass
runs exactly its `steps`, the last ones of a schedule of steps / strength (`GenerationRequest.step_count` "fixed"), from
noise drawn afresh from each image's seed, as the web UI draws it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .request import GenerationRequest

# The web UI's `shared.latent_upscale_modes`: name -> (torch interpolation mode, antialias). Its default is "Latent".
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@dataclass(frozen=True)
class HiresSize:
    """Where the first pass is enlarged to, in pixels, and the latent columns and rows then cut off (where both
    resize sides are given and the aspect differs: the image is enlarged to cover them, and the excess cut)."""

    upscale_to: tuple[int, int]  # (width, height)
    truncate: tuple[int, int]  # (columns, rows) of the latent: half before, half (rounded up) after

    def latent(self, f: int) -> tuple[int, int]:
        """The second pass's latent (height, width) for an autoencoder of downsampling factor f."""
        (width, height), (tx, ty) = self.upscale_to, self.truncate
        return height // f - ty, width // f - tx


def target_size(width: int, height: int, scale: float, resize_x: int, resize_y: int, f: int = 8) -> HiresSize:
    """The web UI's `calculate_target_resolution`: by `scale` where no resize side is given; to one resize side with
    the other from the first pass's aspect; to both, covering them with the aspect kept and the excess truncated."""
    if resize_x == 0 and resize_y == 0:
        return HiresSize((int(width * scale), int(height * scale)), (0, 0))
    if resize_y == 0:
        return HiresSize((resize_x, resize_x * height // width), (0, 0))
    if resize_x == 0:
        return HiresSize((resize_y * width // height, resize_y), (0, 0))
    if width / height < resize_x / resize_y:
        to = (resize_x, resize_x * height // width)
    else:
        to = (resize_y * width // height, resize_y)
    return HiresSize(to, ((to[0] - resize_x) // f, (to[1] - resize_y) // f))


def second_pass(r: GenerationRequest, size: HiresSize, f: int, vae_tiling: bool | None) -> GenerationRequest:
    """The request of a resolved txt2img request's hires pass: img2img at the larger size with the hires settings,
    the first pass's where they give none; `vae_tiling` as the request asked (None: decided for the larger size)."""
    h, n = r.hires, len(r.prompts)
    height, width = size.latent(f)
    return dataclasses.replace(
        r,
        prompts=r.prompts if h.prompt is None else [h.prompt] * n,
        negative_prompts=r.negative_prompts if h.negative_prompt is None else [h.negative_prompt] * n,
        width=width * f,
        height=height * f,
        steps=h.steps or r.steps,
        sampler=h.sampler or r.sampler,
        scheduler=h.scheduler or r.scheduler,
        cfg_scale=r.cfg_scale if h.cfg_scale is None else h.cfg_scale,
        strength=h.strength,
        step_count="fixed",
        vae_tiling=vae_tiling,
        edits_after=r.editing_steps,  # (the web UI's prompt editing counts on across both passes)
        hires=None,
    )


def upscale_latent(x: torch.Tensor, size: HiresSize, mode: str, f: int) -> torch.Tensor:
    """(b, c, h, w) first-pass latents -> (b, c, H, W): interpolated to the target's latent size in a latent mode,
    then truncated."""
    interpolation, antialias = LATENT_MODES[mode]
    (width, height) = size.upscale_to
    x = F.interpolate(x, size=(height // f, width // f), mode=interpolation, antialias=antialias)
    return truncate(x, size.truncate)


def truncate(x: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
    """Cut (columns, rows) from the last two dimensions, half before and half (rounded up) after, as the web UI."""
    tx, ty = cut
    return x[..., ty // 2 : x.shape[-2] - (ty + 1) // 2, tx // 2 : x.shape[-1] - (tx + 1) // 2]


def as_8_bit(images: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) in [0, 1] -> the same through 8-bit pixels, truncated as the web UI's `astype(np.uint8)` does:
    the image upscalers enlarge pictures."""
    return (images * 255).to(torch.uint8).float() / 255
