"""ControlNet files as people have them (`weights/controlnet.py`), against diffusers' ControlNetModel: the original
layout converted by diffusers' own `convert_controlnet_checkpoint`, diffusers' layout as diffusers saves it, the
full-size SD 1.5 and SDXL key sets on the meta device, Stability's Control-LoRA over a base model, and files that are
not ControlNets.

The tiny configs keep the head rule the loader reads files by (the shapes do not show head counts): SD 1.x 8 heads,
64-wide heads where the transformers project linearly."""

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusion, UNetConfig, preset
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.models.unet import timestep_embedding
from latent_diffusion.weights.architecture import infer_unet
from latent_diffusion.weights.controlnet import (
    ControlNetError,
    check_controlnet_fits,
    controlnet_family,
    from_diffusers,
    is_controlnet_state_dict,
    load_controlnet,
    union_config,
)

from conftest import randomize, seeded, tiny_config, tiny_model
from test_checkpoint import RunsCode
from test_full_size import shapes

MICRO = 8  # the tiny SDXL configs' width per micro-conditioning number: 6 numbers (sizes, crop)
CONFIGS = {
    "sd1": dataclasses.replace(tiny_config("sd1").unet, num_heads=8),  # fits the tiny SD 1.x model
    "sd2": UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                      num_heads=None, num_head_channels=64, transformer_depth=2, context_dim=48,
                      use_linear_in_transformer=True),
    # SDXL's shape: a first level without attention, a depth per level, the vector conditioning y
    "sdxl": UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=2,
                       num_heads=None, num_head_channels=64, transformer_depth=(1, 2, 3), context_dim=80,
                       use_linear_in_transformer=True, adm_in_channels=40 + 6 * MICRO),
}  # fmt: skip
# diffusers' distilled SDXL ControlNets: "small" attends nowhere but keeps a middle transformer of 0 layers; "mid"
# has a level-1 transformer of 0 layers and one block at level 2 and in the middle
CONFIGS["sdxl-small"] = dataclasses.replace(CONFIGS["sdxl"], attention_resolutions=(), transformer_depth=(1, 1, 0))
CONFIGS["sdxl-mid"] = dataclasses.replace(CONFIGS["sdxl"], transformer_depth=(1, 0, 1))


def diffusers_config(cfg: UNetConfig, hint_channels: int = 3) -> dict:
    """diffusers' ControlNetModel arguments for our config (its `attention_head_dim` is a head count per level)."""
    widths = [m * cfg.model_channels for m in cfg.channel_mult]
    attends = [2**i in cfg.attention_resolutions for i in range(len(widths))]
    config = dict(
        in_channels=cfg.in_channels,
        conditioning_channels=hint_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=tuple(
            w // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads for w in widths
        ),
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=tuple(cfg.transformer_depth),
    )
    if cfg.adm_in_channels:
        config |= dict(addition_embed_type="text_time", addition_time_embed_dim=MICRO,
                       projection_class_embeddings_input_dim=cfg.adm_in_channels)  # fmt: skip
    return config


def inputs(cfg: UNetConfig, seed: int = 1) -> dict:
    """x (2, 4, 16, 24), its hint at 8x, timesteps, context, and for SDXL the pooled text and size numbers."""
    g = torch.Generator().manual_seed(seed)
    batch = dict(x=torch.randn(2, cfg.in_channels, 16, 24, generator=g), hint=torch.rand(2, 3, 128, 192, generator=g),
                 t=torch.tensor([3, 871]), context=torch.randn(2, 7, cfg.context_dim, generator=g))  # fmt: skip
    if cfg.adm_in_channels:
        batch["pooled"] = torch.randn(2, cfg.adm_in_channels - 6 * MICRO, generator=g)
        batch["time_ids"] = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 896]])
    return batch


