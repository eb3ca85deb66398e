"""softedge_hed, softedge_hedsafe, scribble_hed, lineart_realistic, lineart_coarse and lineart_anime without
controlnet_aux (`models/hed.py`, `models/lineart.py`, `pipeline/hed_edges.py`, `pipeline/lineart_maps.py`): the
networks against the extension's `annotator/hed`, `annotator/lineart` and `annotator/lineart_anime` written out
(pix2pix's in-place leaky ReLU included), with the same random weights; the maps against its `legacy/processor.py`
and `annotator/util.py` written out, from files in an annotator folder."""

import functools

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from latent_diffusion.models.hed import HED
from latent_diffusion.models.lineart import LineartGenerator, UnetGenerator
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_anime_annotators import drawing
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

from conftest import randomize, seeded

# ---- annotator/hed and annotator/util.py, written out -----------------------------------------------------------------


class RefDoubleConvBlock(nn.Module):
    def __init__(self, input_channel, output_channel, layer_number):
        super().__init__()
        self.convs = nn.Sequential()
        self.convs.append(nn.Conv2d(input_channel, output_channel, kernel_size=(3, 3), stride=(1, 1), padding=1))
        for _ in range(1, layer_number):
            self.convs.append(nn.Conv2d(output_channel, output_channel, kernel_size=(3, 3), stride=(1, 1), padding=1))
        self.projection = nn.Conv2d(output_channel, 1, kernel_size=(1, 1), stride=(1, 1), padding=0)

    def __call__(self, x, down_sampling=False):
        h = x
        if down_sampling:
            h = nn.functional.max_pool2d(h, kernel_size=(2, 2), stride=(2, 2))
        for conv in self.convs:
            h = nn.functional.relu(conv(h))
        return h, self.projection(h)


class RefControlNetHED(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(size=(1, 3, 1, 1)))
        self.block1 = RefDoubleConvBlock(input_channel=3, output_channel=64, layer_number=2)
        self.block2 = RefDoubleConvBlock(input_channel=64, output_channel=128, layer_number=2)
        self.block3 = RefDoubleConvBlock(input_channel=128, output_channel=256, layer_number=3)
        self.block4 = RefDoubleConvBlock(input_channel=256, output_channel=512, layer_number=3)
        self.block5 = RefDoubleConvBlock(input_channel=512, output_channel=512, layer_number=3)

    def __call__(self, x):
        h = x - self.norm
        h, projection1 = self.block1(h)
        h, projection2 = self.block2(h, down_sampling=True)
        h, projection3 = self.block3(h, down_sampling=True)
        h, projection4 = self.block4(h, down_sampling=True)
        h, projection5 = self.block5(h, down_sampling=True)
        return projection1, projection2, projection3, projection4, projection5


def ref_safe_step(x, step=2):
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def ref_nms(x, t, s):
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), s)
    f1 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    f2 = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8)
    f3 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)
    f4 = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    y = np.zeros_like(x)
    for f in [f1, f2, f3, f4]:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > t] = 255
    return z


def ref_apply_hed(net, input_image, is_safe=False):
    H, W, _ = input_image.shape
    with torch.no_grad():
        image_hed = torch.from_numpy(input_image.copy()).float().permute(2, 0, 1)[None]
        edges = [e.detach().cpu().numpy().astype(np.float32)[0, 0] for e in net(image_hed)]
        edges = np.stack([cv2.resize(e, (W, H), interpolation=cv2.INTER_LINEAR) for e in edges], axis=2)
        edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
        if is_safe:
            edge = ref_safe_step(edge)
        return (edge * 255.0).clip(0, 255).astype(np.uint8)


def ref_hed(net, img, res, safe=False):  # legacy/processor.py hed, hed_safe
    img, remove_pad = ref_resize_image_with_pad(img, res)
    return remove_pad(ref_apply_hed(net, img, is_safe=safe))


