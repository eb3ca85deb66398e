"""softedge_pidinet, softedge_pidisafe, scribble_pidinet and t2ia_sketch_pidi without controlnet_aux
(`models/pidinet.py`, `pipeline/pidinet_edges.py`): the network against the extension's `annotator/pidinet/model.py`
written out (its pixel-difference convolutions as it computes them), with the same random weights; the maps against
its `annotator/pidinet/__init__.py` and `legacy/processor.py` written out, from a file in an annotator folder."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.models.pidinet import PiDiNet
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_anime_annotators import drawing
from test_hed_lineart import calibrated, random_network, ref_nms, ref_safe_step
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

# ---- annotator/pidinet/model.py, written out ---------------------------------------------------------------------------

CARV4 = ["cd", "ad", "rd", "cv"] * 4


def ref_create_conv_func(op_type):
    if op_type == "cv":
        return F.conv2d
    if op_type == "cd":

        def func(x, weights, bias=None, stride=1, padding=0, dilation=1, groups=1):
            weights_c = weights.sum(dim=[2, 3], keepdim=True)
            yc = F.conv2d(x, weights_c, stride=stride, padding=0, groups=groups)
            y = F.conv2d(x, weights, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
            return y - yc

        return func
    if op_type == "ad":

        def func(x, weights, bias=None, stride=1, padding=0, dilation=1, groups=1):
            shape = weights.shape
            weights = weights.view(shape[0], shape[1], -1)
            weights_conv = (weights - weights[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).view(shape)  # clock-wise
            return F.conv2d(x, weights_conv, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

        return func

    def func(x, weights, bias=None, stride=1, padding=0, dilation=1, groups=1):  # "rd"
        padding = 2 * dilation
        shape = weights.shape
        buffer = torch.zeros(shape[0], shape[1], 5 * 5)
        weights = weights.view(shape[0], shape[1], -1)
        buffer[:, :, [0, 2, 4, 10, 14, 20, 22, 24]] = weights[:, :, 1:]
        buffer[:, :, [6, 7, 8, 11, 13, 16, 17, 18]] = -weights[:, :, 1:]
        buffer[:, :, 12] = 0
        buffer = buffer.view(shape[0], shape[1], 5, 5)
        return F.conv2d(x, buffer, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    return func


class RefConv2d(nn.Module):
    def __init__(self, pdc, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.register_parameter("bias", None)
        self.pdc = pdc

    def forward(self, input):
        return self.pdc(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RefCSAM(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, 4, kernel_size=1, padding=0)
        self.conv2 = nn.Conv2d(4, 1, kernel_size=3, padding=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.conv2(self.conv1(self.relu1(x))))


class RefCDCM(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0)
        self.conv2_1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=5, padding=5, bias=False)
        self.conv2_2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=7, padding=7, bias=False)
        self.conv2_3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=9, padding=9, bias=False)
        self.conv2_4 = nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=11, padding=11, bias=False)

    def forward(self, x):
        x = self.conv1(self.relu1(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class RefMapReduce(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1, padding=0)

    def forward(self, x):
        return self.conv(x)


class RefPDCBlock(nn.Module):
    def __init__(self, pdc, inplane, ouplane, stride=1):
        super().__init__()
        self.stride = stride
        if self.stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(inplane, ouplane, kernel_size=1, padding=0)
        self.conv1 = RefConv2d(pdc, inplane, inplane, kernel_size=3, padding=1, groups=inplane)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inplane, ouplane, kernel_size=1, padding=0, bias=False)

    def forward(self, x):
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(self.relu2(self.conv1(x)))
        if self.stride > 1:
            x = self.shortcut(x)
        return y + x


class RefPiDiNet(nn.Module):  # PiDiNet(60, config_model("carv4"), dil=24, sa=True), its sa-and-dil branch
    def __init__(self, inplane=60, dil=24):
        super().__init__()
        pdcs = [ref_create_conv_func(op) for op in CARV4]
        self.fuseplanes, self.inplane = [], inplane
        self.init_block = RefConv2d(pdcs[0], 3, self.inplane, kernel_size=3, padding=1)
        self.block1_1 = RefPDCBlock(pdcs[1], self.inplane, self.inplane)
        self.block1_2 = RefPDCBlock(pdcs[2], self.inplane, self.inplane)
        self.block1_3 = RefPDCBlock(pdcs[3], self.inplane, self.inplane)
        self.fuseplanes.append(self.inplane)
        inplane, self.inplane = self.inplane, self.inplane * 2
        self.block2_1 = RefPDCBlock(pdcs[4], inplane, self.inplane, stride=2)
        self.block2_2 = RefPDCBlock(pdcs[5], self.inplane, self.inplane)
        self.block2_3 = RefPDCBlock(pdcs[6], self.inplane, self.inplane)
        self.block2_4 = RefPDCBlock(pdcs[7], self.inplane, self.inplane)
        self.fuseplanes.append(self.inplane)
        inplane, self.inplane = self.inplane, self.inplane * 2
        self.block3_1 = RefPDCBlock(pdcs[8], inplane, self.inplane, stride=2)
        self.block3_2 = RefPDCBlock(pdcs[9], self.inplane, self.inplane)
        self.block3_3 = RefPDCBlock(pdcs[10], self.inplane, self.inplane)
        self.block3_4 = RefPDCBlock(pdcs[11], self.inplane, self.inplane)
        self.fuseplanes.append(self.inplane)
        self.block4_1 = RefPDCBlock(pdcs[12], self.inplane, self.inplane, stride=2)
        self.block4_2 = RefPDCBlock(pdcs[13], self.inplane, self.inplane)
        self.block4_3 = RefPDCBlock(pdcs[14], self.inplane, self.inplane)
        self.block4_4 = RefPDCBlock(pdcs[15], self.inplane, self.inplane)
        self.fuseplanes.append(self.inplane)
        self.conv_reduces, self.attentions, self.dilations = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            self.dilations.append(RefCDCM(self.fuseplanes[i], dil))
            self.attentions.append(RefCSAM(dil))
            self.conv_reduces.append(RefMapReduce(dil))
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)

    def forward(self, x):
        H, W = x.size()[2:]
        x = self.init_block(x)
        x1 = self.block1_3(self.block1_2(self.block1_1(x)))
        x2 = self.block2_4(self.block2_3(self.block2_2(self.block2_1(x1))))
        x3 = self.block3_4(self.block3_3(self.block3_2(self.block3_1(x2))))
        x4 = self.block4_4(self.block4_3(self.block4_2(self.block4_1(x3))))
        x_fuses = [self.attentions[i](self.dilations[i](xi)) for i, xi in enumerate([x1, x2, x3, x4])]
        outputs = [
            F.interpolate(self.conv_reduces[i](x_fuses[i]), (H, W), mode="bilinear", align_corners=False)
            for i in range(4)
        ]
        outputs.append(self.classifier(torch.cat(outputs, dim=1)))
        return [torch.sigmoid(r) for r in outputs]


def ref_apply_pidinet(net, input_image, is_safe=False, apply_fliter=False):  # annotator/pidinet/__init__.py
    input_image = input_image[:, :, ::-1].copy()
    with torch.no_grad():
        image_pidi = torch.from_numpy(input_image).float() / 255.0
        edge = net(image_pidi.permute(2, 0, 1)[None])[-1].cpu().numpy()
        if apply_fliter:
            edge = edge > 0.5
        if is_safe:
            edge = ref_safe_step(edge)
        edge = (edge * 255.0).clip(0, 255).astype(np.uint8)
    return edge[0][0]


def ref_pidinet(net, img, res, **options):  # legacy/processor.py pidinet, pidinet_ts, pidinet_safe
    img, remove_pad = ref_resize_image_with_pad(img, res)
    return remove_pad(ref_apply_pidinet(net, img, **options))


def ref_scribble_pidinet(net, img, res):
    result = ref_nms(ref_pidinet(net, img, res), 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result


# ---- the tests -------------------------------------------------------------------------------------------------------


def test_the_network_is_the_extensions():
    ours = random_network(PiDiNet)
    theirs = RefPiDiNet().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert a.shape == (1, 1, 64, 96)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("module", ["softedge_pidinet", "softedge_pidisafe", "scribble_pidinet", "t2ia_sketch_pidi"])
def test_the_maps_are_the_extensions(module, tmp_path):
    model = random_network(PiDiNet)
    padded = ref_resize_image_with_pad(drawing(), 128)[0]
    x = torch.from_numpy(padded[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255
    calibrated(model, model.classifier, x, 0.0, 2.0)  # (the fused logits: spread over both sides of 0)
    (tmp_path / "pidinet").mkdir()  # a DataParallel checkpoint, as the file is
    state = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(state, tmp_path / "pidinet" / "table5_pidinet.pth")
    reference = RefPiDiNet().eval()
    reference.load_state_dict(model.state_dict())
    found = detect(drawing(), module, 128, annotator_folder=tmp_path)
    make = {
        "softedge_pidinet": lambda: ref_pidinet(reference, drawing(), 128),
        "softedge_pidisafe": lambda: ref_pidinet(reference, drawing(), 128, is_safe=True),
        "scribble_pidinet": lambda: ref_scribble_pidinet(reference, drawing(), 128),
        "t2ia_sketch_pidi": lambda: ref_pidinet(reference, drawing(), 128, apply_fliter=True),
    }
    expected = ref_hwc3(make[module]())
    assert found.shape == expected.shape == (128, 196, 3)
    np.testing.assert_array_equal(found, expected)
    levels = {"softedge_pidisafe": [0, 127, 255], "scribble_pidinet": [0, 255], "t2ia_sketch_pidi": [0, 255]}
    assert np.unique(found).tolist() == levels[module] if module in levels else len(np.unique(found)) > 100
    names = {"softedge_pidinet": "pidinet", "softedge_pidisafe": "pidinet_safe", "scribble_pidinet": "pidinet_scribble"}
    assert module_list(annotator_folder=tmp_path)["module_detail"][names.get(module, "pidinet_sketch")]["available"]


def test_a_file_that_is_not_pidinet_is_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'softedge_pidinet' needs table5_pidinet.pth: no folder named"):
        detect(drawing(), "softedge_pidinet")
    torch.save({"init_block.weight": torch.zeros(60, 3, 3, 3)}, tmp_path / "table5_pidinet.pth")
    with pytest.raises(
        PreprocessorError, match=r"^ControlNet module 'softedge_pidinet': table5_pidinet.pth: not a PiD"
    ):
        detect(drawing(), "softedge_pidinet", annotator_folder=tmp_path)
