"""The hires fix against the web UI's own arithmetic and identities: its target sizes, its latent modes as
torch's interpolations, its second pass as img2img of the enlarged first pass, its step count, its infotext."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.hires import LATENT_MODES, HiresSize, target_size, upscale_latent
from latent_diffusion.pipeline.images import from_pil
from latent_diffusion.pipeline.infotext import parse_parameters
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import GenerationRequest, HiresFix, RequestError
from latent_diffusion.sampling.samplers import get_sampler
from latent_diffusion.sampling.sigma_schedules import sampling_schedule

# (width, height, hr_scale, hr_resize_x, hr_resize_y) -> (hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y),
# worked out by hand from the web UI's `calculate_target_resolution` (opt_f = 8)
TARGETS = [
    ((512, 512, 2.0, 0, 0), (1024, 1024, 0, 0)),
    ((512, 768, 1.5, 0, 0), (768, 1152, 0, 0)),
    ((512, 512, 1.3, 0, 0), (665, 665, 0, 0)),  # int(665.6): the latent is 83 wide, the image 664
    ((640, 512, 2.0, 1024, 0), (1024, 819, 0, 0)),  # 1024 * 512 // 640
    ((640, 512, 2.0, 0, 1024), (1280, 1024, 0, 0)),
    ((512, 512, 2.0, 1024, 768), (1024, 1024, 0, 32)),  # wider target: cover its width, cut 256 rows
    ((768, 512, 2.0, 1024, 1024), (1536, 1024, 64, 0)),  # taller target: cover its height, cut 512 columns
    ((600, 400, 2.0, 1000, 700), (1050, 700, 6, 0)),  # (1050 - 1000) // 8
]


@pytest.mark.parametrize(("asked", "expected"), TARGETS)
def test_target_sizes_follow_the_web_ui(asked, expected):
    size = target_size(*asked)
    assert (*size.upscale_to, *size.truncate) == expected


def test_latent_modes_are_the_web_uis_interpolations_and_truncation_cuts_both_ends():
    """The web UI's `latent_upscale_modes`, written out here, and its slicing of a truncated latent."""
    web_ui = {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }
    assert list(LATENT_MODES) == list(web_ui)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    for name, (mode, antialias) in web_ui.items():
        expected = F.interpolate(x, size=(13, 20), mode=mode, antialias=antialias)
        assert torch.equal(upscale_latent(x, HiresSize((160, 104), (0, 0)), name, 8), expected)
    cut = upscale_latent(x, HiresSize((160, 104), (5, 2)), "Latent", 8)
    full = F.interpolate(x, size=(13, 20), mode="bilinear")
    assert torch.equal(cut, full[..., 1:12, 2:17])  # rows 2 // 2 = 1 before, (2 + 1) // 2 = 1 after; columns 2 and 3


def pipeline(tiny_models, variant="sd1"):
    return Pipeline(tiny_models[variant])


SETTINGS = dict(width=32, height=24, steps=4, sampler="euler_ancestral", cfg_scale=5.0, batch_size=2)


def test_hires_with_an_image_upscaler_is_img2img_of_the_enlarged_first_pass(tiny_models):
    """The web UI's own identity: the first pass, decoded to 8-bit pixels and enlarged (Lanczos, as PIL does it),
    then img2img of that with the hires steps, strength and seeds: its fixed-steps img2img, `step_count="fixed"`. The
    ancestral sampler draws per-step noise, so the order of every draw is checked too."""
    pipe, seeds, prompts = pipeline(tiny_models), [3, 4], ["a red circle", "a blue square"]
    hires = HiresFix(scale=2.0, upscaler="Lanczos", steps=3, strength=0.6)
    result = generate(pipe, GenerationRequest(prompts, seeds, **SETTINGS, hires=hires))
    assert result.images.shape == (2, 3, 48, 64)
    first = generate(pipe, GenerationRequest(prompts, seeds, **SETTINGS)).images
    enlarged = []
    for image in first:
        pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # the web UI truncates
        enlarged.append(from_pil(Image.fromarray(pixels).resize((64, 48), Image.LANCZOS)))
    img2img = GenerationRequest(
        prompts,
        seeds,
        **{**SETTINGS, "steps": 3, "width": 64, "height": 48},
        init_image=torch.cat(enlarged),
        strength=0.6,
        step_count="fixed",
    )
    assert torch.allclose(result.images, generate(pipe, img2img).images, atol=1e-6)


