"""Depth Anything (`models/depth_anything.py`, `pipeline/depth_anything_maps.py`): the network against transformers'
`DepthAnythingForDepthEstimation` with the same random weights (its keys mapped from the files' layout), the
full-size layout on the meta device, DINOv2's resize of the positions against its code written out, and the
extension's depth_anything(_v2) maps (its `legacy/processor.py`, `annotator/depth_anything.py` and Depth Anything's
`Resize` written out here) with transformers' network inside, from files in an annotator folder."""

import math
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latent_diffusion.models.depth_anything import DepthAnything, DepthAnythingConfig, depth_anything_from_state_dict
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_preprocessors import ref_resize_image_with_pad

from conftest import randomize, seeded

VIT_S = DepthAnythingConfig(384, 12, 16, (8, 16, 32, 32), 37, (2, 5, 8, 11))  # (with a small decoder)
TINY = DepthAnythingConfig(width=64, depth=5, features=16, out_channels=(8, 16, 32, 32), grid=37, taps=(1, 2, 3, 4))


def transformers_model(cfg: DepthAnythingConfig):
    from transformers import DepthAnythingConfig as HFConfig
    from transformers import DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        image_size=cfg.grid * 14,
        patch_size=14,
        layerscale_value=1.0,
        out_indices=[i + 1 for i in cfg.taps],  # (its stage k is the output of block k - 1)
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    config = HFConfig(
        backbone_config=backbone,
        reassemble_hidden_size=cfg.width,
        patch_size=14,
        neck_hidden_sizes=list(cfg.out_channels),
        fusion_hidden_size=cfg.features,
        head_hidden_size=32,
        depth_estimation_type="relative",
    )
    return DepthAnythingForDepthEstimation(config).eval()


