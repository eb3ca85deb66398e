"""softedge_hed, softedge_hedsafe and scribble_hed (modules `hed`, `hed_safe`, `scribble_hed`): soft edges by
lllyasviel's HED (`models/hed.py`), made as the ControlNet extension makes them (1.1.455: `legacy/processor.py`,
`annotator/hed`), from its file `ControlNetHED.pth` in the annotator folder (or a folder in it, as its
`annotator/downloads/hed/`). Nothing is downloaded. The network runs on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`); HED's five edge
maps, each scaled to that size, are averaged and squashed by a sigmoid (`fused_edges`), quantized to 3 levels for
hed_safe, in 8 bits, cut back. scribble_hed thins that map and thresholds it (`scribble_strokes`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..models.hed import HED, hed_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule
from .detector_images import fused_edges, scribble_strokes

FILES = dict.fromkeys(("hed", "hed_safe", "scribble_hed"), "ControlNetHED.pth")
unavailable_reason = one_file_reason(FILES)
_load = network_loader(hed_from_state_dict)


def hed_edges(image: np.ndarray, model: HED, safe: bool) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 16 -> (H, W) uint8 soft edges."""
    with torch.inference_mode():
        maps = model(torch.from_numpy(image).float().permute(2, 0, 1)[None])  # five (1, 1, H / 2^i, W / 2^i)
    return fused_edges([m[0, 0].numpy() for m in maps], image.shape[:2], 2 if safe else 0)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""

    def work(padded: np.ndarray, model: HED, a=None, b=None) -> np.ndarray:
        return hed_edges(padded, model, safe=module.name == "hed_safe")

    after = scribble_strokes if module.name == "scribble_hed" else None
    return one_file_runner(module, folder, FILES, _load, work, after=after)
