"""softedge_hed, softedge_hedsafe and scribble_hed (modules `hed`, `hed_safe`, `scribble_hed`): soft edges by
lllyasviel's HED (`models/hed.py`), made as the ControlNet extension makes them (1.1.455: `legacy/processor.py`,
`annotator/hed`), from its file `ControlNetHED.pth` in the annotator folder (or a folder in it, as its
`annotator/downloads/hed/`). Nothing is downloaded. The network runs on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`); HED's five edge
maps, each scaled to that size, are averaged and squashed by a sigmoid (`fused_edges`), quantized to 3 levels for
hed_safe, in 8 bits, cut back. scribble_hed thins that map and thresholds it (`scribble_strokes`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..models.hed import HED, hed_from_state_dict
from ..weights.reader import read_state_dict
from .annotator_files import files_place, loaded, missing_files, running
from .control_modules import ControlModule
from .detector_images import fused_edges, resize_with_pad, scribble_strokes

FILES = dict.fromkeys(("hed", "hed_safe", "scribble_hed"), "ControlNetHED.pth")


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, (FILES[module.name],), folder)


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple) -> HED:
    """The network in `path` (kept by its path, modification time and size), on the CPU in float32."""
    return hed_from_state_dict(read_state_dict(path)[0])


def hed_edges(image: np.ndarray, model: HED, safe: bool) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 16 -> (H, W) uint8 soft edges."""
    with torch.inference_mode():
        maps = model(torch.from_numpy(image).float().permute(2, 0, 1)[None])  # five (1, 1, H / 2^i, W / 2^i)
    return fused_edges([m[0, 0].numpy() for m in maps], image.shape[:2], 2 if safe else 0)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        padded, cut_back = resize_with_pad(image, resolution)
        edges = cut_back(running(module, lambda: hed_edges(padded, model, safe=module.name == "hed_safe")))
        return scribble_strokes(edges) if module.name == "scribble_hed" else edges

    return run
