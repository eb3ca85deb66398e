"""LaMa and inpaint_only+lama: our generator against spandrel's (advimman's code, as spandrel carries it) with the same
random weights, big-lama's keys and shapes (the layout of lllyasviel's ControlNetLama.pth) on the meta device, the
fill against the extension's `lama_inpaint.py` and `LamaInpainting.__call__` written out here, and the module in a
generation from an annotator folder."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from latent_diffusion.models.lama import LaMa, lama_from_state_dict
from latent_diffusion.pipeline import lama_fill
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.preprocessors import detect, module_list
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError
from test_preprocessors import ref_resize_image_with_pad

from conftest import randomize, seeded


def spandrel_generator(spandrel, **sizes):
    from spandrel.architectures.LaMa.__arch.LaMa import FFCResNetGenerator

    with seeded(0):
        generator = randomize(FFCResNetGenerator(4, 3, **sizes), seed=1)
    with torch.no_grad():  # (batch norms with statistics of their own, not the identity)
        for m in generator.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return generator.eval()


@pytest.fixture(scope="module")
def small(spandrel):
    """A small generator of big-lama's kind (16 channels, two residual blocks), random, in spandrel's code."""
    return spandrel_generator(spandrel, ngf=16, n_blocks=2)


def test_lama_matches_spandrels_generator(small):
    ours = lama_from_state_dict(small.state_dict())
    assert (ours.model[1].ffc.convl2l.in_channels, len(ours.model)) == (4, len(small.model))
    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(2, 3, 64, 96, generator=g), (torch.rand(2, 1, 64, 96, generator=g) > 0.6).float()
    with torch.no_grad():
        theirs = small(image * (1 - mask), mask)
        torch.testing.assert_close(ours(image, mask), theirs, atol=1e-5, rtol=1e-5)
    assert theirs.std() > 0.05


def test_big_lama_has_the_layout_of_the_file(spandrel):
    """ControlNetLama.pth is big-lama's generator state dict: keys model.N...; ours has the same names and shapes."""
    from spandrel.architectures.LaMa.__arch.LaMa import FFCResNetGenerator

    with torch.device("meta"):
        theirs, ours = FFCResNetGenerator(4, 3).state_dict(), LaMa().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with torch.device("meta"):
        sizes = lama_from_state_dict(theirs)
    assert sum(p.numel() for p in sizes.parameters()) == sum(p.numel() for p in LaMa(ratio=0.75).parameters())


