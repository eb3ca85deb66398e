"""LatentDiffusion: the autoencoder, the text encoder and the U-Net under the names of CompVis checkpoints
(`first_stage_model`, `cond_stage_model`, `model.diffusion_model`), plus the noise schedule.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import schedule
from .autoencoder import AutoencoderKL
from .config import LatentDiffusionConfig, from_ldm_config
from .text_encoder import TextEncoder
from .tokenizer import clip_tokenizer
from .unet import UNetModel


class DiffusionWrapper(nn.Module):
    """Exists only so that the U-Net's keys read `model.diffusion_model.*`, as in CompVis checkpoints."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        self.cond_stage_model = TextEncoder(cfg.text)
        self.init_schedule()

    @classmethod
    def from_ldm_config(cls, cfg: dict) -> LatentDiffusion:
        """From the `model:` mapping of a CompVis inference YAML (CompVis's parameter names)."""
        return cls(from_ldm_config(cfg))

    def init_schedule(self, device: torch.device | str | None = None):
        """(Re)compute the schedule buffers. They are not stored in our checkpoints: the config defines them."""
        betas = schedule.scaled_linear_betas(self.cfg.linear_start, self.cfg.linear_end, self.cfg.timesteps)
        self.register_buffer("betas", betas.float().to(device), persistent=False)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod(betas).float().to(device), persistent=False)

    @property
    def parameterization(self) -> str:
        return self.cfg.parameterization

    @property
    def scale_factor(self) -> float:
        return self.cfg.scale_factor

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def device(self) -> torch.device:
        return self.model.diffusion_model.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.diffusion_model.out[2].weight.dtype

    def get_text_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> context (b, 77, context_dim). Prompts over 75 tokens are cut, with a warning."""
        tokens, cut = self.cond_stage_model.tokenize(list(prompts))
        for prompt, was_cut in zip(prompts, cut):
            if was_cut:
                dropped = clip_tokenizer(self.cfg.text.max_length).cut_text(prompt)
                warnings.warn(
                    f"prompt longer than {self.cfg.text.max_length - 2} tokens; this part was cut: {dropped!r}",
                    stacklevel=2,
                )
        return self.cond_stage_model(tokens)

    def autoencoder_encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """image (b, 3, H, W) in [-1, 1] -> a latent sample × scale_factor (b, 4, H/8, W/8)."""
        return self.scale_factor * self.first_stage_model.encode(image).sample(generator)

    def autoencoder_decode(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latent (b, 4, h, w) -> image (b, 3, 8h, 8w), about [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction (ε or v, per `parameterization`) for noisy latents x at timesteps t."""
        return self.model.diffusion_model(x, t, context)
