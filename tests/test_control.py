"""Control units in generation: our txt2img with one and two ControlNets against diffusers'
StableDiffusionControlNetPipeline with the same weights (converted by diffusers' own `convert_controlnet_checkpoint`),
noise and DDIM schedule; the guidance window, the control modes and the batching of guidance against the web UI's
ControlNet extension's rules, written out here from its `scripts/hook.py`."""

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm
from safetensors.torch import save_file

from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.models.unet import ControlResiduals
from latent_diffusion.models.yaml_config import to_ldm_config
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.control_hook import SamplingClock
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError
from test_generate import NEGATIVE, PROMPT, SETTINGS, diffusers_pipeline, embeddings

from conftest import FakeDetector, randomize, seeded, tiny_model

H, W = 64, 48
STEPS = 4  # DDIM steps of the comparisons with diffusers' pipelines (enough for every step to go through control)


@pytest.fixture(scope="module")
def controlnets(tiny_models, tmp_path_factory):
    """Two tiny ControlNets for the SD 1.x model (zero convolutions not zero), saved in the original layout."""
    folder = tmp_path_factory.mktemp("controlnet")
    nets = []
    for seed, name in ((1, "cn_edges"), (2, "cn_depth")):
        with seeded(seed):
            net = randomize(ControlNet(tiny_models["sd1"].cfg.unet), seed=seed).eval()
        save_file(net.state_dict(), folder / f"{name}.safetensors")
        nets.append(net)
    return folder, nets


@pytest.fixture(scope="module")
def maps():
    """Two control maps (1, 3, H, W) in [0, 1], exactly representable in 8 bits (the preprocessor reads 8-bit)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(1, 3, H, W, generator=g) * 255).round() / 255 for _ in range(2)]


def pipeline(tiny_models, controlnets):
    return Pipeline(tiny_models["sd1"], controlnets=find_control_models(controlnets[0]))


def diffusers_controlnet(model, net: ControlNet) -> ControlNetModel:
    sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items() if k.startswith(("input_", "middle_b"))}
    unet = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(model.cfg)}, sd)
    names = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
             "attention_head_dim", "use_linear_projection", "transformer_layers_per_block")  # fmt: skip
    config = {k: unet[k] for k in names if k in unet} | {"conditioning_channels": 3}
    theirs = ControlNetModel(**config)
    theirs.load_state_dict(convert_controlnet_checkpoint(net.state_dict(), config), strict=True)
    return theirs.eval()


def unit(name, image, **settings):
    return ControlUnit(name, image, resize_mode="resize", **settings)


@pytest.mark.parametrize(("variant", "count"), [("sd1", 1), ("sd1", 2), ("sd2", 1)])
def test_txt2img_matches_the_controlnet_pipeline(tiny_models, controlnets, maps, variant, count, tmp_path):
    model = tiny_models[variant]
    weights = [0.8, 0.5][:count]
    names = ["cn_edges", "cn_depth"][:count]
    units = [unit(n, m, weight=w) for n, m, w in zip(names, maps, weights)]
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=units, **SETTINGS)
    request = dataclasses.replace(request, steps=STEPS)
    folder, nets = controlnets
    if variant == "sd2":  # (an SD 2.x ControlNet: linear projections, 64-channel heads of the tiny config's)
        nets = [randomize(ControlNet(model.cfg.unet), seed=3).eval()]
        folder = tmp_path
        save_file(nets[0].state_dict(), folder / "cn_edges.safetensors")
    ours = generate(Pipeline(model, controlnets=find_control_models(folder)), request).images

    base = diffusers_pipeline(model, StableDiffusionPipeline)
    theirs_nets = [diffusers_controlnet(model, net) for net in nets[:count]]
    pipe = StableDiffusionControlNetPipeline(
        **base.components, controlnet=theirs_nets if count > 1 else theirs_nets[0], requires_safety_checker=False
    )
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=embeddings(pipe, model, PROMPT), negative_prompt_embeds=embeddings(pipe, model, NEGATIVE),
            image=maps[:count] if count > 1 else maps[0], controlnet_conditioning_scale=weights if count > 1 else weights[0],
            num_inference_steps=STEPS, guidance_scale=SETTINGS["cfg_scale"], eta=0.0, height=H, width=W,
            generator=torch.Generator().manual_seed(3), output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05  # the control changed the image


def active_evaluations(tiny_models, controlnets, maps, sampler, steps, start, end):
    """For each model evaluation of a run: whether the unit's ControlNet ran."""
    from latent_diffusion.pipeline.generate import generate_plan
    from latent_diffusion.pipeline.plan import resolve

    request = GenerationRequest(
        [PROMPT], [1], width=W, height=H, steps=steps, sampler=sampler, cfg_scale=1.0,
        controls=[unit("cn_edges", maps[0], guidance_start=start, guidance_end=end)],
    )  # fmt: skip
    plan = resolve(request, pipeline(tiny_models, controlnets))
    ran, evaluations = [], []
    net_hook = plan.controls[0].model.register_forward_hook(lambda *_: ran.append(len(evaluations)))
    unet_hook = tiny_models["sd1"].model.register_forward_hook(
        lambda *_: evaluations.append(ran[-1:] == [len(evaluations)])
    )
    try:
        generate_plan(plan)
    finally:
        net_hook.remove()
        unet_hook.remove()
    return evaluations


