"""Latent diffusion (the Stable Diffusion architecture), readable, in the original checkpoint layout."""

from .checkpoint import CheckpointError, load_model, read_state_dict, save_model
from .config import (
    PRESETS,
    AutoencoderConfig,
    LatentDiffusionConfig,
    TextEncoderConfig,
    UNetConfig,
    preset,
)
from .latent_diffusion import LatentDiffusion
from .ldm_yaml import from_ldm_config
from .pipeline import Pipeline, load_pipeline

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "CheckpointError",
    "LatentDiffusion",
    "LatentDiffusionConfig",
    "Pipeline",
    "TextEncoderConfig",
    "UNetConfig",
    "from_ldm_config",
    "load_model",
    "load_pipeline",
    "preset",
    "read_state_dict",
    "save_model",
]