def test_a_file_that_is_not_lama_is_refused(small):
    with pytest.raises(ValueError, match="not a LaMa generator"):
        lama_from_state_dict({"model.1.weight": torch.zeros(3, 3)})
    sd = dict(small.state_dict())
    sd["model.5.conv1.ffc.convg2g.fu.conv_layer.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(ValueError, match="of this layout"):
        lama_from_state_dict(sd)


# --- the extension's fill (1.1.455), written out: lama_inpaint.py's __call__ and annotator/lama's __call__ -------------


def ref_lama_inpaint(img, model):
    H, W, _ = img.shape
    raw_color, raw_mask = img[:, :, 0:3].copy(), img[:, :, 3:4].copy()
    img_res, remove_pad = ref_resize_image_with_pad(img, 256)
    color = np.ascontiguousarray(img_res[:, :, 0:3]).astype(np.float32) / 255.0
    mask = np.ascontiguousarray(img_res[:, :, 3:4]).astype(np.float32) / 255.0
    with torch.no_grad():
        color, mask = torch.from_numpy(color).float(), torch.from_numpy(mask).float()
        mask = (mask > 0.5).float()
        color = color * (1 - mask)
        image_feed = torch.cat([color, mask], dim=2).permute(2, 0, 1)[None]
        result = model.model(image_feed)[0].permute(1, 2, 0)  # (the generator on the 4-channel feed)
        result = result * mask + color * (1 - mask)
        result *= 255.0
        prd_color = result.detach().cpu().numpy().clip(0, 255).astype(np.uint8)
    prd_color = remove_pad(prd_color)
    prd_color = cv2.resize(prd_color, (W, H))
    alpha = raw_mask.astype(np.float32) / 255.0
    fin_color = prd_color.astype(np.float32) * alpha + raw_color.astype(np.float32) * (1 - alpha)
    fin_color = fin_color.clip(0, 255).astype(np.uint8)
    return np.concatenate([fin_color, raw_mask], axis=2)


def rgba(h, w, seed=0):
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    mask = np.zeros((h, w, 1), np.uint8)
    mask[h // 4 : h // 2, w // 3 : w // 2 + 7] = 255
    mask[h // 2 : h // 2 + 3, : w // 5] = 128  # (a soft edge: laid over through the alpha, LaMa sees it unmasked)
    return np.concatenate([image, mask], axis=2)


@pytest.mark.parametrize("size", [(200, 300), (320, 256), (90, 61)])
def test_the_fill_matches_the_extensions(small, size):
    image = rgba(*size)
    ours = lama_fill.lama_fill(image, lama_from_state_dict(small.state_dict()))
    expected = ref_lama_inpaint(image, small)
    assert ours.shape == (*size, 4)
    # LaMa's output through 8 bits: a float difference of 1e-6 may round the other way
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(ours[:, :, 3], image[:, :, 3])
    outside = image[:, :, 3] == 0
    np.testing.assert_array_equal(ours[outside, :3], image[outside, :3])
    assert np.abs(ours[image[:, :, 3] == 255, :3].astype(int) - image[image[:, :, 3] == 255, :3]).mean() > 5


def test_outpainting_fits_the_input_before_lama_fills_it(small, lama_folder):
    """inpaint_only+lama in Resize and Fill: the extension first fits the RGBA input to the last pass's size (its
    `detectmap_proc`: the band around it masked, in float32), so LaMa fills the band; the hires size where there is
    one."""
    from latent_diffusion.pipeline.control_images import control_map
    from test_preprocessors import ref_detectmap_proc

    image = rgba(48, 64)
    for size, final in (((64, 64), None), ((32, 32), (64, 64))):
        options = dict(resize_mode="Resize and Fill", annotator_folder=lama_folder, final_size=final)
        detected = control_map(image[:, :, :3], "inpaint_only+lama", size=size, mask=image[:, :, 3], **options)[2]
        fitted = ref_detectmap_proc(image, "inpaint", "Resize and Fill", 64, 64)  # (hr_y, hr_x: the final size)
        expected = ref_lama_inpaint(fitted, small)
        assert detected.shape == (64, 64, 4) and detected.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(detected[:, :, 3], expected[:, :, 3])
        assert np.abs(detected[:, :, :3] - expected[:, :, :3]).max() <= 1
        assert (detected[:8, :, 3] == 255).all()  # (the band above the picture: masked, LaMa's)


@pytest.fixture
def lama_folder(small, tmp_path):
    """An annotator folder laid out as the extension's downloads: lama/ControlNetLama.pth (a pickle, as published)."""
    (tmp_path / "lama").mkdir()
    torch.save(small.state_dict(), tmp_path / "lama" / "ControlNetLama.pth")
    lama_fill._load.cache_clear()
    yield tmp_path
    lama_fill._load.cache_clear()


def test_lama_runs_from_the_annotator_folder(small, lama_folder, tiny_models, tmp_path_factory):
    image = rgba(64, 48)
    detected = detect(image[:, :, :3], "inpaint_only+lama", mask=image[:, :, 3], annotator_folder=lama_folder)
    expected = ref_lama_inpaint(image, small)  # (the file's generator)
    assert np.abs(detected[:, :, :3].astype(int) - expected[:, :, :3]).max() <= 1
    available = module_list(annotator_folder=lama_folder)["module_detail"]["inpaint_only+lama"]["available"]
    assert (
        available
        and not module_list(annotator_folder=tmp_path_factory.mktemp("empty"))["module_detail"]["inpaint_only+lama"][
            "available"
        ]
    )

    from safetensors.torch import save_file

    from latent_diffusion.models.controlnet import ControlNet

    folder = tmp_path_factory.mktemp("cn")
    with seeded(1):
        save_file(randomize(ControlNet(tiny_models["sd1"].cfg.unet), seed=1).state_dict(), folder / "cn.safetensors")
    picture = torch.from_numpy(image[:, :, :3]).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(image[:, :, 3] == 255).float()[None, None]
    unit = ControlUnit("cn", picture, module="inpaint_only+lama", mask=mask)
    request = GenerationRequest(["a cat"], [1], width=48, height=64, steps=2, sampler="euler", controls=[unit])
    pipeline = Pipeline(tiny_models["sd1"], controlnets=find_control_models(folder), annotators=lama_folder)
    images = generate(pipeline, request).images
    assert images.shape == (1, 3, 64, 48) and torch.isfinite(images).all()
    with pytest.raises(RequestError, match="needs ControlNetLama.pth in"):
        generate(dataclasses.replace(pipeline, annotators=tmp_path_factory.mktemp("none")), request)
