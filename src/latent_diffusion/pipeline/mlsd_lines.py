"""mlsd: straight line segments by M-LSD (`models/mlsd.py`), drawn as the ControlNet extension draws them (1.1.455:
`legacy/processor.py` `mlsd`, `annotator/mlsd`), from lllyasviel's `mlsd_large_512_fp32.pth` in the annotator
folder (or a folder in it, as its `annotator/downloads/mlsd/`). Nothing is downloaded. The network runs on the CPU in
float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`) and given to the
network with a channel of ones, all in -1..1. Line centres are the local maxima (3×3) of the centre score's sigmoid,
the 200 highest; each whose score is above threshold_a ("MLSD Value Threshold") and whose segment, from its
displacement map, is longer than threshold_b ("MLSD Distance Threshold", in pixels at half size) is drawn, its ends
doubled to the image's pixels and truncated, as a white line one pixel wide on black. The map is cut back.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..models.mlsd import MLSD, mlsd_from_state_dict
from .annotator_files import network_loader, one_file_reason, one_file_runner
from .control_modules import ControlModule

FILES = {"mlsd": "mlsd_large_512_fp32.pth"}
CENTRES = 200  # the most line centres looked at
unavailable_reason = one_file_reason(FILES)
_load = network_loader(mlsd_from_state_dict)


def line_segments(image: np.ndarray, model: MLSD, score_threshold: float, length_threshold: float) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 16 -> (n, 4) segments x0, y0, x1, y1 in the image's pixels."""
    h, w = image.shape[:2]
    x = np.concatenate([image, np.ones((h, w, 1))], axis=-1).transpose(2, 0, 1)[None]  # (1, 4, H, W)
    # (laid out in memory as the extension's array is: torch's CPU convolutions then add in the same order, so that the
    # segments' ends, truncated to pixels, fall where the extension's do)
    x = x.astype(np.float32) / 127.5 - 1.0
    with torch.inference_mode():
        maps = model(torch.from_numpy(x))[0]  # (9, H/2, W/2)
    heat = maps[:1].sigmoid()
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # local maxima only
    scores, indices = heat.flatten().topk(min(CENTRES, heat.numel()))
    ys, xs = (indices // heat.shape[2]).numpy(), (indices % heat.shape[2]).numpy()
    displacement = maps[1:5].permute(1, 2, 0).numpy()[ys, xs]  # (n, 4): x0, y0, x1, y1 from each centre
    lengths = np.sqrt(np.sum((displacement[:, :2] - displacement[:, 2:]) ** 2, axis=-1))
    kept = (scores.numpy() > score_threshold) & (lengths > length_threshold)
    segments = 2 * (np.stack([xs, ys, xs, ys], axis=1)[kept] + displacement[kept])  # (the maps are at half size)
    return segments[np.isfinite(segments).all(axis=1)]  # (a non-finite end: the extension draws nothing at all)


def draw(segments: np.ndarray, h: int, w: int) -> np.ndarray:
    """White segments one pixel wide on black (h, w), each end's coordinates truncated to integers."""
    canvas = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in segments:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W) uint8 map` (PreprocessorError
    that says what is missing where it cannot run)."""

    def work(padded: np.ndarray, model: MLSD, score: float, length: float) -> np.ndarray:
        return draw(line_segments(padded, model, score, length), *padded.shape[:2])

    return one_file_runner(module, folder, FILES, _load, work)
