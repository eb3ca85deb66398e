"""normal_bae: surface normals by BAE's network (`models/normal_bae.py`), made as the ControlNet extension makes them
(1.1.455: `legacy/processor.py` `normal_bae`, `annotator/normalbae`), from lllyasviel's `scannet.pt` in the annotator
folder (or a folder in it, as its `annotator/downloads/normal_bae/`). Nothing is downloaded. The network runs on the
CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), normalized with
ImageNet's statistics; the normals, (n + 1) / 2 in 8 bits (x, y, z as R, G, B), are the map, cut back.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..models.normal_bae import NormalBae, normal_bae_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule
from .dsine_normals import imagenet_normalized, normal_colours

FILES = {"normal_bae": "scannet.pt"}
unavailable_reason = one_file_reason(FILES)
_load = network_loader(normal_bae_from_state_dict)


def normal_map(image: np.ndarray, model: NormalBae) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 32 -> (H, W, 3) uint8 normals."""
    with torch.inference_mode():
        return normal_colours(model(imagenet_normalized(image))[0, :3])  # (the normal; κ, its concentration, unused)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W, 3) uint8 normals`
    (PreprocessorError that says what is missing where it cannot run)."""
    return one_file_runner(module, folder, FILES, _load, lambda padded, model, a, b: normal_map(padded, model))
