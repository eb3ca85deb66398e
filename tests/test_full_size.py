"""The full-size presets, built on the meta device (no memory): every key and shape is what diffusers'
converters map onto diffusers' and transformers' full-size models, with nothing left over or missing."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextModel

from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.models.text_encoder import TextEncoder
from latent_diffusion.models.yaml_config import to_ldm_config

from test_reference import transformers_text_config


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["sd-v1.5", "sd-v2.1", "sd-v1.5-inpaint"])
def test_preset_has_the_keys_and_shapes_the_converters_expect(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    sd = model.state_dict()
    original = {"model": to_ldm_config(cfg)}

    unet_cfg = create_unet_diffusers_config_from_ldm(original, sd)
    vae_cfg = create_vae_diffusers_config_from_ldm(original, sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(transformers_text_config(cfg))
    assert shapes(convert_ldm_unet_checkpoint(sd, unet_cfg)) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(sd, vae_cfg)) == shapes(vae.state_dict())
    # Every one of our keys is consumed by a converter.
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd)

    if cfg.text.kind == "clip":
        converted = convert_ldm_clip_checkpoint(sd)
    else:
        converted = convert_open_clip_checkpoint(text, sd, prefix="cond_stage_model.model.")
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    expected = shapes(text.state_dict())
    got = shapes(converted)
    if cfg.text.layer == "penultimate":  # diffusers drops the unused last block (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
        got = {k: v for k, v in got.items() if not k.startswith(f"encoder.layers.{cfg.text.layers - 1}.")}
    assert got == expected


def test_full_size_parameter_counts():
    """Published sizes: SD 1.5 U-Net 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M; SD 2.x U-Net 865.9 M."""
    with torch.device("meta"):
        sd1 = LatentDiffusion(preset("sd-v1.5"))
        sd2 = LatentDiffusion(preset("sd-v2.1"))
        vit_h = TextEncoder(preset("sd-v2.1").text)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(sd1.model) == 859_520_964
    assert count(sd1.first_stage_model) == 83_653_863
    assert count(sd1.cond_stage_model) == 123_060_480
    assert count(sd2.model) == 865_910_724
    # OpenCLIP ViT-H/14's text tower = transformers' CLIP text model of the same size + text_projection + logit_scale
    with torch.device("meta"):
        reference = CLIPTextModel(transformers_text_config(preset("sd-v2.1"), layers=24))
    assert count(vit_h) == count(reference) + 1024 * 1024 + 1
