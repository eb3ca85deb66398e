"""A ControlNet unit's control image for a generation of size (H, W), as the web UI's ControlNet extension
(Mikubill/sd-webui-controlnet 1.1.455) makes it: `get_control` and `Script.detectmap_proc` of
`scripts/controlnet.py`, `pixel_perfect_resolution` and `resize_mode_from_value` of
`internal_controlnet/external_code.py`, the edge thinning of `scripts/lvminthin.py`, and the inpaint protocol of
`scripts/hook.py`.

The path of one unit (`control_hint`):
1. the input: the image through HWC3; the inpaint modules take it as RGBA with the mask as alpha; another module
   given a mask that is neither all clear nor all set takes the mask itself as its input (the extension's "canvas
   scribble mode": a drawing on the canvas);
2. the preprocessor resolution: the request's, or with pixel perfect the one that maps the image onto the target
   one to one (`pixel_perfect_resolution`);
3. the module's map (`preprocessors.run_module`);
4. the map fitted to the target (`prepare_control`): "Just Resize" stretches it, "Crop and Resize" covers the
   target and cuts the overflow (centred), "Resize and Fill" fits inside and fills the rest with the median colour
   of the map's border. Each resize is `high_quality_resize`: INTER_AREA when shrinking, INTER_CUBIC when
   enlarging, INTER_NEAREST for maps of 3..199 colours (segmentations), and for binary maps (two colours, black
   and white) a threshold after the resize, with one-pixel edges thinned back to one pixel.
The hint is the map / 255 as (1, 3, H, W) float32; for the inpaint modules (1, 4, H, W), the mask as alpha (the
extension's `used_hint_cond`: a control model sees -1 in the masked pixels, `inpaint_protocol`; inpaint_only's fixes
read the colours under the mask too, `control_fixes.py`), and the map shown is RGBA with the masked pixels half
transparent. H and W are first rounded down to multiples of 8 (`align_dim_latent`), as the extension does.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from .control_modules import ControlModule, PreprocessorError
from .detector_images import hwc3, nake_nms
from .preprocessors import (
    check_image,
    map_module,
    resolve_sliders,
    run_module,
    visualize_inpaint_mask,
    with_mask,
)

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the API's 0, 1, 2
RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}


def resize_mode_from_value(value: str | int) -> str:
    """A request's resize mode as one of RESIZE_MODES: a name, an old name, or 0/1/2 (3, the web UI's "Just
    resize (latent upscale)", and anything larger are "Just Resize", as the extension has it)."""
    if isinstance(value, str):
        name = RESIZE_MODE_ALIASES.get(value, value)
        if name not in RESIZE_MODES:
            raise PreprocessorError(f"unknown ControlNet resize mode {value!r} (one of {', '.join(RESIZE_MODES)})")
        return name
    if isinstance(value, int) and value >= 0:
        return RESIZE_MODES[value] if value < len(RESIZE_MODES) else "Just Resize"
    raise PreprocessorError(f"unknown ControlNet resize mode {value!r} (0, 1, 2 or a name)")


def pixel_perfect_resolution(image_size: tuple[int, int], target_h: int, target_w: int, resize_mode: str) -> int:
    """The preprocessor resolution under which the map's shorter side lands on the target at scale 1: the image's
    shorter side times the scale that fits it inside the target ("Resize and Fill") or covers it (the others).
    `image_size` is the input's (H, W)."""
    raw_h, raw_w = image_size
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def _rotations(kernels: list[list[list[int]]]) -> list[np.ndarray]:
    """Each kernel turned by 0, 90, 180 and 270 degrees, in the order lvminthin.py lists them."""
    return [np.rot90(np.array(kernel, np.int32), k=k) for k in range(4) for kernel in kernels]