def ref_scribble_hed(net, img, res):
    result = ref_hed(net, img, res)
    result = ref_nms(result, 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result


# ---- annotator/lineart and annotator/lineart_anime, written out ---------------------------------------------------


class RefResidualBlock(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(in_features, in_features, 3),
                                        nn.InstanceNorm2d(in_features), nn.ReLU(inplace=True), nn.ReflectionPad2d(1),
                                        nn.Conv2d(in_features, in_features, 3), nn.InstanceNorm2d(in_features))  # fmt: skip

    def forward(self, x):
        return x + self.conv_block(x)


class RefGenerator(nn.Module):
    def __init__(self, input_nc=3, output_nc=1, n_residual_blocks=3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(input_nc, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True))  # fmt: skip
        model1, in_features, out_features = [], 64, 128
        for _ in range(2):
            model1 += [nn.Conv2d(in_features, out_features, 3, stride=2, padding=1), nn.InstanceNorm2d(out_features), nn.ReLU(inplace=True)]  # fmt: skip
            in_features, out_features = out_features, out_features * 2
        self.model1 = nn.Sequential(*model1)
        self.model2 = nn.Sequential(*[RefResidualBlock(in_features) for _ in range(n_residual_blocks)])
        model3, out_features = [], in_features // 2
        for _ in range(2):
            model3 += [nn.ConvTranspose2d(in_features, out_features, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(out_features), nn.ReLU(inplace=True)]  # fmt: skip
            in_features, out_features = out_features, out_features // 2
        self.model3 = nn.Sequential(*model3)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, output_nc, 7), nn.Sigmoid())

    def forward(self, x):
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class RefUnetSkipConnectionBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False, norm_layer=None):  # fmt: skip
        super().__init__()
        self.outermost = outermost
        use_bias = norm_layer.func == nn.InstanceNorm2d
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)  # (x has been through the in-place leaky ReLU by then)


class RefUnetGenerator(nn.Module):
    def __init__(self, input_nc=3, output_nc=1, num_downs=8, ngf=64):
        super().__init__()
        norm_layer = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
        block = RefUnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            block = RefUnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = RefUnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = RefUnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = RefUnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = RefUnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm_layer=norm_layer)  # fmt: skip

    def forward(self, input):
        return self.model(input)


def ref_lineart(net, img, res):  # legacy/processor.py lineart(_coarse), LineartDetector.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    with torch.no_grad():
        image = torch.from_numpy(img).float() / 255.0
        line = net(image.permute(2, 0, 1)[None])[0][0].cpu().numpy()
        line = (line * 255.0).clip(0, 255).astype(np.uint8)
    return remove_pad(255 - line)


def ref_lineart_anime(net, img, res):  # legacy/processor.py lineart_anime, LineartAnimeDetector.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    H, W, _ = img.shape
    Hn, Wn = 256 * int(np.ceil(float(H) / 256.0)), 256 * int(np.ceil(float(W) / 256.0))
    big = cv2.resize(img, (Wn, Hn), interpolation=cv2.INTER_CUBIC)
    with torch.no_grad():
        image_feed = torch.from_numpy(big).float() / 127.5 - 1.0
        line = net(image_feed.permute(2, 0, 1)[None])[0, 0] * 127.5 + 127.5
        line = cv2.resize(line.cpu().numpy(), (W, H), interpolation=cv2.INTER_CUBIC)
        line = line.clip(0, 255).astype(np.uint8)
    return remove_pad(255 - line)


# ---- the tests -------------------------------------------------------------------------------------------------------


def random_network(make, seed=0):
    with seeded(seed):
        return randomize(make(), seed=seed + 1).eval()


def calibrated(model, last: nn.Conv2d, x: torch.Tensor, mean: float, spread: float):
    """`model` with its last convolution scaled so that on x its pre-activation output has this mean and spread (a
    random network's is far off, which would make the maps flat)."""
    captured = {}
    hook = last.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        model(x)
        hook.remove()
        out = captured["out"]
        scale = spread / out.std()
        last.bias.copy_(mean - scale * (out.mean() - last.bias))
        last.weight.mul_(scale)
    return model


