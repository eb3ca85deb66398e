"""The ControlNet extension's changes beside the control model (`control_fixes.py`): the colour fixes' and inpaint_only's
change of the U-Net's output against hook.py's code (1.1.455) written out here, their post-processing after the
decode against controlnet.py's, the +lama noise against its `HackedImageRNG`, and inpaint_only's fallback when the
request inpaints."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.models.ldm import LatentDiffusion
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.control_fixes import after_decode, box_blur, first_noise
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, hint_field
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import infotext, infotext_fields, resolve
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest

from conftest import randomize, seeded, tiny_config

H, W = 64, 48
SEED = 7


@pytest.fixture(scope="module")
def models(tiny_models):
    """The tiny SD 1.x model and one like it that predicts v."""
    with seeded(5):
        v_model = randomize(LatentDiffusion(dataclasses.replace(tiny_config("sd1"), parameterization="v")), 5).eval()
    return {"eps": tiny_models["sd1"], "v": v_model}


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    """A tiny ControlNet (zero convolutions not zero) for the tiny U-Net."""
    path = tmp_path_factory.mktemp("fixes")
    with seeded(1):
        save_file(randomize(ControlNet(models["eps"].cfg.unet), seed=1).state_dict(), path / "cn.safetensors")
    return path


def picture(seed: int = 0, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, c, H, W, generator=g) * 255).round() / 255  # (8-bit exact, as the preprocessors read)


def hole() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W)
    mask[:, :, 16:40, 8:32] = 1
    return mask


def request(units: list[ControlUnit], **settings) -> GenerationRequest:
    options = dict(width=W, height=H, steps=3, sampler="euler", cfg_scale=5.0)
    return GenerationRequest(["a red circle"], [SEED], [""], controls=units, **(options | settings))


# --- hook.py (1.1.455), the end of UnetHook's forward, written out for an ε-model ------------------------------------


def ref_blur(x, k):
    y = F.pad(x, (k, k, k, k), mode="replicate")
    return F.avg_pool2d(y, (k * 2 + 1, k * 2 + 1), stride=(1, 1))


def ref_post_processing(h, x, timesteps, params, alphas_cumprod, cond_mark, is_in_high_res_fix):
    """params: dicts of name, weight, threshold_a, threshold_b, used_hint_cond, used_hint_cond_latent, hr_disabled."""
    sqrt_recip, sqrt_recipm1 = (1.0 / alphas_cumprod).sqrt(), (1.0 / alphas_cumprod - 1).sqrt()

    def extract(a, t):
        return a[t].reshape(-1, 1, 1, 1)

    def predict_start_from_noise(x_t, t, noise):
        return extract(sqrt_recip, t) * x_t - extract(sqrt_recipm1, t) * noise

    def predict_noise_from_start(x_t, t, x0):
        return (extract(sqrt_recip, t) * x_t - x0) / extract(sqrt_recipm1, t)

    for param in params:
        if "colorfix" not in param["name"]:
            continue
        k = int(param["threshold_a"])
        if is_in_high_res_fix and not param["hr_disabled"]:
            k *= 2
        xt = x[:, :4, :, :]
        x0_origin = param["used_hint_cond_latent"]
        t = torch.round(timesteps.float()).long()
        x0_prd = predict_start_from_noise(xt, t, h)
        x0 = x0_prd - ref_blur(x0_prd, k) + ref_blur(x0_origin, k)
        if "+sharp" in param["name"]:
            detail_weight = float(param["threshold_b"]) * 0.01
            neg = detail_weight * ref_blur(x0, k) + (1 - detail_weight) * x0
            x0 = cond_mark * x0 + (1 - cond_mark) * neg
        eps_prd = predict_noise_from_start(xt, t, x0)
        w = max(0.0, min(1.0, float(param["weight"])))
        h = eps_prd * w + h * (1 - w)
    for param in params:
        if "inpaint_only" not in param["name"] or param["used_hint_cond"].shape[1] != 4:
            continue
        xt = x[:, :4, :, :]
        mask = param["used_hint_cond"][:, 3:4, :, :]
        mask = torch.nn.functional.max_pool2d(mask, (10, 10), stride=(8, 8), padding=1)
        x0_origin = param["used_hint_cond_latent"]
        t = torch.round(timesteps.float()).long()
        x0_prd = predict_start_from_noise(xt, t, h)
        x0 = x0_prd * mask + x0_origin * (1 - mask)
        eps_prd = predict_noise_from_start(xt, t, x0)
        w = max(0.0, min(1.0, float(param["weight"])))
        h = eps_prd * w + h * (1 - w)
    return h


def image_latent(model, hint):
    """The control image's latent as the pipeline draws it: a posterior sample, its noise from the request's seed."""
    f = model.cfg.autoencoder.downsampling_factor
    shape = (1, model.cfg.autoencoder.embed_dim, H // f, W // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    return model.autoencoder_encode(hint[:1, :3] * 2 - 1, noise=noise)


def outputs(model, controls, rows: int = 2):
    """One evaluation of the controlled U-Net on [unconditional; conditional] rows -> (x_in, t, marks, the U-Net's
    own output, the output after the fixes)."""
    g = torch.Generator().manual_seed(3)
    f = model.cfg.autoencoder.downsampling_factor
    x_in = torch.randn(rows, model.cfg.autoencoder.embed_dim, H // f, W // f, generator=g)
    t = torch.full((rows,), 612.4)
    marks = torch.tensor([0.0, 1.0])
    cond = {"crossattn": torch.randn(rows, 77, model.cfg.unet.context_dim, generator=g), MARK: marks}
    cond |= {hint_field(k): c.hint.expand(rows, -1, -1, -1) for k, c in enumerate(controls)}
    own = []
    hook = model.model.register_forward_hook(lambda module, args, out: own.append(out.float()))
    try:
        with torch.no_grad():
            fixed = controlled_unet(model, controls, SamplingClock(3))(x_in, t, cond)
    finally:
        hook.remove()
    return x_in, t, marks[:, None, None, None], own[-1], fixed


@pytest.mark.parametrize("hires", [None, "acting", "low only"])
def test_the_fixes_change_the_prediction_as_the_extension(models, folder, hires):
    model = models["eps"]
    units = [  # (the inpaint unit first: the colour fixes still come first, as in the extension)
        ControlUnit("cn", picture(1), module="inpaint_only", mask=hole(), weight=1.3, guidance_end=0.0),
        ControlUnit("cn", picture(2), module="tile_colorfix+sharp", weight=0.7, threshold_a=3, threshold_b=1.5),
    ]
    plan = resolve(request(units), Pipeline(model, controlnets=find_control_models(folder)))
    controls = plan.controls
    if hires is not None:  # (a hires pass: the colour fix's radius doubles where the unit acts in it)
        controls = [dataclasses.replace(c, hires=True, acts=hires == "acting") for c in controls]
    x_in, t, marks, own, fixed = outputs(model, controls)
    params = [
        dict(name=c.unit.module, weight=c.unit.weight, threshold_a=c.unit.threshold_a, threshold_b=c.unit.threshold_b,
             used_hint_cond=c.hint.expand(2, -1, -1, -1), used_hint_cond_latent=image_latent(model, c.hint),
             hr_disabled=not c.acts)
        for c in controls
    ]  # fmt: skip
    assert controls[0].hint.shape[1] == 4 and controls[1].hint.shape[1] == 3
    expected = ref_post_processing(own, x_in, t, params, model.alphas_cumprod, marks, hires is not None)
    torch.testing.assert_close(fixed, expected, atol=2e-5, rtol=1e-5)
    assert (fixed - own).abs().max() > 0.1


def test_inpaint_only_keeps_a_v_models_latent_outside_the_mask(models, folder):
    """For a v-model the fixed output, read as v, gives the blended x0 (the extension would read it as ε)."""
    model = models["v"]
    units = [ControlUnit("cn", picture(1), module="inpaint_only", mask=hole())]
    plan = resolve(request(units), Pipeline(model, controlnets=find_control_models(folder)))
    x_in, t, _, own, fixed = outputs(model, plan.controls)
    a = model.alphas_cumprod[t.round().long()].reshape(-1, 1, 1, 1)

    def x0(v):  # x0 = √ᾱ·x_t − √(1−ᾱ)·v
        return a.sqrt() * x_in - (1 - a).sqrt() * v

    m = F.max_pool2d(plan.controls[0].hint[:, 3:4], 10, stride=8, padding=1)
    expected = x0(own) * m + image_latent(model, plan.controls[0].hint) * (1 - m)
    torch.testing.assert_close(x0(fixed), expected, atol=2e-5, rtol=1e-5)
    assert 0 < m.mean() < 1


def test_box_blur_is_the_mean_of_the_clamped_window():
    x = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = 2
    rows, cols = torch.arange(5), torch.arange(7)
    expected = torch.zeros_like(x)
    for i in range(5):
        for j in range(7):
            r = (rows[i] + torch.arange(-k, k + 1)).clamp(0, 4)
            c = (cols[j] + torch.arange(-k, k + 1)).clamp(0, 6)
            expected[..., i, j] = x[..., r[:, None], c[None, :]].mean(dim=(-1, -2))
    torch.testing.assert_close(box_blur(x, k), expected)


# --- controlnet.py (1.1.455): the post-processors after the decode ----------------------------------------------------


def ref_inpaint_only_post_processing(x, final_inpaint_feed):
    final_inpaint_mask = final_inpaint_feed[:, 3, :, :].astype(np.float32)
    final_inpaint_raw = torch.from_numpy(final_inpaint_feed[:, :3].astype(np.float32))
    sigma = 7
    post = []
    for m in final_inpaint_mask:
        m = cv2.dilate(m, np.ones((sigma, sigma), dtype=np.uint8))
        post.append(cv2.blur(m, (sigma, sigma))[None, None])
    final_inpaint_mask = torch.from_numpy(np.concatenate(post, axis=0))
    out = []
    for i in range(len(x)):
        j = 0 if i >= final_inpaint_raw.shape[0] else i
        y = final_inpaint_mask[j] * x[i].clip(0, 1) + (1 - final_inpaint_mask[j]) * final_inpaint_raw[j]
        out.append(y.clip(0, 1))
    return torch.stack(out)


def ref_recolor_post_processing(x, control, luminance):
    final_feed = (control[:, 0].numpy().astype(np.float32) * 255).clip(0, 255).astype(np.uint8)
    out = []
    for i in range(len(x)):
        h = (x[i].numpy().transpose((1, 2, 0)) * 255).clip(0, 255).astype(np.uint8)
        h = cv2.cvtColor(h, cv2.COLOR_RGB2LAB if luminance else cv2.COLOR_RGB2HSV)
        h[:, :, 0 if luminance else 2] = final_feed[min(i, len(final_feed) - 1)]
        h = cv2.cvtColor(h, cv2.COLOR_LAB2RGB if luminance else cv2.COLOR_HSV2RGB)
        out.append(torch.from_numpy((h.astype(np.float32) / 255.0).transpose((2, 0, 1))).clip(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("module", ["inpaint_only", "recolor_luminance", "recolor_intensity"])
def test_after_decode_matches_the_extensions_post_processing(models, folder, module):
    mask = hole() if module == "inpaint_only" else None
    units = [ControlUnit("cn", picture(1), module=module, mask=mask)]
    plan = resolve(request(units), Pipeline(models["eps"], controlnets=find_control_models(folder)))
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4)) * 1.2 - 0.1
    ours = after_decode(images, plan.controls, range(2))
    hint = plan.controls[0].hint
    if module == "inpaint_only":
        expected = ref_inpaint_only_post_processing(images, hint.numpy())
    else:
        expected = ref_recolor_post_processing(images, hint, module == "recolor_luminance")
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    if module == "recolor_luminance":  # what it is for: the lightness is the map's (on greys, which stay in gamut)
        greys = after_decode(images.mean(1, keepdim=True).expand(-1, 3, -1, -1), plan.controls, range(2))
        lab = cv2.cvtColor((greys[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), cv2.COLOR_RGB2LAB)
        lightness = (hint[0, 0].numpy() * 255).round().astype(np.uint8)
        assert np.abs(lab[:, :, 0].astype(int) - lightness).max() <= 1


def test_inpaint_only_gives_back_the_image_outside_the_mask(models, folder):
    """txt2img with an inpaint_only unit: beyond the softened mask, the image is the control image's pixels."""
    units = [ControlUnit("cn", picture(1), module="inpaint_only", mask=hole())]
    pipeline = Pipeline(models["eps"], controlnets=find_control_models(folder))
    images = generate(pipeline, request(units)).images
    soft = cv2.blur(cv2.dilate(hole()[0, 0].numpy(), np.ones((7, 7), np.uint8)), (7, 7))
    outside, inside = torch.from_numpy(soft == 0), torch.from_numpy(soft == 1)
    torch.testing.assert_close(images[0][:, outside], picture(1)[0][:, outside], atol=1e-6, rtol=0)
    assert (images[0][:, inside] - picture(1)[0][:, inside]).abs().mean() > 0.05


