"""InsightFace's face analysis (`pipeline/face_analysis.py`) and instant_id_face_keypoints: against insightface 0.7's
`SCRFD.detect`, `face_align.norm_crop` (scikit-image's `_umeyama` inside), `ArcFaceONNX.get_feat` and the extension's
`InsightFaceModel` (`pick_largest_face`, `run_model`, `run_model_instant_id` with `draw_kps`) written out here, on ONNX
networks of SCRFD's and ArcFace's inputs and outputs built with the onnx package (the real files are not to be had
offline); and the similarity transform against one known by construction."""

import math

import cv2
import numpy as np
import pytest
from onnx import helper

from latent_diffusion.pipeline import face_analysis
from latent_diffusion.pipeline.control_modules import PreprocessorError, find_module
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_pose_estimation import read, write_onnx
from test_pose_estimation import ref_nms as ref_yolox_nms
from test_preprocessors import ref_resize_image_with_pad

# ---- networks of SCRFD's and ArcFace's shapes ------------------------------------------------------------------------


def scrfd_like(path, seed=0):
    """(1, 3, 640, 640) -> per stride 8, 16, 32 (two anchors a cell): scores (1, n, 1), box distances (1, n, 4),
    keypoint offsets (1, n, 10), from 1×1 convolutions of each cell's mean colour: faces where the image is bright."""
    rng = np.random.RandomState(seed)
    nodes, weights, outputs = [], {}, {}
    for s in (8, 16, 32):
        n = 2 * (640 // s) ** 2
        kps_bias = np.tile([-1.2, -1.0, 1.2, -1.0, 0.0, 0.2, -0.9, 1.1, 0.9, 1.1], 2)
        for kind, width, bias, scale in (("score", 1, -6.0, 0.0), ("bbox", 4, 2.5, 0.05), ("kps", 10, kps_bias, 0.05)):
            w = rng.randn(2 * width, 3, 1, 1) * scale
            if kind == "score":
                w += 4.0
            weights |= {
                f"w{kind}{s}": w.astype(np.float32),
                f"b{kind}{s}": (np.zeros(2 * width) + bias).astype(np.float32),
            }
            weights[f"shape{kind}{s}"] = np.array([1, n, width])
            last = f"{kind}_conv{s}"
            nodes += [
                helper.make_node("AveragePool", ["images"], [f"pool{kind}{s}"], kernel_shape=[s, s], strides=[s, s]),
                helper.make_node("Conv", [f"pool{kind}{s}", f"w{kind}{s}", f"b{kind}{s}"], [last]),
            ]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"sig{s}"]))
                last = f"sig{s}"
            nodes += [
                helper.make_node("Transpose", [last], [f"t{kind}{s}"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"t{kind}{s}", f"shape{kind}{s}"], [f"{kind}_{s}"]),
            ]
            outputs[f"{kind}_{s}"] = [1, n, width]
    return write_onnx(path, nodes, weights, [1, 3, 640, 640], outputs)


def arcface_like(path, seed=1):
    """(1, 3, 112, 112) -> (1, 512), linear in the crop's 16×16 cells' mean colours."""
    rng = np.random.RandomState(seed)
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pool"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["embedding"]),
    ]
    weights = {"w": (rng.randn(147, 512) * 0.3).astype(np.float32), "b": (rng.randn(512) * 0.1).astype(np.float32)}
    return write_onnx(path, nodes, weights, [1, 3, 112, 112], {"embedding": [1, 512]})


def packs(folder):
    """The extension's layout: insightface/models/antelopev2 and buffalo_l."""
    for pack, (detector, recognizer) in face_analysis.PACKS.items():
        place = folder / "insightface" / "models" / pack
        place.mkdir(parents=True)
        scrfd_like(place / detector, seed=0 if pack == "antelopev2" else 3)  # (the packs' detectors differ)
        arcface_like(place / recognizer, seed=1 if pack == "antelopev2" else 2)
    return folder


def portrait(height=300, width=420):
    """Two bright faces of different sizes (the larger at the right) on a dark ground."""
    image = np.full((height, width, 3), 25, np.uint8)
    cv2.ellipse(image, (110, 140), (45, 60), 0, 0, 360, (235, 215, 200), -1)
    cv2.ellipse(image, (300, 150), (70, 90), 10, 0, 360, (240, 225, 205), -1)
    cv2.circle(image, (285, 130), 8, (20, 20, 20), -1)
    return image


# ---- insightface and the extension, written out ----------------------------------------------------------------------


def ref_nms(dets, thresh=0.4):  # SCRFD.nms: YOLOX's demo nms (written out in test_pose_estimation) on dets[:, 4]
    return ref_yolox_nms(dets[:, :4], dets[:, 4], thresh)


