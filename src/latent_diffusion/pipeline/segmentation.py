"""seg_ufade20k (module `segmentation`): ADE20K's 150 classes by UniFormer-S with UperNet (`models/uniformer.py`),
painted in ADE20K's palette, as the ControlNet extension paints them (1.1.455: `legacy/processor.py` `uniformer`,
`annotator/uniformer`, its mmsegmentation test pipeline), from lllyasviel's `upernet_global_small.pth` in the
annotator folder (or a folder in it, as its `annotator/downloads/uniformer/`). Nothing is downloaded.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), then, as
mmsegmentation's test pipeline has it: scaled (bilinear) as large as fits 2048 × 512 (long × short side, each size
rounded half up), its channels swapped (`to_rgb` of an image that is already RGB: the network sees BGR, as there)
and normalized in float32 with ImageNet's statistics; the logits scaled (bilinear) to that size and then to the
padded size, softmax'd, and each pixel painted in its class's colour. The network runs on the CPU in float32.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from ..models.uniformer import UperNetUniFormer, segmenter_from_state_dict
from .annotator_files import files_place, loaded, network_loader, one_file_reason, running
from .control_modules import ControlModule, PreprocessorError
from .detector_images import resize_with_pad

FILES = {"segmentation": "upernet_global_small.pth"}
LONG, SHORT = 2048, 512  # the test pipeline's `img_scale`
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])

# ADE20K's palette (mmseg's `ade_palette`), class 0 first: RRGGBB
ADE_PALETTE = """
787878 B47878 06E6E6 503232 04C803 787850 8C8C8C CC05FF E6E6E6 04FA07 E005FF EBFF07 96053D 787846 08FF33 FF0652
8FFF8C CCFF04 FF3307 CC4603 0066C8 3DE6FA FF0633 0B66FF FF0747 FF09E0 0907E6 DCDCDC FF095C 7009FF 08FFD6 07FFE0
FFB806 0AFF47 FF290A 07FFFF E0FF08 6608FF FF3D06 FFC207 FF7A08 00FF14 FF0829 FF0599 0633FF EB0CFF A09614 00A3FF
8C8C8C FA0A0F 14FF00 1FFF00 FF1F00 FFE000 99FF00 0000FF FF4700 00EBFF 00ADFF 1F00FF 0BC8C8 FF5200 00FFF5 003DFF
00FF70 00FF85 FF0000 FFA300 FF6600 C2FF00 008FFF 33FF00 0052FF 00FF29 00FFAD 0A00FF ADFF00 00FF99 FF5C00 FF00FF
FF00F5 FF0066 FFAD00 FF0014 FFB8B8 001FFF 00FF3D 0047FF FF00CC 00FFC2 00FF52 000AFF 0070FF 3300FF 00C2FF 007AFF
00FFA3 FF9900 00FF0A FF7000 8FFF00 5200FF A3FF00 FFEB00 08B8AA 8500FF 00FF5C B800FF FF001F 00B8FF 00D6FF FF0070
5CFF00 00E0FF 70E0FF 46B8A0 A300FF 9900FF 47FF00 FF00A3 FFCC00 FF008F 00FFEB 85FF00 FF00EB F500FF FF007A FFF500
0ABED4 D6FF00 00CCFF 1400FF FFFF00 0099FF 0029FF 00FFCC 2900FF 29FF00 AD00FF 00F5FF 4700FF 7A00FF 00FFB8 005CFF
B8FF00 0085FF FFD600 19C2C2 66FF00 5C00FF
"""
PALETTE = np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in ADE_PALETTE.split()], np.uint8)  # (150, 3)
unavailable_reason = one_file_reason(FILES)
_load = network_loader(segmenter_from_state_dict)


def network_size(height: int, width: int) -> tuple[int, int]:
    """mmcv's `rescale_size` within (2048, 512): the (width, height) scaled by min(2048/long, 512/short), rounded."""
    scale = min(LONG / max(height, width), SHORT / min(height, width))
    return int(width * scale + 0.5), int(height * scale + 0.5)


def segment(image: np.ndarray, model: UperNetUniFormer) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W) class indices."""
    h, w = image.shape[:2]
    resized = cv2.resize(image, network_size(h, w), interpolation=cv2.INTER_LINEAR)
    # mmcv's imnormalize: BGR<->RGB swapped, then float32 minus the mean, times 1/std (OpenCV casts both to float32)
    x = (resized[:, :, ::-1].astype(np.float32) - MEAN.astype(np.float32)) * (1 / STD).astype(np.float32)
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])  # (1, classes, h', w')
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        # softmax is per pixel: taken in bands of rows, so that no second copy of the logits is made at once
        bands = [logits[:, :, i : i + 256].softmax(dim=1).argmax(dim=1) for i in range(0, h, 256)]
        return torch.cat(bands, dim=1)[0].numpy()


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> (H, W, 3) uint8 class colours`
    (PreprocessorError that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        if model.cfg.classes != len(PALETTE):
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: {name} has {model.cfg.classes} classes, not 150"
            )
        padded, cut_back = resize_with_pad(image, resolution)
        if min(network_size(*padded.shape[:2])) < 32:  # (the last stage works at 1/32 of the size)
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: a {image.shape[1]}x{image.shape[0]} image is too elongated for "
                "the segmenter (its shorter side would fall under 32 pixels within 2048x512)"
            )
        return cut_back(PALETTE[running(module, lambda: segment(padded, model))])

    return run
