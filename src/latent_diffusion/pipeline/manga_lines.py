"""lineart_anime_denoise: manga structural lines by MangaLineExtraction (`models/manga_line.py`), made as the ControlNet
extension makes them (1.1.455: `legacy/processor.py` `lineart_anime_denoise`, `annotator/manga_line`), from its file
`erika.pth` in the annotator folder (or a folder in it, as its `annotator/downloads/manga_line/`). Nothing is
downloaded. The network runs on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), made grey
(OpenCV's RGB to grey), run through the network as 0..255, and 255 minus its output, clipped to 0..255 and truncated
to 8 bits, is the map (white lines on black), cut back.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from ..models.manga_line import MangaLineNetwork, manga_line_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule

FILES = {"lineart_anime_denoise": "erika.pth"}
unavailable_reason = one_file_reason(FILES)
_load = network_loader(manga_line_from_state_dict)


def manga_lines(image: np.ndarray, model: MangaLineNetwork) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 16 -> (H, W) uint8, white lines on black."""
    grey = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)).float()[None, None]  # (1, 1, H, W)
    with torch.inference_mode():
        line = model(grey)[0, 0].numpy()
    return (255 - line).clip(0, 255).astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""
    return one_file_runner(module, folder, FILES, _load, lambda padded, model, a, b: manga_lines(padded, model))
