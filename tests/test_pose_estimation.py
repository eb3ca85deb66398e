"""dw_openpose_full and animal_openpose (`pose_estimation.py`, `pose_drawing.py`): against the ControlNet extension's
`cv_ox_det.py`, `cv_ox_pose.py`, `wholebody.py`, `animalpose.py` and `openpose/util.py` written out here, on ONNX
networks of YOLOX's and RTMPose's inputs and outputs built with the onnx package (the real files are not to be had
offline); and one case worked by hand: a known box and known SimCC peaks give the points the arithmetic says."""

import colorsys
import math

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from latent_diffusion.pipeline import pose_estimation
from latent_diffusion.pipeline.control_modules import PreprocessorError, find_module
from latent_diffusion.pipeline.pose_drawing import BODY_COLORS
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_preprocessors import ref_resize_image_with_pad

STRIDES = (8, 16, 32)


def write_onnx(path, nodes, weights, input_shape, outputs):
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)]
    results = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()]
    initializers = [numpy_helper.from_array(np.asarray(value), name) for name, value in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, results, initializers))
    model.opset_import[0].version, model.ir_version = 13, 8
    path.write_bytes(model.SerializeToString())
    return path


def random_yolox(path, rng, person_bias=2.0):
    """YOLOX-L's input and output, (1, 3, 640, 640) -> (1, 8400, 85), from a 1×1 convolution of each stride's mean
    colour: boxes of 120×200 pixels or so, objectness high only where the image is bright, then class scores."""
    nodes, weights, levels = [], {}, []
    for s in STRIDES:
        box_bias = np.float32([0.5, 0.5, math.log(160 / s), math.log(320 / s)])
        class_bias = rng.uniform(-3, 1, 80).astype(np.float32)
        class_bias[0] = person_bias
        weights |= {
            f"wb{s}": (rng.randn(4, 3, 1, 1) * 0.0005).astype(np.float32),
            f"bb{s}": box_bias,
            f"ws{s}": np.concatenate([np.full((1, 3, 1, 1), 0.03), rng.randn(80, 3, 1, 1) * 0.01]).astype(np.float32),
            f"bs{s}": np.concatenate([[-14.0], class_bias]).astype(np.float32),
            f"shape{s}": np.array([1, 85, (640 // s) ** 2]),
        }
        nodes += [
            helper.make_node("AveragePool", ["images"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Conv", [f"pool{s}", f"wb{s}", f"bb{s}"], [f"box{s}"]),
            helper.make_node("Conv", [f"pool{s}", f"ws{s}", f"bs{s}"], [f"logit{s}"]),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"score{s}"]),
            helper.make_node("Concat", [f"box{s}", f"score{s}"], [f"all{s}"], axis=1),
            helper.make_node("Reshape", [f"all{s}", f"shape{s}"], [f"flat{s}"]),
        ]
        levels.append(f"flat{s}")
    nodes += [
        helper.make_node("Concat", levels, ["anchors"], axis=2),
        helper.make_node("Transpose", ["anchors"], ["output"], perm=[0, 2, 1]),
    ]
    return write_onnx(path, nodes, weights, [1, 3, 640, 640], {"output": [1, 8400, 85]})


def constant_onnx(path, input_shape, outputs):
    """A network whose outputs are the given arrays whatever its input (the input's mean times 0 added)."""
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1)]
    weights = {"zero": np.zeros(1, np.float32)}
    for name, value in outputs.items():
        weights |= {f"{name}_value": value.astype(np.float32), f"{name}_shape": np.ones(value.ndim, np.int64)}
        nodes += [
            helper.make_node("Reshape", ["mean", f"{name}_shape"], [f"{name}_mean"]),
            helper.make_node("Mul", [f"{name}_mean", "zero"], [f"{name}_zero"]),
            helper.make_node("Add", [f"{name}_zero", f"{name}_value"], [name]),
        ]
    return write_onnx(path, nodes, weights, input_shape, {name: list(v.shape) for name, v in outputs.items()})


def random_simcc(path, rng, points, size):
    """RTMPose's input and outputs, (1, 3, h, w) -> (1, K, 2w), (1, K, 2h), linear in the crop's mean colour; each
    point's peak offset so that some score under 0.3 (absent) and some at or under 0."""
    w, h = size
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pool"]), helper.make_node("Flatten", ["pool"], ["f"])]
    weights = {}
    for axis, bins in (("x", 2 * w), ("y", 2 * h)):
        offset = np.repeat(rng.uniform(-1.0, 0.6, points), bins)
        weights |= {
            f"w{axis}": (rng.randn(3, points * bins) * 0.3).astype(np.float32),
            f"b{axis}": (rng.randn(points * bins) * 0.1 + offset).astype(np.float32),
            f"s{axis}": np.array([1, points, bins]),
        }
        nodes += [
            helper.make_node("Gemm", ["f", f"w{axis}", f"b{axis}"], [f"g{axis}"]),
            helper.make_node("Reshape", [f"g{axis}", f"s{axis}"], [f"simcc_{axis}"]),
        ]
    outputs = {"simcc_x": [1, points, 2 * w], "simcc_y": [1, points, 2 * h]}
    return write_onnx(path, nodes, weights, [1, 3, h, w], outputs)


def figures(width=300, height=220):
    """A dark picture with three bright figures of different colours, and a dim one."""
    image = np.full((height, width, 3), 20, np.uint8)
    image[30:190, 20:80] = (230, 200, 180)
    image[50:210, 120:170] = (250, 250, 90)
    image[10:120, 200:290] = (200, 240, 250)
    image[150:215, 210:280] = 90
    return image


# ---- the extension's code, written out ---------------------------------------------------------------------------


def ref_nms(boxes, scores, nms_thr):
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr <= nms_thr)[0]
        order = order[inds + 1]
    return keep


