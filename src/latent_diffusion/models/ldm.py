"""LatentDiffusion: the autoencoder, the text encoder and the U-Net under the names of CompVis checkpoints
(`first_stage_model`, `cond_stage_model`, `model.diffusion_model`), plus the noise schedule. SDXL models have
generative-models' `conditioner` (`models/conditioner.py`: two text encoders and the micro-conditioning) in place of
`cond_stage_model`; the other names are the same.

The conditioning is a mapping that `DiffusionWrapper` routes into the U-Net. Prompts in the web UI's language become
its text ("crossattn", and SDXL's pooled "vector") in `prompts/encoding.py`, which calls the text encoders here; the
request layer adds what does not come from the prompt (inpainting's "concat").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..sampling import noise_schedule
from .autoencoder import AutoencoderKL
from .conditioner import Conditioner
from .config import LatentDiffusionConfig
from .text_encoder import TextEncoder
from .tokenizer import clip_tokenizer
from .unet import UNetModel
from .yaml_config import from_ldm_config

CONDITIONING_KEYS = ("crossattn", "concat", "vector", "control")


class DiffusionWrapper(nn.Module):
    """The U-Net under `model.diffusion_model` (CompVis's key names), and the one place where conditioning reaches
    it, as CompVis's `DiffusionWrapper` and generative-models' `OpenAIWrapper`. A conditioning is a mapping:

        "crossattn": (b, n, context_dim)   attended to by every SpatialTransformer (the text)
        "concat":    (b, c, h, w)          appended to the noisy latent's channels (inpainting: mask + masked latent)
        "vector":    (b, adm_in_channels)  added to the time embedding through `label_emb` (SDXL: pooled text, sizes)
        "control":   `unet.ControlResiduals`  what ControlNets and T2I-Adapters add to the U-Net's features

    A new conditioning input is a new key here and a producer of it (the model's conditioner or the request layer).
    """

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x: (b, latent channels, h, w) at timesteps t (b,) -> the U-Net's ε or v, like x."""
        if unknown := cond.keys() - set(CONDITIONING_KEYS):
            raise ValueError(f"unknown conditioning {sorted(unknown)}; the keys are {', '.join(CONDITIONING_KEYS)}")
        if "concat" in cond:
            x = torch.cat([x, cond["concat"]], dim=1)  # (b, latent channels + c, h, w)
        return self.diffusion_model(
            x, t, context=cond.get("crossattn"), y=cond.get("vector"), control=cond.get("control")
        )


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        if cfg.micro_conditioning:  # generative-models' layout (SDXL)
            self.conditioner = Conditioner(cfg)
        else:
            self.cond_stage_model = TextEncoder(cfg.text)
        self.init_schedule()

    @classmethod
    def from_ldm_config(cls, cfg: dict) -> LatentDiffusion:
        """From the `model:` mapping of a CompVis inference YAML (CompVis's parameter names)."""
        return cls(from_ldm_config(cfg))

    def init_schedule(self, device: torch.device | str | None = None):
        """(Re)compute ᾱ. It is not stored in our checkpoints: the config defines it."""
        betas = noise_schedule.scaled_linear_betas(self.cfg.linear_start, self.cfg.linear_end, self.cfg.timesteps)
        self.register_buffer(
            "alphas_cumprod", noise_schedule.alphas_cumprod(betas).float().to(device), persistent=False
        )

    def _apply(self, fn, recurse=True):
        """As nn.Module's (`.to`, `.half`, `.cuda`, ...), except that ᾱ keeps its float32 values whatever dtype the
        weights take: in bfloat16 the first values round to 1 (σ = 0, log σ = -inf: NaN timesteps), and in float16
        every σ moves by up to 1e-3 of itself. It still moves with the model to a new device."""
        schedule = self.alphas_cumprod
        super()._apply(fn, recurse)
        if self.alphas_cumprod.dtype != schedule.dtype:
            self.alphas_cumprod = schedule.to(self.alphas_cumprod.device)
        return self

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
    def text_encoders(self) -> list[TextEncoder]:
        """The text encoders, in the order their outputs are concatenated into the context."""
        return self.conditioner.text_encoders if self.cfg.micro_conditioning else [self.cond_stage_model]

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: a norm's, which stays in it when the layers' weights are stored in float8."""
        return self.unet.out[0].weight.dtype

    def get_text_conditioning(
        self, prompts: list[str], pooled: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """prompts -> context (b, 77, context_dim) as CompVis encodes captions: plain text, cut at 75 tokens (with a
        Python warning naming what was cut); SDXL: both encoders' contexts side by side. Training uses this;
        generation uses `conditioning`. pooled: also return SDXL's pooled text (b, embed_dim), None for others."""
        tokens, cut = self.tokenize(prompts)
        for prompt, was_cut in zip(prompts, cut):
            if was_cut:
                dropped = clip_tokenizer(self.cfg.text.max_length).cut_text(prompt)
                warnings.warn(f"prompt longer than 75 tokens; this part was cut: {dropped!r}", stacklevel=2)
        context, pooled_text = encode_tokens(self.text_encoders, tokens)
        return (context, pooled_text) if pooled else context

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """prompts -> (token ids (b, k, 77), one row per text encoder (each pads its own way); which were cut)."""
        rows = [encoder.tokenize(list(prompts)) for encoder in self.text_encoders]
        return torch.stack([tokens for tokens, _ in rows], dim=1), rows[0][1]

    def autoencoder_encode(
        self, image: torch.Tensor, noise: torch.Tensor | None = None, tiled: bool = False
    ) -> torch.Tensor:
        """image (b, 3, H, W) in [-1, 1] -> a latent sample × scale_factor (b, 4, H/8, W/8); noise (b, 4, H/8, W/8)
        is the posterior sample's standard normal draw (default: torch's global generator). tiled: encode in
        overlapping tiles (`models/vae_tiling.py`), for images whose activations would not fit in memory at once."""
        return self.scale_factor * self.first_stage_model.encode(image, tiled=tiled).sample(noise=noise)

    def autoencoder_decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """scaled latent (b, 4, h, w) -> image (b, 3, 8h, 8w), about [-1, 1]; tiled: in overlapping tiles."""
        return self.first_stage_model.decode(z / self.scale_factor, tiled=tiled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's prediction (ε or v, per `parameterization`) for noisy latents x at timesteps t."""
        return self.model(x, t, cond)


def encode_tokens(encoders: list[TextEncoder], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (b, k, 77), one row per encoder -> (the contexts side by side (b, 77, Σ width), the pooled text
    (b, embed_dim) of the encoder that pools, or None)."""
    contexts, pooled = [], None
    for encoder, rows in zip(encoders, tokens.unbind(1), strict=True):
        out = encoder(rows, pooled=encoder.cfg.pooled)
        if encoder.cfg.pooled:
            out, pooled = out
        contexts.append(out)
    return torch.cat(contexts, dim=-1), pooled


def micro_conditioning(b: int, size: tuple[int, int], negative: bool) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning for generation: trained-on size = target size = `size` (height, width), no crop,
    aesthetic score 6 (2.5 for the negative prompts). -> name -> (b, k)."""
    score = 2.5 if negative else 6.0
    values = {"original_size": size, "crop_coords": (0, 0), "target_size": size, "aesthetic_score": (score,)}
    return {name: torch.tensor([v] * b, dtype=torch.float32) for name, v in values.items()}
