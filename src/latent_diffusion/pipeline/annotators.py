"""The ControlNet modules that need annotator weights (MiDaS, ZoeDepth and LeReS depth, OpenPose, MobileSAM's
segments) or MediaPipe (mediapipe_face), run through the `controlnet_aux` package: only where it (and MediaPipe) is
importable and its weight files are in a folder the user names.
Nothing is ever downloaded: the folder is handed to the detector's `from_pretrained` (which reads a local folder
as it is) only after every file it will read has been found there (or in one of its subfolders, as the extension's
`annotator/downloads` keeps them).

This is a hook, not a port: the maps are controlnet_aux's, which resizes to a multiple of 64 at the processor
resolution where the extension pads (`resize_image_with_pad`), so they differ from the web UI's in size and at the
borders; `control_images.prepare_control` then sizes them to the generation as for any other module. The modules
with a network of their own here (`preprocessors._RUNNERS`: DWPose and the animal poses, Depth Anything, TEED, HED,
PiDiNet, M-LSD, the line-art generators, UniFormer, the anime face segmenter, manga lines, DSINE, BAE, InsightFace, LaMa)
run without controlnet_aux; the other weight-needing modules (OneFormer's segmentation, the hand refiner, PuLID,
densepose) have no loader here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..weights.reader import first_line
from .annotator_files import files_folder
from .control_modules import ControlModule, PreprocessorError


@dataclass(frozen=True)
class Annotator:
    """How one module runs in controlnet_aux: its detector class, the files `from_pretrained` reads from the folder
    (none: the detector is built without arguments and needs no folder) and the options it is built with, the
    options of its call, the call's names for the module's threshold_a and threshold_b and their types, the packages
    it needs beside controlnet_aux, and whether it draws from NumPy's global generator."""

    detector: str
    files: tuple[str, ...]
    options: dict = field(default_factory=dict)
    thresholds: tuple[str, str] | None = None
    threshold_types: tuple[type, type] = (float, float)
    load: tuple[tuple[str, str], ...] = ()
    packages: tuple[str, ...] = ()
    random: bool = False


_OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_LERES_FILES = ("res101.pth", "latest_net_G.pth")


def _pose(body: bool, hand: bool, face: bool) -> Annotator:
    return Annotator(
        "OpenposeDetector", _OPENPOSE_FILES, {"include_body": body, "include_hand": hand, "include_face": face}
    )


