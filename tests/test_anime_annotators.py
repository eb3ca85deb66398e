"""lineart_anime_denoise and seg_anime_face (`models/manga_line.py`, `pipeline/manga_lines.py`,
`models/anime_face_unet.py`, `pipeline/anime_face_segmentation.py`): MangaLineExtraction's network against the
extension's `annotator/manga_line` written out; the anime face U-Net's encoder against transformers' MobileNetV2 (the
same random weights, its keys mapped here) with the extension's decoder written out; the maps against the
extension's `legacy/processor.py` and annotators written out, from files in an annotator folder."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import MobileNetV2Config, MobileNetV2Model

from latent_diffusion.models.anime_face_unet import AnimeFaceUNet
from latent_diffusion.models.manga_line import MangaLineNetwork
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

from conftest import randomize, seeded


def random_weights(model: nn.Module, seed: int) -> nn.Module:
    """`randomize`, and batch norms' running statistics drawn too, so that eval mode's use of them is tested."""
    g = torch.Generator().manual_seed(seed)
    randomize(model, seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def drawing(height=150, width=230):
    """A face-like drawing: dark outlines and flat colours on a light ground."""
    image = np.full((height, width, 3), 235, np.uint8)
    cv2.ellipse(image, (110, 80), (60, 70), 0, 0, 360, (250, 220, 200), -1)
    cv2.ellipse(image, (110, 80), (60, 70), 0, 0, 360, (20, 20, 20), 2)
    cv2.rectangle(image, (40, 5), (180, 40), (60, 40, 140), -1)
    for x in (85, 135):
        cv2.circle(image, (x, 80), 9, (30, 90, 200), -1)
    cv2.line(image, (95, 115), (125, 115), (150, 40, 40), 3)
    return image


# ---- annotator/manga_line, written out ------------------------------------------------------------------------------


class RefBnReluConv(nn.Module):
    def __init__(self, in_filters, nb_filters, fw, fh, subsample=1, up=False):
        super().__init__()
        layers = [nn.BatchNorm2d(in_filters, eps=1e-3), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(in_filters, nb_filters, (fw, fh), stride=subsample, padding=(fw // 2, fh // 2)))
        if up:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefShortcut(nn.Module):  # _shortcut, and _u_shortcut where `up`
    def __init__(self, in_filters, nb_filters, subsample=1, up=False):
        super().__init__()
        self.process = in_filters != nb_filters if up else (in_filters != nb_filters or subsample != 1)
        self.model = None
        if self.process:
            layers = [nn.Conv2d(in_filters, nb_filters, (1, 1), stride=subsample)]
            self.model = nn.Sequential(*layers, *([nn.Upsample(scale_factor=2, mode="nearest")] if up else []))

    def forward(self, x, y):
        return self.model(x) + y if self.process else x + y


class RefBasicBlock(nn.Module):  # basic_block, and _u_basic_block where `up`
    def __init__(self, in_filters, nb_filters, init_subsample=1, up=False):
        super().__init__()
        self.conv1 = RefBnReluConv(in_filters, nb_filters, 3, 3, subsample=init_subsample, up=up)
        self.residual = RefBnReluConv(nb_filters, nb_filters, 3, 3)
        self.shortcut = RefShortcut(in_filters, nb_filters, subsample=init_subsample, up=up)

    def forward(self, x):
        return self.shortcut(x, self.residual(self.conv1(x)))


class RefResidualBlock(nn.Module):
    def __init__(self, in_filters, nb_filters, repetitions, is_first_layer=False):
        super().__init__()
        layers = []
        for i in range(repetitions):
            init_subsample = 2 if i == repetitions - 1 and not is_first_layer else 1
            layers.append(RefBasicBlock(in_filters if i == 0 else nb_filters, nb_filters, init_subsample))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefUpsamplingResidualBlock(nn.Module):
    def __init__(self, in_filters, nb_filters, repetitions):
        super().__init__()
        layers = [RefBasicBlock(in_filters, nb_filters, up=True)]
        layers += [RefBasicBlock(nb_filters, nb_filters) for _ in range(repetitions - 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefResSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.block0 = RefResidualBlock(1, 24, 2, is_first_layer=True)
        self.block1 = RefResidualBlock(24, 48, 3)
        self.block2 = RefResidualBlock(48, 96, 5)
        self.block3 = RefResidualBlock(96, 192, 7)
        self.block4 = RefResidualBlock(192, 384, 12)
        self.block5 = RefUpsamplingResidualBlock(384, 192, 7)
        self.res1 = RefShortcut(192, 192)
        self.block6 = RefUpsamplingResidualBlock(192, 96, 5)
        self.res2 = RefShortcut(96, 96)
        self.block7 = RefUpsamplingResidualBlock(96, 48, 3)
        self.res3 = RefShortcut(48, 48)
        self.block8 = RefUpsamplingResidualBlock(48, 24, 2)
        self.res4 = RefShortcut(24, 24)
        self.block9 = RefResidualBlock(24, 16, 2, is_first_layer=True)
        self.conv15 = RefBnReluConv(16, 1, 1, 1)

    def forward(self, x):
        x0 = self.block0(x)
        x1 = self.block1(x0)
        x2 = self.block2(x1)
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        res1 = self.res1(x3, self.block5(x4))
        res2 = self.res2(x2, self.block6(res1))
        res3 = self.res3(x1, self.block7(res2))
        res4 = self.res4(x0, self.block8(res3))
        return self.conv15(self.block9(res4))


def ref_lineart_anime_denoise(model, img, res):  # legacy/processor.py, MangaLineExtration.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    grey = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).copy()).copy()
    with torch.no_grad():
        line = model(torch.from_numpy(grey).float()[None, None])
        line = 255 - line.cpu().numpy()[0, 0]
    return ref_hwc3(remove_pad(line.clip(0, 255).astype(np.uint8)))


# ---- annotator/anime_face_segment: the decoder written out, the encoder transformers' MobileNetV2 --------------------

PALETTE = [(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255), (255, 0, 255)]


def ref_decoder_block(in_ch, out_ch):
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
    return nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), conv, nn.InstanceNorm2d(out_ch), nn.LeakyReLU(0.1), nn.Dropout(p=0.2))  # fmt: skip


class RefAnimeFaceUNet(nn.Module):
    def __init__(self):
        super().__init__()
        config = MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, hidden_act="relu6", image_size=512)
        self.mobilenet = MobileNetV2Model(
            config, add_pooling_layer=False
        )  # torchvision's mobilenet_v2, as laid out there
        self.de_block4 = ref_decoder_block(160, 96)
        self.de_block3 = ref_decoder_block(96 * 2, 32)
        self.de_block2 = ref_decoder_block(32 * 2, 24)
        self.de_block1 = ref_decoder_block(24 * 2, 16)
        conv = nn.Conv2d(16 * 2, 7, kernel_size=3, padding=1)
        self.de_block0 = nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), conv, nn.Softmax2d())

    def forward(self, x):
        hidden = self.mobilenet(x, output_hidden_states=True).hidden_states  # after each of features[2..17]
        e0 = self.mobilenet.conv_stem(x)  # features[0:2]
        e1, e2, e3, e4 = hidden[1], hidden[4], hidden[11], hidden[14]  # features[3], [6], [13], [16]
        d4 = nn.functional.interpolate(self.de_block4(e4), size=e3.size()[2:], mode="bilinear", align_corners=True)
        d3 = self.de_block3(torch.cat((d4, e3), 1))
        d3 = nn.functional.interpolate(d3, size=e2.size()[2:], mode="bilinear", align_corners=True)
        d2 = self.de_block2(torch.cat((d3, e2), 1))
        d2 = nn.functional.interpolate(d2, size=e1.size()[2:], mode="bilinear", align_corners=True)
        d1 = self.de_block1(torch.cat((d2, e1), 1))
        d1 = nn.functional.interpolate(d1, size=e0.size()[2:], mode="bilinear", align_corners=True)
        return self.de_block0(torch.cat((d1, e0), 1))


def transformers_keys(key: str) -> str:
    """Our (the file's, torchvision's) key -> the reference's."""
    stage, rest = key.split(".", 1)
    if stage.startswith("de_block"):
        return key
    offsets = {"en_block0": 0, "en_block1": 2, "en_block2": 4, "en_block3": 7, "en_block4": 14}
    index, rest = rest.split(".", 1)
    feature = offsets[stage] + int(index)  # torchvision's features[feature]
    norm = {"0": "convolution", "1": "normalization"}
    if feature == 0:
        n, leaf = rest.split(".", 1)
        return f"mobilenet.conv_stem.first_conv.{norm[n]}.{leaf}"
    parts = rest.split(".")  # conv.<i>[.<j>].<leaf>
    names = ["conv_3x3", "reduce_1x1"] if feature == 1 else ["expand_1x1", "conv_3x3", "reduce_1x1"]
    prefix = "mobilenet.conv_stem" if feature == 1 else f"mobilenet.layer.{feature - 2}"
    i = int(parts[1])
    if i < len(names) - 1:  # a conv-norm-ReLU6 triple: conv.<i>.<0|1>.<leaf>
        return f"{prefix}.{names[i]}.{norm[parts[2]]}.{parts[3]}"
    projection = i - (len(names) - 1)  # conv.<k> the projection's convolution, conv.<k+1> its norm
    return f"{prefix}.reduce_1x1.{norm[str(projection)]}.{parts[2]}"


