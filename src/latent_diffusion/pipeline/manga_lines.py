"""lineart_anime_denoise: manga structural lines by MangaLineExtraction (`models/manga_line.py`), made as the ControlNet
extension makes them (1.1.455: `legacy/processor.py` `lineart_anime_denoise`, `annotator/manga_line`), from its file
`erika.pth` in the annotator folder (or a folder in it, as its `annotator/downloads/manga_line/`). Nothing is
downloaded. The network runs on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), made grey
(OpenCV's RGB to grey), run through the network as 0..255, and 255 minus its output, clipped to 0..255 and truncated
to 8 bits, is the map (white lines on black), cut back.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ..models.manga_line import MangaLineNetwork, manga_line_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, missing_files, running
from .control_modules import ControlModule
from .detector_images import resize_with_pad

FILES = {"lineart_anime_denoise": "erika.pth"}


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, (FILES[module.name],), folder)


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple) -> MangaLineNetwork:
    """The network in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return manga_line_from_state_dict(read_state_dict(path)[0])


def manga_lines(image: np.ndarray, model: MangaLineNetwork) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 16 -> (H, W) uint8, white lines on black."""
    grey = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)).float()[None, None]  # (1, 1, H, W)
    with torch.inference_mode():
        line = model(grey)[0, 0].numpy()
    return (255 - line).clip(0, 255).astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        padded, cut_back = resize_with_pad(image, resolution)
        return cut_back(running(module, lambda: manga_lines(padded, model)))

    return run
