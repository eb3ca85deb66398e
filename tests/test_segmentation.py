"""seg_ufade20k (`models/uniformer.py`, `pipeline/segmentation.py`): the UniFormer backbone against its code (the
ControlNet extension's `annotator/uniformer/uniformer.py`) written out here, the UperNet head against transformers'
`UperNetHead`, both with the same random weights; the map against the extension's processor, mmsegmentation's test
pipeline and `show_result` written out, with those two networks inside, from a file in an annotator folder."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.models.uniformer import UniFormerConfig, UperNetUniFormer, segmenter_from_state_dict
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from latent_diffusion.pipeline.segmentation import PALETTE
from test_preprocessors import ref_resize_image_with_pad

from conftest import randomize, seeded

TINY = UniFormerConfig(widths=(16, 32, 64, 128), depths=(1, 2, 2, 1), channels=24, classes=150)

# ---- uniformer.py (the global-attention configuration the file uses), written out ---------------------------------


class RefMlp(nn.Module):
    def __init__(self, in_features, hidden_features, conv):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1, self.act, self.fc2 = (
            layer(in_features, hidden_features),
            nn.GELU(),
            layer(hidden_features, in_features),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefCBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = RefMlp(dim, 4 * dim, conv=True)

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefSABlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.mlp = RefMlp(dim, 4 * dim, conv=False)

    def forward(self, x):
        x = x + self.pos_embed(x)
        B, N, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(B, N, H, W)


class RefPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)
        B, _, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


class RefUniFormer(nn.Module):
    def __init__(self, layers, embed_dim, head_dim=64):
        super().__init__()
        num_heads = [dim // head_dim for dim in embed_dim]
        self.patch_embed1 = RefPatchEmbed(4, 3, embed_dim[0])
        self.patch_embed2 = RefPatchEmbed(2, embed_dim[0], embed_dim[1])
        self.patch_embed3 = RefPatchEmbed(2, embed_dim[1], embed_dim[2])
        self.patch_embed4 = RefPatchEmbed(2, embed_dim[2], embed_dim[3])
        self.blocks1 = nn.ModuleList([RefCBlock(embed_dim[0]) for _ in range(layers[0])])
        self.norm1 = nn.LayerNorm(embed_dim[0], eps=1e-6)
        self.blocks2 = nn.ModuleList([RefCBlock(embed_dim[1]) for _ in range(layers[1])])
        self.norm2 = nn.LayerNorm(embed_dim[1], eps=1e-6)
        self.blocks3 = nn.ModuleList([RefSABlock(embed_dim[2], num_heads[2]) for _ in range(layers[2])])
        self.norm3 = nn.LayerNorm(embed_dim[2], eps=1e-6)
        self.blocks4 = nn.ModuleList([RefSABlock(embed_dim[3], num_heads[3]) for _ in range(layers[3])])
        self.norm4 = nn.LayerNorm(embed_dim[3], eps=1e-6)

    def forward(self, x):
        out = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"blocks{i}"):
                x = blk(x)
            x_out = getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1))
            out.append(x_out.permute(0, 3, 1, 2).contiguous())
        return tuple(out)


def transformers_head(cfg: UniFormerConfig, state: dict):
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetHead

    config = UperNetConfig(hidden_size=cfg.channels, num_labels=cfg.classes, pool_scales=[1, 2, 3, 6])
    head = UperNetHead(config, in_channels=list(cfg.widths)).eval()
    prefix = "decode_head."
    renamed = {
        k[len(prefix) :].replace(".bn.", ".batch_norm.").replace("conv_seg.", "classifier."): v
        for k, v in state.items()
        if k.startswith(prefix)
    }
    head.load_state_dict(renamed, strict=True)
    return head


def random_segmenter(cfg=TINY, seed=0) -> UperNetUniFormer:
    with seeded(seed):
        model = randomize(UperNetUniFormer(cfg), seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():  # batch norms with statistics of their own
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def reference_networks(model: UperNetUniFormer):
    cfg = model.cfg
    backbone = RefUniFormer(cfg.depths, cfg.widths).eval()
    state = model.state_dict()
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    return backbone, transformers_head(cfg, state)


def test_the_networks_are_uniformers_and_transformers_upernet():
    ours = random_segmenter()
    backbone, head = reference_networks(ours)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(x)
        for a, b in zip(ours.backbone(x), features, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        expected = head(list(features))
        torch.testing.assert_close(ours.decode_head(features), expected, atol=1e-5, rtol=1e-5)
    assert expected.shape == (2, 150, 24, 32) and expected.std() > 0.05


def test_the_full_size_layout_is_the_files():
    """UniFormer-S with its UperNet head (the file's `backbone.*`, `decode_head.*`): key for key and shape for shape
    the written-out backbone of the file's config and transformers' head of the same widths (meta device)."""
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetHead

    cfg = UniFormerConfig()
    with torch.device("meta"):
        ours = {k: v.shape for k, v in UperNetUniFormer(cfg).state_dict().items()}
        backbone = {f"backbone.{k}": v.shape for k, v in RefUniFormer(cfg.depths, cfg.widths).state_dict().items()}
        config = UperNetConfig(hidden_size=512, num_labels=150, pool_scales=[1, 2, 3, 6])
        head = UperNetHead(config, list(cfg.widths))
    renamed = {
        "decode_head." + k.replace(".batch_norm.", ".bn.").replace("classifier.", "conv_seg."): v.shape
        for k, v in head.state_dict().items()
    }
    assert ours == backbone | renamed and ours["backbone.blocks3.7.attn.qkv.weight"] == (960, 320)


# ---- the extension's processor and mmsegmentation's pipeline, written out -------------------------------------------


def ref_uniformer(img, res, backbone, head):
    """legacy/processor.py `uniformer` -> apply_uniformer -> inference_segmentor, show_result_pyplot(opacity=1)."""
    img, remove_pad = ref_resize_image_with_pad(img, res)
    # LoadImage (mmcv.imread of an array: as it is), MultiScaleFlipAug(img_scale=(2048, 512)) -> Resize(keep_ratio)
    h, w = img.shape[:2]
    scale_factor = min(max(2048, 512) / max(h, w), min(2048, 512) / min(h, w))
    new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
    resized = cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)
    # Normalize(mean, std, to_rgb=True): mmcv.imnormalize
    normalized = resized.copy().astype(np.float32)
    mean = np.float64(np.array([123.675, 116.28, 103.53]).reshape(1, -1))
    stdinv = 1 / np.float64(np.array([58.395, 57.12, 57.375]).reshape(1, -1))
    cv2.cvtColor(normalized, cv2.COLOR_BGR2RGB, normalized)
    cv2.subtract(normalized, mean, normalized)
    cv2.multiply(normalized, stdinv, normalized)
    tensor = torch.from_numpy(normalized.transpose(2, 0, 1))[None]
    with torch.no_grad():  # EncoderDecoder.simple_test, whole inference with rescale
        out = head(list(backbone(tensor)))
        out = F.interpolate(out, size=tensor.shape[2:], mode="bilinear", align_corners=False)
        seg_logit = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        seg = F.softmax(seg_logit, dim=1).argmax(dim=1).cpu().numpy()[0]
    # BaseSegmentor.show_result(img, [seg], palette=ade_palette(), opacity=1), then mmcv.bgr2rgb
    color_seg = np.zeros((seg.shape[0], seg.shape[1], 3), dtype=np.uint8)
    for label, color in enumerate(PALETTE.tolist()):
        color_seg[seg == label, :] = color
    color_seg = color_seg[..., ::-1]
    shown = (img * (1 - 1) + color_seg * 1).astype(np.uint8)
    return remove_pad(cv2.cvtColor(shown, cv2.COLOR_BGR2RGB))


def photo(height=90, width=140):
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=2).astype(np.uint8)
    cv2.circle(image, (40, 45), 25, (250, 240, 30), -1)
    return image


@pytest.mark.parametrize("res", [128, 200])
def test_the_map_is_the_extensions(res, tmp_path):
    model = random_segmenter()
    (tmp_path / "uniformer").mkdir()
    state = model.state_dict() | {"auxiliary_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)}  # (training only)
    torch.save({"meta": {"CLASSES": ("wall", "building"), "PALETTE": [[1, 2, 3]]}, "state_dict": state},
               tmp_path / "uniformer" / "upernet_global_small.pth")  # fmt: skip
    found = detect(photo(), "seg_ufade20k", res, annotator_folder=tmp_path)
    expected = ref_uniformer(photo(), res, *reference_networks(model))
    assert found.shape == expected.shape and found.shape[0] == res
    np.testing.assert_array_equal(found, expected)
    colours = {tuple(c) for c in found.reshape(-1, 3)}
    assert len(colours) >= 3 and colours <= {tuple(c) for c in PALETTE.tolist()}
    assert module_list(annotator_folder=tmp_path)["module_detail"]["segmentation"]["available"]


def test_the_palette_is_ade20ks():
    assert PALETTE.shape == (150, 3) and len({tuple(c) for c in PALETTE.tolist()}) == 149  # (8C8C8C twice: 6, 48)
    assert PALETTE[[0, 1, 2, 149]].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [92, 0, 255]]


def test_files_that_are_not_the_segmenter_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'seg_ufade20k' needs upernet_global_small.pth: no folder named"):
        detect(photo(), "segmentation")
    torch.save({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(8, 3, 4, 4)}},
               tmp_path / "upernet_global_small.pth")  # fmt: skip
    with pytest.raises(PreprocessorError, match="not an UperNet UniFormer segmenter .no backbone.patch_embed2"):
        detect(photo(), "seg_ufade20k", annotator_folder=tmp_path)
    state = random_segmenter().state_dict()
    state["decode_head.bottleneck.bn.weight"] = torch.ones(7)
    with pytest.raises(
        ValueError, match="^not an UperNet UniFormer segmenter: size mismatch for decode_head.bottleneck"
    ):
        segmenter_from_state_dict(state)


def test_images_the_segmenter_cannot_take_are_refused_in_one_line(tmp_path):
    torch.save({"state_dict": random_segmenter().state_dict()}, tmp_path / "upernet_global_small.pth")
    with pytest.raises(PreprocessorError, match="too elongated for the segmenter"):
        detect(np.full((16, 1100, 3), 100, np.uint8), "seg_ufade20k", 64, annotator_folder=tmp_path)
    state = random_segmenter().state_dict()
    state["decode_head.conv_seg.weight"] = torch.zeros(150)  # (a tensor of another rank)
    torch.save({"state_dict": state}, tmp_path / "upernet_global_small.pth")
    with pytest.raises(PreprocessorError, match="^ControlNet module 'seg_ufade20k': upernet_global_small.pth: "):
        detect(photo(), "seg_ufade20k", 64, annotator_folder=tmp_path)