def test_the_networks_are_the_extensions():
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for make, reference, scale in [(HED, RefControlNetHED, 255), (LineartGenerator, RefGenerator, 1)]:
        ours = random_network(make)
        theirs = reference().eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            for a, b in zip(ours(x * scale), theirs(x * scale), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ours = random_network(UnetGenerator)
    theirs = RefUnetGenerator().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = theirs(x.clone())  # (its in-place leaky ReLU would change x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("module", ["softedge_hed", "softedge_hedsafe", "scribble_hed"])
def test_the_hed_maps_are_the_extensions(module, tmp_path):
    model = random_network(HED)
    padded = ref_resize_image_with_pad(drawing(), 128)[0]
    for block in (model.block1, model.block2, model.block3, model.block4, model.block5):  # (side outputs: each alone)
        calibrated(model, block.projection, torch.from_numpy(padded).float().permute(2, 0, 1)[None], 0.0, 2.0)
    (tmp_path / "hed").mkdir()  # in float16, as lllyasviel's file is
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "hed" / "ControlNetHED.pth")
    reference = RefControlNetHED().eval()
    reference.load_state_dict(state)  # (into its float32 parameters, as the extension's .float() leaves them)
    found = detect(drawing(), module, 128, annotator_folder=tmp_path)
    make = {"softedge_hed": ref_hed, "softedge_hedsafe": functools.partial(ref_hed, safe=True)}
    expected = ref_hwc3(make.get(module, ref_scribble_hed)(reference, drawing(), 128))
    assert found.shape == expected.shape == (128, 196, 3)
    np.testing.assert_array_equal(found, expected)
    levels = {"softedge_hedsafe": [0, 127, 255], "scribble_hed": [0, 255]}  # (safe_step's three; white strokes)
    assert np.unique(found).tolist() == levels[module] if module in levels else len(np.unique(found)) > 100


@pytest.mark.parametrize("module", ["lineart_realistic", "lineart_coarse", "lineart_anime"])
def test_the_lineart_maps_are_the_extensions(module, tmp_path):
    anime = module == "lineart_anime"
    model = random_network(UnetGenerator if anime else LineartGenerator)
    padded = ref_resize_image_with_pad(drawing(), 128)[0]
    if anime:  # (the U-Net sees the image enlarged to 256 × 256, in -1..1; its tanh's input is calibrated)
        x = torch.from_numpy(cv2.resize(padded, (256, 256), interpolation=cv2.INTER_CUBIC)).float() / 127.5 - 1
        calibrated(model, model.model.model[3], x.permute(2, 0, 1)[None], 0.0, 1.0)
    else:
        calibrated(model, model.model4[1], torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 255, 0.0, 2.0)
    name = {"lineart_realistic": "sk_model.pth", "lineart_coarse": "sk_model2.pth", "lineart_anime": "netG.pth"}[module]
    state = {f"module.{k}": v for k, v in model.state_dict().items()} if anime else model.state_dict()
    torch.save(state, tmp_path / name)
    reference = (RefUnetGenerator() if anime else RefGenerator()).eval()
    reference.load_state_dict(model.state_dict())
    found = detect(drawing(), module, 128, annotator_folder=tmp_path)
    expected = ref_hwc3((ref_lineart_anime if anime else ref_lineart)(reference, drawing(), 128))
    assert found.shape == expected.shape == (128, 196, 3)
    np.testing.assert_array_equal(found, expected)
    assert len(np.unique(found)) > 16
    assert module_list(annotator_folder=tmp_path)["module_detail"][module.replace("_realistic", "")]["available"]


def test_files_that_are_not_these_networks_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'softedge_hed' needs ControlNetHED.pth: no folder named"):
        detect(drawing(), "softedge_hed")
    torch.save(random_network(LineartGenerator).state_dict(), tmp_path / "ControlNetHED.pth")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'softedge_hed': ControlNetHED.pth: not a Control"):
        detect(drawing(), "softedge_hed", annotator_folder=tmp_path)
    torch.save(random_network(HED).state_dict(), tmp_path / "netG.pth")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'lineart_anime': netG.pth: not an anime line-art"):
        detect(drawing(), "lineart_anime", annotator_folder=tmp_path)
