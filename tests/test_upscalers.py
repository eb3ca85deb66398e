"""Upscalers (`pipeline/upscalers.py`): the web UI's resamplers against PIL, and model files against spandrel.

Each model is built from spandrel's own architecture classes at a tiny width with random weights, saved as a file
(`.pth` wrapped in `params_ema` as Real-ESRGAN's releases are, and flat `.safetensors`), loaded by us and run by us
in tiles; the reference is the module we built, called on the whole image (clamped to [0, 1] as spandrel's call
does). spandrel comes from the `spandrel` fixture (conftest.py): installed without its dependencies, beside a
stand-in for the three torchvision names it imports where torchvision does not import (see the fixture for why).
"""

import math
import os
import pickle

import pytest
import torch
from PIL import Image

from latent_diffusion.models.vae_tiling import tile_spans
from latent_diffusion.pipeline.images import from_pil, to_pil
from latent_diffusion.pipeline.upscalers import (
    RESAMPLERS,
    Upscaler,
    UpscalerError,
    find_upscalers,
    get_upscaler,
    list_upscalers,
    load_upscaler,
    resample,
    run_model,
    upscale,
)

from conftest import randomize

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


def eight_bit(shape, seed=0) -> torch.Tensor:
    """Random images whose values are whole 8-bit levels, so that the resamplers' 8-bit round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def web_ui_resampler(im: Image.Image, filter, scale: float) -> Image.Image:
    """The web UI's UpscalerLanczos / UpscalerNearest through `Upscaler.upscale` (modules/upscaler.py), for a scale
    > 1, written from its code: one resize by the scale, then Lanczos to the size rounded down to multiples of 8."""
    dest = (int(im.width * scale // 8 * 8), int(im.height * scale // 8 * 8))
    im = im.resize((int(im.width * scale), int(im.height * scale)), resample=filter)
    return im if im.size == dest else im.resize(dest, resample=LANCZOS)


@pytest.mark.parametrize("name, scale", [("Lanczos", 2), ("Lanczos", 2.5), ("Nearest", 3), ("Nearest", 1.7)])
def test_resamplers_are_the_web_ui_s(name, scale):
    image = eight_bit((2, 3, 37, 45))
    out = upscale(image, name, scale=scale)
    filter = RESAMPLERS[name].resample
    expected = torch.cat([from_pil(web_ui_resampler(to_pil(one), filter, scale)) for one in image])
    assert out.shape == expected.shape == (2, 3, int(37 * scale // 8 * 8), int(45 * scale // 8 * 8))
    assert torch.equal(out, expected)


def test_resize_to_a_size_is_resize_image():
    """images.resize_image(0, im, w, h, upscaler): "None" is Lanczos straight to the size; another upscaler enlarges by
    max(w/W, h/H) through Upscaler.upscale, then Lanczos to exactly (w, h)."""
    image = eight_bit((1, 3, 40, 30))
    im = to_pil(image[0])
    assert torch.equal(upscale(image, "None", size=(77, 90)), from_pil(im.resize((77, 90), resample=LANCZOS)))
    expected = web_ui_resampler(im, LANCZOS, max(77 / 30, 90 / 40)).resize((77, 90), resample=LANCZOS)
    assert torch.equal(upscale(image, "Lanczos", size=(77, 90)), from_pil(expected))
    shrunk = upscale(image, "Nearest", size=(20, 16))  # no upscale pass when it shrinks: Lanczos alone
    assert torch.equal(shrunk, from_pil(im.resize((20, 16), resample=LANCZOS)))


def test_none_at_a_scale_is_lanczos_to_the_target():
    image = eight_bit((1, 3, 20, 24))
    expected = to_pil(image[0]).resize((48, 40), resample=LANCZOS)
    assert torch.equal(upscale(image, "None", scale=2), from_pil(expected))


# --- model files -------------------------------------------------------------------------------------------------


def rescale_output(net: torch.nn.Module, last: torch.nn.Conv2d, x: torch.Tensor) -> None:
    """Scale and shift the last convolution so that the output on x has mean 0.5 and standard deviation 0.1: random
    weights give outputs far outside [0, 1], which spandrel's call clamps, and then most pixels would compare 0 with
    0 or 1 with 1. The output is affine in that layer's weights (a pixel shuffle and a residual may follow)."""
    with torch.no_grad():
        out = net(x)
        weight, bias = last.weight.clone(), last.bias.clone()
        last.weight.zero_(), last.bias.zero_()
        rest = net(x)
        k = 0.1 / (out - rest).std()
        last.weight.copy_(weight * k), last.bias.copy_(bias * k)
        last.bias.add_(0.5 - net(x).mean())


