"""A control unit's options beyond the weight and the window, against the web UI's ControlNet extension (1.1.455),
its rules written out here from `scripts/hook.py`: advanced weighting (the residuals' scales replace the weight
and the soft weights), the shuffle ControlNet's global average pooling, and hr_option (which passes of txt2img's
hires fix a unit acts in)."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import test_control
from latent_diffusion.models.controlnet import ControlNet, UnionConfig
from latent_diffusion.models.unet import ControlResiduals
from latent_diffusion.pipeline.control import find_control_models, pools
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, hint_field
from latent_diffusion.pipeline.generate import generate_plan
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import GenerationRequest, HiresFix, RequestError
from test_control import PROMPT, H, W, pipeline, unit

from conftest import randomize, seeded, tiny_config

controlnets, maps = test_control.controlnets, test_control.maps  # the module's fixtures, here too
COND_MARK = torch.tensor([0.0, 1.0])  # an unconditional row, then a conditional one


def unet_with_control(model, controls, hint):
    """One guided evaluation (an unconditional and a conditional row) through generation's path."""
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, H // 8, W // 8, generator=g), torch.tensor([500, 500])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    cond = {"crossattn": context, MARK: COND_MARK, hint_field(0): hint.expand(2, -1, -1, -1)}
    with torch.no_grad():
        ours = controlled_unet(model, controls, SamplingClock(20))(x, t, cond)
    return ours, (x, t, context)


def expected_output(model, net, hint, inputs, transform):
    """The U-Net with the extension's residuals: `transform` of the ControlNet's 13 outputs."""
    x, t, context = inputs
    with torch.no_grad():
        out = net(x, hint.expand(2, -1, -1, -1), t, context)
        control = transform([*out.skips, out.middle])
        return model.model.diffusion_model(x, t, context, control=ControlResiduals(control[:-1], control[-1]))


@pytest.mark.parametrize("mode", ["balanced", "prompt"])
def test_advanced_weighting_replaces_the_weight_and_the_soft_weights(tiny_models, controlnets, maps, mode):
    """`control_scales = param.advanced_weighting` after the soft injection's: the list's scales, not times the
    weight; zip() with a shorter list leaves the last residuals (the deepest skips, the middle block) without
    control."""
    model, net = tiny_models["sd1"], controlnets[1][0]
    weights = (0.2, 1.5, 0.0, 0.7, 1.0, 0.3, 2.0, 0.9, 0.4, 1.1)  # 10 of the 13
    settings = dict(weight=0.7, control_mode=mode, advanced_weighting=weights)
    request = GenerationRequest([PROMPT], [1], width=W, height=H, controls=[unit("cn_edges", maps[0], **settings)])
    plan = resolve(request, pipeline(tiny_models, controlnets))
    ours, inputs = unet_with_control(model, plan.controls, maps[0])
    scales = [*weights, 0.0, 0.0, 0.0]
    expected = expected_output(model, net, maps[0], inputs, lambda c: [o * s for o, s in zip(c, scales)])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    request = dataclasses.replace(request, controls=[unit("cn_edges", maps[0], weight=0.7)])
    plain = resolve(request, pipeline(tiny_models, controlnets))
    assert (unet_with_control(model, plain.controls, maps[0])[0] - ours).abs().max() > 1e-3


def test_a_region_mask_limits_the_residuals(tiny_models, controlnets, maps):
    """effective_region_mask: `param.apply_effective_region_mask(c * scale)`, each residual times the mask (its first
    channel) resized to it, bilinear; a white mask is none, a black one leaves no control."""
    model, net = tiny_models["sd1"], controlnets[1][0]
    region = torch.zeros(1, 1, 30, 20)
    region[..., :, :8] = 1.0
    region[..., 10:20, 8:] = 0.5

    def output(mask):
        units = [unit("cn_edges", maps[0], weight=0.7, control_mode="prompt", region=mask)]
        request = GenerationRequest([PROMPT], [1], width=W, height=H, controls=units)
        return unet_with_control(model, resolve(request, pipeline(tiny_models, controlnets)).controls, maps[0])

    ours, inputs = output(region)
    soft = [0.7 * 0.825 ** float(12 - i) for i in range(13)]

    def masked(control):
        return [o * s * F.interpolate(region, size=o.shape[-2:], mode="bilinear") for o, s in zip(control, soft)]

    torch.testing.assert_close(ours, expected_output(model, net, maps[0], inputs, masked), atol=1e-6, rtol=0)
    whole = expected_output(model, net, maps[0], inputs, lambda control: [o * s for o, s in zip(control, soft)])
    torch.testing.assert_close(output(torch.ones(1, 1, 3, 3))[0], whole, atol=1e-6, rtol=0)
    none = expected_output(model, net, maps[0], inputs, lambda control: [o * 0 for o in control])
    torch.testing.assert_close(output(torch.zeros(1, 1, 3, 3))[0], none, atol=1e-6, rtol=0)
    assert (ours - whole).abs().max() > 1e-3 and (ours - none).abs().max() > 1e-3