def ours(controlnet: ControlNet, b: dict) -> list[torch.Tensor]:
    y = None
    if "pooled" in b:  # y = [pooled | sinusoidal embedding of each size number], as SDXL's conditioner makes it
        y = torch.cat([b["pooled"], timestep_embedding(b["time_ids"].flatten(), MICRO).reshape(2, -1)], dim=1)
    with torch.no_grad():
        r = controlnet(b["x"], b["hint"], b["t"], b["context"], y)
    return [*r.skips, r.middle]


def theirs(model: ControlNetModel, b: dict) -> list[torch.Tensor]:
    added = {"text_embeds": b["pooled"], "time_ids": b["time_ids"]} if "pooled" in b else None
    with torch.no_grad():
        down, mid = model(b["x"], b["t"], b["context"], b["hint"], added_cond_kwargs=added, return_dict=False)
    return [*down, mid]


def assert_residuals_close(a: list, b: list, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert min(x.abs().mean() for x in a) > 1e-3  # the zero convolutions are not zero: every residual is tested


# The original layout ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals():
    with seeded(0):
        return {v: randomize(ControlNet(CONFIGS[v]), seed=i).eval() for i, v in enumerate(("sd1", "sd2", "sdxl"))}


def write(sd: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_original_layout_loads_and_matches_diffusers(originals, variant, tmp_path, tiny_models):
    """Saved as .safetensors and .pth, with and without `control_model.`, and inside a whole SD checkpoint (a 2023
    `control_sd15_*.pth`): the same weights each time, and the residuals of diffusers' ControlNetModel converted from
    the same state dict by diffusers' own converter."""
    controlnet = originals[variant]
    sd = controlnet.state_dict()
    whole = {**tiny_models["sd1"].state_dict(), **{"control_model." + k: v for k, v in sd.items()}}
    files = {
        "bare.safetensors": sd,
        "prefixed.safetensors": {"control_model." + k: v for k, v in sd.items()},
        "bare.pth": sd,
        "control_sd15_whole.pth": {"state_dict": whole},
    }
    for name, content in files.items():
        write(content, tmp_path / name)
        loaded = load_controlnet(tmp_path / name)
        assert loaded.cfg == controlnet.cfg, name
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)

    config = diffusers_config(controlnet.cfg)
    converted = convert_controlnet_checkpoint(sd, config)
    if controlnet.cfg.adm_in_channels:  # the converter leaves SDXL's label_emb out; diffusers' table names it
        converted |= {d: sd[o] for d, o in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items()}
    reference = ControlNetModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    b = inputs(controlnet.cfg)
    assert_residuals_close(ours(loaded, b), theirs(reference, b), atol=1e-5)


# diffusers' layout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl", "sdxl-small", "sdxl-mid"])
def test_diffusers_layout_matches_diffusers(variant, tmp_path):
    """A ControlNetModel with random weights, saved as diffusers saves it, read by us: the same residuals."""
    reference = randomize(ControlNetModel(**diffusers_config(CONFIGS[variant])), seed=5).eval()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    controlnet = load_controlnet(path)
    # No key shows the small variant's context width: nothing in it attends to text (read as 1, as ComfyUI does)
    context_dim = 1 if variant == "sdxl-small" else CONFIGS[variant].context_dim
    assert controlnet.cfg == dataclasses.replace(CONFIGS[variant], context_dim=context_dim)
    assert controlnet_family(controlnet).name == variant.split("-")[0]
    b = inputs(CONFIGS[variant])
    assert_residuals_close(ours(controlnet, b), theirs(reference, b), atol=1e-4)
    if variant == "sd1":  # diffusers' older pickle, the same through the safe reader
        torch.save(reference.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
        again = load_controlnet(tmp_path / "diffusion_pytorch_model.bin")
        assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in again.state_dict().items())


def test_loads_in_the_dtype_asked(originals, tmp_path):
    path = tmp_path / "cn.safetensors"
    write(originals["sd1"].state_dict(), path)
    half = load_controlnet(path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


# Full size, on the meta device --------------------------------------------------------------------------------


def test_full_size_sd15_keys_are_diffusers_controlnet_keys():
    """SD 1.5's ControlNet in the original layout: diffusers' converter maps every key onto its ControlNetModel (the
    config of lllyasviel/sd-controlnet-*: the defaults with a 768-wide context), and our diffusers mapping maps that
    model's keys back onto ours, nothing left over either way."""
    cfg = preset("sd-v1.5").unet
    with torch.device("meta"):
        controlnet = ControlNet(cfg)
        reference = ControlNetModel(cross_attention_dim=768)
    sd = controlnet.state_dict()
    assert shapes(convert_controlnet_checkpoint(sd, reference.config)) == shapes(reference.state_dict())
    renamed, left = from_diffusers(reference.state_dict())
    assert left == [] and shapes(renamed) == shapes(sd)


def test_full_size_sdxl_diffusers_keys_map_onto_ours():
    """diffusers' SDXL ControlNet (diffusers/controlnet-canny-sdxl-1.0's config): every key renamed onto ours, the
    architecture read off them is SDXL base's encoder, and nothing is missing or left over."""
    with torch.device("meta"):
        reference = ControlNetModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    renamed, left = from_diffusers(reference.state_dict())
    assert left == []
    cfg = infer_unet(renamed, prefix="", encoder_only=True)
    assert cfg == preset("sdxl-base").unet
    with torch.device("meta"):
        controlnet = ControlNet(cfg)
    assert shapes(renamed) == shapes(controlnet.state_dict())
    assert controlnet_family(cfg).name == "sdxl"


def test_full_size_union_keys_map_onto_ours():
    """xinsir's controlnet-union-sdxl-1.0 (ProMax: 8 kinds) as diffusers' ControlNetUnionModel with its config: every
    key onto ours, the union parts' sizes read off them (320-wide token, 256 per kind)."""
    from diffusers import ControlNetUnionModel

    with torch.device("meta"):
        reference = ControlNetUnionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8,
        )  # fmt: skip
    renamed, left = from_diffusers(reference.state_dict())
    assert left == []
    union = union_config(renamed, "union")
    assert (union.types, union.width, union.type_width, union.layers) == (8, 320, 256, 1)
    with torch.device("meta"):
        controlnet = ControlNet(infer_unet(renamed, prefix="", encoder_only=True), union=union)
    assert shapes(renamed) == shapes(controlnet.state_dict())


# Control-LoRA -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_base():
    return tiny_model("sdxl", seed=21)


def control_lora(base: LatentDiffusion, rank: int = 2) -> tuple[dict, dict]:
    """(a Control-LoRA file's tensors, the ControlNet they describe), made as ComfyUI's ControlLoraSave writes one:
    each weight of 2 or more dimensions the ControlNet shares with the U-Net as `.up`/`.down` of its difference (here
    exactly of rank `rank`), every other tensor whole; one shared weight left out (it is the base's)."""
    g = torch.Generator().manual_seed(3)
    unet = base.model.diffusion_model.state_dict()
    target = randomize(ControlNet(base.cfg.unet), seed=4).state_dict()
    tensors, skipped = {"lora_controlnet": torch.tensor([])}, "input_blocks.1.0.in_layers.2.weight"
    for k, v in target.items():
        if k == skipped:
            target[k] = unet[k]
        elif k in unet and v.ndim >= 2:
            name = k.removesuffix(".weight")
            up = torch.randn(v.shape[0], rank, *[1] * (v.ndim - 2), generator=g) * 0.1
            down = torch.randn(rank, *v.shape[1:], generator=g) * 0.1
            tensors[name + ".up"], tensors[name + ".down"] = up, down
            target[k] = unet[k] + (up.flatten(1) @ down.flatten(1)).reshape(v.shape)
        else:
            tensors[k] = v
    return tensors, target


def test_control_lora_is_the_base_unet_plus_its_deltas(sdxl_base, tmp_path):
    tensors, target = control_lora(sdxl_base)
    path = tmp_path / "control-lora-canny-rank2.safetensors"
    save_file(tensors, path)
    assert is_controlnet_state_dict(tensors.keys())
    controlnet = load_controlnet(path, base=sdxl_base)
    for k, v in controlnet.state_dict().items():
        torch.testing.assert_close(v, target[k], atol=1e-6, rtol=0)
    check_controlnet_fits(controlnet, sdxl_base.cfg)
    with pytest.raises(ControlNetError, match=r"control-lora-canny-rank2\.safetensors: a Control-LoRA .* base="):
        load_controlnet(path)
    del tensors["input_blocks.3.0.in_layers.2.down"]
    save_file(tensors, path)
    with pytest.raises(ControlNetError, match=r"does not fit the base model: it has no input_blocks\.3\.0\.in_layers"):
        load_controlnet(path, base=sdxl_base)


def test_a_difference_controlnet_is_its_deltas_plus_the_models_unet(originals, tiny_models, tmp_path):
    """The extension's `build_model_by_guess`: a file with a `difference` key holds deltas; the weights of the same
    names in the U-Net in use are added, the rest (zero convolutions, the hint block) taken as filed. Without a base
    model, or with one whose U-Net has other shapes, it is refused in one line."""
    model, net = tiny_models["sd1"], originals["sd1"]
    unet, target = model.model.diffusion_model.state_dict(), net.state_dict()
    deltas = {k: v - unet[k] if k in unet else v for k, v in target.items()}
    assert sum(k in unet for k in target) > 100 and any(k not in unet for k in target)
    path = tmp_path / "diff_control_sd15_edges.safetensors"
    save_file(
        {**{f"control_model.{k}": v.contiguous() for k, v in deltas.items()}, "difference": torch.tensor([])}, path
    )
    loaded = load_controlnet(path, base=model)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, target[k], atol=1e-6, rtol=0)
    with pytest.raises(
        ControlNetError, match=r"diff_control_sd15_edges\.safetensors: a difference ControlNet .* base="
    ):
        load_controlnet(path)
    with pytest.raises(ControlNetError, match=r"a difference ControlNet that does not fit the model: its input_blocks"):
        load_controlnet(path, base=tiny_models["sd2"])