def test_a_latent_hires_fix_matches_diffusers_two_pipeline_flow(tiny_models):
    """diffusers' StableDiffusionPipeline to latents, torch's bilinear interpolation of them, and its img2img
    pipeline over those latents, with the second pass's noise drawn from a generator seeded afresh: the web UI's
    hires fix with the "Latent" mode, written with another library. 4 of a schedule of 8 DDIM steps at 0.5."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from test_generate import NEGATIVE, PROMPT, SETTINGS, diffusers_pipeline, embeddings

    model = tiny_models["sd1"]
    hires = HiresFix(scale=2.0, upscaler="Latent", steps=4, strength=0.5)
    request = GenerationRequest([PROMPT], [9], [NEGATIVE], width=32, height=24, **SETTINGS, hires=hires)
    images = generate(model, request).images
    first, second = diffusers_pipeline(model, StableDiffusionPipeline), None
    second = diffusers_pipeline(model, StableDiffusionImg2ImgPipeline)
    common = dict(prompt_embeds=embeddings(first, model, PROMPT), negative_prompt_embeds=embeddings(first, model,
                  NEGATIVE), guidance_scale=SETTINGS["cfg_scale"], eta=0.0)  # fmt: skip
    with torch.no_grad():
        latents = first(**common, width=32, height=24, num_inference_steps=SETTINGS["steps"], output_type="latent",
                        generator=torch.Generator().manual_seed(9)).images  # fmt: skip
        enlarged = F.interpolate(latents, size=(6, 8), mode="bilinear")
        theirs = second(**common, image=enlarged, strength=0.5, num_inference_steps=8, output_type="pt",
                        generator=torch.Generator().manual_seed(9)).images  # fmt: skip
    assert images.shape == theirs.shape == (1, 3, 48, 64)
    torch.testing.assert_close(images, theirs, atol=1e-3, rtol=0)  # (test_generate's tolerance for ours vs diffusers)


def test_the_hires_pass_runs_exactly_its_steps_at_the_end_of_a_stretched_schedule(tiny_models):
    """The web UI's `setup_img2img_steps` with steps given: a schedule of int(steps / min(strength, 0.999)), of
    which the last `steps` run; the first pass's count where hr_second_pass_steps is 0."""
    pipe, seen = pipeline(tiny_models), []
    for hires_steps, strength, expected_schedule in ((3, 0.45, 6), (0, 0.7, 5), (4, 1.0, 4)):
        seen.clear()
        hires = HiresFix(scale=1.5, steps=hires_steps, strength=strength, sampler="euler")
        request = GenerationRequest(["x"], [1], **{**SETTINGS, "batch_size": 1}, hires=hires)
        generate(pipe, request, progress=lambda p: seen.append((p.step, p.total, p.sampler_step.sigma.item())))
        run = hires_steps or SETTINGS["steps"]
        assert [s[0] for s in seen] == list(range(1, SETTINGS["steps"] + run + 1))
        assert {s[1] for s in seen} == {SETTINGS["steps"] + run}
        schedule = sampling_schedule(get_sampler("euler"), "automatic", expected_schedule, pipe.model.alphas_cumprod)
        assert [s[2] for s in seen[SETTINGS["steps"] :]] == pytest.approx(schedule[-run - 1 : -1].tolist())