@pytest.mark.parametrize(("sampler", "evaluations_per_step"), [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.2, 0.5), (0.5, 0.5), (0.0, 0.0)])
def test_guidance_window_follows_the_extension(
    tiny_models, controlnets, maps, sampler, evaluations_per_step, start, end
):
    steps = 10
    got = active_evaluations(tiny_models, controlnets, maps, sampler, steps, start, end)
    # The extension (hook.py, guidance_schedule_handler): active unless s/N < start or s/N > end, with s the web UI's
    # state.sampling_step: set to i by the sampler's callback, which k-diffusion calls after step i's first
    # evaluation; N = steps. Heun's last step (to σ = 0) evaluates once.
    expected = []
    for i in range(steps):
        for j in range(1 if i == steps - 1 else evaluations_per_step):
            s = max(i - 1, 0) if j == 0 else i
            expected.append(not (s / steps < start or s / steps > end))
    assert got == expected


def test_control_modes_scale_as_the_extension(tiny_models, controlnets, maps):
    """One guided evaluation, cond and uncond rows batched: the U-Net's residuals as the extension computes them."""
    from latent_diffusion.pipeline.control_hook import MARK, controlled_unet, hint_field
    from latent_diffusion.pipeline.plan import resolve

    model = tiny_models["sd1"]
    net = controlnets[1][0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, H // 8, W // 8, generator=g)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    for mode in ("balanced", "prompt", "control"):
        request = GenerationRequest(
            [PROMPT], [1], width=W, height=H, controls=[unit("cn_edges", maps[0], weight=0.7, control_mode=mode)]
        )
        plan = resolve(request, pipeline(tiny_models, controlnets))
        clock = SamplingClock(20)
        cond = {"crossattn": context, MARK: torch.tensor([0.0, 1.0]), hint_field(0): maps[0].expand(2, -1, -1, -1)}
        with torch.no_grad():
            ours = controlled_unet(model, plan.controls, clock)(x, t, cond)
            out = net(x, maps[0].expand(2, -1, -1, -1), t, context)
            control = [*out.skips, out.middle]
            scales = [0.7] * 13 if mode == "balanced" else [0.7 * 0.825 ** float(12 - i) for i in range(13)]
            if mode == "control":  # cfg_injection: control = [c * cond_mark for c in control]
                control = [c * torch.tensor([0.0, 1.0])[:, None, None, None] for c in control]
            control = [c * s for c, s in zip(control, scales[: len(control)])]
            expected = model.model.diffusion_model(x, t, context, control=ControlResiduals(control[:-1], control[-1]))
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_units_reach_img2img_and_an_inpainting_model(tiny_models, controlnets, maps):
    """img2img and an inpainting U-Net (9 channels; the ControlNet sees the first 4) with a unit, and AND prompts
    (a row per part): each run differs from the same run without the unit."""
    y, x = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    picture = torch.stack([x, y, (x * y) ** 0.5])[None]
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1
    cases = [
        ("sd1", dict(init_image=picture, strength=0.6)),
        ("sd1", dict(prompts=["a red circle AND a blue square:0.5"])),
        ("inpaint", dict(init_image=picture, mask=mask)),
    ]
    for variant, fields in cases:
        model = tiny_models[variant]
        pipe = Pipeline(model, controlnets=find_control_models(controlnets[0]))
        request = GenerationRequest([PROMPT], [2], [NEGATIVE], width=W, height=H, steps=4, cfg_scale=5.0)
        request = dataclasses.replace(request, **fields)
        controlled = dataclasses.replace(request, controls=[unit("cn_edges", maps[0])])
        difference = (generate(pipe, controlled).images - generate(pipe, request).images).abs().max()
        assert difference > 0.02, variant


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(model="nothing"), "no control model 'nothing' here"),
        (dict(weight=-1.0), "weight must be between 0 and 10"),
        (dict(guidance_start=0.6, guidance_end=0.4), "start not after end"),
        (dict(control_mode="loud"), "unknown control_mode 'loud'"),
        (dict(resize_mode="stretch"), "unknown resize_mode 'stretch'"),
        (dict(image=torch.rand(1, 1, 8, 8)), "the image must be a (1 or 1, 3, H, W) tensor"),
    ],
)
def test_bad_units_are_refused_before_any_work(tiny_models, controlnets, maps, settings, message):
    fields = {"model": "cn_edges", "image": maps[0], **settings}
    request = GenerationRequest([PROMPT], [1], width=W, height=H, controls=[ControlUnit(**fields)])
    with pytest.raises(RequestError, match=f"ControlNet unit 0: .*{__import__('re').escape(message)}"):
        generate(pipeline(tiny_models, controlnets), request)


