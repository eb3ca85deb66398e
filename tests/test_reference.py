"""Our models against diffusers' and transformers' models, built from the same CompVis-layout state dict by
diffusers' own single-file converters (an independent implementation of every part)."""

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
from transformers import CLIPTextConfig, CLIPTextModel

from latent_diffusion import LatentDiffusion
from latent_diffusion.models.config import LatentDiffusionConfig
from latent_diffusion.models.yaml_config import to_ldm_config

from conftest import randomize, tiny_config

ATOL = 1e-4  # float32; the two implementations order their floating-point operations differently
VARIANTS = ["sd1", "sd2", "inpaint"]


def diffusers_unet(cfg: LatentDiffusionConfig, sd: dict) -> UNet2DConditionModel:
    unet_cfg = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    return unet.eval()


def diffusers_vae(cfg: LatentDiffusionConfig, sd: dict) -> AutoencoderKL:
    vae_cfg = create_vae_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
    return vae.eval()


def transformers_text_config(cfg: LatentDiffusionConfig, layers: int | None = None) -> CLIPTextConfig:
    t = cfg.text
    return CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width, num_attention_heads=t.heads,
        max_position_embeddings=t.max_length, hidden_act=t.activation, projection_dim=t.embed_dim,
        # diffusers builds SD 2.x's encoder one layer short, so that its last hidden state is the penultimate
        num_hidden_layers=layers or (t.layers - 1 if t.layer == "penultimate" else t.layers),
    )  # fmt: skip


def transformers_text_encoder(cfg: LatentDiffusionConfig, sd: dict) -> CLIPTextModel:
    model = CLIPTextModel(transformers_text_config(cfg))
    if cfg.text.kind == "clip":
        converted = convert_ldm_clip_checkpoint(sd)
    else:
        converted = convert_open_clip_checkpoint(model, sd, prefix="cond_stage_model.model.")
    # CLIPTextModel has no `text_model.` level since transformers 5.6; diffusers strips it the same way.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert missing == []
    dropped = f"encoder.layers.{cfg.text.layers - 1}." if cfg.text.layer == "penultimate" else None
    assert [k for k in unexpected if not (dropped and k.startswith(dropped)) and k != "text_projection.weight"] == []
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_matches_diffusers(tiny_models, variant):
    model = tiny_models[variant]
    ref = diffusers_unet(model.cfg, model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.cfg.unet.in_channels, 16, 24, generator=g)
    t = torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        ours = model(x, t, {"crossattn": context})
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, 16, 24)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.abs().mean() > 0.1  # a real signal was compared, not two near-zero tensors


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_autoencoder_matches_diffusers(tiny_models, variant):
    model = tiny_models[variant]
    ref = diffusers_vae(model.cfg, model.state_dict())
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 6, generator=g)
    with torch.no_grad():
        ours_mode = model.first_stage_model.encode(img).mode()
        theirs_mode = ref.encode(img).latent_dist.mode()
        ours_img = model.first_stage_model.decode(z)
        theirs_img = ref.decode(z).sample
    assert ours_mode.shape == (2, 4, 8, 6) and ours_img.shape == (2, 3, 64, 48)
    torch.testing.assert_close(ours_mode, theirs_mode, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_img, theirs_img, atol=ATOL, rtol=0)


def test_every_attention_takes_a_fused_kernel(tiny_models):
    """With scaled_dot_product_attention limited to the flash kernel (no math fallback, which holds the whole
    attention matrix), the text encoder, the U-Net and both halves of the autoencoder still run: every attention
    hands it q, k and v in a layout the fused kernels take (channels contiguous)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_models["sd1"]
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        context = model.get_text_conditioning(["a cat"])
        model(torch.randn(1, 4, 8, 8), torch.tensor([10]), {"crossattn": context})
        model.first_stage_model.decode(model.first_stage_model.encode(torch.rand(1, 3, 32, 32)).mode())


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_text_encoder_matches_transformers(tiny_models, variant):
    model = tiny_models[variant]
    ref = transformers_text_encoder(model.cfg, model.state_dict())
    tokens, _ = model.cond_stage_model.tokenize(["a small red circle on a blue background", "", "Ünïcode, 12 cats!"])
    with torch.no_grad():
        ours = model.get_text_conditioning(["a small red circle on a blue background", "", "Ünïcode, 12 cats!"])
        theirs = ref(input_ids=tokens).last_hidden_state
    assert ours.shape == (3, 77, 32)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_padding_token_follows_the_variant(tiny_models):
    """SD 1.x (CompVis FrozenCLIPEmbedder) pads with <|endoftext|>; SD 2.x (open_clip.tokenize) pads with 0."""
    sd1, _ = tiny_models["sd1"].cond_stage_model.tokenize(["a cat"])
    sd2, _ = tiny_models["sd2"].cond_stage_model.tokenize(["a cat"])
    assert sd1[0, :4].tolist() == [49406, 320, 2368, 49407] and set(sd1[0, 4:].tolist()) == {49407}
    assert sd2[0, :4].tolist() == [49406, 320, 2368, 49407] and set(sd2[0, 4:].tolist()) == {0}


def test_vector_conditioning_matches_diffusers():
    """A U-Net with `label_emb` (CompVis num_classes="sequential", adm_in_channels) takes y through the wrapper's
    "vector" field; diffusers' converter maps it to `class_embedding` (class_embed_type "projection")."""
    cfg = tiny_config("sd1")
    cfg.unet.adm_in_channels = 12
    model = randomize(LatentDiffusion(cfg), seed=7).eval()
    ref = diffusers_unet(cfg, model.state_dict())
    assert ref.config.class_embed_type == "projection"
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([20, 640])
    context, y = torch.randn(2, 77, 32, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        ours = model(x, t, {"crossattn": context, "vector": y})
        theirs = ref(x, t, encoder_hidden_states=context, class_labels=y).sample
        without_y = ref(x, t, encoder_hidden_states=context, class_labels=torch.zeros_like(y)).sample
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (theirs - without_y).abs().mean() > 0.01  # y really changes the prediction
