"""depth_anything and depth_anything_v2: the depth map of `models/depth_anything.py`, made as the ControlNet extension
makes it (1.1.455: `legacy/processor.py` `depth_anything(_v2)` with colored=False, `annotator/depth_anything(_v2).py`),
from its files in the annotator folder (or a folder in it, as its `annotator/downloads/depth_anything(_v2)/`):
`depth_anything_vitl14.pth` (v1), `depth_anything_v2_vitl.safetensors` (v2). Nothing is downloaded.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`); its channels are
swapped (the extension's `cvtColor(BGR2RGB)` of an RGB image: the network sees BGR, as there), the whole scaled
(bicubic) so that both sides are at least 518 and multiples of 14 and normalized with ImageNet's statistics; the
depth is scaled back to the padded size (bilinear), stretched to 0..255 (truncated to 8 bits) and cut back.
The network runs on the CPU in float32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..models.depth_anything import PATCH, DepthAnything, depth_anything_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, one_file_reason, running
from .control_modules import ControlModule, PreprocessorError
from .detector_images import resize_with_pad

FILES = {"depth_anything": "depth_anything_vitl14.pth", "depth_anything_v2": "depth_anything_v2_vitl.safetensors"}
VERSIONS = {"depth_anything": 1, "depth_anything_v2": 2}
SIDE = 518  # the network's training size: the shorter side at least this
MAX_TOKENS = 37 * 37 * 8  # patches a map may take (the sides' ratio up to about 8:1); beyond, the activations grow past
# several GB on a CPU, where the extension would try and run out of memory
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


unavailable_reason = one_file_reason(FILES)


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple, version: int) -> DepthAnything:
    """The network in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return depth_anything_from_state_dict(read_state_dict(path)[0], version)


def network_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) the network sees: the image scaled by the larger of 518/height and 518/width, each side
    rounded to a multiple of 14 and, where that falls under 518, rounded up instead (`Resize`, lower_bound)."""
    scale = max(SIDE / height, SIDE / width)

    def side(length: float) -> int:
        rounded = int(np.round(length / PATCH) * PATCH)
        return rounded if rounded >= SIDE else int(np.ceil(length / PATCH) * PATCH)

    return side(scale * height), side(scale * width)


def depth_map(image: np.ndarray, model: DepthAnything) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W) uint8 relative depth, nearest 255."""
    h, w = image.shape[:2]
    rows, columns = network_size(h, w)
    swapped = image[:, :, ::-1] / 255.0  # RGB read as BGR, in float64
    resized = cv2.resize(swapped, (columns, rows), interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(((resized - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))[None]  # (1, 3, rows, columns)
    with torch.inference_mode():
        depth = F.interpolate(model(x)[None], (h, w), mode="bilinear", align_corners=False)[0, 0]  # (H, W)
        low, high = depth.min(), depth.max()
        if high == low:  # a flat depth: the extension's 0/0 would be NaN
            return np.zeros((h, w), np.uint8)
        return ((depth - low) / (high - low) * 255.0).numpy().astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 depth map`
    (PreprocessorError that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, functools.partial(_load, version=VERSIONS[module.name]))
        padded, cut_back = resize_with_pad(image, resolution)
        rows, columns = network_size(*padded.shape[:2])
        if rows * columns // PATCH**2 > MAX_TOKENS:  # (its short side is always 518: the tokens grow with the aspect)
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: a {image.shape[1]}x{image.shape[0]} image is too elongated for "
                f"Depth Anything (sides beyond {MAX_TOKENS // 37 // 37}:1)"
            )
        return cut_back(running(module, lambda: depth_map(padded, model)))

    return run
