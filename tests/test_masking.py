"""The web UI's img2img preparation (`masking.py`) against closed forms and scipy: resize modes, the mask blur,
the fill of the masked area, the box of "only masked" inpainting and the paste back."""

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from latent_diffusion.serving.img2img_inputs import (
    blur_mask,
    fill_masked,
    img2img_inputs,
    mask_box,
    resize_image,
    widen_box,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def test_resize_modes():
    image = halves(40, 20)
    assert np.array_equal(resize_image(image, 40, 20, 0), np.asarray(image))
    cropped = np.asarray(resize_image(image, 20, 20, 1))  # cover 20x20: keep 40x20, cut 10 columns each side
    assert (cropped[:, :10] == RED).all() and (cropped[:, 10:] == BLUE).all()
    tall = halves(20, 40).transpose(Image.Transpose.ROTATE_90)  # 40x20, top blue, bottom red
    filled = np.asarray(resize_image(tall, 40, 40, 2))  # fit: 40x20 in the middle, bands of the edge rows
    assert np.array_equal(filled[10:30], np.asarray(tall))
    assert (filled[:10] == np.asarray(tall)[0]).all() and (filled[30:] == np.asarray(tall)[-1]).all()
    side = np.asarray(resize_image(image, 80, 20, 2))  # fit: 40x20 in the middle, bands of the edge columns
    assert (side[:, :20] == RED).all() and (side[:, 60:] == BLUE).all()


@pytest.mark.parametrize("sigma", [0.5, 4, 11.5])
def test_mask_blur_is_a_gaussian_with_mirrored_borders(sigma):
    """Against scipy: truncate 2.5 gives the web UI's (OpenCV's) 2·⌊2.5σ + 0.5⌋ + 1 taps, `mirror` its
    BORDER_REFLECT_101. Both round a float64 sum to 8 bits: one level apart at most where a sum lands on .5."""
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 53)) > 0.7).astype(np.uint8) * 255
    ours = np.asarray(blur_mask(Image.fromarray(mask), sigma, sigma)).astype(int)
    reference = gaussian_filter1d(mask.astype(np.float64), sigma, axis=1, mode="mirror", truncate=2.5)
    reference = gaussian_filter1d(np.round(reference), sigma, axis=0, mode="mirror", truncate=2.5)
    assert np.abs(ours - np.round(reference)).max() <= 1
    assert (ours == np.round(reference)).mean() > 0.99


def test_fill_paints_the_hole_with_the_colours_around_it():
    image = halves(64, 32)
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))  # the blue half is the hole
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    assert (filled[:, :32] == RED).all()  # kept exactly
    assert (np.abs(filled[:, 32:] - RED) <= 2).all()  # the only colour around the hole is red


def test_only_masked_box():
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[10:20, 30:70] = 255
    assert mask_box(mask, 0) == (30, 10, 70, 20)
    assert mask_box(mask, 12) == (18, 0, 82, 32)
    assert widen_box((30, 10, 70, 20), 32, 32, 96, 64) == (30, 0, 70, 40)  # 40x10 -> 40x40, shifted down into view
    assert widen_box((30, 10, 40, 50), 64, 32, 96, 64) == (0, 10, 80, 50)  # 10x40 -> 80x40, shifted right
    assert mask_box(np.zeros((8, 8)), 4) == (0, 0, 8, 8)  # no mask: the whole image


def test_only_masked_inputs_and_paste_back():
    """The box around the (blurred) mask is worked on at width x height, and the answer is the whole picture: the
    original outside the mask, the result inside."""
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 20, 56, 36))
    inputs = img2img_inputs(picture, mask, 32, 32, mask_blur_x=2, mask_blur_y=2, fill=False, only_masked=True)
    x1, y1, x2, y2 = inputs.box
    assert x2 - x1 == y2 - y1 and x1 <= 40 - 5 and x2 >= 56 + 5  # square, and holds the blur's reach
    assert inputs.image.size == inputs.mask.size == (32, 32)
    assert np.array_equal(inputs.image, picture.crop(inputs.box).resize((32, 32), Image.Resampling.LANCZOS))
    out = np.asarray(inputs.paste(Image.new("RGB", (32, 32), (0, 255, 0)))).astype(int)
    assert out.shape == (64, 96, 3)
    blurred = np.asarray(inputs.overlay_mask)
    assert np.array_equal(out[blurred == 0], np.asarray(picture)[blurred == 0])
    assert (np.abs(out[blurred == 255] - (0, 255, 0)) <= 1).all()


def test_whole_picture_inputs():
    """Not only masked: image and blurred mask resized together; the overlay is twice the mask, capped (a blurred
    mask's half-way line is fully repainted); an RGBA mask is read from its alpha channel."""
    picture = halves(48, 40)
    mask = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (24, 0, 48, 40))  # opaque = repaint: the blue half
    inputs = img2img_inputs(picture, mask, 32, 32, mask_blur_x=0, mask_blur_y=0, fill=True)
    assert inputs.box is None and inputs.image.size == (32, 32)
    kept = np.asarray(resize_image(picture, 32, 32))
    assert np.array_equal(np.asarray(inputs.image)[:, :10], kept[:, :10])  # not masked: as resized
    assert np.asarray(inputs.image)[:, 20:, 2].max() < 40  # the hole filled with red, not blue
    assert np.array_equal(np.asarray(inputs.overlay_mask), np.clip(np.asarray(inputs.mask, dtype=int) * 2, 0, 255))
