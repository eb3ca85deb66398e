"""End to end: our txt2img / img2img / inpainting against diffusers' Stable Diffusion pipelines assembled
from the same tiny random weights (converted with diffusers' own converters), same seeds, DDIM 10 steps."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from latent_diffusion.generate import GenerationSettings, generate

from test_reference import diffusers_unet, diffusers_vae, transformers_text_encoder

SETTINGS = GenerationSettings(steps=10, sampler="ddim", cfg_scale=7.5)
PROMPT, NEGATIVE = "a small red circle on a blue background", "blurry"


def diffusers_pipeline(model, cls):
    sd = model.state_dict()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        prediction_type="epsilon" if model.parameterization == "eps" else "v_prediction",
    )  # fmt: skip
    return cls(
        vae=diffusers_vae(model.cfg, sd), text_encoder=transformers_text_encoder(model.cfg, sd), tokenizer=None,
        unet=diffusers_unet(model.cfg, sd), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def embeddings(pipe, model, prompt):
    """Prompt embeddings from diffusers' (transformers') text encoder, on our token ids (the tokenizer is
    checked against OpenAI's separately)."""
    tokens, _ = model.cond_stage_model.tokenize([prompt])
    return pipe.text_encoder(tokens).last_hidden_state


def run_diffusers(pipe, model, seed, **kwargs):
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeddings(pipe, model, PROMPT), negative_prompt_embeds=embeddings(pipe, model, NEGATIVE),
            num_inference_steps=SETTINGS.steps, guidance_scale=SETTINGS.cfg_scale, eta=0.0,
            generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs,
        ).images  # fmt: skip


@pytest.fixture(scope="module")
def image():
    """A smooth test picture (1, 3, 64, 64) in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, (x * y) ** 0.5])[None]


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_txt2img_matches_stable_diffusion_pipeline(tiny_models, variant):
    model = tiny_models[variant]
    theirs = run_diffusers(diffusers_pipeline(model, StableDiffusionPipeline), model, 5, height=64, width=48)
    ours = generate(model, [PROMPT], [5], SETTINGS, negative_prompts=[NEGATIVE], width=48, height=64)
    assert ours.shape == theirs.shape == (1, 3, 64, 48)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    assert theirs.std() > 0.01


def test_img2img_matches_pipeline(tiny_models, image):
    model = tiny_models["sd1"]
    settings = GenerationSettings(steps=10, sampler="ddim", cfg_scale=7.5, strength=0.6)
    pipe = diffusers_pipeline(model, StableDiffusionImg2ImgPipeline)
    theirs = run_diffusers(pipe, model, 11, image=image, strength=0.6)
    ours = generate(model, [PROMPT], [11], settings, negative_prompts=[NEGATIVE], init_image=image * 2 - 1)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_inpainting_model_matches_pipeline(tiny_models, image):
    model = tiny_models["inpaint"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1.0
    theirs = run_diffusers(diffusers_pipeline(model, StableDiffusionInpaintPipeline), model, 7, image=image,
                           mask_image=mask, height=64, width=64)  # fmt: skip
    ours = generate(model, [PROMPT], [7], SETTINGS, negative_prompts=[NEGATIVE], init_image=image * 2 - 1, mask=mask)
    torch.testing.assert_close(ours, mask * theirs + (1 - mask) * image, atol=1e-3, rtol=0)
    # unmasked pixels are the input's (up to the float rounding of x -> 2x - 1 -> x, far below 1/255)
    torch.testing.assert_close(ours[..., :16, :], image[..., :16, :], atol=1e-6, rtol=0)


def test_seed_convention(tiny_models):
    """Image i of a batch with seed s equals a single generation with seed s + i (ancestral sampler: the
    per-step noise follows the seed too)."""
    model = tiny_models["sd1"]
    settings = GenerationSettings(steps=4, sampler="euler_ancestral", cfg_scale=3.0)
    batch = generate(model, ["a", "b", "c"], [40, 41, 42], settings, width=32, height=32)
    alone = generate(model, ["b"], [41], settings, width=32, height=32)
    again = generate(model, ["b"], [41], settings, width=32, height=32)
    assert torch.equal(alone, again)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)  # batched matmuls may round differently
    assert not torch.allclose(batch[0], batch[2])


def test_ddim_eta_adds_noise(tiny_models):
    model = tiny_models["sd1"]
    runs = [generate(model, ["a"], [9], GenerationSettings(steps=4, sampler="ddim", eta=eta), width=32, height=32)
            for eta in (0.0, 1.0, 1.0)]  # fmt: skip
    assert torch.equal(runs[1], runs[2]) and not torch.allclose(runs[0], runs[1])


def test_standard_model_inpainting_keeps_the_known_region(tiny_models, image):
    model = tiny_models["sd1"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1.0
    out = generate(model, [PROMPT], [3], GenerationSettings(steps=6, sampler="euler"), init_image=image * 2 - 1,
                   mask=mask)  # fmt: skip
    torch.testing.assert_close(out[..., :32], image[..., :32], atol=1e-6, rtol=0)
    assert (out[..., 32:] - image[..., 32:]).abs().mean() > 0.01


@pytest.mark.parametrize(
    "settings,kwargs,message",
    [
        (GenerationSettings(steps=0), {}, "steps must be at least 1"),
        (GenerationSettings(strength=1.5), {}, r"strength must be in \(0, 1\]"),
        (GenerationSettings(strength=0.0), {}, r"strength must be in \(0, 1\]"),
        (GenerationSettings(sampler="k_lms"), {}, "unknown sampler 'k_lms'; choose one of ddpm, ddim, plms"),
        (GenerationSettings(), {"width": 60}, "positive multiples of 8"),
        (GenerationSettings(), {"init_image": torch.zeros(1, 3, 64, 64), "mask": torch.zeros(1, 1, 32, 32)},
         "mask size"),
    ],
)  # fmt: skip
def test_bad_settings(tiny_models, settings, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_models["sd1"], ["a"], [0], settings, **kwargs)


def test_standard_model_inpainting_matches_pipeline(tiny_models, image):
    """A 4-channel model in diffusers' inpainting pipeline: the known region is re-noised to the sampler's level
    and blended in after every step (the final pixel paste alone would not match)."""
    model = tiny_models["sd1"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 16:56] = 1.0
    pipe = diffusers_pipeline(model, StableDiffusionInpaintPipeline)
    theirs = run_diffusers(pipe, model, 21, image=image, mask_image=mask, height=64, width=64)
    ours = generate(model, [PROMPT], [21], SETTINGS, negative_prompts=[NEGATIVE], init_image=image * 2 - 1, mask=mask)
    torch.testing.assert_close(ours, mask * theirs + (1 - mask) * image, atol=1e-3, rtol=0)


def test_ddpm_keeps_its_timesteps_with_karras_on(tiny_models):
    model = tiny_models["sd1"]
    runs = [generate(model, ["a"], [4], GenerationSettings(steps=3, sampler="ddpm", karras=k), width=16, height=16)
            for k in (True, False)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