def test_hires_prompts_and_settings_reach_the_second_pass_and_its_infotext(tiny_models):
    """A hires prompt, sampler and guidance of their own change the image and are written where the web UI writes
    them; the first pass's own are not written again."""
    pipe = pipeline(tiny_models)
    base = dict(**{**SETTINGS, "sampler": "dpmpp_2m", "batch_size": 1}, negative_prompts=["dark"])
    plain = HiresFix(scale=1.5, upscaler="Latent (bicubic)", steps=2, strength=0.5)
    own = dataclasses.replace(plain, prompt="a blue square", sampler="euler", cfg_scale=3.0, resize_x=48, scale=2.0)
    a = generate(pipe, GenerationRequest(["a red circle"], [7], **base, hires=plain))
    b = generate(pipe, GenerationRequest(["a red circle"], [7], **base, hires=own))
    assert (
        a.images.shape == b.images.shape == (1, 3, 32, 48)
    )  # 36 // 8 latent rows and (a.images - b.images).abs().max() > 0.01
    fields = parse_parameters(a.infotexts[0])
    assert list(fields)[2:] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength",
                                "Hires upscale", "Hires steps", "Hires upscaler"]  # fmt: skip
    assert (fields["Size"], fields["Hires upscale"], fields["Hires upscaler"]) == ("32x24", "1.5", "Latent (bicubic)")
    fields = parse_parameters(b.infotexts[0])
    assert list(fields)[8:] == ["Denoising strength", "Hires sampler", "Hires prompt", "Hires CFG Scale",
                                "Hires resize", "Hires steps", "Hires upscaler"]  # fmt: skip
    assert fields["Hires prompt"] == "a blue square" and fields["Hires resize"] == "48x0"
    # Euler on the automatic schedule has none of its own: no "Hires schedule type", as the web UI