def test_a_union_controlnets_kind_reaches_it(tiny_models, maps, tmp_path):
    """A union unit's kind goes to its ControlNet: another kind, another image; the same kind, the same image; and
    requests of different kinds do not share a batch."""
    with seeded(3):
        net = randomize(ControlNet(tiny_config("sd1").unet, union=UnionConfig(types=8, width=32, type_width=8)), 3)
    save_file(net.state_dict(), tmp_path / "union.safetensors")
    folder = Pipeline(tiny_models["sd1"], controlnets=find_control_models(tmp_path))

    def plan(kind):
        units = [unit("union", maps[0], union_type=kind)]
        return resolve(GenerationRequest([PROMPT], [1], width=W, height=H, steps=2, controls=units), folder)

    depth, edges = (generate_plan(plan(kind)).images for kind in ("Depth", "Hard Edge"))
    assert (depth - edges).abs().max() > 1e-3 and torch.equal(generate_plan(plan("Depth")).images, depth)
    assert plan("Depth").batch_key() != plan("Hard Edge").batch_key()
    with pytest.raises(RequestError, match="unknown union_type 'Edges'"):
        plan("Edges")
    with seeded(3):  # (xinsir's first union model knows six kinds: not Tile, not Inpaint)
        six = randomize(ControlNet(tiny_config("sd1").unet, union=UnionConfig(types=6, width=32, type_width=8)), 3)
    save_file(six.state_dict(), tmp_path / "union.safetensors")
    folder = Pipeline(tiny_models["sd1"], controlnets=find_control_models(tmp_path))
    with pytest.raises(RequestError, match=r"knows 6 kinds of control image \(OpenPose, .*, Segmentation\), not Tile"):
        plan("Tile")


def test_the_shuffle_controlnet_pools_the_conditional_rows_residuals(tiny_models, controlnets, maps, tmp_path):
    """A ControlNet file named "shuffle" (control_v11e_sd15_shuffle): `control = [c * cond_mark ...]` in every
    control mode, scaled, then `torch.mean(c, dim=(2, 3), keepdim=True)`, which the U-Net adds at every place. An
    SDXL ControlNet or another name is not pooled."""
    folder, nets = controlnets
    shutil.copy(folder / "cn_edges.safetensors", tmp_path / "control_v11e_sd15_shuffle.safetensors")
    model = tiny_models["sd1"]
    pipe = Pipeline(model, controlnets=find_control_models(tmp_path))
    shuffle = unit("control_v11e_sd15_shuffle", maps[0], weight=0.6)
    plan = resolve(GenerationRequest([PROMPT], [1], width=W, height=H, controls=[shuffle]), pipe)
    assert plan.controls[0].pooled
    ours, inputs = unet_with_control(model, plan.controls, maps[0])

    def pooled(control):
        control = [c * COND_MARK[:, None, None, None] for c in control]
        return [torch.mean(c * 0.6, dim=(2, 3), keepdim=True) for c in control]

    torch.testing.assert_close(ours, expected_output(model, nets[0], maps[0], inputs, pooled), atol=1e-6, rtol=0)
    plain = resolve(GenerationRequest([PROMPT], [1], width=W, height=H, controls=[unit("cn_edges", maps[0])]),
                    pipeline(tiny_models, controlnets))  # fmt: skip
    assert not plain.controls[0].pooled
    sdxl = ControlNet(tiny_config("sdxl").unet)
    assert not pools(sdxl, Path("controlnet-shuffle-sdxl.safetensors"))


