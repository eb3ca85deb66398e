"""InsightFace's face analysis, as the ControlNet extension's InstantID and IP-Adapter FaceID modules run it
(1.1.455: `legacy/processor.py` `InsightFaceModel`; insightface 0.7's `FaceAnalysis`, `SCRFD`, `ArcFaceONNX`,
`face_align.norm_crop`), on its ONNX files run by OpenCV's own reader (`cv2.dnn`, as the extension runs DWPose): a
graph of operators, nothing in it executed as code. The packs are InsightFace's `antelopev2` (InstantID) and
`buffalo_l` (FaceID), found in the annotator folder, in a folder in it, or as the extension keeps them
(`insightface/models/<pack>/`). Nothing is downloaded.

1. **Faces** (SCRFD, `scrfd_10g_bnkps.onnx` / `det_10g.onnx`): the BGR image scaled (bilinear) into 640×640 at the
   top left, the rest black, normalized as (x − 127.5)/128 in RGB; at strides 8, 16 and 32 two anchors a cell each
   give a score, a box (distances to its four sides) and five keypoints (eyes, nose, mouth corners), all times the
   stride from the cell's corner; anchors scoring at least 0.5 are kept, NMS'd (IoU 0.4), scaled back.
2. **Identity** (ArcFace, `glintr100.onnx` / `w600k_r50.onnx`): the face warped to 112×112 by the similarity that
   takes its keypoints nearest to ArcFace's five (Umeyama's least squares, as scikit-image estimates it), as
   (x − 127.5)/127.5 in RGB, to a 512-vector. FaceID uses it normed; InstantID as it is.

The largest face (by its box's area) is the one used, as the extension picks it. A unit's mask is not read for the
identity (the extension's face modules take none). InsightFace reads ArcFace's statistics off the graph's first
operators (0 and 1 for graphs that normalize themselves); OpenCV does not show them, and 127.5 and 127.5, those of
both packs' recognizers, are assumed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from .annotator_files import files_folder, onnx_networks, running
from .control_modules import ControlModule, PreprocessorError
from .detector_images import greedy_nms, resize_with_pad

PACKS = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
DETECTOR_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2  # per cell, at each stride
SCORE_THRESHOLD, NMS_IOU = 0.5, 0.4
# ArcFace's five keypoints in its 112×112 crops (insightface `face_align.arcface_dst`)
ARCFACE_KEYPOINTS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


class Face(NamedTuple):
    box: np.ndarray  # (4,) x0, y0, x1, y1
    score: float
    keypoints: np.ndarray  # (5, 2): eyes, nose, mouth corners


# ---- SCRFD: faces ----------------------------------------------------------------------------------------------------


def _outputs_by_kind(outputs: list[np.ndarray]) -> dict[int, list[np.ndarray]]:
    """SCRFD's nine outputs by their width (1 scores, 4 boxes, 10 keypoints), each list from stride 8 to 32 (the most
    anchors first). OpenCV lists a graph's outputs in its own order, so they are told apart by their shapes."""
    found: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
    for out in outputs:
        out = out.reshape(-1, out.shape[-1])  # (1, n, c) or (n, c) -> (n, c)
        if out.shape[-1] not in found:
            raise PreprocessorError(f"the face detector gives an output of {out.shape}, not SCRFD's")
        found[out.shape[-1]].append(out)
    cells = [ANCHORS * (DETECTOR_SIZE // s) ** 2 for s in STRIDES]
    for kind, outs in found.items():
        outs.sort(key=len, reverse=True)
        if [len(o) for o in outs] != cells:
            raise PreprocessorError(f"the face detector's outputs are not SCRFD's ({kind}-wide: {len(outs)})")
    return found


def detect_faces(net, image: np.ndarray) -> list[Face]:
    """SCRFD on a BGR uint8 image (`SCRFD.detect`, det_size 640, threshold 0.5), best first."""
    h, w = image.shape[:2]
    if h / w > 1:  # (insightface: the image's aspect against the square input's)
        new_h, new_w = DETECTOR_SIZE, int(DETECTOR_SIZE / (h / w))
    else:
        new_w, new_h = DETECTOR_SIZE, int(DETECTOR_SIZE * (h / w))
    scale = new_h / h
    canvas = np.zeros((DETECTOR_SIZE, DETECTOR_SIZE, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    blob = cv2.dnn.blobFromImage(
        canvas, 1.0 / 128.0, (DETECTOR_SIZE, DETECTOR_SIZE), (127.5, 127.5, 127.5), swapRB=True
    )
    net.setInput(blob)
    outputs = _outputs_by_kind(list(net.forward(net.getUnconnectedOutLayersNames())))
    scores, boxes, points = [], [], []
    for i, stride in enumerate(STRIDES):
        side = DETECTOR_SIZE // stride
        ys, xs = np.mgrid[:side, :side]
        corners = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
        corners = np.repeat(corners, ANCHORS, axis=0)  # (n, 2): each cell's corner, once per anchor
        kept = np.where(outputs[1][i] >= SCORE_THRESHOLD)[0]
        distances, offsets = outputs[4][i][kept] * stride, outputs[10][i][kept] * stride
        c = corners[kept]
        scores.append(outputs[1][i][kept])
        boxes.append(np.stack([c[:, 0] - distances[:, 0], c[:, 1] - distances[:, 1],
                               c[:, 0] + distances[:, 2], c[:, 1] + distances[:, 3]], axis=-1))  # fmt: skip
        points.append((np.tile(c, 5) + offsets).reshape(-1, 5, 2))
    scores = np.vstack(scores)
    order = scores.ravel().argsort()[::-1]
    found = np.hstack([np.vstack(boxes) / scale, scores]).astype(np.float32, copy=False)[order]
    points = (np.vstack(points) / scale)[order]
    keep = greedy_nms(found[:, :4], found[:, 4], NMS_IOU)
    return [Face(found[i, :4], float(found[i, 4]), points[i]) for i in keep]


def largest_face(faces: list[Face]) -> Face:
    """The face of the largest box (the last of equals, as the extension's stable sort leaves it)."""
    if not faces:
        raise PreprocessorError("InsightFace found no face in the image")
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    return faces[max(range(len(faces)), key=lambda i: (areas[i], i))]


# ---- ArcFace: identity ----------------------------------------------------------------------------------------------


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) rotation, uniform scale and shift taking `source` points nearest (least squares) to `target`
    (Umeyama 1991, as scikit-image's `SimilarityTransform.estimate`)."""
    source, target = source.astype(np.float64), target.astype(np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1
    u, s, v = np.linalg.svd(covariance)
    rank = np.linalg.matrix_rank(covariance)
    if rank == 0:
        raise PreprocessorError("InsightFace: the face's keypoints are all one point")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(v) > 0:
        rotation = u @ v
    elif rank == 1:
        rotation = u @ np.diag([signs[0], -1.0]) @ v
    else:
        rotation = u @ np.diag(signs) @ v
    scale = 1.0 / source_centred.var(axis=0).sum() * (s @ signs)
    return np.hstack([scale * rotation, (target_mean - scale * rotation @ source_mean)[:, None]])


def aligned_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """`face_align.norm_crop`: the face warped so its keypoints fall on ArcFace's (scaled to `size`, a multiple of
    112), the rest black."""
    warp = similarity_transform(keypoints, ARCFACE_KEYPOINTS * (size / 112.0))
    return cv2.warpAffine(image, warp, (size, size), borderValue=0.0)


def face_embedding(net, image: np.ndarray, face: Face) -> np.ndarray:
    """ArcFace's (512,) float32 identity of `face` in the BGR image (not normed: InstantID's `embedding`)."""
    crop = aligned_face(image, face.keypoints)
    net.setInput(cv2.dnn.blobFromImages([crop], 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True))
    embedding = net.forward(net.getUnconnectedOutLayersNames())[0].reshape(-1)
    if embedding.shape != (512,) or not np.isfinite(embedding).all():
        raise PreprocessorError(f"the face recognizer gives {embedding.shape} numbers, not ArcFace's 512 finite ones")
    return embedding


# ---- InstantID's keypoint map ---------------------------------------------------------------------------------------

KEYPOINT_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def draw_keypoints(height: int, width: int, keypoints: np.ndarray) -> np.ndarray:
    """InstantID's `draw_kps`: eyes and mouth corners joined to the nose by ellipses at 60 % of the first end's
    colour, then a disc of radius 10 on each keypoint: (H, W, 3) uint8."""
    canvas = np.zeros((height, width, 3))
    for first in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = keypoints[first], keypoints[2]
        length = ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int(np.mean([x0, x1])), int(np.mean([y0, y1])))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLORS[first])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(keypoints, KEYPOINT_COLORS):
        cv2.circle(canvas, (int(x), int(y)), 10, color, -1)
    return canvas


# ---- the modules -----------------------------------------------------------------------------------------------------

PACK_OF_MODULE = {
    "instant_id_face_keypoints": "antelopev2",
    "instant_id_face_embedding": "antelopev2",
    "ip-adapter_face_id": "buffalo_l",
    "ip-adapter_face_id_plus": "buffalo_l",
}
MAP_MODULES = ("instant_id_face_keypoints",)  # the others give an identity for an IP-Adapter, not a map


def pack_folder(pack: str, folder: str | os.PathLike | None, detector_only: bool = False) -> Path | None:
    """Where a pack's files are: the folder, a folder in it, or `insightface/models/<pack>/` in it."""
    files = PACKS[pack][:1] if detector_only else PACKS[pack]
    if folder is None:
        return None
    return files_folder(files, folder) or files_folder(files, Path(folder) / "insightface" / "models")


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    pack = PACK_OF_MODULE[module.name]
    files = PACKS[pack][:1] if module.name in MAP_MODULES else PACKS[pack]
    needs = f"ControlNet module {module.label!r} needs InsightFace's {pack} ({', '.join(files)})"
    if folder is None:
        return f"{needs}: no folder named (--annotator-dir)"
    if pack_folder(pack, folder, module.name in MAP_MODULES) is None:
        return f"{needs} in {os.fspath(folder)}, a folder in it or insightface/models/{pack}"
    return None


def _networks(pack: str, folder, count: int) -> list:
    place = pack_folder(pack, folder, detector_only=count == 1)
    paths = [place / name for name in PACKS[pack][:count]]
    return onnx_networks(paths)


def identity(module: ControlModule, folder: str | os.PathLike | None, image: np.ndarray, resolution: int) -> np.ndarray:
    """The (512,) identity of the largest face in an RGB image: FaceID's normed, from the image as it is; InstantID's
    as it is, from the image at the processor resolution (padded to multiples of 64)."""
    reason = unavailable_reason(module, folder)
    if reason is not None:
        raise PreprocessorError(reason)
    detector, recognizer = _networks(PACK_OF_MODULE[module.name], folder, 2)
    instant_id = module.name.startswith("instant_id")

    def work() -> np.ndarray:
        bgr = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2BGR)
        bgr = resize_with_pad(bgr, resolution)[0] if instant_id else bgr
        return face_embedding(recognizer, bgr, largest_face(detect_faces(detector, bgr)))

    embedding = running(module, work)
    return embedding if instant_id else embedding / np.linalg.norm(embedding)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """instant_id_face_keypoints' `run(image RGB, resolution, ...) -> (H, W, 3) uint8`: the largest face's keypoints
    drawn, found in the BGR image at the processor resolution (padded to multiples of 64, cut back)."""
    reason = unavailable_reason(module, folder)
    if reason is not None:
        raise PreprocessorError(reason)
    if module.name not in MAP_MODULES:
        raise PreprocessorError(f"ControlNet module {module.label!r} makes no map: it gives an IP-Adapter an identity")

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None) -> np.ndarray:
        [detector] = _networks(PACK_OF_MODULE[module.name], folder, 1)

        def work() -> np.ndarray:
            padded, cut_back = resize_with_pad(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), resolution)
            return cut_back(draw_keypoints(*padded.shape[:2], largest_face(detect_faces(detector, padded)).keypoints))

        return running(module, work)

    return run
