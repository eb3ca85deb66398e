"""ControlNet-LLLite (`models/lllite.py`) against the web UI's ControlNet extension's `scripts/controlnet_lllite.py`
(1.1.455, after kohya's ComfyUI node) written out here: a file of kohya's layout with random weights, its modules
hooked onto the U-Net's projections as the extension hooks them (the block's input shape read as its
`current_h_shape`), against our unit through the controlled U-Net; then the unit in a generation, and refusals."""

import re

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.models.lllite import lllite_from_state_dict
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, hint_field
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError

H, W = 64, 48  # pixels: latent 8x6, the second level 4x3
TARGETS = {  # module name -> (in_dim, depth): a level-0 and a level-1 projection of the tiny U-Net, the middle block's
    "lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (32, 1),
    "lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_v": (32, 1),
    "lllite_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_q": (64, 2),
    "lllite_unet_middle_block_1_transformer_blocks_0_attn1_to_k": (64, 3),
    "lllite_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q": (32, 1),
}


# scripts/controlnet_lllite.py, written out ------------------------------------------------------------------------


class RefLLLiteModule(torch.nn.Module):
    def __init__(self, in_dim, depth, cond_emb_dim, mlp_dim):
        super().__init__()
        modules = [torch.nn.Conv2d(3, cond_emb_dim // 2, kernel_size=4, stride=4, padding=0)]
        if depth == 1:
            modules += [torch.nn.ReLU(), torch.nn.Conv2d(cond_emb_dim // 2, cond_emb_dim, kernel_size=2, stride=2)]
        elif depth == 2:
            modules += [torch.nn.ReLU(), torch.nn.Conv2d(cond_emb_dim // 2, cond_emb_dim, kernel_size=4, stride=4)]
        else:
            modules += [torch.nn.ReLU(), torch.nn.Conv2d(cond_emb_dim // 2, cond_emb_dim // 2, kernel_size=4, stride=4)]
            modules += [torch.nn.ReLU(), torch.nn.Conv2d(cond_emb_dim // 2, cond_emb_dim, kernel_size=2, stride=2)]
        self.conditioning1 = torch.nn.Sequential(*modules)
        self.down = torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, in_dim))
        self.cond_image = None

    def forward(self, x, blk_shape):
        cx = self.conditioning1(self.cond_image.to(x.device, dtype=x.dtype))
        _, _, h, w = blk_shape
        cx = torch.nn.functional.interpolate(cx, (h, w), mode="nearest-exact")
        n, c, h, w = cx.shape
        cx = cx.view(n, c, h * w).permute(0, 2, 1)
        if x.shape[0] != cx.shape[0]:
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)
        cx = torch.cat([cx, self.down(x)], dim=2)
        return self.up(self.mid(cx))


def reference_modules(seed: int = 0) -> dict[str, RefLLLiteModule]:
    torch.manual_seed(seed)
    modules = {name: RefLLLiteModule(dim, depth, 16, 24) for name, (dim, depth) in TARGETS.items()}
    with torch.no_grad():
        for m in modules.values():
            for p in m.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
    return modules


def hooked_output(model, modules, cond, weight, x, t, context):
    """The extension's `PlugableControlLLLite.hook` and hacked forward on the U-Net: each projection's input plus the
    weighted terms, the cond image cond · 2 − 1, the block's input shape as `current_h_shape`."""
    unet = model.model.diffusion_model
    state, originals = {}, []
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    handles = [b.register_forward_pre_hook(lambda m, args: state.update(shape=args[0].shape)) for b in blocks]
    for name, module in modules.items():
        module.cond_image = cond * 2.0 - 1.0
        k = name.replace("middle_block", "middle_blocks_0")
        match = re.match("lllite_unet_(.*)_blocks_(.*)_1_transformer_blocks_(.*)_(.*)_to_(.*)", k, re.M | re.I)
        root, block, number, attn, proj = match.groups()
        if root == "input":
            b = unet.input_blocks[int(block)][1].transformer_blocks[int(number)]
        elif root == "output":
            b = unet.output_blocks[int(block)][1].transformer_blocks[int(number)]
        else:
            b = unet.middle_block[1].transformer_blocks[int(number)]
        linear = getattr(getattr(b, attn), "to_" + proj)

        def forward(x, linear=linear, module=module, original=linear.forward):
            return original(x + module(x, state["shape"]) * weight)

        originals.append(linear)
        linear.forward = forward
    try:
        with torch.no_grad():
            return unet(x, t, context).float()
    finally:
        for linear in originals:
            del linear.forward
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def lllite_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lllite")
    modules = reference_modules()
    sd = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "controllllite_tiny.safetensors")
    return folder, modules


def test_lllite_matches_the_extensions_hooks(tiny_models, lllite_file):
    folder, modules = lllite_file
    model = tiny_models["sd1"]
    g = torch.Generator().manual_seed(3)
    hint = torch.rand(1, 3, H, W, generator=g)
    unit = ControlUnit("controllllite_tiny", hint, resize_mode="resize", weight=0.7)
    request = GenerationRequest(["a cat"], [1], width=W, height=H, controls=[unit])
    plan = resolve(request, Pipeline(model, controlnets=find_control_models(folder)))
    x, t = torch.randn(2, 4, H // 8, W // 8, generator=g), torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    cond = {
        "crossattn": context,
        MARK: torch.tensor([0.0, 1.0]),
        hint_field(0): plan.controls[0].hint.expand(2, -1, -1, -1),
    }
    with torch.no_grad():
        ours = controlled_unet(model, plan.controls, SamplingClock(4))(x, t, cond)
        plain = model.model.diffusion_model(x, t, context).float()
    expected = hooked_output(model, modules, plan.controls[0].hint, 0.7, x, t, context)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-3
    with torch.no_grad():  # the U-Net is itself again afterwards
        assert torch.equal(model.model.diffusion_model(x, t, context).float(), plain)


def test_the_file_reads_back_its_modules(lllite_file):
    """Each module's depth (its conditioning convolutions) and widths read off the file, as the extension reads them."""
    from safetensors.torch import load_file

    folder, modules = lllite_file
    ours = lllite_from_state_dict(load_file(folder / "controllllite_tiny.safetensors"))

    def convolutions(module) -> list:
        return [
            (c.kernel_size, c.stride, c.out_channels) for c in module.conditioning1 if isinstance(c, torch.nn.Conv2d)
        ]

    assert {n: convolutions(m) for n, m in ours.named_children()} == {n: convolutions(m) for n, m in modules.items()}


def test_an_lllite_unit_in_a_generation_and_refusals(tiny_models, lllite_file, tmp_path):
    """The unit draws another image, none outside its window; a file naming a projection this U-Net lacks, and one
    of a module without its parts, are refused in one line naming the file."""
    from safetensors.torch import load_file

    folder, _ = lllite_file
    pipeline = Pipeline(tiny_models["sd1"], controlnets=find_control_models(folder))
    hint = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))

    def drawn(pipeline, name="controllllite_tiny", **unit):
        units = [ControlUnit(name, hint, **unit)] if unit else []
        return generate(pipeline, GenerationRequest(["a cat"], [3], width=W, height=H, steps=2, controls=units)).images

    assert (drawn(pipeline, weight=1.0) - drawn(pipeline)).abs().max() > 1e-3
    torch.testing.assert_close(
        drawn(pipeline, guidance_start=1.0, guidance_end=1.0), drawn(pipeline), atol=1e-6, rtol=0
    )
    sd = load_file(folder / "controllllite_tiny.safetensors")
    first = "lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    elsewhere = {k.replace(first, first.replace("blocks_1_1", "blocks_9_1")): v for k, v in sd.items()}
    save_file(elsewhere, tmp_path / "elsewhere.safetensors")
    save_file(
        {k: v for k, v in sd.items() if not k.startswith(first + ".conditioning1")}, tmp_path / "part.safetensors"
    )
    files = Pipeline(tiny_models["sd1"], controlnets=find_control_models(tmp_path))
    with pytest.raises(
        RequestError, match="elsewhere.safetensors: a ControlNet-LLLite for another U-Net: this one has no"
    ):
        drawn(files, "elsewhere", weight=1.0)
    with pytest.raises(RequestError, match="part.safetensors: an incomplete ControlNet-LLLite module: no "):
        drawn(files, "part", weight=1.0)
    text = {k.replace("attn1_to_q", "attn2_to_k"): v for k, v in sd.items() if k.startswith(first)}
    save_file(text, tmp_path / "text.safetensors")
    with pytest.raises(RequestError, match="a cross-attention's key or value projection, which reads the text"):
        drawn(Pipeline(tiny_models["sd1"], controlnets=find_control_models(tmp_path)), "text", weight=1.0)
    with pytest.raises(RequestError, match="a ControlNet-LLLite takes an RGB map, not the inpaint modules' RGBA"):
        drawn(pipeline, weight=1.0, module="inpaint_only", mask=torch.ones(1, 1, 40, 56))
    units = [ControlUnit("controllllite_tiny", hint), ControlUnit("None", hint, module="reference_only")]
    with pytest.raises(RequestError, match="a reference unit and a ControlNet-LLLite unit cannot run together"):
        generate(pipeline, GenerationRequest(["a cat"], [3], width=W, height=H, steps=2, controls=units))


def test_an_lllite_unit_through_the_server(tiny_models, lllite_file, serve, tmp_path):
    """A web UI client's unit naming the LLLite file, over a real socket: listed by /controlnet/model_list, drawn,
    and named in the infotext as the extension names a model."""
    import base64
    import io
    import json

    from PIL import Image

    from latent_diffusion.serving.server import create_app
    from test_server import call

    folder, _ = lllite_file
    pipeline = Pipeline(tiny_models["sd1"], controlnets=find_control_models(folder))
    picture = Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    with serve(create_app(pipeline, tmp_path / "out", controlnet_dir=folder)) as base:
        listed = call(base, "/controlnet/model_list")[1]["model_list"]
        unit = {"enabled": True, "model": listed[0], "module": "canny", "weight": 0.9,
                "image": base64.b64encode(buffer.getvalue()).decode()}  # fmt: skip
        body = {"prompt": "a cat", "seed": 1, "steps": 2, "width": W, "height": H,
                "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
        status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert listed == [next(iter(pipeline.controlnets))] and listed[0].startswith("controllllite_tiny [")
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert f"Model: {listed[0]}, Weight: 0.9" in info["infotexts"][0] and info["ignored"] == []


def test_the_newer_units_run_in_bfloat16(tiny_models, lllite_file, tmp_path):
    """A bfloat16 model (as on a GPU in half precision) through the paths that cast maps and latents: a union
    ControlNet with a colour fix and a region, an inpaint_only unit, an LLLite, through a hires fix; and an inpainting
    model with an inpaint unit. Finite images of the right size, other than without the units."""
    import shutil

    from latent_diffusion.models.controlnet import ControlNet, UnionConfig
    from latent_diffusion.pipeline.request import HiresFix

    from conftest import randomize, seeded, tiny_model

    shutil.copy(lllite_file[0] / "controllllite_tiny.safetensors", tmp_path)
    with seeded(1):
        union = randomize(ControlNet(tiny_models["sd1"].cfg.unet, union=UnionConfig(types=8, width=32, type_width=8)))
    save_file(union.state_dict(), tmp_path / "union.safetensors")
    image, mask, region = torch.rand(1, 3, H, W), torch.zeros(1, 1, H, W), torch.ones(1, 1, 8, 8)
    mask[..., 10:30, 10:30], region[..., :4] = 1, 0
    units = [
        ControlUnit("union", image, module="tile_colorfix", union_type="Tile", region=region, resize_mode="resize"),
        ControlUnit("union", image, module="inpaint_only", mask=mask, union_type="Inpaint", resize_mode="resize"),
        ControlUnit("controllllite_tiny", image, module="canny", resize_mode="resize"),
    ]
    settings = dict(width=W, height=H, steps=2, sampler="euler", hires=HiresFix(scale=1.5, steps=1))
    for variant, chosen in (("sd1", units), ("inpaint", units[1:2])):
        model = tiny_model(variant, seed=0).to(torch.bfloat16)
        pipeline = Pipeline(model, controlnets=find_control_models(tmp_path))
        drawn = generate(pipeline, GenerationRequest(["a cat"], [1], controls=chosen, **settings)).images
        plain = generate(pipeline, GenerationRequest(["a cat"], [1], **settings)).images
        assert drawn.shape == (1, 3, 96, 72) and torch.isfinite(drawn).all()
        assert (drawn - plain).abs().max() > 1e-2
