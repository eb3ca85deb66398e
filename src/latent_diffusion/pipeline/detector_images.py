"""The image helpers the ControlNet extension's detectors share: `HWC3` and `safe_step` (annotator/util.py),
`resize_image_with_pad` (scripts/utils.py), lineart_standard's line intensity (legacy/processor.py) and the greedy
NMS of YOLOX's and SCRFD's demos, used by the weight-free preprocessors and by the detectors with weights alike."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from .control_modules import PreprocessorError


def hwc3(image: np.ndarray) -> np.ndarray:
    """annotator/util.py `HWC3`: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3); alpha over white."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 3:
        return image
    if image.shape[2] == 1:
        return np.concatenate([image, image, image], axis=2)
    color = image[:, :, 0:3].astype(np.float32)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def resize_with_pad(image: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """scripts/utils.py `resize_image_with_pad`: the shorter side scaled to `resolution` (each side rounded), edge
    pixels repeated to a multiple of 64 on the bottom and right; returns it and the function that cuts a map back."""
    h, w = image.shape[:2]
    k = float(resolution) / float(min(h, w))
    target_h, target_w = int(np.round(h * k)), int(np.round(w * k))
    if target_h < 1 or target_w < 1:
        raise PreprocessorError(f"processor resolution {resolution} scales a {w}x{h} image to nothing")
    resized = cv2.resize(image, (target_w, target_h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = -target_h % 64, -target_w % 64  # the extension's pad64: up to the next multiple of 64
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")
    return padded, lambda x: np.ascontiguousarray(x[:target_h, :target_w])


def nake_nms(x: np.ndarray) -> np.ndarray:
    """scripts/lvminthin.py `nake_nms`: non-maximum suppression along the four directions: a pixel survives where it
    is the maximum of a line of three through it."""
    lines = [[[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]]]
    lines += [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]]
    y = np.zeros_like(x)
    for line in lines:
        np.putmask(y, cv2.dilate(x, kernel=np.array(line, np.uint8)) == x, x)
    return y


def nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """annotator/util.py `nms`: `nake_nms` of the map blurred (σ `sigma`, in float32), 255 where above `threshold`."""
    kept = nake_nms(cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma))
    return np.where(kept > threshold, np.uint8(255), np.uint8(0))


def scribble_strokes(edges: np.ndarray) -> np.ndarray:
    """legacy/processor.py's scribble_hed and scribble_pidinet after their soft edges (h, w) uint8: `nms` at 127 after a
    σ-3 blur, blurred again (σ 3, in 8 bits), white where above 4, else black."""
    strokes = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(strokes > 4, np.uint8(255), np.uint8(0))


def fused_edges(maps: list[np.ndarray], size: tuple[int, int], safe_steps: int) -> np.ndarray:
    """HED's and TEED's last step: edge logits at several scales (each (h_i, w_i) float32) -> (h, w) = `size` uint8:
    each scaled to the size (bilinear), averaged, squashed by a sigmoid (in float64), quantized by `safe_step`
    (0: not at all), in 8 bits."""
    h, w = size
    scaled = [cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(scaled, axis=2), axis=2).astype(np.float64)))
    if safe_steps != 0:
        edge = safe_step(edge, safe_steps)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def safe_step(x: np.ndarray, steps: int = 2) -> np.ndarray:
    """annotator/util.py `safe_step`: x in 0..1 quantized to `steps` + 1 levels (truncated), then scaled by 1/steps."""
    return (x.astype(np.float32) * float(steps + 1)).astype(np.int32).astype(np.float32) / float(steps)


def line_intensity(image: np.ndarray) -> np.ndarray:
    """lineart_standard's map of an RGB uint8 image: how far each pixel is below its σ-6 blur (the darkest channel),
    scaled so the median line (of those over 8) is 127: (H, W) uint8."""
    x = image.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    # max(16, median) as the extension writes it; with no line the median is NaN there and max() keeps 16
    intensity /= max(16, np.median(lines)) if lines.size else 16
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS of (n, 4) boxes (x0, y0, x1, y1), best score first, areas counted inclusively (+1 pixel a side)
    as YOLOX's and SCRFD's demos count them: the indices kept, in that order."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= iou]
    return keep
