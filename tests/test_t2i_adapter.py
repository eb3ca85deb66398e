"""T2I-Adapter: our adapters against diffusers' `T2IAdapter` with the same weights (diffusers' layout through our
loader, and TencentARC's layout written out from it by this file's own key rule), the features in our U-Net against
diffusers' `down_intrablock_additional_residuals` on the same U-Net weights, and a one-line refusal per bad file."""

import dataclasses
import re

import pytest
import torch
from diffusers import T2IAdapter
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusion
from latent_diffusion.models.t2i_adapter import T2IAdapterConfig, t2i_residuals
from latent_diffusion.weights.reader import CheckpointError
from latent_diffusion.weights.t2i_adapter import T2IAdapterError, is_t2i_adapter_state_dict, load_t2i_adapter

from conftest import randomize, tiny_config
from test_reference import diffusers_unet
from test_sdxl import diffusers_xl_unet

ATOL = 1e-5
CHANNELS = (32, 64, 128, 128)  # SD's (320, 640, 1280, 1280) at a tenth
HINT = (128, 192)  # every level's size even in both adapters: 16x24 ... 2x3 (SD), 8x12, 4x6 (SDXL)
SOFT = (0.25, 0.62, 0.825, 1.0)  # the extension's soft-injection scales
# (diffusers adapter_type, hint channels): sketch-like (1) and depth-like (3) full adapters, the colour adapter, SDXL
ADAPTERS = [
    ("full_adapter", 1),
    ("full_adapter", 3),
    ("light_adapter", 3),
    ("full_adapter_xl", 1),
    ("full_adapter_xl", 3),
]


def diffusers_adapter(adapter_type: str, hint_channels: int, seed: int = 0) -> T2IAdapter:
    light = adapter_type == "light_adapter"
    adapter = T2IAdapter(
        in_channels=hint_channels,
        channels=list(CHANNELS[:3] if light else CHANNELS),  # diffusers' light adapter repeats its last width
        num_res_blocks=4 if light else 2,
        downscale_factor=16 if adapter_type == "full_adapter_xl" else 8,
        adapter_type=adapter_type,
    )
    return randomize(adapter, seed).eval()


