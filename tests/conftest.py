"""Tiny-width models of the real architecture, one per variant, with every weight perturbed from its init."""

import dataclasses

import pytest
import torch

from latent_diffusion import LatentDiffusion, LatentDiffusionConfig, TextEncoderConfig, UNetConfig, preset, save_model
from latent_diffusion.models.config import SDXL_MICRO, SDXL_REFINER_MICRO


def tiny_config(variant: str) -> LatentDiffusionConfig:
    cfg = preset("tiny")
    if variant == "inpaint":
        cfg.unet.in_channels = 9
    elif variant == "sd2":
        cfg.unet = UNetConfig(**{**dataclasses.asdict(cfg.unet), "num_heads": None, "num_head_channels": 16,
                                 "use_linear_in_transformer": True, "transformer_depth": 2})  # fmt: skip
        cfg.text = TextEncoderConfig(kind="openclip", width=32, layers=3, heads=2, mlp_width=64, activation="gelu",
                                     layer="penultimate", pad_token=0, embed_dim=24)  # fmt: skip
    elif variant in ("sdxl", "sdxl-refiner"):  # SDXL's options: a first level without attention, depth per level
        clip = TextEncoderConfig(width=32, layers=3, heads=2, mlp_width=64, layer="penultimate", final_norm=False)
        big_g = TextEncoderConfig(
            kind="openclip",
            width=48,
            layers=3,
            heads=3,
            mlp_width=96,
            activation="gelu",
            layer="penultimate",
            final_norm=False,
            pad_token=0,
            embed_dim=40,
            pooled=True,
        )
        refiner = variant == "sdxl-refiner"
        micro = SDXL_REFINER_MICRO if refiner else SDXL_MICRO
        cfg.unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=1,
                              num_heads=None, num_head_channels=16, transformer_depth=(1, 1, 2) if refiner else (1, 2, 3),
                              context_dim=48 if refiner else 80, use_linear_in_transformer=True,
                              adm_in_channels=40 + (5 if refiner else 6) * 8)  # fmt: skip
        cfg = dataclasses.replace(cfg, text=big_g if refiner else clip, text2=None if refiner else big_g,
                                  micro_conditioning=micro, micro_conditioning_width=8, scale_factor=0.13025)  # fmt: skip
    elif variant != "sd1":
        raise ValueError(variant)
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (norm scales and zero biases included) so that no term of the forward is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_models():
    """variant -> a randomized tiny LatentDiffusion (built once per session; tests must not modify it)."""
    return {
        v: randomize(LatentDiffusion(tiny_config(v)), seed=i).eval() for i, v in enumerate(("sd1", "sd2", "inpaint"))
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_models):
    """The tiny SD 1.x model as a .safetensors file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_models["sd1"], path)
    return path


@pytest.fixture(scope="session")
def serve():
    """serve(app): a context manager running a real uvicorn server for `app` -> its base URL."""
    from latent_diffusion.serving.http_edge import serving

    return serving
