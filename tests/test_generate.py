"""End to end: our txt2img / img2img / inpainting against diffusers' Stable Diffusion pipelines assembled
from the same tiny random weights (converted with diffusers' own converters), same seeds, DDIM 10 steps."""

import dataclasses

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from latent_diffusion import LatentDiffusion
from latent_diffusion.pipeline.generate import NonFiniteError, generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import GenerationRequest, RequestError
from latent_diffusion.sampling.denoiser import Denoiser

from test_reference import diffusers_unet, diffusers_vae, transformers_text_encoder

PROMPT, NEGATIVE = "a small red circle on a blue background", "blurry"
SETTINGS = dict(steps=10, sampler="ddim", cfg_scale=7.5, step_count="diffusers")  # (img2img counts as diffusers')


def ours(model, seed, **fields):
    """Our images for PROMPT and NEGATIVE with SETTINGS (fields override)."""
    request = GenerationRequest([PROMPT], [seed], negative_prompts=[NEGATIVE], **{**SETTINGS, **fields})
    return generate(model, request).images


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
            num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["cfg_scale"], eta=0.0,
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
    images = ours(model, 5, width=48, height=64)
    assert images.shape == theirs.shape == (1, 3, 64, 48)
    torch.testing.assert_close(images, theirs, atol=1e-3, rtol=0)
    assert theirs.std() > 0.01


def test_img2img_matches_pipeline(tiny_models, image):
    model = tiny_models["sd1"]
    pipe = diffusers_pipeline(model, StableDiffusionImg2ImgPipeline)
    theirs = run_diffusers(pipe, model, 11, image=image, strength=0.6)
    torch.testing.assert_close(ours(model, 11, init_image=image, strength=0.6), theirs, atol=1e-3, rtol=0)


def test_inpainting_model_matches_pipeline(tiny_models, image):
    model = tiny_models["inpaint"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1.0
    theirs = run_diffusers(diffusers_pipeline(model, StableDiffusionInpaintPipeline), model, 7, image=image,
                           mask_image=mask, height=64, width=64)  # fmt: skip
    images = ours(model, 7, init_image=image, mask=mask)
    torch.testing.assert_close(images, mask * theirs + (1 - mask) * image, atol=1e-3, rtol=0)
    assert torch.equal(images[..., :16, :], image[..., :16, :])  # unmasked pixels are the input's


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_seed_convention(tiny_models, sampler):
    """Image i of a batch with seed s equals a single generation with seed s + i (ancestral sampler: the
    per-step noise follows the seed too; SDE sampler: each image's Brownian tree is seeded with its seed)."""
    model = tiny_models["sd1"]
    settings = dict(steps=4, sampler=sampler, cfg_scale=3.0, width=32, height=32)
    batch = generate(model, GenerationRequest(["a", "b", "c"], [40, 41, 42], batch_size=3, **settings)).images
    alone = generate(model, GenerationRequest(["b"], [41], **settings)).images
    again = generate(model, GenerationRequest(["b"], [41], **settings)).images
    assert torch.equal(alone, again)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)  # batched matmuls may round differently
    assert not torch.allclose(batch[0], batch[2])


def test_non_finite_latents_stop_the_run_one_step_late_naming_the_first_bad_step(tiny_models):
    """The check of step i is read after step i + 1 (the host never waits on the step it has just queued), so a
    U-Net that turns NaN at step 3 of 6 stops the run after step 4, and the error names step 3."""
    model = tiny_models["sd1"]
    calls = []

    def nan_from_the_third_call(module, args, out):
        calls.append(1)
        return out.fill_(float("nan")) if len(calls) >= 3 else out

    hook = model.unet.register_forward_hook(nan_from_the_third_call)
    try:
        with pytest.raises(NonFiniteError, match=r"^step 3 of 6 gave non-finite latents .* seeds \[5\]"):
            generate(model, GenerationRequest(["a"], [5], steps=6, sampler="euler", cfg_scale=1.0, width=32, height=32))
    finally:
        hook.remove()
    assert len(calls) == 4