def tencentarc_keys(adapter_type: str, hint_channels: int) -> dict[str, tuple]:
    """The keys and weight shapes TencentARC's constructors give (`Adapter(..., nums_rb=2, ksize=1, sk=True,
    use_conv=False)`, `Adapter_XL`, `Adapter_light(nums_rb=4)`), written out from their loops."""
    keys, ch = {}, CHANNELS
    if adapter_type == "light_adapter":
        widths = [hint_channels * 64, *ch]
        for i in range(4):
            keys[f"body.{i}.in_conv.weight"] = (ch[i] // 4, widths[i], 1, 1)
            keys[f"body.{i}.out_conv.weight"] = (ch[i], ch[i] // 4, 1, 1)
            for j in range(4):
                keys |= {f"body.{i}.body.{j}.block{n}.weight": (ch[i] // 4, ch[i] // 4, 3, 3) for n in (1, 2)}
        return keys
    keys["conv_in.weight"] = (ch[0], hint_channels * (256 if adapter_type == "full_adapter_xl" else 64), 3, 3)
    for i in range(4):
        for r in range(2):
            in_c = ch[i - 1] if i > 0 and r == 0 else ch[i]
            if in_c != ch[i]:
                keys[f"body.{i * 2 + r}.in_conv.weight"] = (ch[i], in_c, 1, 1)
            keys[f"body.{i * 2 + r}.block1.weight"] = (ch[i], ch[i], 3, 3)
            keys[f"body.{i * 2 + r}.block2.weight"] = (ch[i], ch[i], 1, 1)
    return keys


def to_tencentarc(sd: dict, adapter_type: str) -> dict:
    """diffusers' keys -> TencentARC's, as the extension's `controlnet_model_guess.py` maps them for the full adapter
    (`adapter.body.{i}.resnets.{j}.` -> `body.{i * 2 + j}.`), and per TencentARC's `extractor` for the light one."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("adapter.")
        if adapter_type == "light_adapter":
            key = re.sub(r"^body\.(\d+)\.resnets\.", r"body.\1.body.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{int(m[1]) * 2 + int(m[2])}.", key)
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m[1]) * 2}.in_conv.", key)
        out[key] = value
    return out


def hint(channels: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(2, channels, *HINT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("adapter_type", "hint_channels"), ADAPTERS)
def test_diffusers_layout_matches_diffusers(tmp_path, adapter_type, hint_channels):
    ref = diffusers_adapter(adapter_type, hint_channels)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = load_t2i_adapter(path)
    assert ours.cfg == T2IAdapterConfig(
        kind="light" if adapter_type == "light_adapter" else "full",
        channels=CHANNELS,
        num_res_blocks=4 if adapter_type == "light_adapter" else 2,
        hint_channels=hint_channels,
        sdxl=adapter_type == "full_adapter_xl",
    )
    x = hint(hint_channels)
    with torch.no_grad():
        theirs, mine = ref(x), ours(x)
    assert [f.shape for f in mine] == [f.shape for f in theirs]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert min(f.abs().mean() for f in theirs) > 0.01  # real signals were compared
    if hint_channels == 1:  # the extension hands a greyscale hint as RGB; a one-channel adapter takes its first channel
        rgb = torch.cat([x, torch.rand_like(x), torch.rand_like(x)], dim=1)
        with torch.no_grad():
            torch.testing.assert_close(ours(rgb)[-1], mine[-1], atol=0, rtol=0)


@pytest.mark.parametrize(("adapter_type", "hint_channels"), ADAPTERS)
def test_tencentarc_layout_matches_diffusers(tmp_path, adapter_type, hint_channels):
    """Their .pth files (the sd14v1 and sd15v2 adapters, SDXL's adapter-xl): the same weights under TencentARC's keys,
    once with the `adapter.` prefix their own loader strips."""
    ref = diffusers_adapter(adapter_type, hint_channels, seed=1)
    sd = to_tencentarc(ref.state_dict(), adapter_type)
    assert {k: tuple(v.shape) for k, v in sd.items() if k.endswith("weight")} == tencentarc_keys(
        adapter_type, hint_channels
    )
    if hint_channels == 3:
        sd = {f"adapter.{k}": v for k, v in sd.items()}
    path = tmp_path / f"t2iadapter_{adapter_type}_sd14v1.pth"
    torch.save(sd, path)
    ours = load_t2i_adapter(path)
    x = hint(hint_channels)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_dtype_and_hint_checks(tmp_path):
    ref = diffusers_adapter("full_adapter", 3)
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = load_t2i_adapter(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="multiples of 8, not 132x128"):
        ours(torch.rand(1, 3, 128, 132, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="hint of 3 channel"):
        ours(torch.rand(1, 1, 128, 128, dtype=torch.bfloat16))


def test_placement_is_the_extensions():
    """scripts/hook.py: `t2i_injection = [3, 5, 8] if is_sdxl else [2, 5, 8, 11]`, SDXL's fourth onto the middle."""
    features = [torch.full((1, 1, 1, 1), float(i + 1)) for i in range(4)]
    sd = t2i_residuals(features, SOFT, sdxl=False)
    assert {i: f.item() for i, f in sd.features.items()} == pytest.approx({2: 0.25, 5: 1.24, 8: 2.475, 11: 4.0})
    assert sd.middle is None and sd.skips is None
    xl = t2i_residuals(features, 0.5, sdxl=True)
    assert {i: f.item() for i, f in xl.features.items()} == {3: 0.5, 5: 1.0, 8: 1.5} and xl.middle.item() == 2.0
    with pytest.raises(ValueError, match="4 features, not 3"):
        t2i_residuals(features[:3], 1.0, sdxl=False)


def tiny_unet_model(variant: str, num_res_blocks: int) -> LatentDiffusion:
    """SD 1.x's four levels (SDXL's three, the first without attention) at tiny widths."""
    cfg = tiny_config(variant)
    if variant == "sd1":
        unet = dataclasses.replace(
            cfg.unet, channel_mult=(1, 2, 4, 4), attention_resolutions=(1, 2, 4), transformer_depth=1
        )
    else:
        unet = dataclasses.replace(cfg.unet, channel_mult=(1, 2, 4))
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(unet, num_res_blocks=num_res_blocks))
    return randomize(LatentDiffusion(cfg), seed=5).eval()


@pytest.mark.parametrize("num_res_blocks", [2, 1])
@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_injection_matches_diffusers(variant, num_res_blocks):
    """diffusers adds the features after each down block's last resnet/attention pair, and after a block without
    attention in place (`sample += ...`), which changes the skip that block keeps too: the extension's order,
    feature then skip. SDXL's fourth goes onto the middle block's output in both. So the two agree everywhere; with
    2 ResBlocks per level at the extension's indices (`test_placement_is_the_extensions`)."""
    sdxl = variant == "sdxl"
    model = tiny_unet_model(variant, num_res_blocks)
    sd = model.state_dict()
    ref = diffusers_xl_unet(model.cfg, sd) if sdxl else diffusers_unet(model.cfg, sd)
    adapter = diffusers_adapter("full_adapter_xl" if sdxl else "full_adapter", 3, seed=2)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, HINT[0] // 8, HINT[1] // 8, generator=g), torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    kwargs, y = {}, None
    if sdxl:
        pooled = torch.randn(2, model.cfg.text2.embed_dim, generator=g)
        time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 896]])
        y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    unet = model.model.diffusion_model
    scales = [4 * s for s in SOFT]
    with torch.no_grad():
        features = adapter(hint(3))
        control = t2i_residuals(features, scales, sdxl=sdxl, num_res_blocks=num_res_blocks)
        ours = unet(x, t, context, y, control=control)
        plain = unet(x, t, context, y)
        residuals = [f * s for f, s in zip(features, scales)]
        theirs = ref(x, t, encoder_hidden_states=context, down_intrablock_additional_residuals=residuals, **kwargs)
    torch.testing.assert_close(ours, theirs.sample, atol=1e-4, rtol=0)
    assert residuals == []  # diffusers took every feature (it pops them; a missed one would be left)
    assert (ours - plain).abs().mean() > 0.01  # the features really changed the prediction


def bad_files() -> dict[str, tuple[dict, str]]:
    """name -> (state dict, what its one-line refusal says)."""
    good = to_tencentarc(diffusers_adapter("full_adapter", 1).state_dict(), "full_adapter")
    skep = {**good, "body.0.skep.weight": torch.zeros(32, 32, 1, 1)}
    return {
        "style": ({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8)}, "style adapter: it has no"),
        "fuser": ({"task_embedding": torch.zeros(16, 8), "seq_proj": torch.zeros(8, 8)}, "CoAdapter fuser"),
        "skep": (skep, "sk=False"),
        "missing": ({k: v for k, v in good.items() if k != "body.5.block2.bias"}, "1 missing keys"),
        "odd_blocks": ({k: v for k, v in good.items() if not k.startswith("body.7.")}, "7 blocks"),
        "width": ({**good, "conv_in.weight": torch.zeros(32, 100, 3, 3)}, "takes 100 channels"),
        "lora": ({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, "not a T2I-Adapter"),
    }


@pytest.mark.parametrize("name", list(bad_files()))
def test_bad_files_are_refused_in_one_line(tmp_path, name):
    sd, reason = bad_files()[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path)
    with pytest.raises(T2IAdapterError) as e:
        load_t2i_adapter(path)
    assert reason in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
    assert is_t2i_adapter_state_dict(sd) == (name != "lora")


def test_a_stable_diffusion_checkpoint_is_not_an_adapter(ckpt):
    with pytest.raises(T2IAdapterError, match="not a T2I-Adapter"):
        load_t2i_adapter(ckpt)
    with pytest.raises(CheckpointError, match="no such file"):
        load_t2i_adapter(ckpt.parent / "absent.pth")
