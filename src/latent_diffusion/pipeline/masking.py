"""The web UI's mask arithmetic on 8-bit PIL images, shared by img2img's input preparation
(`serving/img2img_inputs.py`) and the outpainting scripts (`pipeline/outpainting.py`): the Gaussian mask blur as its
OpenCV call computes it, the "fill" of a masked area with the colours around it (its `masking.fill`), and the paste
of a result into the picture through the blurred mask (its `mask_for_overlay` and `apply_overlay`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps


def gaussian_blur(mask: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """OpenCV's GaussianBlur of an 8-bit mask along one axis, as the web UI calls it: a kernel of 2·⌊2.5σ + 0.5⌋ + 1
    taps, the border mirrored without repeating its edge pixel (BORDER_REFLECT_101), rounded back to 8 bits."""
    radius = int(2.5 * sigma + 0.5)
    if radius == 0:  # one tap: OpenCV leaves the mask as it is
        return mask
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    taps = (taps / taps.sum()).float()[None, None]  # (1, 1, 2r + 1)
    lines = np.moveaxis(mask, axis, -1)  # blur along the last axis: (lines, n)
    padded = np.pad(lines.astype(np.float32), [(0, 0), (radius, radius)], mode="reflect")  # reflect-101, any width
    blurred = torch.cat([F.conv1d(chunk[:, None], taps)[:, 0] for chunk in torch.from_numpy(padded).split(256)])
    blurred = blurred.numpy()
    return np.moveaxis(np.clip(np.round(blurred), 0, 255).astype(np.uint8), -1, axis)


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A mask (L) blurred across by σ = blur_x, then down by σ = blur_y, as the web UI's two OpenCV calls (0: not
    along that axis)."""
    array = np.asarray(mask.convert("L"))
    if blur_x > 0:
        array = gaussian_blur(array, blur_x, axis=1)
    if blur_y > 0:
        array = gaussian_blur(array, blur_y, axis=0)
    return Image.fromarray(array)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with the colours around it: the unmasked pixels (premultiplied by their alpha) are
    blurred at falling radii, each blur laid over the last, so that far into the hole the colour is a wide average
    and near its edge the neighbouring colour (the web UI's "fill", its default masked content)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def paste_through(result: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """A generated image laid over the `original` through a blurred mask (L, white = repaint), as the web UI's
    overlay: the mask doubled and clipped, so that the blur's outer half is wholly the result and only its inner
    half fades into the original; the original's pixels premultiplied by their opacity in 8 bits and composited
    over the result (its `apply_overlay`, to the level)."""
    overlay = Image.fromarray(np.clip(np.asarray(mask, dtype=np.int32) * 2, 0, 255).astype(np.uint8))
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay))
    out = result.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")
