"""Model families: one row each, with what tells the family apart in a checkpoint, where its conditioner's
weights live, and its generation defaults. Everything else reads these rows instead of testing shapes.

A new family is a new row here, its conditioner module, and its config (SDXL: `models/conditioner.py`, its conditioner
under `conditioner.embedders.N` that also makes the vector `y`); the U-Net, the autoencoder, the samplers, the
request layer and the front ends stay as they are. Inpainting is not a family: any family's U-Net with the mask and the
masked-image latent as extra input channels (`LatentDiffusionConfig.inpainting`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Prefixes every family shares (the CompVis layout).
UNET = "model.diffusion_model."
VAE = "first_stage_model."
EMA = "model_ema."


@dataclass(frozen=True)
class Family:
    name: str  # how `variant` begins: "sd1"
    title: str  # for people: "SD 1.x"
    text_kind: str  # the TextEncoderConfig.kind of its conditioner ("sgm": generative-models' conditioner)
    text_prefix: str  # where its conditioner's weights live in a checkpoint
    marker: str  # a key that only this family's checkpoints hold
    context_dim: int  # the width of the text its U-Net attends to (a LoRA's cross-attention keys tell its family)
    default_size: int = 512  # image side in pixels, for width and height when a request leaves them out
    default_cfg_scale: float = 7.5
    vae_overflows_in_float16: bool = False  # decode in float32 even when the model runs in float16 (SDXL's VAE)


SD1 = Family(
    name="sd1",
    title="SD 1.x",
    text_kind="clip",
    text_prefix="cond_stage_model.transformer.text_model.",
    marker="cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    context_dim=768,
)
SD2 = Family(
    name="sd2",
    title="SD 2.x",
    text_kind="openclip",
    text_prefix="cond_stage_model.model.",
    marker="cond_stage_model.model.token_embedding.weight",
    context_dim=1024,
)
# generative-models' layout: `conditioner.embedders.N`, base: CLIP ViT-L (0), OpenCLIP ViT-bigG (1), sizes, crop;
# refiner: ViT-bigG (0), size, crop, aesthetic score. Defaults of diffusers' StableDiffusionXLPipeline.
SDXL = Family(
    name="sdxl",
    title="SDXL",
    text_kind="sgm",
    text_prefix="conditioner.embedders.",
    marker="conditioner.embedders.1.model.token_embedding.weight",
    context_dim=768 + 1280,
    default_size=1024,
    default_cfg_scale=5.0,
    vae_overflows_in_float16=True,
)
SDXL_REFINER = Family(
    name="sdxl-refiner",
    title="SDXL refiner",
    text_kind="sgm",
    text_prefix="conditioner.embedders.",
    marker="conditioner.embedders.0.model.token_embedding.weight",
    context_dim=1280,
    default_size=1024,
    default_cfg_scale=5.0,
    vae_overflows_in_float16=True,
)
FAMILIES = (SD1, SD2, SDXL, SDXL_REFINER)


def family_of_text_kind(kind: str) -> Family:
    return next(f for f in FAMILIES if f.text_kind == kind)


def family_of_keys(keys) -> Family | None:
    """The family whose marker key is among `keys`, or None."""
    return next((f for f in FAMILIES if f.marker in keys), None)
