"""LatentDiffusion: the autoencoder, the text encoder and the U-Net under the names of CompVis checkpoints
(`first_stage_model`, `cond_stage_model`, `model.diffusion_model`), plus the noise schedule. SDXL models have
generative-models' `conditioner` (`conditioner.py`: two text encoders and the micro-conditioning) in place of
`cond_stage_model`; the other names are the same.

`conditioning(prompts)` is the model's conditioner: it turns prompts into the mapping that `DiffusionWrapper`
routes into the U-Net; the request layer adds what does not come from the prompt (inpainting's "concat").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import schedule
from .autoencoder import AutoencoderKL
from .conditioner import Conditioner
from .config import LatentDiffusionConfig, from_ldm_config
from .prompts import chunk_prompt
from .text_encoder import TextEncoder
from .tokenizer import clip_tokenizer
from .unet import UNetModel

if TYPE_CHECKING:  # embeddings.py imports checkpoint.py, which imports the model: a cycle at import time
    from .embeddings import Embedding

CONDITIONING_KEYS = ("crossattn", "concat", "vector")


class DiffusionWrapper(nn.Module):
    """The U-Net under `model.diffusion_model` (CompVis's key names), and the one place where conditioning reaches
    it, as CompVis's `DiffusionWrapper` and generative-models' `OpenAIWrapper`. A conditioning is a mapping:

        "crossattn": (b, n, context_dim)   attended to by every SpatialTransformer (the text)
        "concat":    (b, c, h, w)          appended to the noisy latent's channels (inpainting: mask + masked latent)
        "vector":    (b, adm_in_channels)  added to the time embedding through `label_emb` (SDXL: pooled text, sizes)

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
        return self.diffusion_model(x, t, context=cond.get("crossattn"), y=cond.get("vector"))


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
        self.checkpoint: str | None = None  # the file `load_model` read it from (infotexts name it)
        self.vae_file: str | None = None  # a separate autoencoder file loaded by `checkpoint.load_vae`
        self.embeddings: dict[str, Embedding] = {}  # textual inversion, by name (`embeddings.load_embeddings`)
        self.loras: dict[str, Path] = {}  # LoRA files that prompts may name (<lora:name:weight>), by name
        self.init_schedule()

    @classmethod
    def from_ldm_config(cls, cfg: dict) -> LatentDiffusion:
        """From the `model:` mapping of a CompVis inference YAML (CompVis's parameter names)."""
        return cls(from_ldm_config(cfg))

    def init_schedule(self, device: torch.device | str | None = None):
        """(Re)compute ᾱ. It is not stored in our checkpoints: the config defines it."""
        betas = schedule.scaled_linear_betas(self.cfg.linear_start, self.cfg.linear_end, self.cfg.timesteps)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod(betas).float().to(device), persistent=False)

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
        return self.unet.out[2].weight.dtype

    def conditioning(
        self,
        prompts: list[str],
        *,
        clip_skip: int | None = None,
        syntax: bool = True,
        size: tuple[int, int] | None = None,
        negative: bool = False,
        joint: bool = False,
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """prompts in the web UI's language (`prompts.py`) -> ({"crossattn": (b, 77·k, context_dim)}, warnings),
        and for SDXL "vector": y (b, adm_in_channels).

        Each prompt is k chunks of 77 tokens (prompts with fewer get empty-prompt chunks). Each token's hidden state
        is multiplied by its emphasis weight, then each chunk is rescaled to the mean it had unweighted, as the
        web UI's "Original" emphasis. The web UI takes that mean over its whole batch, which holds the variants of
        one prompt (its prompt-editing schedule): joint=True for those; per prompt otherwise, so that an image of
        a batch stays the image its seed gives alone. syntax=False reads the prompts as plain text.

        SDXL: each text encoder encodes the chunks (emphasis applies to each), and the contexts are concatenated
        along the features. y is the pooled text of the first chunk, as the web UI's, then the micro-conditioning:
        original and target size `size` (height, width of the image), crop (0, 0), aesthetic score 6 (2.5 for
        negative prompts), diffusers' and the web UI's defaults. An empty negative prompt is all zeros, text and
        pooled (generative-models' `force_zero_embeddings`, as the reference sampling and the web UI use it).
        CLIP skip does not apply to SDXL, as in the web UI."""
        xl = bool(self.cfg.micro_conditioning)
        notes = ["clip_skip has no effect on SDXL models (as in the web UI)"] if xl and clip_skip is not None else []
        clip_skip = None if xl else clip_skip
        tokenizer = clip_tokenizer(self.cfg.text.max_length)
        chunked = [chunk_prompt(p, tokenizer, syntax, self.embeddings) for p in prompts]
        empty = chunk_prompt("", tokenizer, syntax=False)[0]
        encoded, pooled = [], None
        for i in range(max(len(c) for c in chunked)):
            batch = [c[i] if i < len(c) else empty for c in chunked]
            weights = torch.tensor([c.weights for c in batch], device=self.device)[..., None]  # (b, 77, 1)
            vectors = [[(position, e.vectors) for position, e in c.embeddings] for c in batch]
            parts, offset = [], 0
            for encoder in self.text_encoders:
                tokens = torch.tensor([encoder.pad(c.tokens) for c in batch], device=self.device)
                columns = [[(p, v[:, offset : offset + encoder.cfg.width]) for p, v in row] for row in vectors]
                offset += encoder.cfg.width  # (an embedding's vectors hold every encoder's part, side by side)
                z = encoder(tokens, clip_skip, columns, pooled=encoder.cfg.pooled)  # (b, 77, d)
                if encoder.cfg.pooled:
                    z, chunk_pooled = z
                    pooled = chunk_pooled if pooled is None else pooled  # (b, embed_dim), the first chunk's
                parts.append(emphasized(z, weights, joint))
            encoded.append(torch.cat(parts, dim=-1))
        cond = {"crossattn": torch.cat(encoded, dim=1)}
        if xl:
            micro = micro_conditioning(len(prompts), size or (self.cfg.default_size,) * 2, negative)
            cond["vector"] = self.conditioner.vector(pooled, micro)
            zero = torch.tensor([negative and p == "" for p in prompts], device=self.device)
            cond["crossattn"] = cond["crossattn"].masked_fill(zero[:, None, None], 0)
            cond["vector"][:, : pooled.shape[1]] = pooled.masked_fill(zero[:, None], 0)
        return cond, notes

    def get_text_conditioning(
        self, prompts: list[str], pooled: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """prompts -> context (b, 77, context_dim) as CompVis encodes captions: plain text, cut at 75 tokens (with a
        Python warning naming what was cut); SDXL: both encoders' contexts side by side. Training uses this;
        generation uses `conditioning`. pooled: also return SDXL's pooled text (b, embed_dim), None for others."""
        contexts, pooled_text = [], None
        for encoder in self.text_encoders:
            tokens, cut = encoder.tokenize(list(prompts))
            out = encoder(tokens, pooled=encoder.cfg.pooled)
            if encoder.cfg.pooled:
                out, pooled_text = out
            contexts.append(out)
        for prompt, was_cut in zip(prompts, cut):
            if was_cut:
                dropped = clip_tokenizer(self.cfg.text.max_length).cut_text(prompt)
                warnings.warn(f"prompt longer than 75 tokens; this part was cut: {dropped!r}", stacklevel=2)
        context = torch.cat(contexts, dim=-1)
        return (context, pooled_text) if pooled else context

    def autoencoder_encode(
        self, image: torch.Tensor, noise: torch.Tensor | None = None, tiled: bool = False
    ) -> torch.Tensor:
        """image (b, 3, H, W) in [-1, 1] -> a latent sample × scale_factor (b, 4, H/8, W/8); noise (b, 4, H/8, W/8)
        is the posterior sample's standard normal draw (default: torch's global generator). tiled: encode in
        overlapping tiles (`vae_tiling.py`), for images whose activations would not fit in memory at once."""
        return self.scale_factor * self.first_stage_model.encode(image, tiled=tiled).sample(noise=noise)

    def autoencoder_decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """scaled latent (b, 4, h, w) -> image (b, 3, 8h, 8w), about [-1, 1]; tiled: in overlapping tiles."""
        return self.first_stage_model.decode(z / self.scale_factor, tiled=tiled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's prediction (ε or v, per `parameterization`) for noisy latents x at timesteps t."""
        return self.model(x, t, cond)


def emphasized(z: torch.Tensor, weights: torch.Tensor, joint: bool = False) -> torch.Tensor:
    """Hidden states (b, 77, d) times their tokens' weights (b, 77, 1), rescaled to the mean they had unweighted:
    each row's mean, or with joint the mean of all rows."""
    if (weights == 1).all():
        return z
    weighted = z * weights.to(z.dtype)
    dims = (0, 1, 2) if joint else (1, 2)
    mean, new_mean = z.mean(dim=dims, keepdim=True), weighted.mean(dim=dims, keepdim=True)
    return weighted * torch.where(new_mean == 0, 1, mean / new_mean)


def micro_conditioning(b: int, size: tuple[int, int], negative: bool) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning for generation: trained-on size = target size = `size` (height, width), no crop,
    aesthetic score 6 (2.5 for the negative prompts). -> name -> (b, k)."""
    score = 2.5 if negative else 6.0
    values = {"original_size": size, "crop_coords": (0, 0), "target_size": size, "aesthetic_score": (score,)}
    return {name: torch.tensor([v] * b, dtype=torch.float32) for name, v in values.items()}
