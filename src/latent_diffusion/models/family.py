"""Model families: one row each, with what tells the family apart in a checkpoint, where its conditioner's
weights live and which preset's conditioner they are, and its generation defaults. Everything else reads these rows
instead of testing shapes; `weights/checkpoint.py` reads a checkpoint's architecture off its keys by them.

A new family is a new row here, its conditioner module, and its config and preset (SDXL: `models/conditioner.py`,
its conditioner under `conditioner.embedders.N` that also makes the vector `y`); the U-Net, the autoencoder, the
samplers, the request layer and the front ends stay as they are. Inpainting is not a family: any family's U-Net with
the mask and the masked-image latent as extra input channels (`LatentDiffusionConfig.inpainting`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Prefixes every family shares (the CompVis layout).
UNET = "model.diffusion_model."
VAE = "first_stage_model."
EMA = "model_ema."


@dataclass(frozen=True)
class Family:
    name: str  # how `variant` begins: "sd1"
    title: str  # for people: "SD 1.x"
    text_kind: str  # the TextEncoderConfig.kind of its conditioner ("sgm": generative-models' conditioner)
    text_prefixes: tuple[str, ...]  # where each text encoder's weights live in a checkpoint, in the config's order
    marker: str  # a key that only this family's checkpoints hold
    context_dim: int  # the width of the text its U-Net attends to (a LoRA's cross-attention keys tell its family)
    preset: str  # the preset whose conditioner (text encoders' options, micro-conditioning, latent scale) it has
    v_name: str = r"(^|[-_])v([-_.]|$)"  # a file name that matches this is v-prediction (the weights cannot tell)
    default_size: int = 512  # image side in pixels, for width and height when a request leaves them out
    default_cfg_scale: float = 7.5
    vae_overflows_in_float16: bool = False  # decode in float32 even when the model runs in float16 (SDXL's VAE)
    # Latent channels -> RGB, a fixed linear map of its autoencoder's latents (the web UI's "Approx cheap" preview)
    preview_rgb: tuple[tuple[float, float, float], ...] | None = None


# The web UI's `sd_vae_approx.cheap_approximation` coefficients, (latent channel, RGB): SD's autoencoder, SDXL's
SD_PREVIEW_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_PREVIEW_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


SD1 = Family(
    name="sd1",
    title="SD 1.x",
    text_kind="clip",
    text_prefixes=("cond_stage_model.transformer.text_model.",),
    marker="cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    context_dim=768,
    preset="sd-v1.5",
    preview_rgb=SD_PREVIEW_RGB,
)
SD2 = Family(
    name="sd2",
    title="SD 2.x",
    text_kind="openclip",
    text_prefixes=("cond_stage_model.model.",),
    marker="cond_stage_model.model.token_embedding.weight",
    context_dim=1024,
    preset="sd-v2.1",
    v_name=r"(^|[-_])v([-_.]|$)|768",  # also the 768 px models: `v2-1_768-ema-pruned.safetensors`
    preview_rgb=SD_PREVIEW_RGB,
)
# generative-models' layout: `conditioner.embedders.N`, base: CLIP ViT-L (0), OpenCLIP ViT-bigG (1), sizes, crop;
# refiner: ViT-bigG (0), size, crop, aesthetic score. Defaults of diffusers' StableDiffusionXLPipeline.
SDXL = Family(
    name="sdxl",
    title="SDXL",
    text_kind="sgm",
    text_prefixes=("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
    marker="conditioner.embedders.1.model.token_embedding.weight",
    context_dim=768 + 1280,
    preset="sdxl-base",
    default_size=1024,
    default_cfg_scale=5.0,
    vae_overflows_in_float16=True,
    preview_rgb=SDXL_PREVIEW_RGB,
)
SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    title="SDXL refiner",
    text_prefixes=("conditioner.embedders.0.model.",),
    marker="conditioner.embedders.0.model.token_embedding.weight",
    context_dim=1280,
    preset="sdxl-refiner",
)
FAMILIES = (SD1, SD2, SDXL, SDXL_REFINER)


def family_of_text_kind(kind: str) -> Family:
    return next(f for f in FAMILIES if f.text_kind == kind)


def family_of_keys(keys) -> Family | None:
    """The family whose marker key is among `keys`, or None."""
    return next((f for f in FAMILIES if f.marker in keys), None)
