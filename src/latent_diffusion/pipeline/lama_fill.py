"""inpaint_only+lama's preprocessor: the mask filled by LaMa (`models/lama.py`) before the diffusion starts, as the
ControlNet extension fills it (1.1.455: `scripts/preprocessor/lama_inpaint.py`, `annotator/lama/__init__.py`), with
lllyasviel's `ControlNetLama.pth` from the annotator folder (or a folder in it, as the extension's
`annotator/downloads/lama/`). Nothing is downloaded.

The RGBA input (the mask as alpha) is scaled so that its shorter side is 256 (LaMa's training size, whatever the
unit's processor resolution) and padded to multiples of 64 (`resize_with_pad`); LaMa sees the colours with the mask
(alpha > 0.5) cut out, and its picture replaces the masked pixels, through 8 bits; that is cut back, scaled to the
input's size (bilinear) and laid over the input through the alpha. The map is RGBA: the filled colours, the mask.
`control_fixes.py` then starts the noise from the fill and keeps the outside as inpaint_only does.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ..models.lama import LaMa, lama_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, missing_files
from .control_modules import ControlModule
from .detector_images import resize_with_pad

MODULE = "inpaint_only+lama"
LAMA_FILE = "ControlNetLama.pth"
SIDE = 256  # "Always use 256 since lama is trained on 256"


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why LaMa cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, (LAMA_FILE,), folder)


@functools.lru_cache(maxsize=1)
def _load(path: Path, version: tuple) -> LaMa:
    """The generator in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return lama_from_state_dict(read_state_dict(path)[0])


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGBA, resolution, threshold_a, threshold_b, rng) -> RGBA map` (PreprocessorError that
    says what is missing where it cannot run)."""
    path = files_place(module, (LAMA_FILE,), folder) / LAMA_FILE

    def run(image: np.ndarray, resolution=None, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        return lama_fill(image, loaded(module, path, _load))

    return run


def lama_fill(image: np.ndarray, lama: LaMa) -> np.ndarray:
    """(H, W, 4) RGBA in 0..255, the mask as alpha (uint8, or float32 fitted for outpainting) -> (H, W, 4): the masked
    colours LaMa's (whole numbers), the mask, in the input's dtype as the extension's concatenation gives it."""
    h, w = image.shape[:2]
    color, alpha = image[:, :, :3].astype(np.float32), image[:, :, 3:4]
    padded, unpad = resize_with_pad(image, SIDE)  # (h', w', 4), sides multiples of 64
    rgba = torch.from_numpy(padded.astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 4, h', w')
    mask = (rgba[:, 3:4] > 0.5).float()
    seen = rgba[:, :3] * (1 - mask)
    with torch.no_grad():
        filled = lama(seen, mask) * mask + seen * (1 - mask)
    filled = (filled[0].permute(1, 2, 0) * 255.0).numpy().clip(0, 255).astype(np.uint8)
    filled = cv2.resize(unpad(filled), (w, h)).astype(np.float32)  # (bilinear, as the extension's default)
    soft = alpha.astype(np.float32) / 255.0
    return np.concatenate([(filled * soft + color * (1 - soft)).clip(0, 255).astype(np.uint8), alpha], axis=2)
