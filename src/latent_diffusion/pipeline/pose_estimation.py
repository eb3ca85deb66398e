"""dw_openpose_full and animal_openpose: people's whole-body poses (DWPose) and animals' poses (RTMPose on AP-10K)
found in two ONNX networks, as the ControlNet extension finds them (1.1.455: `annotator/openpose/cv_ox_det.py`,
`cv_ox_pose.py`, `wholebody.py`, `animalpose.py`), run by OpenCV's own ONNX reader (`cv2.dnn`), as there; OpenCV is
already a dependency, and an ONNX file is a graph of operators: nothing in it is executed as code.

1. **Who is where**: YOLOX-L (`yolox_l.onnx`) sees the image scaled into 640×640 (top-left, padded with 114); its
   8400 anchors (strides 8, 16, 32) are decoded into boxes, NMS'd per class (IoU 0.45, score 0.1), and the boxes of a
   person (COCO class 0), or of an animal (classes 14-23), scoring above 0.3 are kept.
2. **The keypoints in each box**: the box, enlarged 1.25× and widened to the network's aspect, is warped to its
   input (288×384 for `dw-ll_ucoco_384.onnx`, 133 COCO-WholeBody points; 256×256 for the AP-10K RTMPose-m, 17), and
   the SimCC outputs' maxima (x and y at half-pixel bins) are each keypoint's place; the lower of the two maxima is
   its score.
3. **OpenPose's order** (people): a neck is added between the shoulders, the body reordered into OpenPose's 18
   points; a point scoring under 0.3 is absent. `pose_drawing.py` draws them.

As in the extension, the image goes in as RGB (DWPose was trained on BGR; the extension passes RGB) at the processor
resolution, padded to a multiple of 64; the keypoints are in that image's pixels. Where YOLOX finds boxes of other
classes or weak people only, DWPose still looks at the whole image as one box (`cv_ox_pose.preprocess`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import cv2
import numpy as np

from .annotator_files import files_place, missing_files, onnx_networks, running
from .control_modules import ControlModule, PreprocessorError
from .detector_images import greedy_nms, resize_with_pad
from .pose_drawing import draw_animals, draw_people

DETECTOR_FILE = "yolox_l.onnx"
WHOLEBODY_FILE = "dw-ll_ucoco_384.onnx"
ANIMAL_FILE = "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx"
FILES = {"dw_openpose_full": (DETECTOR_FILE, WHOLEBODY_FILE), "animal_openpose": (DETECTOR_FILE, ANIMAL_FILE)}

DETECTOR_SIZE = 640  # YOLOX's square input
WHOLEBODY_SIZE = (288, 384)  # (w, h) of DWPose's input
ANIMAL_SIZE = (256, 256)
PERSON, ANIMALS = (
    (0,),
    tuple(range(14, 24)),
)  # COCO: person; bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])  # RTMPose's, on RGB 0..255
KEYPOINT_THRESHOLD = 0.3
# OpenPose's 18 body points taken from COCO's 17 and the added neck (index 17): `wholebody.py`'s two index lists
OPENPOSE_FROM_COCO = {
    1: 17,
    2: 6,
    3: 8,
    4: 10,
    6: 7,
    7: 9,
    8: 12,
    9: 14,
    10: 16,
    12: 13,
    13: 15,
    14: 2,
    15: 1,
    16: 4,
    17: 3,
}


class Keypoint(NamedTuple):
    x: float
    y: float
    score: float = 1.0


Keypoints = list[Keypoint | None]  # one part's points, None where a point is absent


class Person(NamedTuple):
    """One person's OpenPose parts: 18 body points; 21 per hand, 70 face points (68 and the eyes), None where the
    whole part is absent."""

    body: Keypoints
    left_hand: Keypoints | None
    right_hand: Keypoints | None
    face: Keypoints | None


# ---- YOLOX: boxes --------------------------------------------------------------------------------------------------


def _letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image scaled (bilinear) to fit 640×640 at the top left, the rest 114: (1, 3, 640, 640) float32, scale."""
    h, w = image.shape[:2]
    ratio = min(DETECTOR_SIZE / h, DETECTOR_SIZE / w)
    padded = np.full((DETECTOR_SIZE, DETECTOR_SIZE, 3), 114, np.uint8)
    size = (int(w * ratio), int(h * ratio))
    padded[: size[1], : size[0]] = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def _anchor_boxes(raw: np.ndarray) -> np.ndarray:
    """YOLOX's (8400, 85) output decoded: centre (offset + cell) · stride, size exp(·) · stride; the rest as it is."""
    cells, strides = [], []
    for stride in (8, 16, 32):
        side = DETECTOR_SIZE // stride
        ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        cells.append(np.stack([xs, ys], -1).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    cells, strides = np.concatenate(cells), np.concatenate(strides)
    decoded = raw.copy()  # float32, as the extension's in-place arithmetic keeps it
    decoded[:, :2] = (raw[:, :2] + cells) * strides
    decoded[:, 2:4] = np.exp(raw[:, 2:4]) * strides
    return decoded


def detect_boxes(net, image: np.ndarray, classes: tuple[int, ...]) -> np.ndarray | None:
    """(n, 4) boxes (x0, y0, x1, y1 in the image's pixels) of `classes` scoring over 0.3, class by class and best
    first; None where no box of any class scores 0.1 (`cv_ox_det.inference_detector`). NMS is per class, so running
    it for `classes` only gives the extension's boxes."""
    letterboxed, ratio = _letterbox(image)
    net.setInput(letterboxed)
    raw = net.forward(net.getUnconnectedOutLayersNames())[0]
    if raw.shape[:2] != (1, 8400) or raw.ndim != 3 or raw.shape[2] <= 5 + max(classes):
        raise PreprocessorError(f"the detector gives {raw.shape}, not YOLOX's (1, 8400, 85)")
    predictions = _anchor_boxes(raw[0])
    centre, size = predictions[:, :2], predictions[:, 2:4]
    boxes = np.concatenate([centre - size / 2.0, centre + size / 2.0], axis=1) / ratio
    scores = predictions[:, 4:5] * predictions[:, 5:]  # objectness × class
    if not (scores > 0.1).any():  # no box of any class: the extension's "None"
        return None
    found = []
    for c in classes:
        valid = scores[:, c] > 0.1
        keep = greedy_nms(boxes[valid], scores[valid, c], 0.45)
        found += [box for box, score in zip(boxes[valid][keep], scores[valid, c][keep]) if float(score) > 0.3]
    return np.array(found, np.float64).reshape(-1, 4)


# ---- RTMPose (SimCC): keypoints in a box ---------------------------------------------------------------------------


def _box_crop(image: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The box, enlarged 1.25× and widened to the input's aspect, warped to `size` (w, h): the crop (h, w, 3) uint8,
    the box's centre and its (w, h) scale (`cv_ox_pose.top_down_affine`)."""
    centre = (box[:2] + box[2:]) * 0.5
    scale = (box[2:] - box[:2]) * 1.25
    aspect = size[0] / size[1]
    scale = np.array([scale[0], scale[0] / aspect] if scale[0] > scale[1] * aspect else [scale[1] * aspect, scale[1]])
    # three points and their images: the centre, the top middle and the top left of a square of side scale[0],
    # the third point found in float32 from the first two, as `get_warp_matrix` finds it
    half, (w, h) = scale[0] * 0.5, size
    middle, top = np.float32(centre), np.float32(centre + np.array([0.0, -half]))
    source = np.stack([middle, top, top + np.float32([top[1] - middle[1], middle[0] - top[0]])])
    target = np.float32([[w * 0.5, h * 0.5], [w * 0.5, h * 0.5 - w * 0.5], [0.0, h * 0.5 - w * 0.5]])
    warp = cv2.getAffineTransform(source, target)
    return cv2.warpAffine(image, warp, size, flags=cv2.INTER_LINEAR), centre, scale


def estimate_keypoints(
    net, image: np.ndarray, boxes: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Each box's keypoints in the image's pixels and their scores: (n, K, 2), (n, K). No box: the whole image is
    one, as the extension's `cv_ox_pose.preprocess` does."""
    if len(boxes) == 0:
        boxes = np.array([[0, 0, image.shape[1], image.shape[0]]])
    places, scores = [], []
    for box in boxes:
        crop, centre, scale = _box_crop(image, np.asarray(box, np.float64), size)
        net.setInput(((crop - MEAN) / STD).astype(np.float32).transpose(2, 0, 1)[None])
        outputs = net.forward(net.getUnconnectedOutLayersNames())  # (1, K, 2w), (1, K, 2h)
        if len(outputs) != 2 or outputs[0].ndim != 3 or outputs[0].shape[:2] != outputs[1].shape[:2]:
            raise PreprocessorError(f"the pose network gives {[o.shape for o in outputs]}, not SimCC's x and y")
        simcc_x, simcc_y = outputs
        best_x, best_y = simcc_x[0].max(1), simcc_y[0].max(1)
        bins = np.stack([simcc_x[0].argmax(1), simcc_y[0].argmax(1)], -1).astype(np.float32)
        score = np.minimum(best_x, best_y)
        bins[score <= 0] = -1
        places.append(bins / 2.0 / size * scale + centre - scale / 2)  # SimCC's bins are half pixels of the crop
        scores.append(score)
    return np.array(places), np.array(scores)


# ---- from keypoints to poses ---------------------------------------------------------------------------------------


def _openpose_order(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, 133, 3) COCO-WholeBody points → (n, 134, 3): a neck (the shoulders' mean, score 1 where both shoulders
    score over 0.3, else 0) inserted at 17 and the body's points moved to OpenPose's order (`wholebody.py`)."""
    points = np.concatenate([keypoints, scores[..., None]], axis=-1)
    neck = points[:, [5, 6]].mean(axis=1)
    neck[:, 2] = np.logical_and(points[:, 5, 2] > KEYPOINT_THRESHOLD, points[:, 6, 2] > KEYPOINT_THRESHOLD)
    points = np.insert(points, 17, neck, axis=1)
    ordered = points.copy()
    ordered[:, list(OPENPOSE_FROM_COCO)] = points[:, list(OPENPOSE_FROM_COCO.values())]
    return ordered


def _part(points: np.ndarray) -> Keypoints | None:
    """One part's points, each absent under 0.3; None where all are."""
    part = [Keypoint(x, y, score) if score >= KEYPOINT_THRESHOLD else None for x, y, score in points.tolist()]
    return None if all(point is None for point in part) else part


def people(points: np.ndarray) -> list[Person]:
    """`Wholebody.format_result`: body 0-17, face 24-91 (with the body's eyes appended, as OpenPose's 70), left hand
    92-112, right hand 113-133."""
    found = []
    for person in points:
        body = _part(person[:18]) or [None] * 18
        face = _part(person[24:92])
        found.append(Person(body, _part(person[92:113]), _part(person[113:134]), face and face + body[14:16]))
    return found


def _points(net, image: np.ndarray, boxes: np.ndarray, size: tuple[int, int], count: int):
    """`estimate_keypoints`, from a network that gives `count` points (133 COCO-WholeBody, 17 AP-10K)."""
    keypoints, scores = estimate_keypoints(net, image, boxes, size)
    if keypoints.shape[1] != count:
        raise PreprocessorError(f"the pose network gives {keypoints.shape[1]} points, not {count}")
    return keypoints, scores


def find_people(detector, pose_net, image: np.ndarray) -> list[Person]:
    """DWPose on an RGB uint8 image."""
    boxes = detect_boxes(detector, image, PERSON)
    if boxes is None:
        return []
    return people(_openpose_order(*_points(pose_net, image, boxes, WHOLEBODY_SIZE, 133)))


def find_animals(detector, pose_net, image: np.ndarray) -> list[Keypoints]:
    """AP-10K's 17 points of each animal, every point kept, its score clipped to 0..1 (`animalpose.py`)."""
    boxes = detect_boxes(detector, image, ANIMALS)
    if boxes is None or len(boxes) == 0:
        return []
    keypoints, scores = _points(pose_net, image, boxes, ANIMAL_SIZE, 17)
    points = np.concatenate([keypoints, scores.clip(0.0, 1.0)[..., None]], axis=-1)
    return [[Keypoint(*point) for point in animal] for animal in points.tolist()]


def _flat(points: Keypoints | None) -> list[float] | None:
    """OpenPose's JSON form of one part: x, y, 1 per point present, 0, 0, 0 per point absent; None for no part."""
    if not points:
        return None
    return [v for p in points for v in ([float(p.x), float(p.y), 1.0] if p is not None else [0.0, 0.0, 0.0])]


def pose_json(found_people: list[Person], animals: list[Keypoints], height: int, width: int) -> dict:
    """The poses in OpenPose's JSON output format as the extension encodes them (`encode_poses_as_json`), in the
    pixels of the padded image the detectors saw, whose size is the canvas's."""
    parts = ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", "face_keypoints_2d")
    return {
        "people": [dict(zip(parts, map(_flat, (p.body, p.left_hand, p.right_hand, p.face)))) for p in found_people],
        "animals": [_flat(animal) for animal in animals],
        "canvas_height": height,
        "canvas_width": width,
    }


# ---- the modules -----------------------------------------------------------------------------------------------------


def unavailable_reason(module: ControlModule, folder: str | os.PathLike | None) -> str | None:
    """Why `module` cannot run with the annotator folder `folder`; None where it can."""
    return missing_files(module, FILES[module.name], folder)


def annotator(module: ControlModule, folder: str | os.PathLike | None):
    """The module's `run(image RGB, resolution, threshold_a, threshold_b, rng) -> HWC uint8 pose map`, drawn on black
    at the image's size (PreprocessorError that says what is missing where it cannot run)."""
    place = files_place(module, FILES[module.name], folder)
    paths = [place / name for name in FILES[module.name]]

    def run(image: np.ndarray, resolution: int, threshold_a=None, threshold_b=None, rng=None, poses=None):
        """`poses`, a list, gets the poses found as the extension's `/controlnet/detect` sends them."""
        detector, pose_net = onnx_networks(paths)
        padded, cut_back = resize_with_pad(image, resolution)
        h, w = padded.shape[:2]
        found_people, animals = [], []
        if module.name == "animal_openpose":
            animals = running(module, lambda: find_animals(detector, pose_net, padded))
        else:
            found_people = running(module, lambda: find_people(detector, pose_net, padded))
        if poses is not None:
            poses.append(pose_json(found_people, animals, h, w))
        drawn = draw_people(found_people, h, w) if found_people or not animals else draw_animals(animals, h, w)
        return cut_back(drawn)

    return run
