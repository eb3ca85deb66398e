"""The two other units of a CLIP image tower the web UI's ControlNet extension runs: the T2I style adapter
(`t2ia_style_clipvision`, TencentARC's `t2iadapter_style_sd14v1.pth`) and SDXL's revision (`revision_clipvision`,
`revision_ignore_prompt`). The adapter against TencentARC's `StyleAdapter` written here as their code has it
(nn.MultiheadAttention, LayerNorm in float32); txt2img with each unit against diffusers' pipelines given the
conditioning the extension's hook makes (the style tokens after the prompt's, zeros after the negative's; the image
embedding noise-augmented in the pooled text's place, zeros for the negative's), the image features from transformers'
tower on the extension's preprocessing; revision through `ldm serve` over a real socket; the refusals."""

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import to_pil
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError
from latent_diffusion.serving.server import create_app
from latent_diffusion.weights.t2i_adapter import t2i_adapter_from_state_dict
from test_controlnet_api import b64
from test_generate import NEGATIVE, PROMPT, SETTINGS, diffusers_pipeline, embeddings
from test_ip_adapter import reference_pixels, tiny_tower_file
from test_server import call, decode

from conftest import seeded, tiny_model
from test_sdxl import reference_conditioning, xl_pipeline

H, W, STEPS = 64, 48, 4


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Float32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class TencentBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = Float32LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))  # fmt: skip
        self.ln_2 = Float32LayerNorm(d)

    def forward(self, x):  # (n, b, d): sequence first
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TencentStyleAdapter(nn.Module):
    """TencentARC's `StyleAdapter` (ldm/modules/encoders/adapter.py), as their code writes it."""

    def __init__(self, width, context_dim, num_head, n_layes, num_token):
        super().__init__()
        scale = width**-0.5
        self.transformer_layes = nn.Sequential(*[TencentBlock(width, num_head) for _ in range(n_layes)])
        self.num_token = num_token
        self.style_embedding = nn.Parameter(torch.randn(1, num_token, width) * scale)
        self.ln_post = Float32LayerNorm(width)
        self.ln_pre = Float32LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, context_dim))

    def forward(self, x):
        style_embedding = self.style_embedding + torch.zeros((x.shape[0], self.num_token, x.shape[-1]))
        x = torch.cat([x, style_embedding], dim=1)
        x = self.ln_pre(x)
        x = self.transformer_layes(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_post(x[:, -self.num_token :, :])
        return x @ self.proj


def tencent_adapter(context_dim: int, width: int = 32) -> TencentStyleAdapter:
    with seeded(7):
        adapter = TencentStyleAdapter(width, context_dim, num_head=8, n_layes=2, num_token=3).eval()
        for p in adapter.parameters():  # (LayerNorms off their identity init, biases off zero)
            p.data.add_(torch.randn_like(p) * 0.1)
    return adapter


def test_the_style_adapter_matches_tencentarcs():
    """Loaded from TencentARC's state dict (bare, and under the `adapter.` prefix their training writes), ours gives
    their tokens for the same CLIP tokens."""
    theirs = tencent_adapter(context_dim=24)
    for prefix in ("", "adapter."):
        ours = t2i_adapter_from_state_dict({prefix + k: v for k, v in theirs.state_dict().items()})
        assert (ours.cfg.width, ours.cfg.context_dim, ours.cfg.layers, ours.cfg.tokens) == (32, 24, 2, 3)
        x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def folders(tmp_path):
    controls, towers = tmp_path / "ControlNet", tmp_path / "clip_vision"
    controls.mkdir(), towers.mkdir()
    return controls, towers


def test_txt2img_with_a_style_unit_matches_diffusers(tmp_path):
    """The extension's hook: w · the adapter's tokens after the prompt's context, zeros (as many) after the negative
    prompt's; the tokens from the tower's last hidden state (transformers' `last_hidden_state`). Weight 0 still
    appends its zeros, as there."""
    model = tiny_model("sd1", seed=3)
    controls, towers = folders(tmp_path)
    tower = tiny_tower_file(towers, "clip_vitl", width=32, projection=16)
    adapter = tencent_adapter(model.cfg.unet.context_dim)
    torch.save(adapter.state_dict(), controls / "t2iadapter_style_sd14v1.pth")
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(6))
    unit = ControlUnit("t2iadapter_style_sd14v1", image, module="t2ia_style_clipvision", weight=0.7)
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=[unit], **SETTINGS)
    request = dataclasses.replace(request, steps=STEPS)
    pipeline = Pipeline(model, controlnets=find_control_models(controls), clip_vision=towers)
    ours = generate(pipeline, request).images

    pipe = diffusers_pipeline(model, StableDiffusionPipeline)
    with torch.no_grad():
        no_mask = np.zeros(image.shape[-2:], np.uint8)  # (the extension's alpha for an unmasked unit)
        tokens = 0.7 * adapter(tower(pixel_values=reference_pixels(image, no_mask)).last_hidden_state)  # (1, 3, C)
        prompt = torch.cat([embeddings(pipe, model, PROMPT), tokens], dim=1)
        negative = torch.cat([embeddings(pipe, model, NEGATIVE), torch.zeros_like(tokens)], dim=1)
        theirs = pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=STEPS, eta=0.0, height=H,
            width=W, guidance_scale=SETTINGS["cfg_scale"], generator=torch.Generator().manual_seed(3), output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05  # the style tokens changed the image