def build(arch: str, spandrel) -> tuple[torch.nn.Module, int]:
    """(a tiny model of spandrel's architecture with random weights in eval mode, its receptive-field radius in input
    pixels). The radius counts the 3×3 convolutions on the longest path (a convolution after a 2× upsampling reaches
    half an input pixel), rounded up; an output pixel farther than that from a tile's cut edge cannot see it."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    if arch == "ESRGAN":  # conv_first, 1 RRDB (3 dense blocks of 5 convs), trunk conv; 2 upconvs, HR conv, last conv
        net = spandrel.architectures.ESRGAN.ESRGAN(num_filters=8, num_blocks=1, scale=4)
        radius, last = 20, net.model[-1]
    elif arch == "Compact":  # first conv, 4 body convs, last conv, pixel shuffle; plus the input upsampled
        net = spandrel.architectures.Compact.Compact(num_feat=8, num_conv=4, upscale=2)
        radius, last = 6, net.body[-1]
    else:  # SPAN: conv_1, 6 blocks of 3 convs, conv_2, the upsampler's conv (each Conv3XC is one 3×3 in eval)
        net = spandrel.architectures.SPAN.SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)
        radius, last = 21, net.upsampler[0]
    randomize(net).eval()
    rescale_output(net, last, x)
    return net, radius


def whole(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: the module itself on the whole image, clamped as spandrel's call clamps."""
    with torch.no_grad():
        return net(x).clamp(0, 1)


