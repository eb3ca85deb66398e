"""Reference units (reference_only, reference_adain, reference_adain+attn) against the web UI's ControlNet extension
(1.1.455, `scripts/hook.py`): its tables of which blocks take part at which weight, written out here for SD 1.5 and
SDXL at full size; its style-fidelity rules; and closed-form cases of the injection: a reference pass identical to
the main pass leaves the U-Net's prediction as it was (attention over [n; n] is attention over n, and AdaIN to a
feature map's own statistics is the identity), and with style fidelity 1 the unconditional rows are the plain
U-Net's."""

import dataclasses

import pytest
import torch

import latent_diffusion.pipeline.reference as reference
from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, hint_field
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.reference import adain_weights, attention_weights, style_fidelity
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest

from conftest import tiny_model

H, W = 64, 48


def full_size_unet(name: str):
    with torch.device("meta"):
        return LatentDiffusion(preset(name)).model.diffusion_model


def block_names(unet) -> dict[int, str]:
    """id -> the extension's short name of the block a module sits in: in7, mid, out3, ..."""
    names = {}
    for kind, blocks in (("in", unet.input_blocks), ("out", unet.output_blocks)):
        for i, block in enumerate(blocks):
            names |= {id(m): f"{kind}{i}" for m in block.modules()}
    return names | {id(m): "mid" for m in unet.middle_block.modules()}


def test_the_blocks_and_weights_are_the_extensions_tables():
    """SD 1.5: 16 transformer blocks ranked widest first (in7, in8, mid, out3-5 at 1280; in4, in5, out6-8 at 640;
    in1, in2, out9-11 at 320), the i-th at i/16; AdaIN on input blocks 4, 5, 7, 8, 10, 11 at 2(1 - k/6), the middle
    at 0, output blocks 0-7 at 2k/8. SDXL: 70 blocks, the 60 at 1280 first; AdaIN on input 4, 5, 7, 8, output 0-5."""
    unet = full_size_unet("sd-v1.5")
    names = block_names(unet)
    ranked = sorted(attention_weights(unet).values(), key=lambda bw: bw[1])
    assert [names[id(b)] for b, _ in ranked] == [
        "in7", "in8", "mid", "out3", "out4", "out5", "in4", "in5", "out6", "out7", "out8",
        "in1", "in2", "out9", "out10", "out11",
    ]  # fmt: skip
    assert [w for _, w in ranked] == [i / 16 for i in range(16)]
    adain = [(names[id(next(b.modules()))], w) for b, w in adain_weights(unet, preset("sd-v1.5").unet)]
    expected = [("mid", 0.0)] + [(f"in{i}", 2 * (1 - k / 6)) for k, i in enumerate((4, 5, 7, 8, 10, 11))]
    assert adain == expected + [(f"out{i}", 2 * i / 8) for i in range(8)]

    xl = full_size_unet("sdxl-base")
    ranked = sorted(attention_weights(xl).values(), key=lambda bw: bw[1])
    assert len(ranked) == 70 and {b.norm1.normalized_shape[0] for b, _ in ranked[:60]} == {1280}
    names = block_names(xl)
    adain = [names[id(next(b.modules()))] for b, _ in adain_weights(xl, preset("sdxl-base").unet)]
    assert adain == ["mid", "in4", "in5", "in7", "in8", "out0", "out1", "out2", "out3", "out4", "out5"]


@pytest.mark.parametrize(
    ("threshold_a", "mode", "sdxl", "hires", "expected"),
    [(None, "balanced", False, False, 0.5), (0.8, "balanced", True, False, 0.8**3), (0.3, "control", False, False, 1.0),
     (0.3, "prompt", False, False, 0.0), (0.3, "balanced", False, True, 0.0), (7.0, "balanced", False, False, 1.0)],
)  # fmt: skip
def test_style_fidelity_follows_the_extension(threshold_a, mode, sdxl, hires, expected):
    assert style_fidelity(threshold_a, mode, sdxl, hires) == pytest.approx(expected)


def guided(model, plan, x, t, context):
    """One guided evaluation through generation's path: row 0 unconditional, row 1 conditional."""
    cond = {
        "crossattn": context,
        MARK: torch.tensor([0.0, 1.0]),
        hint_field(0): plan.controls[0].hint.expand(2, -1, -1, -1),
    }
    with torch.no_grad():
        return controlled_unet(model, plan.controls, SamplingClock(20))(x, t, cond)


