"""seg_anime_face (module `anime_face_segment`): hair, eyes, mouth, face, skin and clothes of anime faces by a U-Net on
MobileNetV2 (`models/anime_face_unet.py`), painted as the ControlNet extension paints them (1.1.455:
`legacy/processor.py` `anime_face_segment`, `annotator/anime_face_segment`), from its file `UNet.pth` in the annotator
folder (or a folder in it, as its `annotator/downloads/anime_face_segment/`). Nothing is downloaded. The network runs
on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`); then, as the
extension's torchvision transform, PIL scales it (bicubic) so that its shorter side is 512, the longer
int(512 · long / short), and it goes in as 0..1. Each pixel is painted in the colour of its most likely class.

One deliberate difference: the extension cuts the padding off that 512-pixel map as if it were the padded image's
size, so at a processor resolution other than 512 its map is cropped to the top-left corner (below 512) or keeps
the padding (above). Here the map is scaled (nearest) to the padded image's size first, so it covers the image at
every resolution; at 512, the extension's default, the two are the same.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ..models.anime_face_unet import AnimeFaceUNet, anime_face_unet_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, missing_files, running
from .control_modules import ControlModule, PreprocessorError
from .detector_images import resize_with_pad

FILES = {"anime_face_segment": "UNet.pth"}
SIDE = 512  # the transform's `Resize(512)`: the shorter side
MAX_ASPECT = 8  # beyond 8:1 the longer side passes 4096 pixels and the activations several GB
# background, hair, eye, mouth, face, skin, clothes
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255), (255, 0, 255)], np.uint8)  # fmt: skip


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, (FILES[module.name],), folder)


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple) -> AnimeFaceUNet:
    """The network in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return anime_face_unet_from_state_dict(read_state_dict(path)[0])


def network_size(height: int, width: int) -> tuple[int, int]:
    """torchvision's `Resize(512)`: (width, height) with the shorter side 512, the longer int(512 · long / short)."""
    if width <= height:
        return SIDE, int(SIDE * height / width)
    return int(SIDE * width / height), SIDE


def segment(image: np.ndarray, model: AnimeFaceUNet) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (h, w) class indices, the shorter side 512 (`network_size`, rounded up to even)."""
    resized = np.array(Image.fromarray(image).resize(network_size(*image.shape[:2]), Image.BICUBIC))
    x = torch.from_numpy(resized).permute(2, 0, 1).float().div(255)[None]  # (1, 3, h, w), as ToTensor
    with torch.inference_mode():
        return model(x)[0].argmax(dim=0).numpy()


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W, 3) uint8 class colours`
    (PreprocessorError that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        padded, cut_back = resize_with_pad(image, resolution)
        h, w = padded.shape[:2]
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: a {image.shape[1]}x{image.shape[0]} image is too elongated for "
                f"the anime face segmenter (sides beyond {MAX_ASPECT}:1)"
            )
        painted = PALETTE[running(module, lambda: segment(padded, model))]
        return cut_back(cv2.resize(painted, (w, h), interpolation=cv2.INTER_NEAREST))

    return run