def ref_scrfd_detect(net, img, input_size=(640, 640), threshold=0.5):
    """SCRFD.detect (max_num=0) with SCRFD.forward; the outputs by name, as onnxruntime lists them."""
    im_ratio = float(img.shape[0]) / img.shape[1]
    model_ratio = float(input_size[1]) / input_size[0]
    if im_ratio > model_ratio:
        new_height = input_size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = input_size[0]
        new_height = int(new_width * im_ratio)
    det_scale = float(new_height) / img.shape[0]
    resized_img = cv2.resize(img, (new_width, new_height))
    det_img = np.zeros((input_size[1], input_size[0], 3), dtype=np.uint8)
    det_img[:new_height, :new_width, :] = resized_img
    blob = cv2.dnn.blobFromImage(det_img, 1.0 / 128.0, input_size, (127.5, 127.5, 127.5), swapRB=True)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    net.setInput(blob)
    net_outs = [o[0] for o in net.forward(names)]
    scores_list, bboxes_list, kpss_list = [], [], []
    for idx, stride in enumerate([8, 16, 32]):
        scores = net_outs[idx]
        bbox_preds = net_outs[idx + 3] * stride
        kps_preds = net_outs[idx + 6] * stride
        height, width = blob.shape[2] // stride, blob.shape[3] // stride
        anchor_centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
        anchor_centers = (anchor_centers * stride).reshape((-1, 2))
        anchor_centers = np.stack([anchor_centers] * 2, axis=1).reshape((-1, 2))
        pos_inds = np.where(scores >= threshold)[0]
        p = anchor_centers
        bboxes = np.stack([p[:, 0] - bbox_preds[:, 0], p[:, 1] - bbox_preds[:, 1],
                           p[:, 0] + bbox_preds[:, 2], p[:, 1] + bbox_preds[:, 3]], axis=-1)  # fmt: skip
        preds = []
        for i in range(0, kps_preds.shape[1], 2):
            preds += [p[:, i % 2] + kps_preds[:, i], p[:, i % 2 + 1] + kps_preds[:, i + 1]]
        kpss = np.stack(preds, axis=-1).reshape((-1, 5, 2))
        scores_list.append(scores[pos_inds])
        bboxes_list.append(bboxes[pos_inds])
        kpss_list.append(kpss[pos_inds])
    scores = np.vstack(scores_list)
    order = scores.ravel().argsort()[::-1]
    bboxes = np.vstack(bboxes_list) / det_scale
    kpss = np.vstack(kpss_list) / det_scale
    pre_det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)[order, :]
    keep = ref_nms(pre_det)
    return pre_det[keep, :], kpss[order, :, :][keep, :, :]


def ref_umeyama(src, dst, estimate_scale=True):  # skimage.transform._geometric._umeyama
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    A = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(A) < 0:
        d[dim - 1] = -1
    T = np.eye(dim + 1, dtype=np.float64)
    U, S, V = np.linalg.svd(A)
    rank = np.linalg.matrix_rank(A)
    if rank == 0:
        return np.nan * T
    elif rank == dim - 1:
        if np.linalg.det(U) * np.linalg.det(V) > 0:
            T[:dim, :dim] = U @ V
        else:
            s = d[dim - 1]
            d[dim - 1] = -1
            T[:dim, :dim] = U @ np.diag(d) @ V
            d[dim - 1] = s
    else:
        T[:dim, :dim] = U @ np.diag(d) @ V
    scale = 1.0 / src_demean.var(axis=0).sum() * (S @ d) if estimate_scale else 1.0
    T[:dim, dim] = dst_mean - scale * (T[:dim, :dim] @ src_mean.T)
    T[:dim, :dim] *= scale
    return T


ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


def ref_embedding(net, img, kps):
    """ArcFaceONNX.get: norm_crop(img, kps, 112) (estimate_norm, mode arcface), get_feat (mean 127.5, std 127.5)."""
    M = ref_umeyama(kps, ARCFACE_DST * 1.0)[0:2, :]
    aimg = cv2.warpAffine(img, M, (112, 112), borderValue=0.0)
    blob = cv2.dnn.blobFromImages([aimg], 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    net.setInput(blob)
    return net.forward(net.getUnconnectedOutLayersNames())[0].flatten()


def ref_pick_largest_face(faces):
    return sorted(faces, key=lambda x: (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1]))[-1]


def ref_faces(detector, recognizer, img):  # FaceAnalysis.get, detection and recognition
    dets, kpss = ref_scrfd_detect(detector, img)
    faces = []
    for i in range(dets.shape[0]):
        face = {"bbox": dets[i, 0:4], "det_score": dets[i, 4], "kps": kpss[i]}
        if recognizer is not None:
            face["embedding"] = ref_embedding(recognizer, img, face["kps"])
        faces.append(face)
    return faces


