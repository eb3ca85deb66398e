"""lineart_realistic, lineart_coarse and lineart_anime (modules `lineart`, `lineart_coarse`, `lineart_anime`): line
art by the generators of `models/lineart.py`, made as the ControlNet extension makes them (1.1.455:
`legacy/processor.py`, `annotator/lineart`, `annotator/lineart_anime`), from its files `sk_model.pth`,
`sk_model2.pth` and `netG.pth` in the annotator folder (or a folder in it, as its `annotator/downloads/lineart/`
and `.../lineart_anime/`). Nothing is downloaded. The networks run on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`). lineart and
lineart_coarse: the generator on it in 0..1, its output in 8 bits (truncated). lineart_anime: the image enlarged
(bicubic) to multiples of 256, the U-Net on it in -1..1, its output back in 0..255 and scaled back (bicubic), in 8
bits. Each map is inverted (white lines on black), cut back.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from ..models.lineart import LineartGenerator, UnetGenerator, lineart_anime_from_state_dict, lineart_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule

FILES = {"lineart": "sk_model.pth", "lineart_coarse": "sk_model2.pth", "lineart_anime": "netG.pth"}
unavailable_reason = one_file_reason(FILES)
_LOADERS = {False: network_loader(lineart_from_state_dict, keep=2), True: network_loader(lineart_anime_from_state_dict)}


def lines(image: np.ndarray, model: LineartGenerator) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 4 -> (H, W) uint8, black lines on white."""
    with torch.inference_mode():
        line = model(torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)[None])[0, 0].numpy()
    return (line * 255.0).clip(0, 255).astype(np.uint8)


def anime_lines(image: np.ndarray, model: UnetGenerator) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W) uint8, black lines on white."""
    h, w = image.shape[:2]
    big = cv2.resize(image, (256 * -(-w // 256), 256 * -(-h // 256)), interpolation=cv2.INTER_CUBIC)
    with torch.inference_mode():
        x = torch.from_numpy(big).float() / 127.5 - 1.0
        line = (model(x.permute(2, 0, 1)[None])[0, 0] * 127.5 + 127.5).numpy()
    return cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""
    anime = module.name == "lineart_anime"
    draw = anime_lines if anime else lines
    return one_file_runner(
        module, folder, FILES, _LOADERS[anime], lambda padded, model, a, b: 255 - draw(padded, model)
    )
