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

import os

import cv2
import numpy as np
import torch
from PIL import Image

from ..models.anime_face_unet import AnimeFaceUNet, anime_face_unet_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule, PreprocessorError

FILES = {"anime_face_segment": "UNet.pth"}
SIDE = 512  # the transform's `Resize(512)`: the shorter side
MAX_ASPECT = 8  # beyond 8:1 the longer side passes 4096 pixels and the activations several GB
# background, hair, eye, mouth, face, skin, clothes
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255), (255, 0, 255)], np.uint8)  # fmt: skip
unavailable_reason = one_file_reason(FILES)
_load = network_loader(anime_face_unet_from_state_dict)


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

    def work(padded: np.ndarray, model: AnimeFaceUNet, a=None, b=None) -> np.ndarray:
        h, w = padded.shape[:2]
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise PreprocessorError(
                f"the image is too elongated for the anime face segmenter (sides beyond {MAX_ASPECT}:1)"
            )
        return cv2.resize(PALETTE[segment(padded, model)], (w, h), interpolation=cv2.INTER_NEAREST)

    return one_file_runner(module, folder, FILES, _load, work)
