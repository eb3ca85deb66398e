"""normal_dsine: surface normals by DSINE (`models/dsine.py`), from the file `dsine.pt` in the annotator folder (or a
folder in it, as the ControlNet extension's `annotator/downloads/normal_dsine/`), made as the extension makes them
(1.1.455: `scripts/preprocessor/normal_dsine.py`, `annotator/normaldsine`) with one deliberate difference, below.
Nothing is downloaded. The network runs on the CPU in float32.

The image is scaled to the processor resolution and padded to multiples of 64 (`resize_with_pad`), normalized with
ImageNet's statistics, and given to DSINE with a pinhole camera whose field of view is the Fov slider (threshold_a,
degrees) over the longer side and whose centre is the image's centre (`intrinsics`), for Iterations (threshold_b)
refinements. The normals, (n + 1) / 2 in 8 bits (x, y, z as R, G, B), are the map, cut back.

The difference: the extension builds the camera from the image as it came, not as the network sees it (scaled and
padded), moves its centre by the padding DSINE's own demo would add around the image (where a side is not a multiple
of 32), which is not added, and cuts a window of the image's original size at those offsets out of the map. So
unless the image already has the processor's size, the camera's field of view and centre are not the slider's on
the image the network sees; and where the image is smaller than that or a side is not a multiple of 32, the map is
a window of another size, showing part of the image. Here the camera is the scaled image's and the map covers it;
where the image already has the processor's size and sides that are multiples of 32, the two agree.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..models.dsine import DSINE, dsine_from_state_dict
from .annotator_files import files_place, loaded, network_loader, one_file_reason, running
from .control_modules import ControlModule
from .detector_images import resize_with_pad

FILES = {"normal_dsine": "dsine.pt"}
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
unavailable_reason = one_file_reason(FILES)
_load = network_loader(dsine_from_state_dict)


def intrinsics(fov: float, height: int, width: int) -> torch.Tensor:
    """(1, 4): fu, fv, cu, cv of a pinhole camera seeing `fov` degrees across the image's longer side, centred on it
    (the extension's `get_intrinsics_from_fov`); a FOV of 0 is an orthographic camera (f infinite)."""
    with np.errstate(divide="ignore"):
        focal = np.float64(max(height, width) / 2.0) / np.tan(np.deg2rad(fov / 2.0))
    return torch.tensor([[focal, focal, width / 2.0 - 0.5, height / 2.0 - 0.5]], dtype=torch.float32)


def imagenet_normalized(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB uint8 -> (1, 3, H, W) float32, in 0..1 then normalized with ImageNet's statistics."""
    return ((torch.from_numpy(image).float().permute(2, 0, 1) / 255.0 - MEAN) / STD)[None]


def normal_colours(normal: torch.Tensor) -> np.ndarray:
    """Unit normals (3, H, W) -> (H, W, 3) uint8: (n + 1) / 2 in 8 bits, x, y, z as R, G, B."""
    return (((normal + 1) * 0.5).clip(0, 1).permute(1, 2, 0).numpy() * 255.0).clip(0, 255).astype(np.uint8)


def normal_map(padded: np.ndarray, size: tuple[int, int], model: DSINE, fov: float, iterations: int) -> np.ndarray:
    """(H, W, 3) RGB uint8, sides multiples of 32, the image (h, w) = `size` in its top-left -> (H, W, 3) uint8."""
    with torch.inference_mode():
        return normal_colours(model(imagenet_normalized(padded), intrinsics(fov, *size), iterations)[0])


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, fov, iterations, rng) -> (H, W, 3) uint8 normals` (PreprocessorError
    that says what is missing where it cannot run)."""
    name = FILES[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, fov: float, iterations: float, rng=None) -> np.ndarray:
        model = loaded(module, path, _load)
        padded, cut_back = resize_with_pad(image, resolution)
        size = cut_back(padded).shape[:2]  # the scaled image's, inside the padding
        return cut_back(running(module, lambda: normal_map(padded, size, model, float(fov), int(iterations))))

    return run