def test_lama_leans_the_first_noise_toward_the_fill(models, folder):
    """+lama's first noise: q_sample of the fill's latent at t = 999 (`HackedImageRNG`)."""
    model = models["eps"]
    units = [ControlUnit("cn", picture(1), module="inpaint_only", mask=hole())]
    plan = resolve(request(units), Pipeline(model, controlnets=find_control_models(folder)))
    lama = [dataclasses.replace(c, unit=dataclasses.replace(c.unit, module="inpaint_only+lama")) for c in plan.controls]
    noise = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    a = model.alphas_cumprod[999]
    expected = a.sqrt() * image_latent(model, plan.controls[0].hint) + (1 - a).sqrt() * noise
    torch.testing.assert_close(first_noise(noise, lama, range(2), model), expected, atol=1e-6, rtol=0)
    assert first_noise(noise, plan.controls, range(2), model) is noise  # (inpaint_only alone: the noise as drawn)


def test_inpaint_only_falls_back_to_inpaint_when_the_request_inpaints(models, folder):
    pipeline = Pipeline(models["eps"], controlnets=find_control_models(folder))
    unit = ControlUnit("cn", picture(1), module="inpaint_only", mask=hole())
    inpainting = resolve(request([unit], init_image=picture(2), mask=hole()), pipeline)
    assert inpainting.controls[0].unit.module == "inpaint"
    assert "Module: inpaint," in infotext(inpainting.request, 0, infotext_fields(inpainting))
    assert resolve(request([unit], init_image=picture(2)), pipeline).controls[0].unit.module == "inpaint_only"


