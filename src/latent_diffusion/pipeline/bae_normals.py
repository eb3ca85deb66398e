"""normal_bae: surface normals by BAE's network (`models/normal_bae.py`), made as the ControlNet extension makes them
(1.1.455: `legacy/processor.py` `normal_bae`, `annotator/normalbae`), from lllyasviel's `scannet.pt` in the annotator
folder (or a folder in it, as its `annotator/downloads/normal_bae/`). Nothing is downloaded. The network runs on the
CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), normalized with
ImageNet's statistics; the normals, (n + 1) / 2 in 8 bits (x, y, z as R, G, B), are the map, cut back.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..models.normal_bae import NormalBae, normal_bae_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, missing_files, running
from .control_modules import ControlModule
from .detector_images import resize_with_pad
from .dsine_normals import MEAN, STD

FILES = {"normal_bae": "scannet.pt"}


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, (FILES[module.name],), folder)


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple) -> NormalBae:
    """The network in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return normal_bae_from_state_dict(read_state_dict(path)[0])


def normal_map(image: np.ndarray, model: NormalBae) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 32 -> (H, W, 3) uint8 normals."""
    x = (torch.from_numpy(image).float().permute(2, 0, 1) / 255.0 - MEAN) / STD  # (3, H, W)
    with torch.inference_mode():
        normal = model(x[None])[0, :3]  # (3, H, W), unit
    return (((normal + 1) * 0.5).clip(0, 1).permute(1, 2, 0).numpy() * 255.0).clip(0, 255).astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W, 3) uint8 normals`
    (PreprocessorError that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        padded, cut_back = resize_with_pad(image, resolution)
        return cut_back(running(module, lambda: normal_map(padded, model)))

    return run