def test_hr_option_chooses_the_passes_a_unit_acts_in(tiny_models, controlnets, maps, monkeypatch):
    """`disabled_by_hr_option`: "Low res only" acts in the first pass alone, "High res only" in the hires pass alone,
    "Both" in both; without the hires fix every unit acts in its one pass (the extension passes BOTH)."""
    sizes = []
    forward = ControlNet.forward
    monkeypatch.setattr(
        ControlNet, "forward", lambda self, x, *a: sizes.append(tuple(x.shape[-2:])) or forward(self, x, *a)
    )
    first, second = (H // 8, W // 8), (H // 8 * 2, W // 8 * 2)
    for option, passes in (("both", {first, second}), ("low", {first}), ("high", {second})):
        sizes.clear()
        request = GenerationRequest([PROMPT], [1], width=W, height=H, steps=2, hires=HiresFix(scale=2.0, steps=2),
                                    controls=[unit("cn_edges", maps[0], hr_option=option)])  # fmt: skip
        generate_plan(resolve(request, pipeline(tiny_models, controlnets)))
        assert set(sizes) == passes, option
    sizes.clear()
    request = GenerationRequest([PROMPT], [1], width=W, height=H, steps=2,
                                controls=[unit("cn_edges", maps[0], hr_option="high")])  # fmt: skip
    generate_plan(resolve(request, pipeline(tiny_models, controlnets)))
    assert set(sizes) == {first}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(hr_option="sometimes"), "unknown hr_option 'sometimes'; choose one of both, low, high"),
        (
            dict(advanced_weighting=(1.0, float("nan"))),
            "advanced_weighting must be a tuple of 1 to 64 numbers in [0, 10]",
        ),
        (dict(advanced_weighting=()), "advanced_weighting must be a tuple of 1 to 64 numbers"),
        (dict(advanced_weighting=[1.0]), "advanced_weighting must be a tuple of 1 to 64 numbers"),
        (dict(region=torch.ones(1, 3, 8, 8)), "the region must be a (1, 1, H, W) tensor"),
        (dict(region=torch.ones(2, 1, 8, 8)), "one region mask for all images, not 2"),
    ],
)
def test_bad_options_are_refused_before_any_work(tiny_models, controlnets, maps, settings, message):
    request = GenerationRequest([PROMPT], [1], width=W, height=H, controls=[unit("cn_edges", maps[0], **settings)])
    with pytest.raises(RequestError, match=re.escape(message)):
        resolve(request, pipeline(tiny_models, controlnets))


def test_the_command_line_takes_hr_option_per_unit(controlnets, maps, tmp_path):
    """`--control-hr-option`, once for all units or once per unit, as the other --control flags."""
    from latent_diffusion.cli_arguments import build_parser
    from latent_diffusion.cli_control import controls_from_args
    from latent_diffusion.pipeline.images import to_pil

    to_pil(maps[0][0]).save(tmp_path / "map.png")
    file, image = str(controlnets[0] / "cn_edges.safetensors"), str(tmp_path / "map.png")
    flags = ["--controlnet", file, "--control-image", image, "--controlnet", file, "--control-image", image]
    args = build_parser().parse_args(["txt2img", *flags, "--control-hr-option", "low", "--control-hr-option", "high"])
    assert [u.hr_option for u in controls_from_args(args)[0]] == ["low", "high"]
    args = build_parser().parse_args(["txt2img", *flags])
    assert [u.hr_option for u in controls_from_args(args)[0]] == ["both", "both"]
    # the images a unit may have beside its own: its mask and its region, greyscale, once for all or once per unit
    to_pil(torch.zeros(3, 20, 30)).save(tmp_path / "region.png")
    more = ["--control-mask", image, "--control-region", str(tmp_path / "region.png"), "--control-region", image]
    units = controls_from_args(build_parser().parse_args(["txt2img", *flags, *more]))[0]
    assert [u.mask.shape for u in units] == [(1, 1, H, W)] * 2
    assert [u.region.shape for u in units] == [(1, 1, 20, 30), (1, 1, H, W)] and units[0].region.max() == 0
    # a union ControlNet's kind: given, or that of the module's control type (none where its types disagree)
    kinds = ["--control-union-type", "soft-edge", "--control-union-type", "depth"]
    assert [u.union_type for u in controls_from_args(build_parser().parse_args(["txt2img", *flags, *kinds]))[0]] == [
        "Soft Edge",
        "Depth",
    ]
    unknown = build_parser().parse_args(
        ["txt2img", *flags, "--control-module", "canny", "--control-union-type", "unknown"]
    )
    assert [u.union_type for u in controls_from_args(unknown)[0]] == [None, None]
    for module, kind in (("canny", "Hard Edge"), ("depth_midas", "Depth"), ("invert", None), ("none", None)):
        args = build_parser().parse_args(["txt2img", *flags, "--control-module", module])
        assert [u.union_type for u in controls_from_args(args)[0]] == [kind, kind], module