def to_transformers(state: dict) -> dict:
    """The files' keys as transformers names them (its conversion script's table, written from its module tree)."""
    out = {}
    for key, value in state.items():
        k = key.replace("pretrained.", "backbone.")
        k = k.replace("backbone.cls_token", "backbone.embeddings.cls_token")
        k = k.replace("backbone.mask_token", "backbone.embeddings.mask_token")
        k = k.replace("backbone.pos_embed", "backbone.embeddings.position_embeddings")
        k = k.replace("backbone.patch_embed.proj", "backbone.embeddings.patch_embeddings.projection")
        k = k.replace("backbone.blocks.", "backbone.encoder.layer.").replace("backbone.norm.", "backbone.layernorm.")
        k = k.replace(".attn.proj.", ".attention.o_proj.").replace(".ls1.gamma", ".layer_scale1.lambda1")
        k = k.replace(".ls2.gamma", ".layer_scale2.lambda1")
        k = re.sub(r"depth_head\.projects\.(\d)", r"neck.reassemble_stage.layers.\1.projection", k)
        k = re.sub(r"depth_head\.resize_layers\.(\d)", r"neck.reassemble_stage.layers.\1.resize", k)
        k = re.sub(r"depth_head\.scratch\.layer(\d)_rn", lambda m: f"neck.convs.{int(m[1]) - 1}", k)
        k = re.sub(r"depth_head\.scratch\.refinenet(\d)", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}", k)
        k = k.replace(".out_conv.", ".projection.").replace(".resConfUnit1.", ".residual_layer1.")
        k = k.replace(".resConfUnit2.", ".residual_layer2.").replace(".conv1.", ".convolution1.")
        k = k.replace(".conv2.", ".convolution2.")
        k = k.replace("depth_head.scratch.output_conv1.", "head.conv1.")
        k = k.replace("depth_head.scratch.output_conv2.0.", "head.conv2.")
        k = k.replace("depth_head.scratch.output_conv2.2.", "head.conv3.")
        if ".attn.qkv." in k:
            for name, part in zip("qkv", value.chunk(3)):
                out[k.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
        else:
            out[k] = value
    return out


def tiny(cfg=TINY, seed=0) -> DepthAnything:
    with seeded(seed):
        return randomize(DepthAnything(cfg), seed=seed + 1).eval()


def test_the_network_is_transformers():
    ours = tiny()
    theirs = transformers_model(TINY)
    theirs.load_state_dict(to_transformers(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(pixel_values=x).predicted_depth
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
    assert expected.shape == (2, 518, 518) and expected.std() > 1e-3


def test_the_full_size_layout_is_the_files():
    """ViT-L's Depth Anything (both versions' files): every tensor ours has, transformers' model has under its
    name with the same shape, and nothing else (the meta device: no memory)."""
    vitl = DepthAnythingConfig()
    with torch.device("meta"):
        ours = {k: v.shape for k, v in to_transformers(DepthAnything(vitl).state_dict()).items()}
        theirs = {k: v.shape for k, v in transformers_model(vitl).state_dict().items()}
    assert ours == theirs and len(ours) > 400


def ref_interpolate_pos_encoding(pos_embed, x_shape, patch_size=14, interpolate_offset=0.1):
    """DINOv2's `interpolate_pos_encoding` (Depth Anything v2's dinov2.py), written out."""
    _, _, w, h = x_shape
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + interpolate_offset, h // patch_size + interpolate_offset
    sqrt_N = math.sqrt(N)
    sx, sy = float(w0) / sqrt_N, float(h0) / sqrt_N
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(sqrt_N), int(sqrt_N), dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("rows, columns", [(37, 37), (37, 52), (45, 37), (20, 29)])
def test_the_positions_are_resized_as_dinov2_resizes_them(rows, columns):
    encoder = tiny().pretrained
    expected = ref_interpolate_pos_encoding(encoder.pos_embed.data, (1, 3, rows * 14, columns * 14))
    assert torch.equal(encoder.positions(rows, columns), expected)


def ref_get_size(width, height, target=518, multiple=14):  # depth_anything util/transform.py Resize, lower_bound
    def constrain(x, min_val):
        y = (np.round(x / multiple) * multiple).astype(int)
        if y < min_val:
            y = (np.ceil(x / multiple) * multiple).astype(int)
        return y

    scale_height, scale_width = target / height, target / width
    if scale_width > scale_height:
        scale_height = scale_width
    else:
        scale_width = scale_height
    return constrain(scale_width * width, target), constrain(scale_height * height, target)


def ref_depth_anything(img, res, network):
    """legacy/processor.py `depth_anything(img, res, colored=False)` with DepthAnythingDetector.__call__."""
    img, remove_pad = ref_resize_image_with_pad(img, res)
    h, w = img.shape[:2]
    image = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255.0
    width, height = ref_get_size(image.shape[1], image.shape[0])
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    image = np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32)
    with torch.no_grad():
        depth = network(torch.from_numpy(image).unsqueeze(0))
    depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    return remove_pad(depth.cpu().numpy().astype(np.uint8))


def picture(height=64, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 3 % 256, (x * y) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    "module, cfg, name",
    [
        ("depth_anything", TINY, "depth_anything_vitl14.pth"),
        # v2 reads blocks 2, 5, 8 and 11 of a ViT-S (width 384, 12 blocks): that size, with a small decoder
        ("depth_anything_v2", VIT_S, "depth_anything_v2_vitl.safetensors"),
    ],
)  # fmt: skip
def test_the_map_is_the_extensions(module, cfg, name, tmp_path):
    """The map from a file in the annotator folder (a subfolder, as annotator/downloads keeps it), against the
    extension's code with transformers' network of the same weights. The two networks' floats differ in the last
    bits, which the map's truncation to 8 bits can turn into one level at a pixel: at most 1 level, at 2 % of pixels."""
    ours = tiny(cfg)
    (tmp_path / module).mkdir()
    if name.endswith(".pth"):
        torch.save(ours.state_dict(), tmp_path / module / name)
    else:
        save_file(ours.state_dict(), tmp_path / module / name)
    theirs = transformers_model(cfg)
    theirs.load_state_dict(to_transformers(ours.state_dict()), strict=True)

    def network(x):
        depth = theirs(pixel_values=x).predicted_depth  # (1, H, W)
        if module == "depth_anything":  # v1's forward also resizes to the input's size (its own: no change)
            depth = F.interpolate(depth[:, None], size=x.shape[2:], mode="bilinear", align_corners=True)[:, 0]
        return F.relu(depth)

    found = detect(picture(), module, 64, annotator_folder=tmp_path)
    expected = ref_depth_anything(picture(), 64, network)
    assert found.shape == (64, 64, 3) and np.array_equal(found[:, :, 0], found[:, :, 2])
    difference = np.abs(found[:, :, 0].astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.02
    assert expected.std() > 20  # (a map, not a flat image)
    assert module_list(annotator_folder=tmp_path)["module_detail"][module]["available"]


def test_files_that_are_not_depth_anything_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'depth_anything' needs depth_anything_vitl14.pth: no folder named"):
        detect(picture(), "depth_anything")
    save_file({"pretrained.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "depth_anything_v2_vitl.safetensors")
    with pytest.raises(PreprocessorError, match="not a Depth Anything model .no pretrained.pos_embed.$"):
        detect(picture(), "depth_anything_v2", annotator_folder=tmp_path)
    state = tiny().state_dict()
    with pytest.raises(ValueError, match="no Depth Anything v2 encoder of width 64 and 5 blocks"):
        depth_anything_from_state_dict(state, version=2)  # v2 reads fixed blocks of the released sizes only
    state["depth_head.projects.0.weight"] = torch.zeros(9, 64, 1, 1)
    with pytest.raises(ValueError, match="^not a Depth Anything model: size mismatch for depth_head.projects.0"):
        depth_anything_from_state_dict(state, version=1)


def test_images_and_files_depth_anything_cannot_take_are_refused_in_one_line(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "depth_anything_vitl14.pth")
    with pytest.raises(PreprocessorError, match="is too elongated for Depth Anything"):
        detect(picture(32, 640), "depth_anything", 64, annotator_folder=tmp_path)  # (20:1: 37 x 740 patches)
    state = tiny().state_dict()
    state["pretrained.cls_token"] = torch.tensor(0.0)  # (a tensor of no dimension)
    torch.save(state, tmp_path / "depth_anything_vitl14.pth")
    with pytest.raises(PreprocessorError, match="^ControlNet module 'depth_anything': depth_anything_vitl14.pth: "):
        detect(picture(), "depth_anything", 64, annotator_folder=tmp_path)