def test_units_are_found_by_listed_name_bare_name_or_file_name(tiny_models, controlnets, maps):
    listed = next(name for name in find_control_models(controlnets[0]) if name.startswith("cn_edges ["))
    for name in (listed, "cn_edges", "CN_EDGES.safetensors", "cn_edges [00000000]"):
        request = GenerationRequest([PROMPT], [1], width=W, height=H, steps=1, controls=[unit(name, maps[0])])
        result = generate(pipeline(tiny_models, controlnets), request)
        assert f'ControlNet 0: "Module: none, Model: {listed}, Weight: 1.0' in result.infotexts[0]


def test_sdxl_txt2img_with_a_diffusers_controlnet_matches_the_xl_controlnet_pipeline(tmp_path):
    """An SDXL ControlNet in diffusers' layout (text-time conditioning), read by our loader, in our generation: the
    image StableDiffusionXLControlNetPipeline makes with the same weights, noise and DDIM schedule."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from test_controlnet_files import diffusers_config

    from test_sdxl import reference_conditioning, xl_pipeline

    model = tiny_model("sdxl", seed=11)
    theirs_net = randomize(ControlNetModel(**diffusers_config(model.cfg.unet)), seed=6).eval()
    folder = tmp_path / "ControlNet"
    folder.mkdir()
    save_file(theirs_net.state_dict(), folder / "xl_canny.safetensors")
    control = (torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(9)) * 255).round() / 255
    request = GenerationRequest(
        [PROMPT], [5], [NEGATIVE], width=W, height=H, steps=STEPS, sampler="ddim",
        controls=[unit("xl_canny", control, weight=0.6)],
    )  # fmt: skip
    ours = generate(Pipeline(model, controlnets=find_control_models(folder)), request).images

    base = xl_pipeline(model)
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=theirs_net)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    with torch.no_grad():
        context, pooled = reference_conditioning(model, encoders, PROMPT)
        negative, negative_pooled = reference_conditioning(model, encoders, NEGATIVE)
        theirs = pipe(
            prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled, image=control, controlnet_conditioning_scale=0.6,
            height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, eta=0.0,
            generator=torch.Generator().manual_seed(5), output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05


def test_txt2img_with_a_t2i_adapter_matches_the_adapter_pipeline(tmp_path):
    """A T2I-Adapter (diffusers' layout, read by our loader) in our generation: the image
    StableDiffusionAdapterPipeline makes with the same weights, noise and DDIM schedule; both add the scaled features
    to both halves of guidance (the extension's balanced mode)."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    from test_t2i_adapter import tiny_unet_model

    model = tiny_unet_model("sd1", 2)  # SD's four levels, which the adapter's four features need
    widths = [model.cfg.unet.model_channels * m for m in model.cfg.unet.channel_mult]
    adapter = randomize(T2IAdapter(in_channels=3, channels=widths, num_res_blocks=2, downscale_factor=8), seed=3).eval()
    folder = tmp_path / "ControlNet"
    folder.mkdir()
    save_file(adapter.state_dict(), folder / "t2iadapter_depth.safetensors")
    size = 64
    control = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(8)) * 255).round() / 255
    settings = {**SETTINGS, "width": size, "height": size, "steps": STEPS}
    request = GenerationRequest([PROMPT], [4], [NEGATIVE], controls=[unit("t2iadapter_depth", control, weight=0.8)],
                                **settings)  # fmt: skip
    ours = generate(Pipeline(model, controlnets=find_control_models(folder)), request).images

    base = diffusers_pipeline(model, StableDiffusionPipeline)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    pipe = StableDiffusionAdapterPipeline(**parts, adapter=adapter, requires_safety_checker=False)
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=embeddings(pipe, model, PROMPT), negative_prompt_embeds=embeddings(pipe, model, NEGATIVE),
            image=control, adapter_conditioning_scale=0.8, num_inference_steps=STEPS,
            guidance_scale=SETTINGS["cfg_scale"], eta=0.0, height=size, width=size,
            generator=torch.Generator().manual_seed(4), output_type="np",
        ).images  # fmt: skip
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)  # (this pipeline decodes to NumPy, (b, H, W, 3))
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05