# Files that are not ControlNets, and ControlNets of another family ------------------------------------------------


def refusal(path, **kwargs) -> str:
    with pytest.raises(ControlNetError if kwargs.pop("ours", True) else ValueError) as e:
        load_controlnet(path, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_not_controlnets_are_refused_in_one_line(tmp_path, ckpt):
    t = torch.zeros(4, 4)
    files = {
        "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}, "a LoRA"),
        "vae.safetensors": ({"encoder.down.0.block.0.conv1.weight": t, "decoder.up.0.block.0.conv1.weight": t}, "VAE"),
        "t2i.safetensors": ({"adapter.body.0.resnets.0.block1.weight": t, "adapter.conv_in.weight": t}, "T2I-Adapter"),
        "lllite.safetensors": ({"lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.down.0.weight": t},
                               "ControlNet-LLLite"),
    }  # fmt: skip
    for name, (content, what) in files.items():
        save_file({k: v.clone() for k, v in content.items()}, tmp_path / name)
        assert not is_controlnet_state_dict(content.keys())
        assert f"{name}: not a ControlNet: " in refusal(tmp_path / name) and what in refusal(tmp_path / name)
    assert "a Stable Diffusion checkpoint without control_model.* weights" in refusal(ckpt)

    (tmp_path / "notes.safetensors").write_text("not a model\n" * 10)
    assert "notes.safetensors: not a readable .safetensors file" in refusal(tmp_path / "notes.safetensors", ours=False)
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    torch.save({"input_hint_block.0.weight": torch.zeros(1), "x": payload}, tmp_path / "evil.pth")
    assert "evil.pth: refused: its pickle would import or call" in refusal(tmp_path / "evil.pth", ours=False)
    assert not marker.exists()


def test_a_diffusers_file_with_keys_of_its_own_is_named_not_misread(tmp_path):
    """A diffusers file with keys ControlNetModel does not have; a union ControlNet's without its other parts."""
    sd = ControlNetModel(**diffusers_config(CONFIGS["sd1"])).state_dict()
    save_file({**sd, "down_blocks.9.extra": torch.zeros(6, 64)}, tmp_path / "other.safetensors")
    assert "not a plain diffusers ControlNetModel: 1 keys it does not have (first: down_blocks.9.extra)" in refusal(
        tmp_path / "other.safetensors"
    )
    save_file({**sd, "task_embedding": torch.zeros(6, 64)}, tmp_path / "union.safetensors")
    assert "an incomplete union ControlNet" in refusal(tmp_path / "union.safetensors")


# xinsir's union ControlNet (ControlNet++) --------------------------------------------------------------------------


def union_reference(cfg: UNetConfig, types: int = 8):
    """diffusers' ControlNetUnionModel for our config, random: its token as wide as the first level (320 at full
    size), each kind embedded at the micro-conditioning width (256 at full size)."""
    from diffusers import ControlNetUnionModel

    config = diffusers_config(cfg) | dict(
        conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=types,
        num_trans_channel=cfg.model_channels, num_trans_head=8, num_proj_channel=cfg.model_channels,
    )  # fmt: skip
    config.pop("conditioning_channels")
    with seeded(7):
        return randomize(ControlNetUnionModel(**config), seed=7).eval()


@pytest.mark.parametrize("kind", [0, 3, 7, None])
def test_a_union_controlnet_matches_diffusers(kind, tmp_path):
    """xinsir's file as diffusers saves it, read by us: the residuals of diffusers' ControlNetUnionModel told the same
    kind of control image (both rows one control image: diffusers' attention across the batch is then each row's),
    and, told none, those of its all-zero kind vector without the hint's bias (the extension's run of "Unknown")."""
    reference = union_reference(CONFIGS["sdxl"])
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "union.safetensors")
    controlnet = load_controlnet(tmp_path / "union.safetensors")
    assert controlnet.union.types == 8 and controlnet.union.type_width == MICRO
    b = inputs(CONFIGS["sdxl"])
    b["hint"] = b["hint"][:1].expand(2, -1, -1, -1)
    y = torch.cat([b["pooled"], timestep_embedding(b["time_ids"].flatten(), MICRO).reshape(2, -1)], dim=1)
    with torch.no_grad():
        r = controlnet(b["x"], b["hint"], b["t"], b["context"], y, control_type=kind)
        one_hot = torch.zeros(2, 8)
        if kind is not None:
            one_hot[:, kind] = 1
        added = {"text_embeds": b["pooled"], "time_ids": b["time_ids"]}
        if kind is None:  # (diffusers always adds the bias of a kind: a unit without one has no equivalent there)
            reference.spatial_ch_projs.weight.zero_(), reference.spatial_ch_projs.bias.zero_()
        down, mid = reference(
            b["x"], b["t"], b["context"], [b["hint"]], one_hot, [kind or 0], added_cond_kwargs=added, return_dict=False
        )
    assert_residuals_close([*r.skips, r.middle], [*down, mid], atol=1e-4)


def test_a_controlnet_of_another_family_does_not_fit(originals, tiny_models):
    model_cfg = tiny_models["sd1"].cfg
    check_controlnet_fits(originals["sd1"], model_cfg)  # same widths: fits
    with pytest.raises(ControlNetError) as e:
        check_controlnet_fits(originals["sdxl"], model_cfg)
    message = str(e.value)
    assert message.startswith("a ControlNet for SDXL does not fit this SD 1.x model: context width 80, the model's 32")
    assert "vector conditioning width 88, the model's 0" in message and "\n" not in message
    inpainting = tiny_models["inpaint"].cfg  # 9 input channels: the ControlNet still sees the 4-channel latent
    check_controlnet_fits(originals["sd1"], inpainting)