def ref_anime_face_segment(model, img, res, cut=True):  # legacy/processor.py, AnimeFaceSegment.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    h, w = img.shape[:2]  # torchvision's Resize(512) on a PIL image: the shorter side 512, the longer truncated
    size = (512, int(512 * h / w)) if w <= h else (int(512 * w / h), 512)
    resized = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)  # ToTensor
    with torch.no_grad():
        seg = model(x.unsqueeze(0)).squeeze(0).numpy()
    labels = seg.transpose(1, 2, 0)  # rearrange "h w c -> w c h" of (7, H, W): (H, W, 7)
    painted = np.array(PALETTE)[labels.argmax(axis=2)].astype(np.uint8)  # PALETTE[np.argmax(val)] for each pixel
    return (ref_hwc3(remove_pad(painted)) if cut else painted), remove_pad, (h, w)


# ---- the tests -------------------------------------------------------------------------------------------------------


def random_manga_line(seed=0):
    with seeded(seed):
        return random_weights(MangaLineNetwork(), seed + 1)


def calibrated_manga_line(image: np.ndarray, seed=0):
    """A random network whose last convolution is scaled so that on `image` its output has mean 128 and spread 60 (the
    random body's output is far outside 0..255, which would make the map black and white)."""
    model = random_manga_line(seed)
    grey = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)).float()[None, None]
    last = model.conv15.model[2]
    with torch.no_grad():
        out = model(grey)
        scale = 60 / out.std()
        last.bias.copy_(128 - scale * (out.mean() - last.bias))
        last.weight.mul_(scale)
    return model