def test_ddim_eta_adds_noise(tiny_models):
    model = tiny_models["sd1"]
    runs = [generate(model, GenerationRequest(["a"], [9], steps=4, sampler="ddim", eta=eta, width=32, height=32)).images
            for eta in (0.0, 1.0, 1.0)]  # fmt: skip
    assert torch.equal(runs[1], runs[2]) and not torch.allclose(runs[0], runs[1])


def test_standard_model_inpainting_keeps_the_known_region(tiny_models, image):
    model = tiny_models["sd1"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1.0
    out = generate(
        model, GenerationRequest([PROMPT], [3], steps=6, sampler="euler", init_image=image, mask=mask)
    ).images
    assert torch.equal(out[..., :32], image[..., :32])
    assert (out[..., 32:] - image[..., 32:]).abs().mean() > 0.01


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"steps": 0}, "steps must be between 1 and 10000"),
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"strength": float("nan")}, r"strength must be in \(0, 1\]"),
        ({"sampler": "k_dpm_fast"}, "unknown sampler 'k_dpm_fast'; choose one of ddpm, ddim, plms"),
        ({"width": 60}, "width and height must be positive multiples of 8, not 60x64"),
        ({"width": 16, "height": 16}, "the image is 16x16: too small for this model"),  # 1 value per group
        ({"seeds": [0, 1]}, "1 prompts need as many seeds"),
        ({"eta": -1.0}, "eta must be between 0 and 10, not -1.0"),
        ({"s_noise": 1e308}, "s_noise must be between 0 and 10"),
        ({"cfg_scale": 1e30}, r"cfg_scale must be between -100 and 100, not 1e\+30"),
        ({"prompts": ["(" * 1000 + "a" + ")" * 1000]}, r"prompt: an emphasis weight of 2.47e\+41 is beyond ±1000"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be between -100 and 100, not inf"),
        ({"init_image": torch.zeros(1, 3, 64, 64), "mask": torch.zeros(1, 1, 32, 32)}, "the mask is 32x32"),
        ({"mask": torch.zeros(1, 1, 32, 32)}, "a mask or a strength below 1 needs an init image"),
        ({"strength": 0.5}, "a mask or a strength below 1 needs an init image"),
        ({"steps": "20"}, "steps must be a whole number, not '20'"),
        ({"cfg_scale": "7"}, "cfg_scale must be a number, not '7'"),
    ],
)  # fmt: skip
def test_bad_requests(tiny_models, fields, message):
    request = GenerationRequest(**{"prompts": ["a"], "seeds": [0], "height": 64, **fields})
    with pytest.raises(RequestError, match=message):
        generate(tiny_models["sd1"], request)


def test_request_defaults_come_from_the_model(tiny_models):
    """Size and guidance: the model's own where its config has them, else its family's (SD 1.x: 512, 7.5)."""
    model = tiny_models["sd1"]
    resolved = resolve(GenerationRequest(["a"], [0]), Pipeline(model)).request
    assert (resolved.width, resolved.height, resolved.cfg_scale, resolved.negative_prompts) == (512, 512, 7.5, [""])
    small = LatentDiffusion(dataclasses.replace(model.cfg, image_size=32, cfg_scale=2.0))
    resolved = resolve(GenerationRequest(["a"], [0], width=48), Pipeline(small)).request
    assert (resolved.width, resolved.height, resolved.cfg_scale) == (48, 32, 2.0)