# Hit-or-miss patterns (1 set, -1 clear, 0 either) of a pixel that an edge can do without, and of a spur's tip.
THIN_KERNELS = _rotations([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
PRUNE_KERNELS = _rotations([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])


def _thin_pass(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clears, kernel after kernel, the pixels each pattern hits (in place); whether any was cleared."""
    changed = False
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        changed |= hits[0].shape[0] > 0
    return changed


def lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    """scripts/lvminthin.py: a binary edge map thinned to one pixel (at most 32 passes), then spurs cut once."""
    for _ in range(32):
        if not _thin_pass(x, THIN_KERNELS):
            break
    if prunings:
        _thin_pass(x, PRUNE_KERNELS)
    return x


def _is_one_pixel_edge(x: np.ndarray) -> bool:
    """Whether most of a binary map's white is in lines an opening removes (edges one or two pixels wide)."""
    opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8), iterations=1), np.ones((3, 3), np.uint8), iterations=1)
    return np.where(opened < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """detectmap_proc's `high_quality_resize` of a (h, w, 3) map, or (h, w, 4) with an inpaint mask, to `size`
    (width, height); the mask comes back thresholded at 127 to 0/255."""
    mask = x[:, :, 3] if x.shape[2] == 4 else None
    x = x[:, :, 0:3]
    y = x
    if x.shape[0] != size[1] or x.shape[1] != size[0]:
        smaller, bigger = size[0] * size[1] < x.shape[0] * x.shape[1], size[0] * size[1] > x.shape[0] * x.shape[1]
        colors = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
        binary = colors == 2 and np.min(x) < 16 and np.max(x) > 240
        one_pixel_edge = binary and _is_one_pixel_edge(x)
        if 2 < colors < 200:  # a segmentation or a palette: no new colours between regions
            interpolation = cv2.INTER_NEAREST
        else:  # "Must be CUBIC because we now use nms. NEVER CHANGE THIS" (the extension's comment)
            interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
        y = cv2.resize(x, size, interpolation=interpolation)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=interpolation)
        if binary:  # back to black and white: Otsu's threshold, edges thinned to one pixel again
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if one_pixel_edge:
                y = lvmin_thin(cv2.threshold(nake_nms(y), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1], bigger)
            else:
                y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
            y = np.stack([y] * 3, axis=2)
    if mask is not None:
        mask = ((mask > 127).astype(np.float32) * 255.0)[:, :, None].clip(0, 255).astype(np.uint8)
        y = np.concatenate([y, mask], axis=2)
    return y