def ref_draw_kps(img, kps, color_list=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))):
    stickwidth = 4
    limbSeq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    h, w, _ = img.shape
    out_img = np.zeros([h, w, 3])
    for index in limbSeq:
        color = color_list[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle), 0, 360, 1
        )
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, color_list[idx_kp], -1)
    return out_img.astype(np.uint8)


def ref_instant_id(detector, recognizer, img, res, return_keypoints):  # run_model_instant_id
    img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    img, remove_pad = ref_resize_image_with_pad(img, res)
    face_info = ref_pick_largest_face(ref_faces(detector, recognizer, img))
    return remove_pad(ref_draw_kps(img, face_info["kps"])) if return_keypoints else face_info["embedding"]


# ---- the tests -------------------------------------------------------------------------------------------------------


def test_faces_are_scrfds(tmp_path):
    net = read(scrfd_like(tmp_path / "det.onnx"))
    image = cv2.cvtColor(portrait(), cv2.COLOR_RGB2BGR)
    dets, kpss = ref_scrfd_detect(net, image)
    faces = face_analysis.detect_faces(net, image)
    assert len(faces) == len(dets) >= 2
    for face, det, kps in zip(faces, dets, kpss):
        np.testing.assert_array_equal(face.box, det[:4])
        np.testing.assert_array_equal(face.keypoints, kps)
        assert face.score == det[4]


def test_the_similarity_transform_is_umeyamas_and_exact_on_a_similarity():
    rng = np.random.RandomState(0)
    angle, scale, shift = 0.3, 1.7, np.array([12.5, -4.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    source = rng.uniform(0, 100, (5, 2))
    target = source @ (scale * rotation).T + shift
    found = face_analysis.similarity_transform(source, target)
    np.testing.assert_allclose(found, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    noisy = source + rng.normal(0, 2, source.shape)
    np.testing.assert_array_equal(face_analysis.similarity_transform(noisy, target), ref_umeyama(noisy, target)[:2])


@pytest.mark.parametrize("res", [256, 384])
def test_instant_id_keypoints_are_the_extensions(tmp_path, res):
    folder = packs(tmp_path)
    found = detect(portrait(), "instant_id_face_keypoints", res, annotator_folder=folder)
    place = folder / "insightface" / "models" / "antelopev2"
    expected = ref_instant_id(read(place / "scrfd_10g_bnkps.onnx"), None, portrait(), res, return_keypoints=True)
    np.testing.assert_array_equal(found, expected)
    assert {tuple(c) for c in found.reshape(-1, 3)} >= {(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 0)}


def test_identities_are_insightfaces(tmp_path):
    """FaceID's normed identity of the image as it is (buffalo_l), InstantID's raw one at the processor resolution
    (antelopev2). Our warp is estimated in float64 from float32 keypoints as scikit-image does: equal to 1e-5."""
    folder = packs(tmp_path)
    for module, pack, instant in (
        ("ip-adapter_face_id", "buffalo_l", False),
        ("instant_id_face_embedding", "antelopev2", True),
    ):
        place = folder / "insightface" / "models" / pack
        nets = [read(place / name) for name in face_analysis.PACKS[pack]]
        found = face_analysis.identity(find_module(module), folder, portrait(), 512)
        if instant:
            expected = ref_instant_id(*nets, portrait(), 512, return_keypoints=False)
        else:
            face = ref_pick_largest_face(ref_faces(*nets, cv2.cvtColor(portrait(), cv2.COLOR_RGB2BGR)))
            expected = face["embedding"] / np.linalg.norm(face["embedding"])
        assert found.shape == (512,)
        np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5)
        assert np.linalg.norm(found) == pytest.approx(1.0) or instant  # fmt: skip


def test_the_modules_need_their_files_and_a_face(tmp_path):
    with pytest.raises(PreprocessorError, match=r"needs InsightFace's antelopev2 \(scrfd_10g_bnkps.onnx\): no folder"):
        detect(portrait(), "instant_id_face_keypoints")
    folder = packs(tmp_path)
    assert module_list(annotator_folder=folder)["module_detail"]["instant_id_face_keypoints"]["available"]
    with pytest.raises(PreprocessorError, match="^ControlNet module 'instant_id_face_keypoints': InsightFace found no"):
        detect(np.full((100, 120, 3), 10, np.uint8), "instant_id_face_keypoints", 256, annotator_folder=folder)
    with pytest.raises(PreprocessorError, match="makes no map: it gives an IP-Adapter an identity"):
        detect(portrait(), "ip-adapter_face_id", annotator_folder=folder)
    (folder / "insightface" / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"not a network")
    with pytest.raises(PreprocessorError, match="^scrfd_10g_bnkps.onnx is not an ONNX network OpenCV can read: "):
        detect(portrait(), "instant_id_face_keypoints", annotator_folder=folder)
