"""The ControlNet extension's preprocessors that need no weights, computed as Mikubill/sd-webui-controlnet 1.1.455
computes them (`scripts/preprocessor/model_free_preprocessors.py`, `inpaint.py`, `legacy/processor.py`,
`annotator/util.py`, `annotator/shuffle`), with OpenCV as it calls it; and `detect`, its `/controlnet/detect`.

Every detector takes an RGB image (H, W, 3) uint8, or RGBA for the inpaint modules (the mask in the alpha channel),
and returns a map (h, w, 3) uint8. Most first scale the image so its shorter side is the processor resolution
(`resize_with_pad`: INTER_CUBIC when enlarging, INTER_AREA when shrinking, then the edge pixels repeated out to a
multiple of 64), run on that, and cut the padding off again: the padding reaches the map's border pixels (Canny's
gradients, the blurs), so it is kept as the extension has it. Modules that need annotator weights run through
`annotators.py` where the user has them.

shuffle is the one random module. The extension seeds NumPy's global generator once per unit before its
preprocessor runs, with `(seed + subseed) & 0xFFFFFFFF` (`set_numpy_seed`; `numpy_seed` here), then draws the two
noise fields of its flow from it. Here a `np.random.RandomState(seed)` of its own does the same draws: the legacy
MT19937 seeding, so the flow equals the extension's (a `default_rng` Generator, PCG64, would draw other numbers),
and no global state is touched.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from . import (
    anime_face_segmentation,
    annotators,
    bae_normals,
    depth_anything_maps,
    dsine_normals,
    face_analysis,
    hed_edges,
    lama_fill,
    lineart_maps,
    manga_lines,
    mlsd_lines,
    pidinet_edges,
    pose_estimation,
    segmentation,
    teed_edges,
)
from .control_modules import ControlModule, PreprocessorError, Slider, find_module, module_detail, sorted_modules
from .detector_images import hwc3, line_intensity, resize_with_pad
from .image_prompts import IMAGE_PROMPT_MODULES, missing_tower

# Each detector: (image, resolution, threshold_a, threshold_b, rng) -> map. The thresholds are the module's sliders
# (already checked and defaulted); rng serves shuffle only.


def identity(image, resolution, a, b, rng):
    """none, the inpaint modules and tile_colorfix(+sharp): the image itself (the colour fix of the tile modules
    and inpaint_only's blend happen during and after sampling, not here)."""
    return image


def invert(image, resolution, a, b, rng):
    return 255 - image


def canny(image, resolution, low, high, rng):
    """cv2.Canny with the integer parts of the two thresholds, on the padded image."""
    padded, unpad = resize_with_pad(image, resolution)
    return unpad(cv2.cvtColor(cv2.Canny(padded, int(low), int(high)), cv2.COLOR_GRAY2RGB))


def threshold(image, resolution, level, b, rng):
    """White where every channel is above the level, black elsewhere."""
    padded, unpad = resize_with_pad(image, resolution)
    found = np.zeros_like(padded)
    found[np.min(padded, axis=2) > level] = 255
    return unpad(found)


def scribble_xdog(image, resolution, level, b, rng):
    """Difference of Gaussians (σ 0.5 and 5), thresholded: white lines on black."""
    padded, unpad = resize_with_pad(image, resolution)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    found = np.zeros_like(padded)
    found[2 * (255 - dog) > level] = 255  # uint8 arithmetic: 2·(255 − dog) wraps modulo 256, as in the extension
    return unpad(found)


def blur_gaussian(image, resolution, sigma, b, rng):
    padded, unpad = resize_with_pad(image, resolution)
    return cv2.GaussianBlur(unpad(padded), (0, 0), float(sigma))


def tile_resample(image, resolution, rate, b, rng):
    """Down-sampled by the rate (INTER_AREA); a rate under 1.1 leaves the image as it is."""
    if rate < 1.1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (int(float(w) / float(rate)), int(float(h) / float(rate))), interpolation=cv2.INTER_AREA)