def test_an_inpainting_model_draws_without_a_mask_as_the_web_ui(tiny_models):
    """txt2img with an inpainting model: all of the image is the hole, as the web UI's `txt2img_image_conditioning`
    (a mask of ones, the latent of a mid-grey image: 0.5, so 0 in [-1, 1]); that latent drawn after the initial
    noise from the image's generator."""
    model = tiny_models["inpaint"]
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args: seen.append(args[2]["concat"]))
    try:
        images = generate(model, GenerationRequest(["a"], [5], width=32, height=24, steps=2)).images
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(5)
    torch.randn(4, 3, 4, generator=g)  # (the initial noise)
    grey = model.autoencoder_encode(torch.zeros(1, 3, 24, 32), noise=torch.randn(1, 4, 3, 4, generator=g))
    assert images.shape == (1, 3, 24, 32) and torch.isfinite(images).all()
    for concat in seen:  # ([unconditional; conditional] rows, each the same)
        assert (concat[:, :1] == 1).all()
        torch.testing.assert_close(concat[:, 1:], grey.expand(len(concat), -1, -1, -1), atol=1e-6, rtol=0)


def test_progress_sees_every_step_with_its_x0_and_the_result_has_infotexts(tiny_models):
    seen = []
    request = GenerationRequest(["a", "b", "c"], [1, 2, 3], steps=3, width=24, height=24, batch_size=2)
    result = generate(tiny_models["sd1"], request, progress=seen.append)
    assert [(p.step, p.total) for p in seen] == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    assert seen[0].sampler_step.denoised.shape == (2, 4, 3, 3) and seen[-1].sampler_step.x.shape == (1, 4, 3, 3)
    assert result.images.shape == (3, 3, 24, 24) and len(result.infotexts) == 3
    assert result.infotexts[2] == (
        "c\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 24x24"
    )


def test_sampler_options_reach_the_samplers_that_take_them(tiny_models):
    """eta and s_noise go to every sampler that takes them (and are written in the infotext where they differ from
    the sampler's default, under the web UI's names): Euler a with η = 0 is Euler; s_noise scales its fresh noise."""
    model, common = tiny_models["sd1"], {"width": 24, "height": 24, "steps": 3, "scheduler": "uniform"}
    run = lambda **kw: generate(model, GenerationRequest(["a"], [5], **common, **kw))  # noqa: E731
    default, euler = run(sampler="euler_ancestral"), run(sampler="euler")
    torch.testing.assert_close(run(sampler="euler_ancestral", eta=0.0).images, euler.images, atol=1e-6, rtol=0)
    quiet = run(sampler="euler_ancestral", s_noise=0.5)
    assert not torch.allclose(quiet.images, default.images, atol=1e-3)
    assert torch.equal(run(sampler="euler_ancestral", s_noise=1.0).images, default.images)
    assert "Sigma noise: 0.5" in quiet.infotexts[0] and "Sigma noise" not in default.infotexts[0]
    assert "Eta" not in run(sampler="euler", eta=0.5).infotexts[0]  # Euler takes no η: ignored, not written
    assert "Eta DDIM: 0.5" in run(sampler="ddim", eta=0.5).infotexts[0]  # the web UI's name for DDIM's η


def test_long_prompts_are_not_cut(tiny_models):
    """Words past the 75th token reach the model (in a second chunk) and change the image; nothing to warn about."""
    common = dict(steps=1, width=32, height=32, cfg_scale=1.0)
    long = generate(tiny_models["sd1"], GenerationRequest(["word " * 75 + "red cat"], [0], **common))
    cut = generate(tiny_models["sd1"], GenerationRequest(["word " * 75], [0], **common))
    assert long.warnings == [] and not torch.allclose(long.images, cut.images)


def test_standard_model_inpainting_matches_pipeline(tiny_models, image):
    """A 4-channel model in diffusers' inpainting pipeline: the known region is re-noised to the sampler's level
    and blended in after every step (the final pixel paste alone would not match)."""
    model = tiny_models["sd1"]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 16:56] = 1.0
    pipe = diffusers_pipeline(model, StableDiffusionInpaintPipeline)
    theirs = run_diffusers(pipe, model, 21, image=image, mask_image=mask, height=64, width=64)
    torch.testing.assert_close(ours(model, 21, init_image=image, mask=mask), mask * theirs + (1 - mask) * image,
                               atol=1e-3, rtol=0)  # fmt: skip