def test_command_line_units_write_the_extensions_fields_and_read_them_back(tmp_path, ckpt, controlnets, capsys):
    """`ldm txt2img --controlnet FILE:WEIGHT --control-image ... --control-module canny`: the image, its
    `ControlNet 0` infotext field; the same command from that infotext (--infotext) draws the same image."""
    from PIL import Image, ImageDraw

    from latent_diffusion.cli import main
    from latent_diffusion.pipeline.infotext import parse_parameters

    picture = Image.new("RGB", (W, H), "white")
    ImageDraw.Draw(picture).ellipse((8, 16, 40, 48), fill="black")
    picture.save(tmp_path / "control.png")
    file = controlnets[0] / "cn_edges.safetensors"
    common = ["--ckpt", ckpt, "--width", W, "--height", H, "--steps", 3, "--quiet", "--control-image",
              tmp_path / "control.png"]  # fmt: skip
    first = tmp_path / "first"
    assert main([str(a) for a in ["txt2img", "--prompt", "a red circle", "--seed", 3, "--controlnet", f"{file}:0.8",
                                  "--control-module", "canny", "--control-threshold-a", 50, "--control-end", 0.8,
                                  "--control-mode", "prompt", "--outdir", first, *common]]) == 0  # fmt: skip
    with Image.open(first / "00001-3.png") as im:
        text = im.text["parameters"]
        drawn = torch.tensor(list(im.getdata()))
    unit_text = parse_parameters(text)["ControlNet 0"]
    assert unit_text.startswith("Module: canny, Model: cn_edges [")
    for part in ("Weight: 0.8", "Resize Mode: Crop and Resize", "Threshold A: 50.0", "Guidance End: 0.8",
                 "Control Mode: My prompt is more important"):  # fmt: skip
        assert part in unit_text
    again = tmp_path / "again"
    assert main([str(a) for a in ["txt2img", "--infotext", first / "00001-3.png", "--controlnet", file,
                                  "--outdir", again, *common]]) == 0  # fmt: skip
    with Image.open(again / "00001-3.png") as im:
        # the same settings; a slider left at its default is written as the extension declares it ("200"), and
        # once read back it is a value given ("200.0"), as the extension writes a value a request gives
        assert control_values(parse_parameters(im.text["parameters"])["ControlNet 0"]) == control_values(unit_text)
        assert torch.equal(torch.tensor(list(im.getdata())), drawn)


def control_values(text: str) -> dict:
    """A `ControlNet k` field's values, numbers as numbers."""
    values = dict(item.split(": ", 1) for item in text.split(", "))
    return {key: float(value) if value.replace(".", "", 1).isdigit() else value for key, value in values.items()}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--control-image", "IMAGE"], "the --control flags need --controlnet FILE"),
        (["--controlnet", "FILE", "--controlnet", "FILE", "--control-image", "IMAGE"], "2 --controlnet units need"),
        (["--controlnet", "FILE", "--control-image", "IMAGE", "--control-module", "sharpen"], "sharpen"),
        (["--controlnet", "FILE:3x", "--control-image", "IMAGE"], "the weight a number"),
        (["--controlnet", "FILE:11", "--control-image", "IMAGE"], "weight must be between 0 and 10"),
        (
            ["--controlnet", "FILE", "--control-image", "IMAGE", "--control-start", "0.9", "--control-end", "0.1"],
            "start not after end",
        ),
        (["--controlnet", "nowhere.safetensors", "--control-image", "IMAGE"], "no such file"),
        (["--controlnet", "FILE", "--control-image", "nowhere.png"], "nowhere.png"),
        (["--controlnet", "FILE", "--control-image", "IMAGE", "--control-module", "depth"], "'depth_midas' needs "),
        (["--controlnet", "FILE", "--control-image", "IMAGE", "--annotator-dir", "nowhere"], "nowhere: no such folder"),
    ],
)
def test_command_line_bad_units_exit_2_writing_nothing(tmp_path, ckpt, controlnets, capsys, flags, message):
    from PIL import Image

    from latent_diffusion.cli import main

    Image.new("RGB", (W, H), "white").save(tmp_path / "control.png")
    file = str(controlnets[0] / "cn_edges.safetensors")
    flags = [f.replace("FILE", file).replace("IMAGE", str(tmp_path / "control.png")) for f in flags]
    out = tmp_path / "out"
    code = main(["txt2img", "--ckpt", str(ckpt), "--prompt", "x", "--width", str(W), "--height", str(H), "--steps",
                 "1", "--outdir", str(out), *flags])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_command_line_annotator_modules_run_from_the_annotator_folder(tmp_path, ckpt, controlnets, fake_controlnet_aux):
    """`--annotator-dir` names the annotators' weights: a depth unit runs its detector (controlnet_aux's, stood in
    for) on the control image at the unit's resolution."""
    from PIL import Image

    from latent_diffusion.cli import main

    Image.new("RGB", (W, H), "white").save(tmp_path / "control.png")
    (tmp_path / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"weights")
    flags = ["--controlnet", controlnets[0] / "cn_edges.safetensors", "--control-image", tmp_path / "control.png",
             "--control-module", "depth", "--control-processor-res", 64, "--annotator-dir", tmp_path]  # fmt: skip
    code = main([str(a) for a in ["txt2img", "--ckpt", ckpt, "--prompt", "x", "--width", W, "--height", H, "--steps",
                                  1, "--quiet", "--outdir", tmp_path / "out", *flags]])  # fmt: skip
    assert code == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1
    assert FakeDetector.built == [str(tmp_path)] and FakeDetector.calls[0]["detect_resolution"] == 64