def save(net: torch.nn.Module, path) -> None:
    state_dict = {k: v.contiguous() for k, v in net.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save({"params_ema": state_dict}, path)  # as Real-ESRGAN's releases wrap it


def near_cuts(size: int, tile: int, overlap: int, radius: int, scale: int) -> torch.Tensor:
    """(size·scale,) True for the output pixels within `radius` input pixels of a tile's edge inside the image."""
    cuts = [y for y, n in tile_spans(size, tile, overlap) for y in (y, y + n) if 0 < y < size]
    near = torch.zeros(size * scale, dtype=torch.bool)
    for cut in cuts:
        near[max(0, (cut - radius) * scale) : (cut + radius) * scale] = True
    return near


# name -> (spandrel's name for it, scale, image height and width, tile): two tiles a side overlapping by 8 to 12
# pixels, with room beyond the receptive field of each cut for pixels away from the seams
ARCHITECTURES = {"ESRGAN": ("ESRGAN", 4, 64, 72, 40), "Compact": ("RealESRGAN Compact", 2, 48, 56, 32),
                 "SPAN": ("SPAN", 2, 80, 88, 48)}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_model_tiled_is_spandrel_s_model_whole(arch, spandrel, tmp_path):
    """Away from the seams (farther than the receptive field from every tile's cut edge) every tile sees what the
    whole image shows it, so the tiled result equals the whole one to float rounding (1e-5). At the seams a pixel is
    a weighted mean (weights ≥ 0 summing to 1) of the tiles that cover it, each of which is exactly the model run on
    that tile: the bound there is that it lies between the smallest and the largest of those tiles' outputs."""
    net, radius = build(arch, spandrel)
    name, scale, h, w, tile = ARCHITECTURES[arch]
    overlap = 8
    for suffix in (".pth", ".safetensors"):
        save(net, tmp_path / f"tiny{suffix}")
        model = load_upscaler(tmp_path / f"tiny{suffix}")
        assert (model.name, model.architecture, model.scale, model.dtype) == ("tiny", name, scale, torch.float32)
        loaded = model.descriptor.model.state_dict()
        assert (
            all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
            and loaded.keys() == net.state_dict().keys()
        )

    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    reference = whole(net, x)
    assert torch.allclose(run_model(model, x, tile=0), reference, atol=1e-5, rtol=0)
    tiled = run_model(model, x, tile=tile, overlap=overlap)
    assert tiled.shape == reference.shape == (1, 3, h * scale, w * scale)

    rows, columns = near_cuts(h, tile, overlap, radius, scale), near_cuts(w, tile, overlap, radius, scale)
    seams = rows[:, None] | columns[None, :]
    assert 0.5 < seams.float().mean() < 0.95  # both regions are there to be compared
    assert (tiled - reference)[..., ~seams].abs().max() < 1e-5

    low, high = torch.full_like(tiled, math.inf), torch.full_like(tiled, -math.inf)
    for y, th in tile_spans(h, tile, overlap):
        for x0, tw in tile_spans(w, tile, overlap):
            part = whole(net, x[..., y : y + th, x0 : x0 + tw])
            region = (..., slice(y * scale, (y + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
            low[region], high[region] = torch.minimum(low[region], part), torch.maximum(high[region], part)
    assert ((tiled >= low - 1e-6) & (tiled <= high + 1e-6)).all()
    assert (tiled - reference)[..., seams].abs().max() > 1e-4  # the seams do differ: the test sees the tiles


def test_passes_until_the_scale_then_lanczos(spandrel, tmp_path):
    """The web UI's loop: a 2× model at scale 3 runs twice (2×, then 4× ≥ 3×) and Lanczos takes it to 3× rounded
    down to 8s; at scale 2 it runs once and nothing is resized; a size goes on to exactly that size."""
    net, _ = build("Compact", spandrel)
    save(net, tmp_path / "compact.pth")
    model = load_upscaler(tmp_path / "compact.pth")
    x = eight_bit((1, 3, 20, 28), seed=2)
    once = run_model(model, x, tile=0)
    assert torch.equal(upscale(x, model, scale=2, tile=0), once)
    twice = run_model(model, once, tile=0)
    assert torch.equal(upscale(x, model, scale=3, tile=0), resample(twice, (80, 56), LANCZOS))
    factor = max(90 / 28, 61 / 20)  # resize_image: Upscaler.upscale by this, to 88×64, then Lanczos to 90×61
    at_factor = resample(twice, (int(28 * factor // 8 * 8), int(20 * factor // 8 * 8)), LANCZOS)
    assert torch.equal(upscale(x, model, size=(90, 61), tile=0), resample(at_factor, (90, 61), LANCZOS))
    by_row = upscale(x, Upscaler("compact", path=tmp_path / "compact.pth"), scale=2, tile=0)  # loaded for the call
    assert torch.equal(by_row, once)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside spandrel's SwinIR
def test_dtypes_where_the_architecture_allows(spandrel, tmp_path):
    net, _ = build("Compact", spandrel)
    save(net, tmp_path / "compact.safetensors")
    model = load_upscaler(tmp_path / "compact.safetensors", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.descriptor.supports_bfloat16
    x = torch.rand(1, 3, 24, 24)
    out = run_model(model, x, tile=16, overlap=4)
    assert out.dtype == torch.float32 and (out - whole(net, x)).abs().max() < 0.05  # bfloat16's 8-bit mantissa

    swinir = spandrel.architectures.SwinIR.SwinIR(
        img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
        upsampler="pixelshuffle",
    )  # fmt: skip
    save(swinir.eval(), tmp_path / "swinir.pth")
    model = load_upscaler(tmp_path / "swinir.pth", dtype=torch.float16)
    assert not model.descriptor.supports_half and model.dtype == torch.float32  # spandrel: SwinIR has no fp16
    assert run_model(model, x, tile=0).shape == (1, 3, 48, 48)


# --- listing and refusals ----------------------------------------------------------------------------------------


def test_find_and_list(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("4x-UltraSharp.pth", "sub/RealESRGAN_x4plus.safetensors", "a.ckpt", "b.pt", "notes.txt", "c.bin"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "Lanczos.pth").write_bytes(b"")  # a file may not take a resampler's name
    found = find_upscalers(tmp_path)
    assert sorted(found) == ["4x-UltraSharp", "Lanczos", "RealESRGAN_x4plus", "a", "b"]
    assert found["RealESRGAN_x4plus"] == tmp_path / "sub" / "RealESRGAN_x4plus.safetensors"
    listed = list_upscalers(tmp_path, tmp_path / "missing")
    assert list(listed)[:3] == ["None", "Lanczos", "Nearest"] and listed["Lanczos"] == RESAMPLERS["Lanczos"]
    assert listed["a"] == Upscaler("a", path=tmp_path / "a.ckpt")


def test_unknown_upscaler_lists_what_exists(tmp_path):
    (tmp_path / "4x-UltraSharp.pth").write_bytes(b"")
    with pytest.raises(UpscalerError, match=r"no upscaler named 'R-ESRGAN 4x\+'; the upscalers are 'None', "):
        upscale(torch.rand(1, 3, 8, 8), "R-ESRGAN 4x+", scale=2, upscalers=list_upscalers(tmp_path))
    with pytest.raises(UpscalerError, match="'4x-UltraSharp'"):
        get_upscaler("4x", list_upscalers(tmp_path))


def one_line(e: pytest.ExceptionInfo, path) -> str:
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_files_that_are_not_models_are_refused(spandrel, tmp_path):
    from safetensors.torch import save_file

    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "text.pth").write_text("not a model")
    (tmp_path / "folder.pth").mkdir()
    torch.save({"params": {"weight": torch.zeros(3)}}, tmp_path / "wrong.pth")
    for name, reason in [
        ("vae.safetensors", "not an upscaler model that spandrel knows"),
        ("text.pth", ""),  # the safe loader's words: a pickle it cannot read
        ("folder.pth", "is a directory"),
        ("wrong.pth", "not an upscaler model that spandrel knows"),
        ("missing.pth", "no such file"),
    ]:
        with pytest.raises(UpscalerError) as e:
            load_upscaler(tmp_path / name)
        assert reason in one_line(e, tmp_path / name)
    with pytest.raises(UpscalerError, match="'Lanczos' is a resampler, not a model file"):
        load_upscaler(RESAMPLERS["Lanczos"])


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_that_would_run_code_is_refused(spandrel, tmp_path):
    """Both as torch.save writes it (a zip) and as a bare pickle (the legacy format); nothing of either runs."""
    marker = tmp_path / "ran"
    contents = {"params_ema": {"conv_first.weight": torch.zeros(1)}, "x": RunsCode(marker)}
    torch.save(contents, tmp_path / "evil.pth")
    (tmp_path / "bare.pth").write_bytes(pickle.dumps(contents))
    for name, reason in [("evil.pth", "refused: its pickle would import or call posix.mkdir"), ("bare.pth", "refused")]:
        with pytest.raises(UpscalerError) as e:
            upscale(torch.rand(1, 3, 8, 8), Upscaler("evil", path=tmp_path / name), scale=2)
        assert reason in one_line(e, tmp_path / name)
    assert not marker.exists()


def test_without_spandrel_one_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "spandrel", None)  # import spandrel -> ImportError
    with pytest.raises(UpscalerError, match=r"^upscaler models need spandrel: pip install latent_diffusion\[upscale\]"):
        load_upscaler(tmp_path / "model.pth")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give a scale or a size"),
        ({"scale": 2, "size": (8, 8)}, "give a scale or a size"),
        ({"scale": 0}, "positive number"),
        ({"scale": float("nan")}, "positive number"),
        ({"size": (0, 8)}, "whole pixels"),
        ({"scale": 0.1}, "rounds down"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(UpscalerError, match=message):
        upscale(torch.rand(1, 3, 20, 20), "Lanczos", **kwargs)
