"""mlsd without controlnet_aux (`models/mlsd.py`, `models/mobilenet_v2.py`, `pipeline/mlsd_lines.py`): the network
against the extension's `annotator/mlsd/models/mbv2_mlsd_large.py` written out, with the same random weights; the map
against its `apply_mlsd` and `utils.pred_lines` written out, from a file in an annotator folder, including where no
segment passes the thresholds."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.models.mlsd import MLSD
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_anime_annotators import drawing, random_weights
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

from conftest import seeded

# ---- annotator/mlsd, written out --------------------------------------------------------------------------------------


def conv_bn_relu_ref(in_c, out_c, kernel_size, padding=0, dilation=1):
    conv = nn.Conv2d(in_c, out_c, kernel_size=kernel_size, padding=padding, dilation=dilation)
    return nn.Sequential(conv, nn.BatchNorm2d(out_c), nn.ReLU())


class RefBlockTypeA(nn.Module):
    def __init__(self, in_c1, in_c2, out_c1, out_c2, upscale=True):
        super().__init__()
        self.conv1 = conv_bn_relu_ref(in_c2, out_c2, 1)
        self.conv2 = conv_bn_relu_ref(in_c1, out_c1, 1)
        self.upscale = upscale

    def forward(self, a, b):
        b = self.conv1(b)
        a = self.conv2(a)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class RefBlockTypeB(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv1 = conv_bn_relu_ref(in_c, in_c, 3, padding=1)
        self.conv2 = conv_bn_relu_ref(in_c, out_c, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


class RefBlockTypeC(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv1 = conv_bn_relu_ref(in_c, in_c, 3, padding=5, dilation=5)
        self.conv2 = conv_bn_relu_ref(in_c, in_c, 3, padding=1)
        self.conv3 = nn.Conv2d(in_c, out_c, kernel_size=1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class RefConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        self.stride = stride
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride)

    def forward(self, x):
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1), "constant", 0)
        for module in self:
            if not isinstance(module, nn.MaxPool2d):
                x = module(x)
        return x


class RefInvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = [RefConvBNReLU(inp, hidden_dim, kernel_size=1)] if expand_ratio != 1 else []
        layers.extend([RefConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                       nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)])  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class RefMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        input_channel = 32
        features = [RefConvBNReLU(4, input_channel, stride=2)]
        for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1]]:
            for i in range(n):
                features.append(RefInvertedResidual(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        self.features = nn.Sequential(*features)
        self.fpn_selected = [1, 3, 6, 10, 13]

    def forward(self, x):
        fpn_features = []
        for i, f in enumerate(self.features):
            if i > self.fpn_selected[-1]:
                break
            x = f(x)
            if i in self.fpn_selected:
                fpn_features.append(x)
        return fpn_features


class RefMobileV2MLSDLarge(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = RefMobileNetV2()
        self.block15 = RefBlockTypeA(in_c1=64, in_c2=96, out_c1=64, out_c2=64, upscale=False)
        self.block16 = RefBlockTypeB(128, 64)
        self.block17 = RefBlockTypeA(in_c1=32, in_c2=64, out_c1=64, out_c2=64)
        self.block18 = RefBlockTypeB(128, 64)
        self.block19 = RefBlockTypeA(in_c1=24, in_c2=64, out_c1=64, out_c2=64)
        self.block20 = RefBlockTypeB(128, 64)
        self.block21 = RefBlockTypeA(in_c1=16, in_c2=64, out_c1=64, out_c2=64)
        self.block22 = RefBlockTypeB(128, 64)
        self.block23 = RefBlockTypeC(64, 16)

    def forward(self, x):
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:, :, :]


def ref_decode(tpMap, topk_n=200, ksize=5):  # utils.py deccode_output_score_and_ptss
    w = tpMap.shape[3]
    displacement = tpMap[:, 1:5, :, :][0]
    heat = torch.sigmoid(tpMap[:, 0, :, :])
    hmax = F.max_pool2d(heat, (ksize, ksize), stride=1, padding=(ksize - 1) // 2)
    heat = (heat * (hmax == heat).float()).reshape(-1)
    scores, indices = torch.topk(heat, topk_n, dim=-1, largest=True)
    yy = torch.floor_divide(indices, w).unsqueeze(-1)
    xx = torch.fmod(indices, w).unsqueeze(-1)
    ptss = torch.cat((yy, xx), dim=-1).numpy()
    return ptss, scores.numpy(), displacement.numpy().transpose((1, 2, 0))


def ref_pred_lines(image, model, input_shape, score_thr=0.10, dist_thr=20.0):  # utils.py pred_lines
    h, w, _ = image.shape
    h_ratio, w_ratio = [h / input_shape[0], w / input_shape[1]]
    resized_image = np.concatenate(
        [cv2.resize(image, (input_shape[1], input_shape[0]), interpolation=cv2.INTER_AREA), np.ones([input_shape[0], input_shape[1], 1])], axis=-1)  # fmt: skip
    batch_image = np.expand_dims(resized_image.transpose((2, 0, 1)), axis=0).astype("float32")
    batch_image = torch.from_numpy((batch_image / 127.5) - 1.0).float()
    pts, pts_score, vmap = ref_decode(model(batch_image), 200, 3)
    dist_map = np.sqrt(np.sum((vmap[:, :, :2] - vmap[:, :, 2:]) ** 2, axis=-1))
    segments_list = []
    for center, score in zip(pts, pts_score):
        y, x = center
        if score > score_thr and dist_map[y, x] > dist_thr:
            disp_x_start, disp_y_start, disp_x_end, disp_y_end = vmap[y, x, :]
            segments_list.append([x + disp_x_start, y + disp_y_start, x + disp_x_end, y + disp_y_end])
    lines = 2 * np.array(segments_list)  # 256 > 512
    lines[:, 0] = lines[:, 0] * w_ratio
    lines[:, 1] = lines[:, 1] * h_ratio
    lines[:, 2] = lines[:, 2] * w_ratio
    lines[:, 3] = lines[:, 3] * h_ratio
    return lines


def ref_mlsd(model, img, res, thr_v, thr_d):  # legacy/processor.py mlsd, apply_mlsd
    img, remove_pad = ref_resize_image_with_pad(img, res)
    img_output = np.zeros_like(img)
    try:
        with torch.no_grad():
            for line in ref_pred_lines(img, model, [img.shape[0], img.shape[1]], thr_v, thr_d):
                x_start, y_start, x_end, y_end = [int(val) for val in line]
                cv2.line(img_output, (x_start, y_start), (x_end, y_end), [255, 255, 255], 1)
    except Exception:
        pass
    return ref_hwc3(remove_pad(img_output[:, :, 0]))


# ---- the tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def networks():
    with seeded(0):
        ours = random_weights(MLSD(), 1)
    theirs = RefMobileV2MLSDLarge().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():  # the displacements scaled up, so that segments are tens of pixels long
        for m in (ours, theirs):
            m.block23.conv3.weight[8:].mul_(20.0)
            m.block23.conv3.bias[8:].mul_(20.0)
    return ours, theirs


def test_the_network_is_the_extensions(networks):
    ours, theirs = networks
    x = torch.rand(1, 4, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        found, expected = ours(x), theirs(x)
    assert found.shape == (1, 9, 32, 48)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("score", "length"), [(0.1, 0.1), (0.3, 5.0), (1.5, 0.1)])
def test_the_mlsd_map_is_the_extensions(networks, score, length, tmp_path):
    ours, theirs = networks
    (tmp_path / "mlsd").mkdir()
    torch.save(ours.state_dict(), tmp_path / "mlsd" / "mlsd_large_512_fp32.pth")
    found = detect(drawing(), "mlsd", 128, score, length, annotator_folder=tmp_path)
    expected = ref_mlsd(theirs, drawing(), 128, score, length)
    assert found.shape == expected.shape == (128, 196, 3)
    np.testing.assert_array_equal(found, expected)
    assert set(np.unique(found)) <= {0, 255}
    if score > 1:  # (no score is above 1: no segment, a black map, where the extension's reference fails and passes)
        assert not found.any()
    else:
        assert (found == 255).mean() > 0.01
    assert module_list(annotator_folder=tmp_path)["module_detail"]["mlsd"]["available"]


def test_a_file_that_is_not_mlsd_is_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'mlsd' needs mlsd_large_512_fp32.pth: no folder named"):
        detect(drawing(), "mlsd")
    torch.save({"block15.conv1.0.weight": torch.zeros(64, 96, 1, 1)}, tmp_path / "mlsd_large_512_fp32.pth")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'mlsd': mlsd_large_512_fp32.pth: not an M-LSD"):
        detect(drawing(), "mlsd", annotator_folder=tmp_path)