def lineart_standard(image, resolution, a, b, rng):
    """Dark lines on a light ground, by how far each pixel is below its σ-6 blur, scaled by the median line."""
    padded, unpad = resize_with_pad(image, resolution)
    return unpad(line_intensity(padded))


def recolor_luminance(image, resolution, gamma, b, rng):
    """L of Lab, to the power gamma. The extension converts from BGR although its images are RGB: kept."""
    lightness = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)[:, :, 0].astype(np.float32) / 255.0
    return cv2.cvtColor((lightness**gamma * 255.0).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def recolor_intensity(image, resolution, gamma, b, rng):
    """V of HSV (from "BGR", as above), to the power gamma."""
    value = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[:, :, 2].astype(np.float32) / 255.0
    return cv2.cvtColor((value**gamma * 255.0).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def color_grid(image, resolution, a, b, rng):
    """t2ia_color_grid (annotator/color): shorter side to the resolution (INTER_AREA), then 64-pixel colour cells."""
    h, w = image.shape[:2]
    if h < w:
        size = (round(w / h * resolution), resolution)
    else:
        size = (resolution, round(h / w * resolution))
    scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    cells = cv2.resize(scaled, (size[0] // 64, size[1] // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, size, interpolation=cv2.INTER_NEAREST)


def noise_disk(h: int, w: int, rng: np.random.RandomState, f: int = 256) -> np.ndarray:
    """annotator/util.py `make_noise_disk` with one channel: uniform noise on a grid of f-pixel cells, enlarged
    (INTER_CUBIC), cut to (h, w) and stretched to 0..1. Returns (h, w) float64."""
    noise = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise


def shuffle(image, resolution, a, b, rng):
    """annotator/shuffle: each pixel taken from where a smooth random flow points (x first, then y, drawn in that
    order), bilinear."""
    padded, unpad = resize_with_pad(image, resolution)
    image = unpad(padded)
    h, w = image.shape[:2]
    x = noise_disk(h, w, rng) * float(w - 1)
    y = noise_disk(h, w, rng) * float(h - 1)
    flow = np.stack([x, y], axis=2).astype(np.float32)  # (h, w, 2): the source pixel of each pixel
    return cv2.remap(image, flow, None, cv2.INTER_LINEAR)


DETECTORS = {
    "none": identity,
    "canny": canny,
    "invert": invert,
    "threshold": threshold,
    "scribble_xdog": scribble_xdog,
    "blur_gaussian": blur_gaussian,
    "shuffle": shuffle,
    "tile_resample": tile_resample,
    "tile_colorfix": identity,
    "tile_colorfix+sharp": identity,
    "inpaint": identity,
    "inpaint_only": identity,
    "lineart_standard": lineart_standard,
    "recolor_luminance": recolor_luminance,
    "recolor_intensity": recolor_intensity,
    "color": color_grid,
    "reference_only": identity,  # the image itself, which the U-Net sees through `reference.py`
    "reference_adain": identity,
    "reference_adain+attn": identity,
}


def numpy_seed(seed: int, subseed: int, first_seed: int) -> int:
    """The extension's `set_numpy_seed`: (seed + subseed) & 0xFFFFFFFF, where a -1 (random) seed or subseed
    counts as the batch's first seed (`p.all_seeds[0]`, the one drawn for it) and a negative one as 0."""
    seed = first_seed if seed == -1 else max(int(seed), 0)
    subseed = first_seed if subseed == -1 else max(int(subseed), 0)
    return (seed + subseed) & 0xFFFFFFFF


def unavailable_reason(
    module: ControlModule,
    annotator_folder: str | os.PathLike | None = None,
    clip_vision: str | os.PathLike | None = None,
) -> str | None:
    """Why `module` cannot run here, in one line; None where it can. `annotator_folder` holds the annotators'
    weights (`annotators.py`), `clip_vision` the CLIP image towers some modules use (`image_prompts.py`)."""
    if module.name in DETECTORS:
        return None
    if module.name in IMAGE_PROMPT_MODULES:
        reason = missing_tower(module.name, clip_vision)
        return reason and f"ControlNet module {module.label!r} needs {reason}"
    return _weights_runner(module).unavailable_reason(module, annotator_folder)


def _weights_runner(module: ControlModule):
    """What runs a module from the weights in the annotator folder: its runner in `_RUNNERS` (a module per network:
    LaMa, InsightFace, and those of `_NETWORK_RUNNERS`), or else a controlnet_aux detector (`annotators.py`); each has
    `unavailable_reason(module, folder)` and `annotator(module, folder)`."""
    return _RUNNERS.get(module.name, annotators)


# (DWPose and the animal poses, Depth Anything, TEED, HED, PiDiNet, M-LSD, line art, UniFormer, anime faces, manga
# lines, DSINE, BAE): each names its modules' files in `FILES`
_NETWORK_RUNNERS = (pose_estimation, depth_anything_maps, teed_edges, hed_edges, pidinet_edges, mlsd_lines)
_NETWORK_RUNNERS += (lineart_maps, segmentation, anime_face_segmentation, manga_lines, dsine_normals, bae_normals)
_RUNNERS = {lama_fill.MODULE: lama_fill} | dict.fromkeys(face_analysis.PACK_OF_MODULE, face_analysis)
_RUNNERS |= {name: runner for runner in _NETWORK_RUNNERS for name in runner.FILES}


def map_module(name: str, annotator_folder: str | os.PathLike | None = None) -> ControlModule:
    """The module a map is made with (PreprocessorError where it makes none, or cannot run here)."""
    found = find_module(name)
    if found.name in IMAGE_PROMPT_MODULES:
        raise PreprocessorError(
            f"ControlNet module {found.label!r} makes no map: its image goes to a CLIP image tower (an IP-Adapter's, "
            "a style adapter's or revision's)"
        )
    reason = unavailable_reason(found, annotator_folder)
    if reason is not None:
        raise PreprocessorError(reason)
    return found


def module_list(
    alias_names: bool = False,
    annotator_folder: str | os.PathLike | None = None,
    clip_vision: str | os.PathLike | None = None,
) -> dict:
    """`GET /controlnet/module_list?alias_names=...`: every module the extension has, in its order (labels where
    `alias_names`, else names), and their sliders; each detail also says whether it is `available` here with these
    folders (`unavailable_reason`; a key the extension does not send)."""
    modules = sorted_modules()
    keys = [m.label if alias_names else m.name for m in modules]
    available = [unavailable_reason(m, annotator_folder, clip_vision) is None for m in modules]
    details = [module_detail(m) | {"available": ok} for m, ok in zip(modules, available)]
    return {"module_list": keys, "module_detail": dict(zip(keys, details))}


def _slider_value(module: ControlModule, slider: Slider, what: str, value: float | None, strict: bool) -> float:
    """A request's value for one slider: None or -1 (the API's "default") is the slider's default; out of range, an
    error for a slider the module shows (where `strict`), else the default, as the extension silently does."""
    if value is None or value == -1 or not slider.minimum <= value <= slider.maximum:
        if value is not None and value != -1 and strict and slider.visible:
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: {what} ({slider.label}) {value} is outside "
                f"{slider.minimum}..{slider.maximum}"
            )
        return slider.value
    return float(value)


def resolve_sliders(
    module: ControlModule,
    processor_res: float | None,
    threshold_a: float | None,
    threshold_b: float | None,
    strict: bool = True,
) -> tuple[int, float, float]:
    """The resolution and the two thresholds a module runs with (`ControlNetUnit.bound_check_params`)."""
    res = _slider_value(module, module.resolution, "processor_res", processor_res, strict)
    a = _slider_value(module, module.threshold_a, "threshold_a", threshold_a, strict)
    b = _slider_value(module, module.threshold_b, "threshold_b", threshold_b, strict)
    return int(res), a, b


def check_image(image: object, what: str = "control image") -> np.ndarray:
    """An image the extension can use: uint8 numpy (H, W) or (H, W, 1|3|4), H and W at least 1."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = f"{image.dtype} array" if isinstance(image, np.ndarray) else type(image).__name__
        raise PreprocessorError(f"{what}: expected a uint8 numpy image (H, W[, C]), got {kind}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or 0 in image.shape[:2]:
        raise PreprocessorError(f"{what}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    return image


def run_module(
    module: ControlModule,
    image: np.ndarray,
    resolution: int,
    a: float,
    b: float,
    rng: np.random.RandomState,
    annotator_folder: str | os.PathLike | None = None,
    poses: list | None = None,
) -> np.ndarray:
    """One module on a prepared input (RGB; RGBA for the inpaint modules): its map, RGB uint8 (the inpaint modules'
    RGBA input as it is). `poses`, a list, gets the poses a pose estimator found (OpenPose's JSON)."""
    # the annotator hook raises what is missing where the module cannot run
    detector = DETECTORS.get(module.name) or _weights_runner(module).annotator(module, annotator_folder)
    found_poses = {"poses": poses} if module.name in pose_estimation.FILES else {}
    try:
        found = detector(image, resolution, a, b, rng, **found_poses)
    except cv2.error as error:  # a size OpenCV refuses (a cell grid of nothing, ...): one line, not its traceback
        lines = [line for line in str(error).splitlines() if line.strip()]
        h, w = image.shape[:2]
        raise PreprocessorError(
            f"ControlNet module {module.label!r} cannot process a {w}x{h} image at resolution {resolution}: {lines[-1]}"
        ) from error
    return found if module.is_inpaint else hwc3(found)


def with_mask(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """RGBA: the image and the mask's first channel as alpha, zeros where there is no mask (`ControlNetUnit.
    combine_image_and_mask`; a mask passes through HWC3 first, as the extension parses it)."""
    alpha = np.zeros(image.shape[:2], np.uint8) if mask is None else hwc3(check_image(mask, "mask"))[:, :, 0]
    if alpha.shape != image.shape[:2]:
        raise PreprocessorError(f"mask size {alpha.shape[::-1]} differs from the image's {image.shape[1::-1]}")
    return np.concatenate([image, alpha[:, :, None]], axis=2)


def visualize_inpaint_mask(found: np.ndarray) -> np.ndarray:
    """The extension's display of an RGBA inpaint map: masked pixels half transparent (alpha 255 − mask // 2)."""
    shown = found.copy()
    shown[:, :, 3] = 255 - shown[:, :, 3] // 2
    return shown.clip(0, 255).astype(np.uint8)


def detect(
    image: np.ndarray,
    module: str,
    processor_res: float | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    *,
    mask: np.ndarray | None = None,
    seed: int | None = None,
    annotator_folder: str | os.PathLike | None = None,
    strict: bool = True,
    poses: list | None = None,
) -> np.ndarray:
    """`POST /controlnet/detect` for one image: the map the extension sends back (uint8 (h, w, 3); (h, w, 4) for the
    inpaint modules, which need the mask). A mask is ignored by other modules, as there. The image goes through
    HWC3 first (alpha over white). shuffle draws from `RandomState(seed)`, or fresh entropy without a seed. `poses`,
    a list, gets the poses of dw_openpose_full and animal_openpose."""
    found = map_module(module, annotator_folder)
    rgb = hwc3(check_image(image))
    if found.requires_mask and mask is None:
        raise PreprocessorError(f"ControlNet module {found.label!r} needs a mask (controlnet_masks)")
    res, a, b = resolve_sliders(found, processor_res, threshold_a, threshold_b, strict)
    source = with_mask(rgb, mask) if found.is_inpaint else rgb
    detected = run_module(found, source, res, a, b, np.random.RandomState(seed), annotator_folder, poses)
    return visualize_inpaint_mask(detected) if found.is_inpaint else detected