# By the extension's module names; the file names are controlnet_aux 0.0.10's defaults (those of lllyasviel/Annotators).
ANNOTATORS = {
    "depth": Annotator("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "depth_zoe": Annotator("ZoeDetector", ("ZoeD_M12_N.pt",)),
    "depth_leres": Annotator("LeresDetector", _LERES_FILES, {"boost": False}, ("thr_a", "thr_b")),
    "depth_leres++": Annotator("LeresDetector", _LERES_FILES, {"boost": True}, ("thr_a", "thr_b")),
    "openpose": _pose(body=True, hand=False, face=False),
    "openpose_face": _pose(body=True, hand=False, face=True),
    "openpose_faceonly": _pose(body=False, hand=False, face=True),
    "openpose_full": _pose(body=True, hand=True, face=True),
    "openpose_hand": _pose(body=True, hand=True, face=False),
    # The extension itself runs mobile_sam through controlnet_aux (`annotator/mobile_sam`: this SamDetector with
    # MobileSAM's "vit_t", called as here), which paints each mask in a colour drawn from NumPy's global generator; the
    # extension seeds that per unit, and so does `run`. Its mediapipe_face draws with controlnet_aux's code.
    "mobile_sam": Annotator(
        "SamDetector", ("mobile_sam.pt",), load=(("model_type", "vit_t"), ("filename", "mobile_sam.pt")), random=True
    ),
    "mediapipe_face": Annotator(
        "MediapipeFaceDetector",
        (),
        thresholds=("max_faces", "min_confidence"),
        threshold_types=(int, float),
        packages=("mediapipe",),
    ),
}
# A detector that draws from NumPy's global generator holds this while it runs (the whole detection, not only the
# draws), its seeded state set and the previous one restored after. Nothing else in the package draws from that
# generator; a library that did so in another thread meanwhile would shift the colours.
_GLOBAL_NUMPY = threading.Lock()


def weights_folder(module: ControlModule, folder: str | os.PathLike | None) -> Path | None:
    """Where `module`'s files are (`files_folder`)."""
    spec = ANNOTATORS.get(module.name)
    return None if spec is None else files_folder(spec.files, folder)


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run through controlnet_aux with the weights in `folder`; None where it can."""
    spec = ANNOTATORS.get(module.name)
    if spec is None:
        return f"ControlNet module {module.label!r} needs model weights that nothing here loads"
    for package in ("controlnet_aux", *spec.packages):
        if importlib.util.find_spec(package) is None:
            return f"ControlNet module {module.label!r} needs the {package} package, which is not installed"
    if not spec.files:
        return None
    if folder is None:
        return (
            f"ControlNet module {module.label!r} needs annotator weights ({', '.join(spec.files)}): no folder named "
            "(--annotator-dir)"
        )
    if weights_folder(module, folder) is None:
        return (
            f"ControlNet module {module.label!r} needs {', '.join(spec.files)} in {os.fspath(folder)} or a folder in it"
        )
    return None


@functools.lru_cache(maxsize=2)
def _load(detector: str, folder: str | None, load: tuple[tuple[str, str], ...] = ()):
    """One controlnet_aux detector, built from the files in `folder` with the options `load` (the last two kept: each
    holds a network); with no folder, built without arguments."""
    import controlnet_aux

    kind = getattr(controlnet_aux, detector)
    return kind() if folder is None else kind.from_pretrained(folder, **dict(load))


def annotator(module: ControlModule, folder: str | os.PathLike | None) -> Callable[..., np.ndarray]:
    """`module`'s detector as `run(image, resolution, threshold_a, threshold_b, rng) -> HWC uint8 map` (the
    signature of the weight-free detectors; rng seeds the random ones); a PreprocessorError that says what is missing
    where it cannot run."""
    reason = unavailable_reason(module, folder)
    if reason is not None:
        raise PreprocessorError(reason)
    spec = ANNOTATORS[module.name]

    def run(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float, rng=None) -> np.ndarray:
        place = weights_folder(module, folder) if spec.files else None
        if spec.files and place is None:  # (the files went away since)
            raise PreprocessorError(unavailable_reason(module, folder))
        try:
            detector = _load(spec.detector, place and os.fspath(place), spec.load)
        except Exception as error:  # a file that is not the weights it is named for: say which, in one line
            raise PreprocessorError(
                f"ControlNet module {module.label!r}: controlnet_aux cannot load it: {first_line(error)}"
            ) from error
        options = dict(spec.options)
        if spec.thresholds is not None:
            values = [kind(value) for kind, value in zip(spec.threshold_types, (threshold_a, threshold_b))]
            options |= dict(zip(spec.thresholds, values))
        sizes = {"detect_resolution": resolution, "image_resolution": resolution, "output_type": "np"}
        try:
            if not spec.random:
                return np.asarray(detector(image, **sizes, **options), dtype=np.uint8)
            with _GLOBAL_NUMPY:
                saved = np.random.get_state()
                np.random.set_state((rng or np.random.RandomState()).get_state())  # the extension's `set_numpy_seed`
                try:
                    return np.asarray(detector(image, **sizes, **options), dtype=np.uint8)
                finally:
                    np.random.set_state(saved)
        except Exception as error:  # what controlnet_aux or MediaPipe raise on an image (SAM finding no mask, ...)
            raise PreprocessorError(
                f"ControlNet module {module.label!r} (controlnet_aux) cannot run on this image: {first_line(error)}"
            ) from error

    return run