def test_ddpm_keeps_its_timesteps_whatever_the_scheduler(tiny_models):
    model = tiny_models["sd1"]
    runs = [generate(model, GenerationRequest(["a"], [4], steps=3, sampler="ddpm", scheduler=s, width=24, height=24))
            for s in ("karras", "automatic")]  # fmt: skip
    assert torch.equal(runs[0].images, runs[1].images)
    # the schedule asked for, as the web UI writes its `p.scheduler` where no sampler of its resolves one
    assert ["Schedule type: Karras" in runs[0].infotexts[0], "Schedule type: Automatic" in runs[1].infotexts[0]] == [
        True,
        True,
    ]


def test_guidance_batches_every_conditioning_field():
    """Each field of the conditioning goes into the U-Net call as [unconditional; conditional], and the guided
    output is out_u + s·(out_c − out_u)."""
    seen = {}

    def net(x, t, cond):
        seen.update(cond)
        return x + cond["vector"].sum(dim=1)[:, None, None, None]  # depends on the conditioning, per sample

    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    cond, uncond = {"vector": torch.full((1, 3), 2.0)}, {"vector": torch.zeros(1, 3)}
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor(1.5, dtype=torch.float64)
    x0 = Denoiser(net, alphas_cumprod, "eps", cond, uncond, cfg_scale=3.0)(x, sigma)
    assert torch.equal(seen["vector"], torch.cat([uncond["vector"], cond["vector"]]))
    x_in = x / (1 + 1.5**2) ** 0.5
    eps = x_in + 0.0 + 3.0 * ((x_in + 6.0) - x_in)  # out_u + s·(out_c − out_u)
    torch.testing.assert_close(x0, x - 1.5 * eps)


def test_one_init_image_per_image_across_batches(tiny_models, image):
    """Two different init images and masks, run one per U-Net batch: each image gets its own (as in one batch)."""
    images = torch.cat([image, image.flip(-1)])
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, ..., :32], masks[1, ..., 32:] = 1.0, 1.0
    common = dict(steps=3, sampler="euler", init_image=images, mask=masks, strength=0.7)
    apart = generate(tiny_models["sd1"], GenerationRequest(["a", "b"], [1, 2], batch_size=1, **common)).images
    together = generate(tiny_models["sd1"], GenerationRequest(["a", "b"], [1, 2], batch_size=2, **common)).images
    torch.testing.assert_close(apart, together, atol=1e-4, rtol=0)  # batched matmuls round otherwise: 1.6e-5 seen
    assert torch.equal(apart[1, ..., :32], images[1, ..., :32])  # the second image's own kept half
    with pytest.raises(RequestError, match="one for all images or one per image"):
        generate(tiny_models["sd1"], GenerationRequest(["a"] * 3, [1, 2, 3], **common))