@pytest.mark.parametrize(
    ("hires", "message"),
    [
        (HiresFix(scale=0), "hr_scale must be above 0"),
        (HiresFix(scale=float("nan")), "hr_scale must be above 0"),
        (HiresFix(scale=1e9), "hr_scale must be above 0 and at most 8"),
        (HiresFix(resize_x=-8), "hr_resize_x must be a whole number"),
        (HiresFix(steps=2.5), "hr_second_pass_steps must be a whole number"),
        (HiresFix(strength=0), "hires pass: strength must be in (0, 1]"),
        (HiresFix(sampler="nope"), "hires pass: unknown sampler"),
        (HiresFix(upscaler="ESRGAN_4x"), "hr_upscaler: no upscaler 'ESRGAN_4x' here; these are: Latent,"),
        (HiresFix(resize_x=8192, resize_y=8192), "at most 8192 per side"),
        (HiresFix(scale=0.1), "too small for this model"),
    ],
)
def test_bad_hires_settings_are_refused_before_any_work(tiny_models, hires, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(pipeline(tiny_models), GenerationRequest(["x"], [1], **SETTINGS, hires=hires))


def test_hires_is_txt2img_only(tiny_models):
    request = GenerationRequest(["x"], [1], init_image=torch.rand(1, 3, 24, 32), strength=0.5, hires=HiresFix())
    with pytest.raises(RequestError, match="the hires fix is txt2img's"):
        generate(pipeline(tiny_models), request)


def run(*args) -> int:
    return main([str(a) for a in args])


def test_the_command_line_hires_fix_and_its_infotext_give_the_same_image_again(tmp_path, ckpt, capsys):
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "a red circle", "--seed", 3, "--width", 32, "--height", 24,
               "--steps", 3, "--hires-resize", "48x0", "--hires-upscaler", "Latent (nearest-exact)", "--hires-steps",
               2, "--hires-denoise", 0.55, "--hires-sampler", "DPM++ 2M", "--hires-scheduler", "exponential",
               "--hires-prompt", "a blue circle", "--hires-cfg-scale", 4, "--quiet", "--outdir", tmp_path / "a") == 0  # fmt: skip
    (original,) = (tmp_path / "a").iterdir()
    with Image.open(original) as im:
        fields = parse_parameters(im.text["parameters"])
        assert im.size == (48, 32)
    assert fields["Hires resize"] == "48x0" and fields["Hires schedule type"] == "Exponential"
    assert fields["Denoising strength"] == "0.55" and fields["Hires CFG Scale"] == "4.0"
    assert run("txt2img", "--ckpt", ckpt, "--infotext", original, "--quiet", "--outdir", tmp_path / "b") == 0
    (again,) = (tmp_path / "b").iterdir()
    with Image.open(original) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes() and a.text["parameters"] == b.text["parameters"]
    assert capsys.readouterr().err == ""  # every hires field is read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hires-scale", 0], "--hires-scale must be above 0"),
        (["--hires-scale", "nan"], "--hires-scale must be above 0"),
        (["--hires-resize", "9000x0"], "--hires-resize's width must be a whole number in [0, 8192]"),
        (["--hires-resize", "big"], "--hires-resize: WIDTHxHEIGHT"),
        (["--hires-scale", 2, "--hires-upscaler", "4x-UltraSharp"], "--hires-upscaler: no upscaler '4x-UltraSharp'"),
        (["--hires-steps", 3], "the --hires flags need --hires-scale or --hires-resize"),
        (["--hires-scale", 2, "--hires-denoise", 1.5], "--hires-denoise must be in (0, 1]"),
    ],
)
def test_bad_hires_flags_exit_2_in_one_line_and_write_nothing(tmp_path, ckpt, capsys, args, message):
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x", "--width", 32, "--height", 24, "--steps", 2,
               *args, "--quiet", "--outdir", out) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_an_existing_client_asks_for_the_hires_fix_and_gets_the_librarys_image(ckpt, serve):
    """webuiapi's txt2img with enable_hr and its own defaults for every other hires field: the larger image, equal
    to the library's, nothing in `ignored`; bad hires fields are 422s naming them."""
    import webuiapi

    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.serving.server import ServerLimits, create_app
    from test_server import call

    served = load_pipeline(ckpt)
    with serve(create_app(served, limits=ServerLimits(max_side=128))) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler a", steps=3)
        result = api.txt2img(prompt="a red circle", seed=5, width=32, height=24, batch_size=2, cfg_scale=6,
                             enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
                             hr_upscaler=webuiapi.HiResUpscaler.LatentBicubic)  # fmt: skip
        assert [im.size for im in result.images] == [(48, 32)] * 2 and result.info["ignored"] == []
        hires = HiresFix(scale=1.5, upscaler="Latent (bicubic)", steps=2, strength=0.5)
        library = generate(served, GenerationRequest(["a red circle"] * 2, [5, 6], width=32, height=24, steps=3,
                                                     sampler="euler_ancestral", cfg_scale=6.0, batch_size=2,
                                                     hires=hires))  # fmt: skip
        expected = (library.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert all(im.tobytes() == e.tobytes() for im, e in zip(result.images, expected))
        assert "Hires upscaler: Latent (bicubic)" in result.info["infotexts"][0]

        body = {"prompt": "x", "width": 32, "height": 24, "steps": 2, "enable_hr": True}
        for fields, message in (
            ({"hr_scale": 0}, "hr_scale must be above 0"),
            ({"hr_scale": 8}, "hr_scale: the hires fix would enlarge to 256x192, over this server's 128"),
            ({"hr_upscaler": "4x-UltraSharp"}, "hr_upscaler: no upscaler '4x-UltraSharp' here"),
            ({"hr_sampler_name": "nope"}, "hr_sampler_name: unknown sampler"),
            ({"denoising_strength": 2}, "hires pass: strength must be in (0, 1]"),
            ({"hr_second_pass_steps": 1000}, "hr_second_pass_steps must be at most 300"),
        ):
            status, answer = call(base, "/sdapi/v1/txt2img", {**body, **fields})
            assert status == 422 and message in answer["detail"], (fields, answer)
        status, answer = call(base, "/sdapi/v1/txt2img", {**body, "hr_checkpoint_name": "other", "hr_scale": 1.5})
        assert status == 404 and "no checkpoint named 'other'" in answer["detail"]


def test_a_model_upscaler_from_the_upscaler_folder_enlarges_the_first_pass(tmp_path, ckpt, spandrel, capsys):
    """--upscaler-dir's model (a tiny Compact 2x built from spandrel's classes, as a .pth) as the hires upscaler: the
    image is the library's img2img of the first pass enlarged by that model (`upscale`, tested against spandrel in
    test_upscalers.py); a file that is not a model is refused in one line, before any work."""
    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.pipeline.upscalers import load_upscaler, upscale
    from test_upscalers import build, save

    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    save(build("Compact", spandrel)[0], folder / "tiny-2x.pth")
    args = ["txt2img", "--ckpt", ckpt, "--prompt", "a red circle", "--seed", 3, "--width", 32, "--height", 24,
            "--steps", 3, "--sampler", "euler", "--hires-scale", 2, "--hires-steps", 2, "--hires-denoise", 0.5,
            "--upscaler-dir", folder, "--quiet"]  # fmt: skip
    assert run(*args, "--hires-upscaler", "tiny-2x", "--outdir", tmp_path / "a") == 0
    with Image.open(next((tmp_path / "a").iterdir())) as im:
        ours = from_pil(im)
    pipe = load_pipeline(ckpt)
    settings = dict(steps=3, sampler="euler", batch_size=1)
    first = generate(pipe, GenerationRequest(["a red circle"], [3], width=32, height=24, **settings)).images
    pixels = (first * 255).to(torch.uint8).float() / 255  # the web UI's 8-bit truncation
    enlarged = upscale(pixels, load_upscaler(folder / "tiny-2x.pth"), size=(64, 48))
    img2img = GenerationRequest(["a red circle"], [3], width=64, height=48, init_image=enlarged, strength=0.5,
                                step_count="fixed", **{**settings, "steps": 2})  # fmt: skip
    expected = generate(pipe, img2img).images
    assert ours.shape == expected.shape == (1, 3, 48, 64)
    assert (ours - expected).abs().max() <= 1 / 255 + 1e-6  # (the PNG's 8 bits)

    (folder / "broken.pth").write_text("not a model")
    assert run(*args, "--hires-upscaler", "broken", "--outdir", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error: hr_upscaler broken:") and err.count("\n") == 1 and str(folder) not in err
    assert not (tmp_path / "b").exists()


def test_a_hires_checkpoint_of_its_own(tmp_path, tiny_models, serve):
    """The web UI's hr_checkpoint_name: the second pass on another checkpoint (with an image upscaler, the first
    pass's image encoded by that checkpoint's autoencoder), named in the infotext as the web UI names it; through
    the library, the command line (--hires-checkpoint) and the server, each the same image. A latent mode needs the
    same latent space."""
    from latent_diffusion import LatentDiffusion, save_model
    from latent_diffusion.files import model_hash
    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.serving.server import create_app
    from test_server import call, decode

    from conftest import tiny_config, tiny_model

    save_model(tiny_models["sd1"], tmp_path / "base.safetensors")
    save_model(tiny_model("sd1", seed=7), tmp_path / "detail.safetensors")
    pipe = load_pipeline(tmp_path / "base.safetensors", hires_checkpoint=tmp_path / "detail.safetensors")
    settings = dict(width=32, height=24, steps=3, sampler="euler", cfg_scale=5.0)
    hires = HiresFix(scale=2.0, upscaler="Nearest", steps=2, strength=0.5)
    result = generate(pipe, GenerationRequest(["a red circle"], [4], **settings, hires=hires))
    first = generate(pipe, GenerationRequest(["a red circle"], [4], **settings)).images
    enlarged = from_pil(Image.fromarray((first[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()).resize(
        (64, 48), Image.NEAREST))  # fmt: skip
    img2img = GenerationRequest(["a red circle"], [4], **{**settings, "steps": 2, "width": 64, "height": 48},
                                init_image=enlarged, strength=0.5, step_count="fixed")  # fmt: skip
    assert torch.allclose(result.images, generate(pipe.hires_pipeline, img2img).images, atol=1e-6)
    assert (result.images - generate(pipe, img2img).images).abs().max() > 0.01  # not the base model's
    fields = parse_parameters(result.infotexts[0])
    keys = list(fields)
    assert keys[keys.index("Denoising strength") + 1] == "Hires checkpoint"  # (the web UI's order)
    assert fields["Hires checkpoint"] == f"detail [{model_hash(tmp_path / 'detail.safetensors')}]"

    other = LatentDiffusion(dataclasses.replace(tiny_config("sd1"), scale_factor=0.13025)).eval()
    with pytest.raises(RequestError, match="the hires checkpoint .* does not share this .* latent space"):
        generate(Pipeline(tiny_models["sd1"], hires_pipeline=Pipeline(other)), GenerationRequest(
            ["x"], [1], **settings, hires=HiresFix(upscaler="Latent")))  # fmt: skip

    assert run("txt2img", "--ckpt", tmp_path / "base.safetensors", "--hires-checkpoint", tmp_path / "detail.safetensors",
               "--prompt", "a red circle", "--seed", 4, "--width", 32, "--height", 24, "--steps", 3, "--sampler", "euler",
               "--cfg-scale", 5, "--hires-scale", 2, "--hires-upscaler", "Nearest", "--hires-steps", 2,
               "--hires-denoise", 0.5, "--quiet", "--outdir", tmp_path / "out") == 0  # fmt: skip
    with Image.open(next((tmp_path / "out").iterdir())) as im:
        assert (from_pil(im) - result.images).abs().max() <= 1 / 255 + 1e-6

    body = {"prompt": "a red circle", "seed": 4, "width": 32, "height": 24, "steps": 3, "sampler_name": "Euler",
            "cfg_scale": 5, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Nearest", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5, "hr_checkpoint_name": "detail"}  # fmt: skip
    with serve(create_app(load_pipeline(tmp_path / "base.safetensors"), load=load_pipeline,
                          models_dir=tmp_path)) as base:  # fmt: skip
        status, answer = call(base, "/sdapi/v1/txt2img", body)
        assert status == 200 and json.loads(answer["info"])["ignored"] == []
        assert "Hires checkpoint: detail [" in json.loads(answer["info"])["infotexts"][0]
        assert (from_pil(decode(answer["images"][0])) - result.images).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    ("when", "schedule"),
    [("0.5", [(10, "b")]), ("1.5", [(5, "a"), (10, "b")]), ("25", [(5, "a"), (10, "b")]), ("8", [(10, "b")]),
     ("2.0", [(10, "a")])],
)  # fmt: skip
def test_prompt_editing_counts_on_into_the_hires_pass(when, schedule):
    """The web UI's get_learned_conditioning_prompt_schedules with hires steps (10 here, after a first pass of 20):
    a fraction counts from 1 (v − 1)·10, a step number from the first pass's 20 (v − 20)."""
    from latent_diffusion.prompts.syntax import prompt_schedule

    assert prompt_schedule(f"[a:b:{when}]", 10, before=20) == schedule


def test_an_edit_of_the_first_pass_is_past_in_the_hires_pass(tiny_models):
    """[a red:a blue:0.5] switched half-way through the first pass, so the whole hires pass draws "a blue circle": the
    same image as a hires prompt of "a blue circle" (the first pass being the same)."""
    pipe = pipeline(tiny_models)
    settings = {**SETTINGS, "batch_size": 1, "sampler": "euler"}
    hires = HiresFix(scale=1.5, steps=2, strength=0.5)
    edited = generate(pipe, GenerationRequest(["[a red:a blue:0.5] circle"], [5], **settings, hires=hires)).images
    explicit = dataclasses.replace(hires, prompt="a blue circle")
    blue = generate(pipe, GenerationRequest(["[a red:a blue:0.5] circle"], [5], **settings, hires=explicit)).images
    assert torch.equal(edited, blue)
    red = dataclasses.replace(hires, prompt="a red circle")
    assert not torch.equal(edited, generate(pipe, GenerationRequest(["[a red:a blue:0.5] circle"], [5], **settings,
                                                                    hires=red)).images)  # fmt: skip