def test_a_colour_fixs_thresholds_and_seed_keep_requests_apart(models, folder):
    pipeline = Pipeline(models["eps"], controlnets=find_control_models(folder))
    keys = [
        resolve(request([ControlUnit("cn", picture(1), module=module, threshold_a=a)]), pipeline).controls[0].key()
        for module, a in (("tile_colorfix", 4), ("tile_colorfix", 6), ("canny", 90), ("canny", 110))
    ]
    assert keys[0] != keys[1] and keys[2] == keys[3]  # (canny's thresholds change its maps alone: one batch)
    # a colour fix's image latent is drawn from the request's seed: requests of other seeds do not share a batch
    units = [ControlUnit("cn", picture(1), module="tile_colorfix")]
    seeded_keys = {resolve(dataclasses.replace(request(units), seeds=[s]), pipeline).controls[0].key() for s in (1, 2)}
    assert len(seeded_keys) == 2


def test_an_inpainting_model_sees_the_inpaint_units_mask_and_image(tiny_models, folder):
    """hook.py's "Replace x_t to support inpaint models": an inpainting U-Net (9 channels) with an inpaint unit, here
    in txt2img, sees max_pool₈(alpha > 0.5) and the latent of the unit's image with those pixels grey (its posterior
    noise the unit's first draw), in place of the request's all-hole input."""
    model = tiny_models["inpaint"]
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args: seen.append(args[2]["concat"]))
    unit = ControlUnit("cn", picture(1), module="inpaint", mask=hole())
    try:
        generate(Pipeline(model, controlnets=find_control_models(folder)), request([unit], steps=2))
    finally:
        hook.remove()
    mask = hole()
    grey = picture(1) * (1 - mask) + 0.5 * mask
    noise = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(SEED))
    expected = torch.cat([F.max_pool2d(mask, 8), model.autoencoder_encode(grey * 2 - 1, noise=noise)], dim=1)
    assert len(seen) == 2  # (two Euler steps, a guided call each)
    for concat in seen:
        torch.testing.assert_close(concat, expected.expand(len(concat), -1, -1, -1), atol=1e-5, rtol=0)