def test_the_hires_pass_fits_the_first_passs_map_again(tiny_models, controlnets, maps):
    """As the extension: the hires pass's map is the preprocessor's first map fitted to the larger size (not run
    again), and canny's is soft-injected there (`high_res_fix_forced_soft_injection`)."""
    from latent_diffusion.pipeline.control_images import control_map, prepare_control
    from latent_diffusion.pipeline.generate import generate_plan
    from latent_diffusion.pipeline.plan import resolve
    from latent_diffusion.pipeline.request import HiresFix

    units = [unit("cn_edges", maps[0], module="canny"), unit("cn_depth", maps[1])]
    request = GenerationRequest([PROMPT], [1], width=W, height=H, steps=2, hires=HiresFix(scale=1.5, steps=2),
                                controls=units)  # fmt: skip
    plan = resolve(request, pipeline(tiny_models, controlnets))
    first, second = plan.controls[0], plan.hires.controls[0]
    assert first.hint.shape[-2:] == (H, W) and second.hint.shape[-2:] == (H * 3 // 2, W * 3 // 2)
    as_8_bit = (maps[0][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    module, mode, detected = control_map(as_8_bit, "canny", size=(H, W), resize_mode="Just Resize")
    torch.testing.assert_close(second.hint, prepare_control(detected, module, mode, H * 3 // 2, W * 3 // 2)[0])
    assert (first.soft, second.soft, plan.hires.controls[1].soft) == (False, True, False)
    images = generate_plan(plan).images
    assert images.shape == (1, 3, H * 3 // 2, W * 3 // 2)


def test_plans_with_different_maps_merge_into_one_batch(tiny_models, controlnets, maps):
    """Two requests whose units differ only in their images share a U-Net batch (the job queue's `merge`): their maps
    in image order, and each image as it is drawn alone."""
    from latent_diffusion.pipeline.generate import generate_plan
    from latent_diffusion.pipeline.plan import merge, resolve

    pipe = pipeline(tiny_models, controlnets)
    requests = [
        GenerationRequest([PROMPT] * 2, [1, 2], width=W, height=H, steps=2, controls=[unit("cn_edges", maps[0])]),
        GenerationRequest([PROMPT], [3], width=W, height=H, steps=2, controls=[unit("cn_edges", maps[1])]),
    ]
    plans = [resolve(r, pipe) for r in requests]
    assert plans[0].batch_key() == plans[1].batch_key()
    other = resolve(dataclasses.replace(requests[1], controls=[unit("cn_edges", maps[1], weight=0.5)]), pipe)
    assert other.batch_key() != plans[0].batch_key()
    merged = merge(plans)
    assert len(merged.controls[0].hint) == len(merged.controls[0].maps) == 3
    torch.testing.assert_close(merged.controls[0].hint, torch.cat([maps[0], maps[0], maps[1]]))
    together = generate_plan(merged).images
    alone = torch.cat([generate_plan(plan).images for plan in plans])
    # Batches of 3 and of 2 + 1 run the convolutions at other batch sizes, whose kernels sum in other orders: 1.2e-5
    # seen with one thread per test worker (as tests/test_composable.py's batch against alone, 2e-5)
    torch.testing.assert_close(together, alone, atol=3e-5, rtol=0)