def random_anime_face(seed=0):
    with seeded(seed):
        return random_weights(AnimeFaceUNet(), seed + 1)


def test_the_manga_line_network_is_the_extensions():
    ours = random_manga_line()
    theirs = RefResSkip().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (1, 1, 64, 96)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_the_anime_face_network_is_mobilenet_v2_and_the_extensions_decoder():
    ours = random_anime_face()
    theirs = RefAnimeFaceUNet().eval()
    state = {transformers_keys(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith(("mobilenet.layer.15.", "mobilenet.conv_1x1.")) for k in missing)  # features[17:], unused
    x = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (2, 7, 96, 160)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_lineart_anime_denoise_map_is_the_extensions(tmp_path):
    model = calibrated_manga_line(ref_resize_image_with_pad(drawing(), 128)[0])
    (tmp_path / "manga_line").mkdir()  # the extension's annotator/downloads/manga_line/, a DataParallel file
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "manga_line" / "erika.pth")
    reference = RefResSkip().eval()
    reference.load_state_dict(model.state_dict())
    found = detect(drawing(), "lineart_anime_denoise", 128, annotator_folder=tmp_path)
    expected = ref_lineart_anime_denoise(reference, drawing(), 128)
    assert found.shape == expected.shape == (128, 196, 3)
    np.testing.assert_array_equal(found, expected)
    assert len(np.unique(found)) > 16
    assert module_list(annotator_folder=tmp_path)["module_detail"]["lineart_anime_denoise"]["available"]


def test_the_seg_anime_face_map_is_the_extensions(tmp_path):
    model = random_anime_face()
    torch.save(model.state_dict(), tmp_path / "UNet.pth")
    found = detect(drawing(300, 460), "seg_anime_face", 512, annotator_folder=tmp_path)
    expected = ref_anime_face_segment(model, drawing(300, 460), 512)[0]
    assert found.shape == expected.shape == (512, 785, 3)
    np.testing.assert_array_equal(found, expected)
    assert len(np.unique(found.reshape(-1, 3), axis=0)) >= 3  # several classes: the argmax is not trivial
    assert {tuple(c) for c in np.unique(found.reshape(-1, 3), axis=0)} <= set(PALETTE)


def test_seg_anime_face_covers_the_image_at_other_resolutions(tmp_path):
    """The deliberate difference: the 512-pixel map is scaled (nearest) to the padded image before the padding is cut
    off, where the extension cuts the unscaled map (its top-left corner at 256)."""
    model = random_anime_face()
    torch.save(model.state_dict(), tmp_path / "UNet.pth")
    found = detect(drawing(), "seg_anime_face", 256, annotator_folder=tmp_path)
    painted, remove_pad, (h, w) = ref_anime_face_segment(model, drawing(), 256, cut=False)
    assert painted.shape[:2] == (512, 896) and (h, w) == (256, 448)  # the map at 512, the padded image at 256
    assert found.shape == (256, 393, 3)
    np.testing.assert_array_equal(found, remove_pad(cv2.resize(painted, (w, h), interpolation=cv2.INTER_NEAREST)))
    assert not np.array_equal(found, remove_pad(painted))  # the extension's crop of the corner


def test_files_that_are_not_these_networks_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'lineart_anime_denoise' needs erika.pth: no folder named"):
        detect(drawing(), "lineart_anime_denoise")
    assert not module_list(annotator_folder=tmp_path)["module_detail"]["anime_face_segment"]["available"]
    torch.save({"block0.model.0.conv1.model.2.weight": torch.zeros(24, 1, 3, 3)}, tmp_path / "erika.pth")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'lineart_anime_denoise': erika.pth: not a Manga"):
        detect(drawing(), "lineart_anime_denoise", annotator_folder=tmp_path)
    torch.save(random_manga_line().state_dict(), tmp_path / "UNet.pth")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'seg_anime_face': UNet.pth: not an anime face"):
        detect(drawing(), "seg_anime_face", annotator_folder=tmp_path)
    torch.save(random_anime_face().state_dict(), tmp_path / "UNet.pth")
    with pytest.raises(PreprocessorError, match=r"too elongated for the anime face segmenter \(sides beyond 8:1\)"):
        detect(np.zeros((20, 400, 3), np.uint8), "seg_anime_face", 64, annotator_folder=tmp_path)