def _fit(x: np.ndarray, resize_mode: str, h: int, w: int) -> np.ndarray:
    """detectmap_proc's three ways of bringing a map to (h, w)."""
    if resize_mode == "Just Resize":
        return high_quality_resize(x, (w, h))
    old_h, old_w = x.shape[:2]
    k0, k1 = float(h) / old_h, float(w) / old_w
    if resize_mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)  # (2w + 2h, c)
        color = np.median(borders, axis=0).astype(x.dtype)
        if len(color) == 4:  # the inpaint mask: the filled band is masked, to be painted
            color[3] = 255
        canvas = np.tile(color[None, None], [h, w, 1])
        x = high_quality_resize(x, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        top, left = max(0, (h - x.shape[0]) // 2), max(0, (w - x.shape[1]) // 2)
        canvas[top : top + x.shape[0], left : left + x.shape[1]] = x
        return canvas
    k = max(k0, k1)
    x = high_quality_resize(x, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    top, left = max(0, (x.shape[0] - h) // 2), max(0, (x.shape[1] - w) // 2)
    return x[top : top + h, left : left + w]


def prepare_control(detected: np.ndarray, module: ControlModule, resize_mode: str, h: int, w: int):
    """`detectmap_proc`: a module's map fitted to (h, w). Returns the hint (1, 3, h, w) float32 in [0, 1] ((1, 4, h, w)
    for the inpaint modules, the mask as alpha, 0 or 1) and the map as shown, (h, w, 3) uint8 ((h, w, 4) for the
    inpaint modules)."""
    x = detected.astype(np.float32) if module.is_inpaint else hwc3(detected)
    x = np.ascontiguousarray(_fit(x, resize_mode, h, w))
    hint = (torch.from_numpy(x).float() / 255.0).permute(2, 0, 1)[None].contiguous()  # (h, w, c) -> (1, c, h, w)
    return hint, visualize_inpaint_mask(x) if module.is_inpaint else x


def inpaint_protocol(hint: torch.Tensor) -> torch.Tensor:
    """What a control model sees of a hint: an inpaint module's (b, 4, h, w) RGBA as RGB with -1 in the masked pixels
    (hook.py's "ControlNet inpaint protocol", c · (1 − m) − m), any other hint as it is."""
    if hint.shape[1] != 4:
        return hint
    color, masked = hint[:, 0:3], (hint[:, 3:4] > 0.5).to(hint.dtype)
    return color * (1 - masked) - masked


def unit_input(image: np.ndarray, mask: np.ndarray | None, module: ControlModule) -> np.ndarray:
    """What the module runs on (`choose_input_image`): RGB, RGBA for the inpaint modules, or the mask itself where
    another module is given one that is neither all ≤ 5 nor all ≥ 250 (a scribble drawn on the canvas)."""
    rgb = hwc3(check_image(image))
    if mask is None:
        return with_mask(rgb, None) if module.is_inpaint else rgb
    rgba = with_mask(rgb, mask)
    if module.is_inpaint:
        return rgba
    alpha = rgba[:, :, 3]
    return rgb if (alpha <= 5).all() or (alpha >= 250).all() else hwc3(alpha)


def control_map(
    image: np.ndarray,
    module: str,
    *,
    size: tuple[int, int],
    resize_mode: str | int = "Crop and Resize",
    processor_res: float | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    pixel_perfect: bool = False,
    mask: np.ndarray | None = None,
    seed: int = 0,
    annotator_folder: str | os.PathLike | None = None,
    strict: bool = True,
    final_size: tuple[int, int] | None = None,
) -> tuple[ControlModule, str, np.ndarray]:
    """One ControlNet unit's preprocessor run for a generation of `size` (H, W) -> (its module, the resize mode, the
    map it detected, HWC uint8 (float32 for +lama's outpainting), at the preprocessor's resolution), which
    `prepare_control` fits to a size: the first
    pass's, and a hires pass's without running the preprocessor again (as the extension).

    `module` is a name or a label; `processor_res`, `threshold_a`, `threshold_b` are the request's (None or -1: the
    slider's default; out of a shown slider's range: an error where `strict`, else the default, as the extension);
    `seed` is shuffle's NumPy seed (`preprocessors.numpy_seed` of the request's seeds); `annotator_folder` holds the
    annotator weights of the modules that need them. The default resize mode is the extension's ("Crop and Resize").
    inpaint_only+lama in "Resize and Fill" first fits its input to `final_size` (H, W: the last pass's, a hires
    pass's; default `size`), the band around it masked, so that LaMa fills the band too: outpainting, as the
    extension does.
    """
    found = map_module(module, annotator_folder)
    mode = resize_mode_from_value(resize_mode)
    h, w = (int(size[0]) // 8) * 8, (int(size[1]) // 8) * 8
    if h < 8 or w < 8:
        raise PreprocessorError(f"generation size {size} is smaller than 8x8")
    if not 0 <= seed <= 0xFFFFFFFF:
        raise PreprocessorError(f"shuffle's NumPy seed {seed} is outside 0..2**32 - 1")
    source = unit_input(image, mask, found)
    if found.name == "inpaint_only+lama" and mode == "Resize and Fill":
        final_h, final_w = final_size or size
        source = _fit(source.astype(np.float32), mode, (int(final_h) // 8) * 8, (int(final_w) // 8) * 8)
    # pixel perfect replaces the resolution after the extension's range check, so a request's value is not checked
    res, a, b = resolve_sliders(found, None if pixel_perfect else processor_res, threshold_a, threshold_b, strict)
    if pixel_perfect:
        res = pixel_perfect_resolution(source.shape[:2], h, w, mode)
    return found, mode, run_module(found, source, res, a, b, np.random.RandomState(seed), annotator_folder)


def control_hint(
    image: np.ndarray, module: str, *, size: tuple[int, int], **options
) -> tuple[torch.Tensor, np.ndarray]:
    """One ControlNet unit's hint for a generation of `size` (H, W): the hint (1, 3 or 4, H', W') float32 and the map
    shown (uint8 HWC), H' and W' being H and W rounded down to multiples of 8 (`control_map`'s options)."""
    found, mode, detected = control_map(image, module, size=size, **options)
    return prepare_control(detected, found, mode, (int(size[0]) // 8) * 8, (int(size[1]) // 8) * 8)