def test_lora_tags_merge_for_the_batch_and_come_off_after(tiny_models, tmp_path):
    """<lora:name:w> in a prompt: the image is the one made with the LoRA merged by hand at w and the tag taken out
    of the text; afterwards every weight is bitwise what it was; the infotext keeps the tag and hashes the file."""
    from safetensors.torch import save_file

    from latent_diffusion.files import lora_hash
    from latent_diffusion.weights.lora import apply_lora, read_lora, remove_lora

    model = tiny_models["sd1"]
    proj_in = model.unet.input_blocks[1][1].proj_in.weight  # (out, in, 1, 1)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "style.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"  # kohya's name of input block 1's proj_in
    save_file({f"{key}.lora_down.weight": torch.randn(2, proj_in.shape[1], 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(proj_in.shape[0], 2, 1, 1, generator=g),
               f"{key}.alpha": torch.tensor(1.0)}, path)  # fmt: skip
    pipeline = Pipeline(model, loras={"style": path})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(steps=2, width=24, height=24, cfg_scale=3.0)
    tagged = generate(pipeline, GenerationRequest(["a cat <lora:style:0.6>"], [3], **common))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    applied = apply_lora(model, read_lora(path), 0.6)
    by_hand = generate(model, GenerationRequest(["a cat "], [3], **common))
    remove_lora(model, applied)
    assert torch.equal(tagged.images, by_hand.images)
    assert not torch.allclose(tagged.images, generate(model, GenerationRequest(["a cat "], [3], **common)).images)
    assert tagged.infotexts[0].startswith("a cat <lora:style:0.6>\n")
    assert f'Lora hashes: "style: {lora_hash(path)}"' in tagged.infotexts[0]
    pipeline.loras = {"style": path, "sty,le": path}  # the web UI writes a name without its `,` and `:` there
    infotext = generate(pipeline, GenerationRequest(["<lora:sty,le:0.6>"], [3], **common)).infotexts[0]
    assert f'Lora hashes: "style: {lora_hash(path)}"' in infotext
    pipeline.loras = {"style": path, "b": path}  # in the prompt's order, as the web UI's loaded networks
    infotext = generate(pipeline, GenerationRequest(["<lora:b:0.2> <lora:style:0.2>"], [3], **common)).infotexts[0]
    assert f'Lora hashes: "b: {lora_hash(path)}, style: {lora_hash(path)}"' in infotext
    pipeline.loras = {"style": path}
    with pytest.raises(RequestError, match=r"<lora:other> names no LoRA file here; these are: style"):
        generate(pipeline, GenerationRequest(["<lora:other:1>"], [3], **common))
    # A batch of prompts that name other LoRA sets (none is a set): each image is the one its prompt gives alone,
    # for a batch samples on one set of merged weights
    prompts = ["a cat <lora:style:1>", "a cat", "a cat <lora:style:0.5>", "a cat <lora:style:0.5>"]
    batched = generate(pipeline, GenerationRequest(prompts, [1, 2, 3, 4], batch_size=4, **common)).images
    alone = torch.cat(
        [generate(pipeline, GenerationRequest([p], [s], **common)).images for p, s in zip(prompts, [1, 2, 3, 4])]
    )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # Named twice, as the web UI applies it: merged twice, both times at the last tag's weight
    twice = generate(pipeline, GenerationRequest(["a cat <lora:style:1> <lora:style:0.5>"], [3], **common))
    applied = [apply_lora(model, read_lora(path), 0.5) for _ in range(2)]
    by_hand = generate(model, GenerationRequest(["a cat  "], [3], **common))
    for a in reversed(applied):
        remove_lora(model, a)
    assert torch.equal(twice.images, by_hand.images)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("step_count", "run", "schedule"), [("web_ui", 16, 20), ("fixed", 20, 26), ("diffusers", 15, 20)]
)
def test_img2img_counts_its_steps_as_asked(tiny_models, image, step_count, run, schedule):
    """20 steps at strength 0.75: the web UI's `setup_img2img_steps` runs t_enc + 1 = int(0.75 × 20) + 1 = 16 of a
    schedule of 20 from its 5th σ (its default), or exactly 20 of int(20 / 0.75) = 26 (its img2img_fix_steps);
    diffusers' img2img runs int(20 × 0.75) = 15 of 20."""
    from latent_diffusion.sampling.samplers import get_sampler
    from latent_diffusion.sampling.sigma_schedules import sampling_schedule

    model, seen = tiny_models["sd1"], []
    request = GenerationRequest(["a cat"], [1], steps=20, sampler="euler", init_image=image[..., :32, :32],
                                strength=0.75, step_count=step_count)  # fmt: skip
    generate(model, request, progress=lambda p: seen.append(p.sampler_step.sigma.item()))
    sigmas = sampling_schedule(get_sampler("euler"), "automatic", schedule, model.alphas_cumprod)
    assert len(seen) == run and seen == pytest.approx(sigmas[schedule - run : -1].tolist())
