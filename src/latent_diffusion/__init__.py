"""Latent diffusion (the Stable Diffusion architecture), readable, in the original checkpoint layout."""

from .models.config import (
    PRESETS,
    AutoencoderConfig,
    LatentDiffusionConfig,
    TextEncoderConfig,
    UNetConfig,
    preset,
)
from .models.ldm import LatentDiffusion
from .models.yaml_config import from_ldm_config
from .pipeline.loading import Pipeline, load_pipeline
from .weights.checkpoint import CheckpointError, load_model, read_state_dict, save_model

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