def test_inpaint_only_in_a_hires_fix_keeps_the_hires_control_image(models, folder):
    """txt2img with the hires fix and an inpaint_only unit: both passes' outputs are fixed with their pass's map (the
    hires one at twice the size), and the final image is the hires map's colours beyond its softened mask."""
    from latent_diffusion.pipeline.request import HiresFix

    units = [ControlUnit("cn", picture(1), module="inpaint_only", mask=hole(), resize_mode="resize")]
    hires = request(units, steps=2, hires=HiresFix(scale=2.0, steps=2, upscaler="Latent"))
    pipeline = Pipeline(models["eps"], controlnets=find_control_models(folder))
    plan = resolve(hires, pipeline)
    images = generate(pipeline, hires).images
    hint = plan.hires.controls[0].hint  # (1, 4, 2H, 2W)
    assert images.shape == (1, 3, 2 * H, 2 * W) and hint.shape == (1, 4, 2 * H, 2 * W)
    soft = cv2.blur(cv2.dilate(hint[0, 3].numpy(), np.ones((7, 7), np.uint8)), (7, 7))
    outside = torch.from_numpy(soft == 0)
    # (the map enlarged by INTER_CUBIC in float32 overshoots [0, 1] a little; the post-processing clips, as there)
    torch.testing.assert_close(images[0][:, outside], hint[0, :3].clamp(0, 1)[:, outside], atol=1e-6, rtol=0)
