"""The annotator folder (`--annotator-dir`, `Pipeline.annotators`): where a module's weight files are, why a module
cannot run without them, and each file read once (kept by its path, modification time and size, so a file replaced
on disk is read again). The ControlNet extension keeps its annotators' files one folder per annotator
(`annotator/downloads/openpose/`, `.../depth_anything/`, ...); a folder given as that, or holding the files itself,
works. ONNX files are read by OpenCV's own reader (`cv2.dnn`): a graph of operators, nothing in it run as code."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from ..weights.reader import CheckpointError, first_line, read_state_dict
from .control_modules import ControlModule, PreprocessorError
from .detector_images import resize_with_pad

T = TypeVar("T")
_LOADING, _RUNNING = threading.Lock(), threading.Lock()


def files_folder(files: tuple[str, ...], folder: str | os.PathLike | None) -> Path | None:
    """Where `files` are: `folder` itself, or one of its subfolders holding them all; None: nowhere."""
    if folder is None or not Path(folder).is_dir():
        return None
    for place in [Path(folder), *sorted(p for p in Path(folder).iterdir() if p.is_dir())]:
        if all((place / name).is_file() for name in files):
            return place
    return None


def missing_files(
    module: ControlModule, files: tuple[str, ...], folder: str | os.PathLike | None, what: str | None = None
) -> str | None:
    """Why `module` cannot run: its files (`what` names them, else their names) are not in `folder` or a folder in
    it, or no folder was named; None where they are."""
    needs = f"ControlNet module {module.label!r} needs {what or ', '.join(files)}"
    if folder is None:
        return f"{needs}: no folder named (--annotator-dir)"
    if files_folder(files, folder) is None:
        return f"{needs} in {os.fspath(folder)} or a folder in it"
    return None


def files_place(module: ControlModule, files: tuple[str, ...], folder: str | os.PathLike | None) -> Path:
    """The folder holding `module`'s files (`files_folder`); PreprocessorError saying what is missing where none does."""
    reason = missing_files(module, files, folder)
    if reason is not None:
        raise PreprocessorError(reason)
    return files_folder(files, folder)


def loaded(module: ControlModule, path: Path, load: Callable[[Path, tuple], T]) -> T:
    """`load(path, stamp)` (an lru_cache'd reader: the stamp, the file's modification time and size, keys it), a file
    that cannot be read or is not what it is named for (tensors of other shapes or ranks than the network's) as one
    PreprocessorError line naming it."""
    try:
        stat = path.stat()
        with _LOADING:  # (two threads missing the cache together would each read the file)
            return load(path, (stat.st_mtime_ns, stat.st_size))
    except (OSError, CheckpointError, ValueError, IndexError, KeyError, TypeError, RuntimeError) as e:
        raise PreprocessorError(f"ControlNet module {module.label!r}: {path.name}: {first_line(e)}") from None


def running(module: ControlModule, work: Callable[[], T]) -> T:
    """`work()`, an annotator's networks at work, one at a time: the server's threads would each hold a large torch
    network's activations, and an OpenCV network holds its input and outputs. What they refuse, as one
    PreprocessorError line naming the module: torch (an allocation, a size the network cannot take), OpenCV (a file of
    other inputs or outputs, an image it cannot take), the work's own refusals (no face, keypoints no transform fits)."""
    try:
        with _RUNNING:
            return work()
    except RuntimeError as e:
        raise PreprocessorError(
            f"ControlNet module {module.label!r} cannot run on this image: {first_line(e)}"
        ) from None
    except cv2.error as e:
        raise PreprocessorError(f"ControlNet module {module.label!r}: {last_line(e)}") from None
    except (PreprocessorError, np.linalg.LinAlgError) as e:
        raise PreprocessorError(f"ControlNet module {module.label!r}: {e}") from None


def one_file_reason(files: dict[str, str]) -> Callable[[ControlModule, str | os.PathLike | None], str | None]:
    """A runner's `unavailable_reason(module, folder)` where each module needs one file, `files[module.name]`."""
    return lambda module, folder: missing_files(module, (files[module.name],), folder)


def network_loader(build: Callable[[dict], T], keep: int = 1) -> Callable[[Path, tuple], T]:
    """A `load(path, stamp)` for `loaded`: `build` of the file's tensors (read without running its code), on the CPU
    in float32; the last `keep` networks kept (by the file's path, modification time and size)."""

    @functools.lru_cache(maxsize=keep)
    def load(path: Path, stamp: tuple) -> T:
        return build(read_state_dict(path)[0])

    return load


def one_file_runner(
    module: ControlModule,
    folder: str | os.PathLike | None,
    files: dict[str, str],
    load: Callable[[Path, tuple], T],
    work: Callable[[np.ndarray, T, float, float], np.ndarray],
    after: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Callable[..., np.ndarray]:
    """The `run(image RGB, resolution, threshold_a, threshold_b, rng)` of a module whose network is one file
    (`files[module.name]`, found as `files_place` finds it, read by `load` as `loaded` reads it): `work(padded,
    network, threshold_a, threshold_b)` on the image scaled and padded as the extension's `resize_image_with_pad` does
    (`resize_with_pad`), under `running`; its map cut back, then `after` it where given. PreprocessorError that says
    what is missing where the file is not there."""
    name = files[module.name]
    path = files_place(module, (name,), folder) / name

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        network = loaded(module, path, load)
        padded, cut_back = resize_with_pad(image, resolution)
        found = cut_back(running(module, lambda: work(padded, network, threshold_a, threshold_b)))
        return found if after is None else after(found)

    return run


def last_line(error: Exception) -> str:
    """An OpenCV error's last line (the one that says what went wrong)."""
    return [line for line in str(error).splitlines() if line.strip()][-1]


@functools.lru_cache(maxsize=8)
def onnx_network(path: Path, stamp: tuple):
    """An ONNX network read by OpenCV, run on the CPU (PreprocessorError for a file it cannot read)."""
    try:
        net = cv2.dnn.readNetFromONNX(os.fspath(path))
    except cv2.error as error:
        raise PreprocessorError(f"{path.name} is not an ONNX network OpenCV can read: {last_line(error)}") from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def onnx_networks(paths: list[Path]) -> list:
    """`onnx_network` of each path (PreprocessorError for one that cannot be read)."""
    try:
        return [onnx_network(path, (path.stat().st_mtime_ns, path.stat().st_size)) for path in paths]
    except OSError as e:
        raise PreprocessorError(f"{e.filename and Path(e.filename).name}: {e.strerror}") from None