@pytest.mark.parametrize("module", ["reference_only", "reference_adain", "reference_adain+attn"])
def test_a_reference_pass_like_the_main_pass_changes_nothing(module, monkeypatch):
    """ref_xt made equal to x (its noise chosen so): each bank is the main pass's own n (attention over [n; n] is
    attention over n) and its own statistics (AdaIN the identity), so the prediction is the plain U-Net's; with
    another reference it is not, and with style fidelity 1 ("ControlNet is more important") the unconditional
    row still is."""
    model = tiny_model("sd1", seed=3)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, H // 8, W // 8, generator=g), torch.tensor([400.0, 400.0])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        plain = model.model(x, t, {"crossattn": context})
    unit = ControlUnit("None", torch.rand(1, 3, H, W, generator=g), module=module, resize_mode="resize")
    plan = resolve(GenerationRequest(["x"], [1], width=W, height=H, controls=[unit]), Pipeline(model))
    a = model.alphas_cumprod[400]
    monkeypatch.setattr(reference, "noise_like", lambda z, _: (x - a.sqrt() * z) / (1 - a).sqrt())
    torch.testing.assert_close(guided(model, plan, x, t, context), plain, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(reference, "noise_like", lambda z, _: torch.randn(z.shape, generator=g))
    other = guided(model, plan, x, t, context)
    assert (other - plain).abs().max() > 1e-3
    strong = ControlUnit("None", unit.image, module=module, resize_mode="resize", control_mode="control")
    plan = resolve(GenerationRequest(["x"], [1], width=W, height=H, controls=[strong]), Pipeline(model))
    out = guided(model, plan, x, t, context)
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-5)  # unconditional: plain at sf 1
    assert (out[1] - plain[1]).abs().max() > 1e-3


def test_a_weight_of_0_writes_nothing_and_generation_runs_every_module():
    """The unit's weight is the threshold a block's weight must be under: at 0 no block takes part. Each module
    changes a guided generation (SD 1.x, SDXL, and an inpainting U-Net, whose reference pass sees a zero mask)."""
    for variant in ("sd1", "sdxl", "inpaint"):
        model = tiny_model(variant, seed=1)
        pipe, image = Pipeline(model), torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(5))
        fields = dict(width=W, height=H, steps=3, cfg_scale=5.0)
        if variant == "inpaint":
            mask = torch.zeros(1, 1, H, W)
            mask[..., 16:48, 8:40] = 1
            fields |= dict(init_image=image, mask=mask)
        plain = generate(pipe, GenerationRequest(["a cat"], [1], ["x"], **fields)).images
        for module in reference.MODULES:
            unit = ControlUnit("None", image.flip(-1), module=module)
            changed = generate(pipe, GenerationRequest(["a cat"], [1], ["x"], controls=[unit], **fields)).images
            assert (changed - plain).abs().max() > 0.01, (variant, module)
        unit = ControlUnit("None", image.flip(-1), module="reference_only", weight=0.0)
        same = generate(pipe, GenerationRequest(["a cat"], [1], ["x"], controls=[unit], **fields)).images
        assert torch.equal(same, plain)


def test_a_compiled_unet_runs_a_reference_unit_eagerly_and_draws_the_same_image():
    """`--compile` with a reference unit: the hooked U-Net runs eagerly (its banks are Python state that would break
    the graph and recompile every block), the same image as without compiling; the plain request stays compiled."""
    from torch._dynamo.utils import counters

    from latent_diffusion.pipeline.compiling import compile_model

    model = tiny_model("sd1", seed=2)
    pipe, image = Pipeline(model), torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    unit = ControlUnit("None", image, module="reference_adain+attn")
    request = GenerationRequest(["a cat"], [1], ["x"], width=W, height=H, steps=3, cfg_scale=5.0, controls=[unit])
    eager = generate(pipe, request).images
    compile_model(model, backend="aot_eager")
    counters.clear()
    compiled = generate(pipe, dataclasses.replace(request, compile=True)).images
    assert torch.equal(compiled, eager) and not counters["graph_break"] and not counters["recompiles"]
    generate(pipe, dataclasses.replace(request, controls=[], compile=True))
    assert counters["stats"]["unique_graphs"] == 2  # the plain request: the U-Net's graph and the decoder's


def test_the_command_line_runs_a_reference_unit_the_same_every_time(tmp_path, ckpt, capsys):
    """`--controlnet None:WEIGHT --control-module reference_only`: the infotext names Model None; the draws come from
    the request's seed, so the command draws the same image again (and another seed another)."""
    from PIL import Image

    from latent_diffusion.cli import main
    from latent_diffusion.pipeline.infotext import parse_parameters

    Image.new("RGB", (W, H), (200, 40, 40)).save(tmp_path / "ref.png")
    common = ["txt2img", "--ckpt", str(ckpt), "--prompt", "a circle", "--width", str(W), "--height", str(H),
              "--steps", "3", "--quiet", "--controlnet", "None:0.9", "--control-image", str(tmp_path / "ref.png"),
              "--control-module", "reference_only"]  # fmt: skip
    drawn = []
    for seed, out in ((3, "a"), (3, "b"), (4, "c")):
        assert main([*common, "--seed", str(seed), "--outdir", str(tmp_path / out)]) == 0
        with Image.open(next((tmp_path / out).glob("*.png"))) as im:
            drawn.append(torch.tensor(list(im.getdata())))
            text = im.text["parameters"]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    assert parse_parameters(text)["ControlNet 0"].startswith("Module: reference_only, Model: None, Weight: 0.9")
    bad = [*common[:-2], "--control-module", "canny", "--outdir", str(tmp_path / "d")]
    assert main(bad) == 2 and "needs a --control-module of reference_adain, " in capsys.readouterr().err