def revision_reference(tower, image, noise: float, seed: int) -> torch.Tensor:
    """The extension's revision embedding: the tower's image_embeds, then DDPM's q_sample on the linear schedule of
    1000 steps from β = 1e-4 to 2e-2 at k = int(1000 · noise); ε from the request's seed (the extension's draw is
    unseeded)."""
    betas = np.linspace(1e-4**0.5, 2e-2**0.5, 1000, dtype=np.float64) ** 2
    abar = float(np.cumprod(1.0 - betas)[int(noise * 1000)])
    with torch.no_grad():
        e = tower(pixel_values=reference_pixels(image, np.zeros(image.shape[-2:], np.uint8))).image_embeds
    epsilon = torch.randn(e.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    return abar**0.5 * e + (1 - abar) ** 0.5 * epsilon


@pytest.mark.parametrize("module", ["revision_clipvision", "revision_ignore_prompt"])
def test_txt2img_with_revision_matches_diffusers_sdxl(tmp_path, module):
    """SDXL's pooled text replaced by w · the noise-augmented image embedding on the prompt's rows and by zeros on
    the negative's; revision_ignore_prompt also zeroes both contexts. The model needs no file ("None")."""
    model = tiny_model("sdxl", seed=11)
    _, towers = folders(tmp_path)
    tower = tiny_tower_file(towers, "clip_g", width=32, projection=model.cfg.text2.embed_dim)
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(6))
    unit = ControlUnit("None", image, module=module, weight=0.8, threshold_a=0.3)
    request = GenerationRequest([PROMPT], [5], [NEGATIVE], width=48, height=64, steps=STEPS, sampler="ddim",
                                cfg_scale=5.0, controls=[unit])  # fmt: skip
    ours = generate(Pipeline(model, clip_vision=towers), request).images

    pipe = xl_pipeline(model)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    with torch.no_grad():
        context, _ = reference_conditioning(model, encoders, PROMPT)
        negative, negative_pooled = reference_conditioning(model, encoders, NEGATIVE)
        if module == "revision_ignore_prompt":
            context, negative = torch.zeros_like(context), torch.zeros_like(negative)
        theirs = pipe(
            prompt_embeds=context, pooled_prompt_embeds=0.8 * revision_reference(tower, image, 0.3, seed=5),
            negative_prompt_embeds=negative, negative_pooled_prompt_embeds=torch.zeros_like(negative_pooled),
            height=64, width=48, num_inference_steps=STEPS, guidance_scale=5.0, eta=0.0,
            generator=torch.Generator().manual_seed(5), output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05


def test_revision_through_the_server(tiny_models, serve, tmp_path):
    """A revision unit (model "None") sent to `ldm serve` over a real socket: listed as available where clip_g is,
    the same image as the library's; refused on an SD 1.x model in one line naming the unit."""
    model = tiny_model("sdxl", seed=11)
    _, towers = folders(tmp_path)
    tiny_tower_file(towers, "clip_g", width=32, projection=model.cfg.text2.embed_dim)
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(6))
    unit = {"enabled": True, "module": "revision_clipvision", "model": "None", "image": b64(to_pil(image[0])),
            "weight": 0.8, "threshold_a": 0.3}  # fmt: skip
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 5, "steps": 3, "width": 48, "height": 64,
            "cfg_scale": 5, "sampler_name": "DDIM", "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
    with serve(create_app(Pipeline(model, clip_vision=towers))) as base:
        modules = call(base, "/controlnet/module_list")[1]["module_detail"]
        status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert modules["revision_clipvision"]["available"] and not modules["clip_vision"]["available"]
    assert status == 200 and len(answer["images"]) == 1  # (no detected map)
    control = ControlUnit("None", image, module="revision_clipvision", weight=0.8, threshold_a=0.3)
    request = GenerationRequest([PROMPT], [5], [NEGATIVE], width=48, height=64, steps=3, sampler="ddim",
                                cfg_scale=5.0, controls=[control])  # fmt: skip
    library = generate(Pipeline(model, clip_vision=towers), request).images[0]
    served = torch.from_numpy(np.asarray(decode(answer["images"][0])).copy()).permute(2, 0, 1)
    assert torch.equal(served, (library * 255).round().byte())
    with serve(create_app(Pipeline(tiny_models["sd1"], clip_vision=towers))) as base:
        status, refused = call(base, "/sdapi/v1/txt2img", {**body, "sampler_name": "Euler"})
    assert status == 422 and refused["detail"].startswith("ControlNet unit 0: revision only supports SDXL")


