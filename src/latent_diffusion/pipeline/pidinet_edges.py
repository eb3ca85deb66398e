"""softedge_pidinet, softedge_pidisafe, scribble_pidinet and t2ia_sketch_pidi (modules `pidinet`, `pidinet_safe`,
`pidinet_scribble`, `pidinet_sketch`): soft edges by PiDiNet (`models/pidinet.py`), made as the ControlNet extension
makes them (1.1.455: `legacy/processor.py`, `annotator/pidinet`), from lllyasviel's `table5_pidinet.pth` in the
annotator folder (or a folder in it, as its `annotator/downloads/pidinet/`). Nothing is downloaded. The network runs
on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), its channels
swapped (PiDiNet was trained on BGR), in 0..1; the fused edge probability is the map, in 8 bits, cut back:
thresholded at 0.5 for t2ia_sketch_pidi, quantized to 3 levels for softedge_pidisafe; scribble_pidinet thins and
thresholds it as scribble_hed does (`scribble_strokes`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..models.pidinet import PiDiNet, pidinet_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule
from .detector_images import safe_step, scribble_strokes

FILES = dict.fromkeys(("pidinet", "pidinet_safe", "pidinet_scribble", "pidinet_sketch"), "table5_pidinet.pth")
unavailable_reason = one_file_reason(FILES)
_load = network_loader(pidinet_from_state_dict)


def pidinet_edges(image: np.ndarray, model: PiDiNet, safe: bool = False, threshold: bool = False) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 8 -> (H, W) uint8 soft edges (`threshold`: 0 or 255 at 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).float() / 255.0  # (H, W, 3) BGR
    with torch.inference_mode():
        edge = model(x.permute(2, 0, 1)[None])[-1][0, 0].numpy()
    if threshold:
        edge = edge > 0.5
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""

    def work(padded: np.ndarray, model: PiDiNet, a=None, b=None) -> np.ndarray:
        return pidinet_edges(
            padded, model, safe=module.name == "pidinet_safe", threshold=module.name == "pidinet_sketch"
        )

    after = scribble_strokes if module.name == "pidinet_scribble" else None
    return one_file_runner(module, folder, FILES, _load, work, after=after)
