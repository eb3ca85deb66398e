"""txt2img, img2img and inpainting: one sampling loop in latent space, started from noise or from a noised
image latent, with the known region of an inpainting mask held in place.

Seeds: image i of a batch uses its own generator, seeded `seeds[i]`, for everything random about it (its
posterior sample, initial noise and per-step noise), so any image of a grid can be regenerated alone.
Random numbers are drawn on the CPU, so a seed gives the same noise on every device. The order of draws is
diffusers' for a single image: image latent (img2img, inpainting), initial noise, masked-image latent
(9-channel inpainting models), then the sampler's per-step noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .latent_diffusion import LatentDiffusion
from .samplers import get_sampler
from .schedule import sampling_sigmas


@dataclass
class GenerationSettings:
    steps: int = 20
    sampler: str = "dpmpp_2m"
    karras: bool = True  # Karras σ spacing for the σ-space samplers (DDIM, PLMS, DDPM keep their timesteps)
    cfg_scale: float = 7.5
    eta: float = 0.0  # DDIM's η (0: deterministic, 1: DDPM-like noise)
    spacing: str = "leading"  # timestep spacing, as diffusers' SD schedulers ("leading", "trailing", "linspace")
    strength: float = 1.0  # img2img / inpainting: how much of the schedule to run (1 = from pure noise)

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], not {self.strength}")
        get_sampler(self.sampler)
        if self.eta < 0:
            raise ValueError(f"eta must be at least 0, not {self.eta}")
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} of {self.steps} steps runs no step; raise either")


def per_image_randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(b, *shape) standard normals, row i from generators[i] (on the CPU)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def prepare_mask(mask: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (b, 1, H, W) in [0, 1], white = repaint -> (binary pixel mask, latent-size mask) as diffusers."""
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the image size {tuple(image.shape[-2:])}")
    mask = (mask >= 0.5).to(image.dtype)
    return mask, F.interpolate(mask, size=(image.shape[-2] // 8, image.shape[-1] // 8))


@torch.no_grad()
def generate(
    model: LatentDiffusion,
    prompts: list[str],
    seeds: list[int],
    settings: GenerationSettings,
    *,
    negative_prompts: list[str] | None = None,
    width: int = 512,
    height: int = 512,
    init_image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """-> images (b, 3, H, W) in [0, 1].

    init_image: (b, 3, H, W) in [-1, 1] for img2img and inpainting (then width and height are its size);
    mask: (b, 1, H, W), white = repaint. progress(i) is called after each sampling step.
    """
    settings.check()
    sampler, final, takes_karras, _ = get_sampler(settings.sampler)
    if init_image is not None:
        height, width = init_image.shape[-2:]
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of 8, not {width}x{height}")
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    inpaint_model = model.cfg.unet.in_channels == 9
    if inpaint_model and mask is None:
        raise ValueError("this is an inpainting model (9 input channels): it needs an image and a mask")

    device, dtype = model.device, model.dtype
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latent_shape = (model.cfg.autoencoder.embed_dim, height // 8, width // 8)
    negative_prompts = negative_prompts or [""] * len(prompts)
    context = model.get_text_conditioning(prompts)
    uncond = model.get_text_conditioning(negative_prompts) if settings.cfg_scale != 1.0 else None

    sigmas = sampling_sigmas(
        model.alphas_cumprod.cpu(), settings.steps, spacing=settings.spacing,
        karras=settings.karras and takes_karras, final=final,
    )  # fmt: skip
    sigmas = sigmas[settings.steps - int(settings.steps * settings.strength) :]  # img2img starts part-way

    def encode(image: torch.Tensor) -> torch.Tensor:
        posterior = model.first_stage_model.encode(image.to(device, dtype))
        return model.scale_factor * posterior.sample(noise=per_image_randn(latent_shape, generators))

    image_latent = None
    if init_image is not None and (settings.strength < 1 or (mask is not None and not inpaint_model)):
        image_latent = encode(init_image).float()
    noise = per_image_randn(latent_shape, generators).to(device)
    if settings.strength < 1:
        x = image_latent + sigmas[0].item() * noise
    else:
        x = noise * (1 + sigmas[0].item() ** 2) ** 0.5

    concat, pixel_mask, latent_mask = None, None, None
    if mask is not None:
        pixel_mask, latent_mask = prepare_mask(mask.to(device, torch.float32), init_image.to(device, torch.float32))
        if inpaint_model:  # the model sees the mask and the latent of the image with the hole cut out
            masked = init_image.to(device, torch.float32) * (pixel_mask < 0.5)
            concat = torch.cat([latent_mask, encode(masked).float()], dim=1).to(dtype)

    denoiser = Denoiser(
        lambda x_in, t, c: model.model.diffusion_model(x_in.to(dtype), t, c).float(),
        model.alphas_cumprod, model.parameterization, context, uncond, settings.cfg_scale, concat,
    )  # fmt: skip

    def callback(i: int, x: torch.Tensor) -> torch.Tensor:
        if latent_mask is not None and not inpaint_model:
            # Hold the known region at the noise level the sampler is now at (clean after the last step).
            sigma = sigmas[i + 1].item() if i + 2 < len(sigmas) else 0.0
            x = latent_mask * x + (1 - latent_mask) * (image_latent + sigma * noise)
        if progress:
            progress(i)
        return x

    def noise_sampler(sigma, sigma_next) -> torch.Tensor:
        return per_image_randn(latent_shape, generators).to(device)

    extra = {"eta": settings.eta} if settings.sampler == "ddim" else {}  # the ancestral samplers keep η = 1
    # σs stay float64 on the CPU (0-d values mix with tensors on any device; MPS has no float64)
    x = sampler(denoiser, x, sigmas, noise=noise_sampler, callback=callback, **extra)
    x = x / (1 + sigmas[-1].item() ** 2) ** 0.5  # DDIM/PLMS stop at σ_0 > 0: back to the VP latent there
    images = (model.autoencoder_decode(x.to(dtype)).float() / 2 + 0.5).clamp(0, 1)
    if pixel_mask is not None:  # keep the input's pixels outside the mask
        images = pixel_mask * images + (1 - pixel_mask) * (init_image.to(device, torch.float32) / 2 + 0.5)
    return images
