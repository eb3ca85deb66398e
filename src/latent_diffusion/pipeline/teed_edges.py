"""softedge_teed and softedge_anyline: soft edges by TEED (`models/teed.py`), made as the ControlNet extension makes
them (1.1.455: `scripts/preprocessor/teed.py`, `annotator/teed/__init__.py`), from its files in the annotator folder
(or a folder in it, as its `annotator/downloads/TEED/`): `7_model.pth` (TEED), `MTEED.pth` (MistoLine's Anyline).
Nothing is downloaded. The network runs on the CPU in float32.

softedge_teed: the image scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`); the
four edge maps, each scaled to that size (bilinear), averaged and squashed by a sigmoid, then quantized by
`safe_step` (threshold_a "Safe Steps"; 0: not at all), in 8 bits, cut back.

softedge_anyline: MTEED's map so made, then lineart_standard's map of the same padded image; where that map is
exactly 1 in a 4-connected patch of at least 12 such pixels (skimage's `remove_small_objects(min_size=36)` on its
three identical channels), the result is 1. That is what the extension's blend (`combine_layers`, written for maps in
0..1 as in MistoLine's ComfyUI node) computes on 8-bit maps; kept as the extension has it. (The extension runs
lineart_standard through its own resize again, which at a resolution that is not a multiple of 64 gives a map of
another size and fails; here the padded image's map is taken as it is.)
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from ..models.teed import TEED, teed_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule
from .detector_images import fused_edges, hwc3, line_intensity

FILES = {"softedge_teed": "7_model.pth", "softedge_anyline": "MTEED.pth"}
unavailable_reason = one_file_reason(FILES)
_load = network_loader(teed_from_state_dict, keep=2)  # (TEED's and Anyline's, both small)


def teed_edges(image: np.ndarray, model: TEED, safe_steps: int) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 4 -> (H, W) uint8 soft edges."""
    with torch.inference_mode():
        maps = model(torch.from_numpy(image).float().permute(2, 0, 1)[None])  # four (1, 1, H, W)
    return fused_edges([m[0, 0].numpy() for m in maps], image.shape[:2], safe_steps)


def anyline(image: np.ndarray, model: TEED, safe_steps: int) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W, 3) uint8: MTEED's edges, 1 where lineart_standard's faintest lines are."""
    edges = hwc3(teed_edges(image, model, safe_steps))
    faint = (line_intensity(image) == 1).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(faint, connectivity=4)
    kept = stats[:, cv2.CC_STAT_AREA] * 3 >= 36  # (the extension counts each pixel in its three channels)
    kept[0] = False  # (the background)
    return np.where(kept[labels][:, :, None], np.uint8(1), edges)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> uint8 map` (PreprocessorError that
    says what is missing where it cannot run)."""
    make = anyline if module.name == "softedge_anyline" else teed_edges
    return one_file_runner(
        module, folder, FILES, _load, lambda padded, model, steps, b: make(padded, model, int(steps))
    )