def test_units_that_cannot_run_are_refused_in_one_line(tmp_path, tiny_models):
    """A style adapter with another module or a tower of another width, a style adapter on a model of another context
    width, revision on SD 1.x or with a tower of another width: RequestError naming the unit, before any sampling."""
    controls, towers = folders(tmp_path)
    tiny_tower_file(towers, "clip_vitl", width=48, projection=16)
    tiny_tower_file(towers, "clip_g", width=32, projection=20)
    sd1 = tiny_models["sd1"]
    torch.save(tencent_adapter(sd1.cfg.unet.context_dim).state_dict(), controls / "style.pth")
    torch.save(tencent_adapter(sd1.cfg.unet.context_dim + 8).state_dict(), controls / "style_wide.pth")
    models = find_control_models(controls)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sdxl = tiny_model("sdxl", seed=11)
    cases = [
        (sd1, "style", "ip-adapter_clip_sd15", "a T2I style adapter needs the module clip_vision, not"),
        (sd1, "style", "t2ia_style_clipvision", "takes CLIP tokens 32 wide; the tower clip_vitl gives 48"),
        (sd1, "style_wide", "t2ia_style_clipvision", "does not fit this model's context"),
        (sd1, "None", "revision_clipvision", "revision only supports SDXL"),
        (sdxl, "None", "revision_ignore_prompt", "the tower clip_g gives embeddings 20 wide; this model's pooled"),
    ]
    for model, name, module, message in cases:
        unit = ControlUnit(name, image, module=module, title="tower unit")
        request = GenerationRequest(["a cat"], [1], width=32, height=32, steps=2, controls=[unit])
        with pytest.raises(RequestError, match=message) as raised:
            resolve(request, Pipeline(model, controlnets=models, clip_vision=towers))
        assert str(raised.value).startswith("tower unit: ") and "\n" not in str(raised.value)


def test_a_hires_checkpoint_of_another_family_is_checked_too(tmp_path, tiny_models):
    """Revision acts in both passes (its hr_option aside, as the extension): with an SD 1.x hires checkpoint behind
    an image upscaler it is refused in one line before any work; a style unit kept to the first pass runs."""
    from latent_diffusion.pipeline.request import HiresFix

    sdxl, sd1 = tiny_model("sdxl", seed=11), tiny_models["sd1"]
    controls, towers = folders(tmp_path)
    tiny_tower_file(towers, "clip_g", width=32, projection=sdxl.cfg.text2.embed_dim)
    tiny_tower_file(towers, "clip_vitl", width=32, projection=16)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    hires = HiresFix(scale=1.5, upscaler="Lanczos", steps=1)
    unit = ControlUnit("None", image, module="revision_clipvision", hr_option="low")
    request = GenerationRequest(["a cat"], [1], width=32, height=32, steps=1, hires=hires, controls=[unit])
    pipeline = Pipeline(sdxl, clip_vision=towers, hires_pipeline=Pipeline(sd1, clip_vision=towers))
    with pytest.raises(RequestError, match="^ControlNet unit 0: in the hires pass: revision only supports SDXL"):
        resolve(request, pipeline)
    torch.save(tencent_adapter(sdxl.cfg.unet.context_dim).state_dict(), controls / "style.pth")
    style = ControlUnit("style", image, module="t2ia_style_clipvision", hr_option="low")
    pipeline = Pipeline(sdxl, controlnets=find_control_models(controls), clip_vision=towers,
                        hires_pipeline=Pipeline(sd1, clip_vision=towers))  # fmt: skip
    plan = resolve(dataclasses.replace(request, controls=[style]), pipeline)
    assert plan.hires.controls[0].acts is False
    with pytest.raises(RequestError, match='in the hires pass: .* context .*hr_option "low" keeps the unit out of it'):
        resolve(dataclasses.replace(request, controls=[dataclasses.replace(style, hr_option="both")]), pipeline)
