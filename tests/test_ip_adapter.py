"""IP-Adapter: the CLIP image tower against transformers' `CLIPVisionModelWithProjection`, and the U-Net with an
IP-Adapter (base, plus, full face; SD 1.x and SDXL) against diffusers' UNet2DConditionModel with the same file
loaded by its own `_load_ip_adapter_weights` (its converter and IPAdapterAttnProcessor2_0)."""

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from transformers import CLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TransformersVision

from latent_diffusion.models.clip_vision import (
    VIT_BIGG,
    VIT_H,
    VIT_L,
    CLIPVisionModelWithProjection,
    VisionOutput,
    vision_config_of,
)
from latent_diffusion.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions, image_prompted
from latent_diffusion.weights.ip_adapter import load_clip_vision, load_ip_adapter
from latent_diffusion.weights.reader import CheckpointError

from conftest import randomize, seeded, tiny_model
from test_reference import diffusers_unet
from test_sdxl import diffusers_xl_unet

EMBED = 48  # the tiny CLIP tower's projected width (base) and hidden width (plus, full face)


def transformers_tower(act: str) -> TransformersVision:
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=16, image_size=56,
        patch_size=14, projection_dim=EMBED, hidden_act=act,
    )  # fmt: skip
    with seeded(1):
        return TransformersVision(cfg).eval()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_image_tower_matches_transformers(tmp_path, act):
    theirs = transformers_tower(act)
    torch.save(theirs.state_dict(), tmp_path / "clip.pth")
    ours = load_clip_vision(tmp_path / "clip.pth")  # its config read off the shapes (gelu below ViT-L's width)
    if act == "quick_gelu":  # at tiny width only by its config (`test_full_size_towers_are_read_off_their_shapes`)
        ours = CLIPVisionModelWithProjection(dataclasses.replace(ours.cfg, activation=act))
        ours.load_state_dict(theirs.state_dict())
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.penultimate, expected.hidden_states[-2], atol=1e-5, rtol=0)


# The web UI's ControlNet extension's three configs (annotator/clipvision/__init__.py), as transformers builds them
EXTENSION_TOWERS = {
    "clip_h": (dict(hidden_size=1280, num_hidden_layers=32, intermediate_size=5120, projection_dim=1024, hidden_act="gelu"), VIT_H),
    "clip_g": (dict(hidden_size=1664, num_hidden_layers=48, intermediate_size=8192, projection_dim=1280, hidden_act="gelu"), VIT_BIGG),
    "clip_vitl": (dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, projection_dim=768, hidden_act="quick_gelu"), VIT_L),
}  # fmt: skip


@pytest.mark.parametrize("name", EXTENSION_TOWERS)
def test_full_size_towers_are_read_off_their_shapes(name):
    options, expected = EXTENSION_TOWERS[name]
    with torch.device("meta"):
        theirs = TransformersVision(CLIPVisionConfig(num_attention_heads=16, image_size=224, patch_size=14, **options))
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert vision_config_of(shapes) == expected
    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(expected)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def tiny_adapter(kind: str, model) -> IPAdapter:
    """An IP-Adapter of `kind` for the model's U-Net, random weights."""
    attentions = cross_attentions(model.model.diffusion_model)
    context = model.cfg.unet.context_dim
    cfg = IPAdapterConfig(
        kind,
        embed_dim=EMBED,
        context_dim=context,
        tokens={"base": 4, "plus": 16, "full": 257}[kind],
        layers=tuple(range(1, 2 * len(attentions), 2)),
        widths=tuple(a.to_k.out_features for a in attentions),
        resampler_dim=128 if kind == "plus" else 0,  # (two heads of 64)
    )
    return randomize(IPAdapter(cfg), seed=7).eval()


def tencent_file(adapter: IPAdapter, path) -> dict:
    """The adapter saved as tencent-ailab's `ip_adapter.bin`: {"image_proj": {...}, "ip_adapter": {...}}."""
    sd = adapter.state_dict()
    parts = {part: {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(part + ".")} for part in ("image_proj", "ip_adapter")}
    torch.save(parts, path)
    return parts


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_unet_with_an_ip_adapter_matches_diffusers(tmp_path, variant, kind):
    model = tiny_model(variant, seed=3)
    sd = model.state_dict()
    ref = diffusers_xl_unet(model.cfg, sd) if variant == "sdxl" else diffusers_unet(model.cfg, sd)
    parts = tencent_file(tiny_adapter(kind, model), tmp_path / "ip-adapter.bin")
    adapter = load_ip_adapter(tmp_path / "ip-adapter.bin")  # (through the reader's flattening of the parts)
    assert adapter.cfg.kind == kind
    ref._load_ip_adapter_weights([parts])
    w = 0.7
    for processor in ref.attn_processors.values():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale = [w]

    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    image = VisionOutput(image_embeds=torch.randn(2, EMBED, generator=g), penultimate=torch.randn(2, 9, EMBED, generator=g))
    kwargs, y = {}, None
    if variant == "sdxl":
        pooled = torch.randn(2, model.cfg.text2.embed_dim, generator=g)
        time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 896]])
        y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
        kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    unet = model.model.diffusion_model
    with torch.no_grad():
        with image_prompted(unet, [(adapter, adapter.tokens(image), w)]):
            ours = unet(x, t, context, y)
        plain = unet(x, t, context, y)
        embeds = image.image_embeds if kind == "base" else image.penultimate
        theirs = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={**kwargs, "image_embeds": [embeds[:, None]]})
    torch.testing.assert_close(ours, theirs.sample, atol=1e-4, rtol=0)
    assert (ours - plain).abs().mean() > 0.01  # the image prompt really changed the prediction
    assert torch.equal(unet(x, t, context, y), plain)  # and the U-Net is itself again afterwards
