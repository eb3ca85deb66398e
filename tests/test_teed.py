"""TEED, softedge_teed and softedge_anyline (`models/teed.py`, `pipeline/teed_edges.py`): the network against TEED's
`ted.py` (as the ControlNet extension carries it) written out here, with the same random weights; the maps against
the extension's `scripts/preprocessor/teed.py` and `annotator/teed/__init__.py` written out, skimage's
`remove_small_objects` as scipy computes it, from files in an annotator folder."""

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from latent_diffusion.models.teed import TEED
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_preprocessors import ref_hwc3, ref_lineart_standard, ref_resize_image_with_pad

from conftest import randomize, seeded

# ---- ted.py, written out ---------------------------------------------------------------------------------------------


def ref_smish(x):
    return x * torch.tanh(torch.log(1 + torch.sigmoid(x)))


class RefSmish(nn.Module):
    def forward(self, x):
        return ref_smish(x)


class RefDoubleFusion(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.DWconv1 = nn.Conv2d(in_ch, in_ch * 8, kernel_size=3, stride=1, padding=1, groups=in_ch)
        self.PSconv1 = nn.PixelShuffle(1)
        self.DWconv2 = nn.Conv2d(24, 24 * 1, kernel_size=3, stride=1, padding=1, groups=24)
        self.AF = RefSmish()

    def forward(self, x):
        attn = self.PSconv1(self.DWconv1(self.AF(x)))
        attn2 = self.PSconv1(self.DWconv2(self.AF(attn)))
        return ref_smish(((attn2 + attn).sum(1)).unsqueeze(1))


class RefDenseLayer(nn.Sequential):
    def __init__(self, input_features, out_features):
        super().__init__()
        self.add_module("conv1", nn.Conv2d(input_features, out_features, kernel_size=3, stride=1, padding=2))
        self.add_module("smish1", RefSmish())
        self.add_module("conv2", nn.Conv2d(out_features, out_features, kernel_size=3, stride=1))

    def forward(self, x):
        x1, x2 = x
        new_features = super().forward(ref_smish(x1))
        return 0.5 * (new_features + x2), x2


class RefDenseBlock(nn.Sequential):
    def __init__(self, num_layers, input_features, out_features):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", RefDenseLayer(input_features, out_features))
            input_features = out_features


class RefUpConvBlock(nn.Module):
    def __init__(self, in_features, up_scale):
        super().__init__()
        layers, all_pads = [], [0, 0, 1, 3, 7]
        for i in range(up_scale):
            kernel_size, pad = 2**up_scale, all_pads[up_scale]
            out_features = 1 if i == up_scale - 1 else 16
            layers.append(nn.Conv2d(in_features, out_features, 1))
            layers.append(RefSmish())
            layers.append(nn.ConvTranspose2d(out_features, out_features, kernel_size, stride=2, padding=pad))
            in_features = out_features
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class RefSingleConvBlock(nn.Module):
    def __init__(self, in_features, out_features, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 1, stride=stride, bias=True)

    def forward(self, x):
        return self.conv(x)


class RefDoubleConvBlock(nn.Module):
    def __init__(self, in_features, mid_features, out_features=None, stride=1, use_act=True):
        super().__init__()
        self.use_act = use_act
        out_features = mid_features if out_features is None else out_features
        self.conv1 = nn.Conv2d(in_features, mid_features, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(mid_features, out_features, 3, padding=1)
        self.smish = RefSmish()

    def forward(self, x):
        x = self.conv2(self.smish(self.conv1(x)))
        return self.smish(x) if self.use_act else x


class RefTED(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = RefDoubleConvBlock(3, 16, 16, stride=2)
        self.block_2 = RefDoubleConvBlock(16, 32, use_act=False)
        self.dblock_3 = RefDenseBlock(1, 32, 48)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.side_1 = RefSingleConvBlock(16, 32, 2)
        self.pre_dense_3 = RefSingleConvBlock(32, 48, 1)
        self.up_block_1 = RefUpConvBlock(16, 1)
        self.up_block_2 = RefUpConvBlock(32, 1)
        self.up_block_3 = RefUpConvBlock(48, 2)
        self.block_cat = RefDoubleFusion(3, 3)

    def forward(self, x):
        block_1 = self.block_1(x)
        block_1_side = self.side_1(block_1)
        block_2 = self.block_2(block_1)
        block_2_down = self.maxpool(block_2)
        block_2_add = block_2_down + block_1_side
        block_3_pre_dense = self.pre_dense_3(block_2_down)
        block_3, _ = self.dblock_3([block_2_add, block_3_pre_dense])
        results = [self.up_block_1(block_1), self.up_block_2(block_2), self.up_block_3(block_3)]
        results.append(self.block_cat(torch.cat(results, dim=1)))
        return results


# ---- the extension's detector and preprocessors, written out -------------------------------------------------------


def ref_safe_step(x, step=2):
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def ref_teed_detector(model, image, safe_steps=2):  # annotator/teed/__init__.py TEEDDetector.__call__
    H, W, _ = image.shape
    with torch.no_grad():
        image_teed = torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None]  # rearrange "h w c -> 1 c h w"
        edges = model(image_teed)
        edges = [e.detach().cpu().numpy().astype(np.float32)[0, 0] for e in edges]
        edges = [cv2.resize(e, (W, H), interpolation=cv2.INTER_LINEAR) for e in edges]
        edges = np.stack(edges, axis=2)
        edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
        if safe_steps != 0:
            edge = ref_safe_step(edge, safe_steps)
        return (edge * 255.0).clip(0, 255).astype(np.uint8)


def ref_softedge_teed(model, input_image, resolution, slider_1):
    img, remove_pad = ref_resize_image_with_pad(input_image, resolution)
    return ref_hwc3(remove_pad(ref_teed_detector(model, img, safe_steps=int(slider_1))))


def ref_remove_small_objects(ar, min_size, connectivity):  # skimage.morphology, as it labels with scipy
    footprint = ndimage.generate_binary_structure(ar.ndim, connectivity)
    labels, _ = ndimage.label(ar, footprint)
    too_small = np.bincount(labels.ravel()) < min_size
    out = ar.copy()
    out[too_small[labels]] = 0
    return out


def ref_softedge_anyline(model, input_image, resolution, slider_1):
    img, remove_pad = ref_resize_image_with_pad(input_image, resolution)
    mteed_result = ref_hwc3(ref_teed_detector(model, img, safe_steps=int(slider_1)))
    lineart_result = ref_lineart_standard(img, resolution, None, None)
    mask = lineart_result[:, :, 0]
    mask = np.where((mask >= 0) & (mask <= 1), mask, 0)
    lineart_result = np.expand_dims(mask, 2).repeat(3, axis=2)
    cleaned = ref_remove_small_objects(lineart_result.astype(bool), min_size=36, connectivity=1)
    top = lineart_result * cleaned
    temp = 1 - (1 - top) * (1 - mteed_result)
    final_result = mteed_result * (~top.astype(bool)) + temp * top.astype(bool)
    return ref_hwc3(remove_pad(final_result))


# ---- the tests -------------------------------------------------------------------------------------------------------


def random_teed(seed=0):
    with seeded(seed):
        return randomize(TEED(), seed=seed + 1).eval()


def test_the_network_is_teeds():
    ours = random_teed()
    theirs = RefTED().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert a.shape == (2, 1, 64, 96)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def drawing(height=150, width=230):
    """Shapes on a light ground, and faint dots and strokes for lineart's faintest level."""
    image = np.full((height, width, 3), 225, np.uint8)
    cv2.circle(image, (60, 70), 35, (40, 90, 160), -1)
    cv2.rectangle(image, (120, 30), (200, 110), (30, 30, 30), 3)
    for x in range(10, width - 10, 13):  # faint strokes of several lengths
        cv2.line(image, (x, 125), (x + x % 7, 140), (205, 205, 205), 1)
    return image


@pytest.mark.parametrize("module, name", [("softedge_teed", "7_model.pth"), ("softedge_anyline", "MTEED.pth")])
@pytest.mark.parametrize("safe_steps", [2, 0])
def test_the_maps_are_the_extensions(module, name, safe_steps, tmp_path):
    model = random_teed()
    (tmp_path / "TEED").mkdir()
    torch.save(model.state_dict(), tmp_path / "TEED" / name)
    reference = RefTED().eval()
    reference.load_state_dict(model.state_dict())
    res = 256
    found = detect(drawing(), module, res, safe_steps, annotator_folder=tmp_path)
    make = ref_softedge_anyline if module == "softedge_anyline" else ref_softedge_teed
    expected = make(reference, drawing(), res, safe_steps)
    assert found.shape == expected.shape == (256, 393, 3)  # (at the processor resolution)
    np.testing.assert_array_equal(found, expected)
    assert len(np.unique(found)) > 2
    if module == "softedge_anyline":  # faint patches both small (left alone) and large (set to 1) were there
        img = ref_resize_image_with_pad(drawing(), res)[0]
        sizes = np.bincount(ndimage.label(ref_lineart_standard(img, res, None, None)[:, :, 0] == 1)[0].ravel())[1:]
        assert (sizes < 12).any() and (sizes >= 12).any()
        plain = ref_hwc3(ref_teed_detector(reference, img, safe_steps))[:256, :393]
        assert ((found == 1) & (plain != 1)).any()
    assert module_list(annotator_folder=tmp_path)["module_detail"][module]["available"]


def test_files_that_are_not_teed_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'softedge_teed' needs 7_model.pth: no folder named"):
        detect(drawing(), "softedge_teed")
    torch.save({"block_1.conv1.weight": torch.zeros(16, 3, 3, 3)}, tmp_path / "MTEED.pth")
    with pytest.raises(
        PreprocessorError, match=r"^ControlNet module 'softedge_anyline': MTEED.pth: not a TEED model: "
    ):
        detect(drawing(), "softedge_anyline", annotator_folder=tmp_path)