def ref_multiclass_nms(boxes, scores, nms_thr, score_thr):
    final_dets = []
    for cls_ind in range(scores.shape[1]):
        cls_scores = scores[:, cls_ind]
        valid_score_mask = cls_scores > score_thr
        if valid_score_mask.sum() == 0:
            continue
        valid_scores = cls_scores[valid_score_mask]
        valid_boxes = boxes[valid_score_mask]
        keep = ref_nms(valid_boxes, valid_scores, nms_thr)
        if len(keep) > 0:
            cls_inds = np.ones((len(keep), 1)) * cls_ind
            final_dets.append(np.concatenate([valid_boxes[keep], valid_scores[keep, None], cls_inds], 1))
    return None if len(final_dets) == 0 else np.concatenate(final_dets, 0)


def ref_inference_detector(session, ori_img, detect_classes=(0,)):
    input_shape = (640, 640)
    padded_img = np.ones((640, 640, 3), dtype=np.uint8) * 114
    r = min(input_shape[0] / ori_img.shape[0], input_shape[1] / ori_img.shape[1])
    resized_img = cv2.resize(
        ori_img, (int(ori_img.shape[1] * r), int(ori_img.shape[0] * r)), interpolation=cv2.INTER_LINEAR
    ).astype(np.uint8)
    padded_img[: int(ori_img.shape[0] * r), : int(ori_img.shape[1] * r)] = resized_img
    img = np.ascontiguousarray(padded_img.transpose((2, 0, 1)), dtype=np.float32)
    session.setInput(img[None, :, :, :])
    outputs = session.forward(session.getUnconnectedOutLayersNames())[0]
    grids, expanded_strides = [], []
    for stride in STRIDES:
        xv, yv = np.meshgrid(np.arange(640 // stride), np.arange(640 // stride))
        grid = np.stack((xv, yv), 2).reshape(1, -1, 2)
        grids.append(grid)
        expanded_strides.append(np.full((*grid.shape[:2], 1), stride))
    grids, expanded_strides = np.concatenate(grids, 1), np.concatenate(expanded_strides, 1)
    outputs[..., :2] = (outputs[..., :2] + grids) * expanded_strides
    outputs[..., 2:4] = np.exp(outputs[..., 2:4]) * expanded_strides
    predictions = outputs[0]
    boxes = predictions[:, :4]
    scores = predictions[:, 4:5] * predictions[:, 5:]
    boxes_xyxy = np.ones_like(boxes)
    boxes_xyxy[:, 0] = boxes[:, 0] - boxes[:, 2] / 2.0
    boxes_xyxy[:, 1] = boxes[:, 1] - boxes[:, 3] / 2.0
    boxes_xyxy[:, 2] = boxes[:, 0] + boxes[:, 2] / 2.0
    boxes_xyxy[:, 3] = boxes[:, 1] + boxes[:, 3] / 2.0
    boxes_xyxy /= r
    dets = ref_multiclass_nms(boxes_xyxy, scores, nms_thr=0.45, score_thr=0.1)
    if dets is None:
        return None
    final_boxes, final_scores, final_cls_inds = dets[:, :4], dets[:, 4], dets[:, 5]
    isbbox = [i and j for (i, j) in zip(final_scores > 0.3, np.isin(final_cls_inds, detect_classes))]
    return final_boxes[isbbox]


def ref_get_warp_matrix(center, scale, output_size):
    src_w, dst_w, dst_h = scale[0], output_size[0], output_size[1]
    rot_mat = np.array([[1.0, -0.0], [0.0, 1.0]])  # np.cos(0), np.sin(0)
    src_dir = rot_mat @ np.array([0.0, src_w * -0.5])
    dst_dir = np.array([0.0, dst_w * -0.5])

    def third(a, b):
        direction = a - b
        return b + np.r_[-direction[1], direction[0]]

    src = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale * np.array((0.0, 0.0))
    src[1, :] = center + src_dir + scale * np.array((0.0, 0.0))
    src[2, :] = third(src[0, :], src[1, :])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2, :] = third(dst[0, :], dst[1, :])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def ref_inference_pose(session, out_bbox, ori_img, model_input_size=(288, 384)):
    if len(out_bbox) == 0:
        out_bbox = [[0, 0, ori_img.shape[1], ori_img.shape[0]]]
    all_key, all_score = [], []
    for x0, y0, x1, y1 in out_bbox:
        bbox = np.array([x0, y0, x1, y1])[None, :]
        bx1, by1, bx2, by2 = np.hsplit(bbox, [1, 2, 3])
        center = (np.hstack([bx1 + bx2, by1 + by2]) * 0.5)[0]
        scale = (np.hstack([bx2 - bx1, by2 - by1]) * 1.25)[0]
        w, h = model_input_size
        sw, sh = np.hsplit(scale, [1])
        scale = np.where(sw > sh * (w / h), np.hstack([sw, sw / (w / h)]), np.hstack([sh * (w / h), sh]))
        warp_mat = ref_get_warp_matrix(center, scale, (w, h))
        img = cv2.warpAffine(ori_img, warp_mat, (int(w), int(h)), flags=cv2.INTER_LINEAR)
        img = (img - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
        session.setInput(img.transpose(2, 0, 1)[None, :, :, :])  # float64, as the extension hands it to OpenCV
        simcc_x, simcc_y = session.forward(session.getUnconnectedOutLayersNames())
        n, k, _ = simcc_x.shape
        simcc_x, simcc_y = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
        locs = np.stack((np.argmax(simcc_x, axis=1), np.argmax(simcc_y, axis=1)), axis=-1).astype(np.float32)
        max_val_x, max_val_y = np.amax(simcc_x, axis=1), np.amax(simcc_y, axis=1)
        mask = max_val_x > max_val_y
        max_val_x[mask] = max_val_y[mask]
        vals = max_val_x
        locs[vals <= 0.0] = -1
        keypoints, scores = locs.reshape(n, k, 2) / 2.0, vals.reshape(n, k)
        keypoints = keypoints / model_input_size * scale + center - scale / 2
        all_key.append(keypoints[0])
        all_score.append(scores[0])
    return np.array(all_key), np.array(all_score)


def ref_wholebody(det, pose, ori_img):
    det_result = ref_inference_detector(det, ori_img)
    if det_result is None:
        return None
    keypoints, scores = ref_inference_pose(pose, det_result, ori_img)
    keypoints_info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(keypoints_info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(keypoints_info[:, 5, 2:4] > 0.3, keypoints_info[:, 6, 2:4] > 0.3).astype(int)
    new_keypoints_info = np.insert(keypoints_info, 17, neck, axis=1)
    mmpose_idx = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
    openpose_idx = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    new_keypoints_info[:, openpose_idx] = new_keypoints_info[:, mmpose_idx]
    return new_keypoints_info


def ref_format_result(keypoints_info):
    def part(points):
        keypoints = [(x, y, score) if score >= 0.3 else None for x, y, score in points]
        return None if all(k is None for k in keypoints) else keypoints

    poses = []
    for instance in [] if keypoints_info is None else keypoints_info:
        body = part(instance[:18]) or ([None] * 18)
        face = part(instance[24:92])
        if face is not None:
            face.append(body[14])
            face.append(body[15])
        poses.append((body, part(instance[92:113]), part(instance[113:134]), face))
    return poses


def ref_draw_bodypose(canvas, keypoints):
    limb_seq = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13]]
    limb_seq += [[13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0]]
    colors += [[0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255]]
    colors += [[170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    for (k1_index, k2_index), color in zip(limb_seq, colors):
        keypoint1, keypoint2 = keypoints[k1_index - 1], keypoints[k2_index - 1]
        if keypoint1 is None or keypoint2 is None:
            continue
        Y = np.array([keypoint1[0], keypoint2[0]]) * 1.0
        X = np.array([keypoint1[1], keypoint2[1]]) * 1.0
        mX, mY = np.mean(X), np.mean(Y)
        length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
        polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for keypoint, color in zip(keypoints, colors):
        if keypoint is not None:
            cv2.circle(canvas, (int(keypoint[0]), int(keypoint[1])), 4, color, thickness=-1)


def ref_draw_handpose(canvas, keypoints):
    if not keypoints:
        return
    edges = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11], [11, 12]]
    edges += [[0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
    for ie, (e1, e2) in enumerate(edges):
        k1, k2 = keypoints[e1], keypoints[e2]
        if k1 is None or k2 is None:
            continue
        x1, y1, x2, y2 = int(k1[0]), int(k1[1]), int(k2[0]), int(k2[1])
        if x1 > 0.01 and y1 > 0.01 and x2 > 0.01 and y2 > 0.01:
            color = np.array(colorsys.hsv_to_rgb(ie / float(len(edges)), 1.0, 1.0)) * 255  # matplotlib's hsv_to_rgb
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for keypoint in keypoints:
        if keypoint is not None and int(keypoint[0]) > 0.01 and int(keypoint[1]) > 0.01:
            cv2.circle(canvas, (int(keypoint[0]), int(keypoint[1])), 4, (0, 0, 255), thickness=-1)


def ref_draw_facepose(canvas, keypoints):
    for keypoint in keypoints or []:
        if keypoint is not None and int(keypoint[0]) > 0.01 and int(keypoint[1]) > 0.01:
            cv2.circle(canvas, (int(keypoint[0]), int(keypoint[1])), 3, (255, 255, 255), thickness=-1)


def ref_dw_openpose_full(det, pose, image, res):
    img, remove_pad = ref_resize_image_with_pad(image, res)
    poses = ref_format_result(ref_wholebody(det, pose, img.copy()))
    canvas = np.zeros(shape=img.shape, dtype=np.uint8)
    for body, left_hand, right_hand, face in poses:
        ref_draw_bodypose(canvas, body)
        ref_draw_handpose(canvas, left_hand)
        ref_draw_handpose(canvas, right_hand)
        ref_draw_facepose(canvas, face)
    return remove_pad(canvas), poses


def ref_animal_openpose(det, pose, image, res):
    img, remove_pad = ref_resize_image_with_pad(image, res)
    det_result = ref_inference_detector(det, img, detect_classes=list(range(14, 23 + 1)))
    animals = []
    if det_result is not None and det_result.shape[0] != 0:
        keypoint_sets, scores = ref_inference_pose(pose, det_result, img, (256, 256))
        for idx, keypoints in enumerate(keypoint_sets):
            score = scores[idx, ..., None]
            score[score > 1.0] = 1.0
            score[score < 0.0] = 0.0
            animals.append(np.concatenate((keypoints, score), axis=-1).tolist())
    pairs = [(1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5), (5, 15)]
    pairs += [(15, 16), (16, 17), (5, 12), (12, 13), (13, 14)]
    colors = [(255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255)]
    colors += [(0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0)]
    colors += [(255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150)]
    canvas = np.zeros(shape=img.shape, dtype=np.uint8)
    for animal in animals:
        for ind, (i, j) in enumerate(pairs):
            p1, p2 = animal[i - 1], animal[j - 1]
            cv2.line(canvas, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colors[ind], 5)
    return remove_pad(canvas), animals


def ref_encode_poses_as_json(poses, animals, canvas_height, canvas_width):
    def compress_keypoints(keypoints):
        if not keypoints:
            return None
        return [
            value
            for keypoint in keypoints
            for value in ([float(keypoint[0]), float(keypoint[1]), 1.0] if keypoint is not None else [0.0, 0.0, 0.0])
        ]

    return {
        "people": [
            {
                "pose_keypoints_2d": compress_keypoints(body),
                "face_keypoints_2d": compress_keypoints(face),
                "hand_left_keypoints_2d": compress_keypoints(left_hand),
                "hand_right_keypoints_2d": compress_keypoints(right_hand),
            }
            for body, left_hand, right_hand, face in poses
        ],
        "animals": [compress_keypoints(animal) for animal in animals],
        "canvas_height": canvas_height,
        "canvas_width": canvas_width,
    }


# ---- the tests -----------------------------------------------------------------------------------------------------


def networks(folder, person_bias=2.0, seed=0):
    rng = np.random.RandomState(seed)
    folder.mkdir(exist_ok=True)
    random_yolox(folder / pose_estimation.DETECTOR_FILE, rng, person_bias)
    random_simcc(folder / pose_estimation.WHOLEBODY_FILE, rng, 133, pose_estimation.WHOLEBODY_SIZE)
    random_simcc(folder / pose_estimation.ANIMAL_FILE, rng, 17, pose_estimation.ANIMAL_SIZE)
    return folder


def read(path):
    return cv2.dnn.readNetFromONNX(str(path))


def as_tuples(part):
    return part and [point and tuple(point) for point in part]


@pytest.mark.parametrize("res", [256, 384])
def test_dw_openpose_full_is_the_extensions(tmp_path, res):
    folder = networks(tmp_path / "openpose")  # the extension's annotator/downloads/openpose, inside the folder named
    image = figures()
    found_poses = []
    found = detect(image, "dw_openpose_full", res, annotator_folder=tmp_path, poses=found_poses)
    files = [folder / name for name in pose_estimation.FILES["dw_openpose_full"]]
    expected, poses = ref_dw_openpose_full(read(files[0]), read(files[1]), image, res)
    np.testing.assert_array_equal(found, expected)
    padded_size = ref_resize_image_with_pad(image, res)[0].shape[:2]
    assert found_poses == [ref_encode_poses_as_json(poses, [], *padded_size)]  # /controlnet/detect's "poses"
    # the keypoints too, to the last bit, and the case is not trivial: several people, points present and absent
    padded, _ = ref_resize_image_with_pad(image, res)
    people = pose_estimation.find_people(read(files[0]), read(files[1]), padded)
    for person, (body, left, right, face) in zip(people, poses, strict=True):
        assert [as_tuples(part) for part in person] == [as_tuples(part) for part in (body, left, right, face)]
    drawn = [p for person in people for part in person for p in part or [] if p is not None]
    assert len(people) >= 2 and 0 < len(drawn) < sum(18 + 21 + 21 + 70 for _ in people)
    assert (found > 0).mean() > 0.01


def test_with_no_person_but_other_boxes_dwpose_reads_the_whole_image(tmp_path):
    """YOLOX finds boxes of other classes only: the extension's DWPose then takes the whole image as one person."""
    folder = networks(tmp_path, person_bias=-20.0)
    files = [folder / name for name in pose_estimation.FILES["dw_openpose_full"]]
    image = ref_resize_image_with_pad(figures(), 256)[0]
    assert pose_estimation.detect_boxes(read(files[0]), image, pose_estimation.PERSON).shape == (0, 4)
    people = pose_estimation.find_people(read(files[0]), read(files[1]), image)
    assert len(people) == 1 and len(ref_format_result(ref_wholebody(read(files[0]), read(files[1]), image))) == 1
    np.testing.assert_array_equal(
        detect(figures(), "dw_openpose_full", 256, annotator_folder=folder),
        ref_dw_openpose_full(read(files[0]), read(files[1]), figures(), 256)[0],
    )


def test_animal_openpose_is_the_extensions(tmp_path):
    folder = networks(tmp_path)
    image = figures()
    found_poses = []
    found = detect(image, "animal_openpose", 320, annotator_folder=folder, poses=found_poses)
    files = [folder / name for name in pose_estimation.FILES["animal_openpose"]]
    expected, animals = ref_animal_openpose(read(files[0]), read(files[1]), image, 320)
    np.testing.assert_array_equal(found, expected)
    padded_size = ref_resize_image_with_pad(image, 320)[0].shape[:2]
    assert found_poses == [ref_encode_poses_as_json([], animals, *padded_size)]
    assert len(animals) >= 1 and (found > 0).mean() > 0.01


def test_a_known_box_and_known_peaks_give_the_points_the_arithmetic_says(tmp_path):
    """One anchor fires: a person box centred at (160, 128) of 80×160 pixels in a 320×256 image (YOLOX sees it
    doubled). SimCC peaks at known bins place the nose and the shoulders; the neck is their mean; the rest is absent.
    The box, enlarged 1.25× to 100×200 and widened to 3:4, is 150×200 around (160, 128): a bin b of the 576 (x)
    is at 160 − 75 + b/2 · 150/288, of the 768 (y) at 128 − 100 + b/2 · 200/384."""
    anchors = np.zeros((1, 8400, 85), np.float32)
    cell = 6400 + 1600 + 7 * 20 + 9  # stride 32, row 7, column 9: its centre (9 + 1, 7 + 1) · 32 = (320, 256)
    anchors[0, cell, :6] = [1.0, 1.0, math.log(160 / 32), math.log(320 / 32), 1.0, 0.9]
    constant_onnx(tmp_path / pose_estimation.DETECTOR_FILE, [1, 3, 640, 640], {"output": anchors})
    simcc_x, simcc_y = np.full((1, 133, 576), 0.1, np.float32), np.full((1, 133, 768), 0.1, np.float32)
    bins = {0: (288, 100), 5: (400, 300), 6: (176, 300)}  # COCO: nose, left shoulder, right shoulder
    for point, (bx, by) in bins.items():
        simcc_x[0, point, bx], simcc_y[0, point, by] = 0.9, 0.8
    constant_onnx(tmp_path / pose_estimation.WHOLEBODY_FILE, [1, 3, 384, 288], {"simcc_x": simcc_x, "simcc_y": simcc_y})

    image = np.zeros((256, 320, 3), np.uint8)
    detector, pose_net = (read(tmp_path / name) for name in pose_estimation.FILES["dw_openpose_full"])
    np.testing.assert_allclose(
        pose_estimation.detect_boxes(detector, image, pose_estimation.PERSON), [[120, 48, 200, 208]], atol=1e-4
    )
    [person] = pose_estimation.find_people(detector, pose_net, image)

    def place(bx, by):
        return 160 - 75 + bx / 2 * 150 / 288, 128 - 100 + by / 2 * 200 / 384

    nose, left, right = (place(*bins[p]) for p in (0, 5, 6))
    neck = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2)
    # OpenPose's order: 0 nose, 1 neck, 2 right shoulder, 5 left shoulder; scores: the lower peak, 0.8; the neck's 1
    expected = {0: (*nose, 0.8), 1: (*neck, 1.0), 2: (*right, 0.8), 5: (*left, 0.8)}
    assert {i for i, p in enumerate(person.body) if p is not None} == set(expected)
    for i, point in expected.items():
        np.testing.assert_allclose(tuple(person.body[i]), point, atol=1e-3)
    assert person.left_hand is person.right_hand is person.face is None

    drawn = detect(image, "dw_openpose_full", 256, annotator_folder=tmp_path)
    for i, (x, y, _) in expected.items():  # each point's disc in its colour, over the limbs
        assert tuple(drawn[int(y), int(x)]) == BODY_COLORS[i]
    # the limbs, at 60 % of their colours (OpenPose's limbs 13, 1 and 2): neck to nose, to each shoulder
    for (a, b), color in {(1, 0): (0, 0, 153), (1, 2): (153, 0, 0), (1, 5): (153, 51, 0)}.items():
        middle = [(p + q) / 2 for p, q in zip(expected[a][:2], expected[b][:2])]
        assert tuple(drawn[int(middle[1]), int(middle[0])]) == color
    assert drawn[120:].max() == 0 and drawn[:, :120].max() == 0  # nothing beyond them


def test_the_modules_need_their_files_and_say_so(tmp_path):
    image = figures()
    with pytest.raises(PreprocessorError, match=r"'dw_openpose_full' needs yolox_l.onnx, dw-ll_ucoco_384.onnx: no f"):
        detect(image, "dw_openpose_full")
    (tmp_path / pose_estimation.DETECTOR_FILE).write_bytes(b"not a network")
    with pytest.raises(PreprocessorError, match="'animal_openpose' needs yolox_l.onnx, rtmpose-m_simcc-ap10k"):
        detect(image, "animal_openpose", annotator_folder=tmp_path)
    (tmp_path / pose_estimation.WHOLEBODY_FILE).write_bytes(b"not a network either")
    assert module_list(annotator_folder=tmp_path)["module_detail"]["dw_openpose_full"]["available"]
    with pytest.raises(PreprocessorError, match="^yolox_l.onnx is not an ONNX network OpenCV can read: ") as error:
        detect(image, "dw_openpose_full", annotator_folder=tmp_path)
    assert "\n" not in str(error.value)
    # a network of another kind under the right name: one line too
    networks(tmp_path / "other")
    (tmp_path / "other" / pose_estimation.WHOLEBODY_FILE).write_bytes(
        (tmp_path / "other" / pose_estimation.DETECTOR_FILE).read_bytes()
    )
    with pytest.raises(PreprocessorError, match="^ControlNet module 'dw_openpose_full': ") as error:
        detect(image, "dw_openpose_full", annotator_folder=tmp_path / "other")
    assert "\n" not in str(error.value) and find_module("dw_openpose_full").name == "dw_openpose_full"
