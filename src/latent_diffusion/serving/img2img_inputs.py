"""The web UI's preparation of img2img and inpainting inputs, on PIL images: its three resize modes, the Gaussian
mask blur, the "fill" of the masked area with colours from around it, and "only masked" inpainting (a crop around
the mask, worked on at the request's size and pasted back into the whole image).

These follow `modules/images.py`, `modules/masking.py` and `StableDiffusionProcessingImg2Img.init` of the
AUTOMATIC1111 web UI, so that a request to `ldm serve` gives what it gives there. The blur and the fill are
`pipeline/masking.py`'s (the outpainting scripts use them too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..pipeline.masking import blur_mask, fill_masked

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


def scaled_size(size: tuple[int, int], width: int, height: int, mode: int) -> tuple[int, int]:
    """The size an image of `size` is scaled to by `resize_image` before it is cut or padded to width × height."""
    w, h = size
    if mode == 0:
        return width, height
    wider = width / height > w / h  # the target is wider than the image
    if (mode == 1) == wider:  # scale to the target's width
        return width, max(1, h * width // w)
    return max(1, w * height // h), height  # to its height


def resize_image(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """0: stretch to width × height; 1: scale to cover it and cut the overflow, centred; 2: scale to fit inside it,
    centred, the bands left over filled by stretching the image's edge rows (or columns). Lanczos throughout."""
    scaled_w, scaled_h = scaled_size(image.size, width, height, mode)
    scaled = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    if mode == 0:
        return scaled
    out = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    out.paste(scaled, (left, top))
    if mode == 2 and top > 0:  # bands above and below: the first and last rows, stretched
        out.paste(scaled.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        out.paste(scaled.resize((width, top), box=(0, scaled_h, width, scaled_h)), (0, top + scaled_h))
    elif mode == 2 and left > 0:  # bands left and right: the first and last columns
        out.paste(scaled.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(scaled.resize((left, height), box=(scaled_w, 0, scaled_w, height)), (left + scaled_w, 0))
    return out


def mask_box(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the smallest box holding every nonzero pixel of the mask, grown by `padding` within it."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    if len(rows) == 0:
        return 0, 0, w, h
    return (
        max(columns[0] - padding, 0),
        max(rows[0] - padding, 0),
        min(columns[-1] + 1 + padding, w),
        min(rows[-1] + 1 + padding, h),
    )


def widen_box(box, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow the box around its centre to the aspect ratio of width × height, shifted to stay inside the image."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide: add rows
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_h)
    else:  # too tall: add columns
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(start: int, end: int, extra: int, size: int) -> tuple[int, int]:
    start, end = start - extra // 2, end + extra - extra // 2
    if end >= size:
        start, end = start - (end - size), size
    if start < 0:
        start, end = 0, end - start
    return start, min(end, size)


@dataclass
class Img2ImgInputs:
    """What the sampler gets, and how its result goes back into the picture."""

    image: Image.Image  # width × height, RGB: the init image (its masked area filled where asked)
    mask: Image.Image | None  # width × height, L: the blurred mask (white = repaint)
    overlay_mask: Image.Image | None  # the original's size where `box` is set, else width × height
    original: Image.Image  # the picture the result is laid into
    box: tuple[int, int, int, int] | None = None  # "only masked": the part of `original` that was worked on

    def paste(self, result: Image.Image) -> Image.Image:
        """A generated width × height image -> the answer: the original's pixels kept where the mask is not."""
        if self.overlay_mask is None:
            return result
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.copy()
            canvas.paste(resize_image(result, x2 - x1, y2 - y1, mode=1), (x1, y1))
            result = canvas
        return Image.composite(result, self.original, self.overlay_mask)


def img2img_inputs(
    image: Image.Image,
    mask: Image.Image | None,
    width: int,
    height: int,
    *,
    resize_mode: int = 0,
    mask_blur_x: float = 4,
    mask_blur_y: float = 4,
    invert: bool = False,
    fill: bool = True,
    only_masked: bool = False,
    padding: int = 0,
) -> Img2ImgInputs:
    """The web UI's img2img preparation. The mask is read as the web UI reads it (the alpha channel of a
    transparent RGBA image, else its grey level), inverted if asked, blurred, then either resized with the image
    (`resize_mode`) or, `only_masked`, used to cut the box around it (plus `padding`, widened to the aspect of
    width × height) out of the image and mask, each resized to width × height. fill: paint the masked area with
    the colours around it first (the web UI's default "fill"; False: keep the original there)."""
    image = image.convert("RGB")
    if mask is None:
        resized = resize_image(image, width, height, resize_mode)
        return Img2ImgInputs(resized, None, None, resized)
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    mask = ImageOps.invert(mask.convert("L")) if invert else mask.convert("L")
    mask = blur_mask(mask, mask_blur_x, mask_blur_y)
    if only_masked:
        if mask.size != image.size:  # a mask of another size covers the same picture: the result keeps the image's
            mask = mask.resize(image.size, Image.Resampling.LANCZOS)
        box = widen_box(mask_box(np.asarray(mask), padding), width, height, mask.width, mask.height)
        original = image
        work_mask = resize_image(mask.crop(box), width, height, mode=2)
        work_image = resize_image(original.crop(box), width, height, mode=2)
        overlay, paste_box = mask, box
    else:
        work_mask = resize_image(mask, width, height, resize_mode)
        work_image = original = resize_image(image, width, height, resize_mode)
        overlay = Image.fromarray(np.clip(np.asarray(work_mask, dtype=np.int32) * 2, 0, 255).astype(np.uint8))
        paste_box = None
    if fill:
        work_image = fill_masked(work_image, work_mask)
    return Img2ImgInputs(work_image, work_mask, overlay, original, paste_box)
