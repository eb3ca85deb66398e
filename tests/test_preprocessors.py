"""The ControlNet preprocessors and control-image preparation against the web UI's ControlNet extension
(Mikubill/sd-webui-controlnet 1.1.455), whose code is restated below in a few lines each (cited by file and
function) and run beside ours with OpenCV: pixel for pixel for the uint8 maps. Tiny drawn images; nothing
downloaded."""

import importlib.machinery
import importlib.util
import sys
import types
from typing import ClassVar

import cv2
import numpy as np
import pytest
import torch

from latent_diffusion.pipeline import control_images, control_modules, preprocessors
from latent_diffusion.pipeline.control_images import control_hint, inpaint_protocol, prepare_control
from latent_diffusion.pipeline.control_modules import MODULES, PreprocessorError, find_module
from latent_diffusion.pipeline.preprocessors import detect

from conftest import FakeDetector

# ---- the extension, restated -------------------------------------------------------------------------------------


def ref_hwc3(x):  # annotator/util.py HWC3
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color, alpha = x[:, :, 0:3].astype(np.float32), x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def ref_pad64(x):  # scripts/utils.py pad64
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def ref_resize_image_with_pad(img, resolution):  # scripts/utils.py resize_image_with_pad
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    padded = np.pad(img, [[0, ref_pad64(h_target)], [0, ref_pad64(w_target)], [0, 0]], mode="edge")
    return padded, lambda x: np.ascontiguousarray(x[:h_target, :w_target].copy())


def ref_canny(img, res, a, b):  # model_free_preprocessors.py PreprocessorCanny.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    return remove_pad(cv2.cvtColor(cv2.Canny(img, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def ref_xdog(img, res, a, b):  # model_free_preprocessors.py PreprocessorScribbleXdog.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return remove_pad(result)


def ref_blur(img, res, a, b):  # model_free_preprocessors.py PreprocessorBlurGaussian.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(a))


def ref_threshold(img, res, a, b):  # legacy/processor.py threshold
    img, remove_pad = ref_resize_image_with_pad(ref_hwc3(img), res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > a] = 255
    return remove_pad(result)


def ref_tile_resample(img, res, a, b):  # legacy/processor.py tile_resample
    img = ref_hwc3(img)
    if a < 1.1:
        return img
    h, w = int(float(img.shape[0]) / float(a)), int(float(img.shape[1]) / float(a))
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def ref_lineart_standard(img, res, a, b):  # legacy/processor.py lineart_standard
    img, remove_pad = ref_resize_image_with_pad(img, res)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return ref_hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def ref_recolor(code, channel):  # legacy/processor.py recolor_luminance / recolor_intensity
    def run(img, res, a, b):
        result = cv2.cvtColor(ref_hwc3(img), code)[:, :, channel].astype(np.float32) / 255.0
        result = result**a
        return cv2.cvtColor((result * 255.0).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)

    return run


def ref_color(img, res, a, b):  # annotator/color apply_color (cv2_resize_shortest_edge)
    h, w = img.shape[:2]
    new_h, new_w = (res, round(w / h * res)) if h < w else (round(h / w * res), res)
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    small = cv2.resize(img, (new_w // 64, new_h // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (new_w, new_h), interpolation=cv2.INTER_NEAREST)


def ref_make_noise_disk(h, w, c, f):  # annotator/util.py make_noise_disk: NumPy's global generator
    noise = np.random.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, c))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None] if c == 1 else noise


def ref_shuffle(img, res, seed):  # controlnet.py set_numpy_seed, then PreprocessorShuffle / ContentShuffleDetector
    img, remove_pad = ref_resize_image_with_pad(img, res)
    img = remove_pad(img)
    h, w, _ = img.shape
    state = np.random.get_state()
    np.random.seed(seed)
    x = ref_make_noise_disk(h, w, 1, 256) * float(w - 1)
    y = ref_make_noise_disk(h, w, 1, 256) * float(h - 1)
    np.random.set_state(state)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def ref_nake_nms(x):  # scripts/lvminthin.py nake_nms
    y = np.zeros_like(x)
    lines = [[[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]]]
    lines += [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]]
    for f in lines:
        np.putmask(y, cv2.dilate(x, kernel=np.array(f, np.uint8)) == x, x)
    return y


def ref_kernels(raw):  # scripts/lvminthin.py lvmin_kernels / lvmin_prunings
    return [np.rot90(np.array(x, np.int32), k=k, axes=(0, 1)) for k in range(4) for x in raw]


REF_THIN = ref_kernels([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
REF_PRUNE = ref_kernels([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])


def ref_thin_one_time(x, kernels):  # scripts/lvminthin.py remove_pattern / thin_one_time
    is_done = True
    for k in kernels:
        objects = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, k) > 127)
        x[objects] = 0
        is_done = is_done and objects[0].shape[0] == 0
    return x, is_done


def ref_lvmin_thin(x, prunings=True):  # scripts/lvminthin.py lvmin_thin
    for _ in range(32):
        x, is_done = ref_thin_one_time(x, REF_THIN)
        if is_done:
            break
    if prunings:
        x, _ = ref_thin_one_time(x, REF_PRUNE)
    return x


def ref_high_quality_resize(x, size):  # scripts/controlnet.py detectmap_proc.high_quality_resize
    inpaint_mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        inpaint_mask, x = x[:, :, 3], x[:, :, 0:3]
    if x.shape[0] != size[1] or x.shape[1] != size[0]:
        smaller = (size[0] * size[1]) < (x.shape[0] * x.shape[1])
        bigger = (size[0] * size[1]) > (x.shape[0] * x.shape[1])
        rows = x.reshape(-1, x.shape[2])
        rows = rows[np.lexsort(rows.T)]  # utils.get_unique_axis0
        unique_color_count = 1 + int(np.any(rows[:-1] != rows[1:], axis=-1).sum())
        is_one_pixel_edge = is_binary = False
        if unique_color_count == 2:
            is_binary = np.min(x) < 16 and np.max(x) > 240
            if is_binary:
                xc = cv2.erode(x, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                xc = cv2.dilate(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                is_one_pixel_edge = np.where(xc < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
        if 2 < unique_color_count < 200:
            interpolation = cv2.INTER_NEAREST
        elif smaller:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        y = cv2.resize(x, size, interpolation=interpolation)
        if inpaint_mask is not None:
            inpaint_mask = cv2.resize(inpaint_mask, size, interpolation=interpolation)
        if is_binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if is_one_pixel_edge:
                y = ref_nake_nms(y)
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = ref_lvmin_thin(y, prunings=bigger)
            else:
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
    else:
        y = x
    if inpaint_mask is not None:
        inpaint_mask = (inpaint_mask > 127).astype(np.float32) * 255.0
        y = np.concatenate([y, inpaint_mask[:, :, None].clip(0, 255).astype(np.uint8)], axis=2)
    return y


def ref_detectmap_proc(detected_map, module, resize_mode, h, w):  # scripts/controlnet.py Script.detectmap_proc
    detected_map = detected_map.astype(np.float32) if "inpaint" in module else ref_hwc3(detected_map)
    if resize_mode == "Just Resize":
        return ref_high_quality_resize(detected_map, (w, h))
    old_h, old_w, _ = detected_map.shape
    k0, k1 = float(h) / float(old_h), float(w) / float(old_w)
    if resize_mode == "Resize and Fill":
        k = min(k0, k1)
        m = detected_map
        borders = np.concatenate([m[0, :, :], m[-1, :, :], m[:, 0, :], m[:, -1, :]], axis=0)
        border_color = np.median(borders, axis=0).astype(detected_map.dtype)
        if len(border_color) == 4:
            border_color[3] = 255
        background = np.tile(border_color[None, None], [h, w, 1])
        m = ref_high_quality_resize(m, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        new_h, new_w, _ = m.shape
        pad_h, pad_w = max(0, (h - new_h) // 2), max(0, (w - new_w) // 2)
        background[pad_h : pad_h + new_h, pad_w : pad_w + new_w] = m
        return background
    k = max(k0, k1)
    m = ref_high_quality_resize(detected_map, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w, _ = m.shape
    pad_h, pad_w = max(0, (new_h - h) // 2), max(0, (new_w - w) // 2)
    return m[pad_h : pad_h + h, pad_w : pad_w + w]


def ref_hint(detected_map):  # controlnet.py get_pytorch_control, then hook.py's "ControlNet inpaint protocol"
    y = torch.from_numpy(np.ascontiguousarray(detected_map)).float() / 255.0
    hint = y.permute(2, 0, 1)[None]
    if hint.shape[1] == 4:
        c, m = hint[:, 0:3], (hint[:, 3:4] > 0.5).float()
        hint = c * (1 - m) - m
    return hint


def ref_pixel_perfect(raw_h, raw_w, target_h, target_w, resize_mode):  # external_code.py pixel_perfect_resolution
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    if resize_mode == "Resize and Fill":
        return int(np.round(min(k0, k1) * float(min(raw_h, raw_w))))
    return int(np.round(max(k0, k1) * float(min(raw_h, raw_w))))


# ---- drawn images ------------------------------------------------------------------------------------------------


def drawing(h=48, w=72):
    """A small picture: a ground of gradients (red across, green down: hundreds of colours), a filled circle, a
    rectangle outline and a line."""
    red = np.broadcast_to(np.linspace(40, 220, w)[None, :], (h, w))
    green = np.broadcast_to(np.linspace(30, 200, h)[:, None], (h, w))
    image = np.stack([red, green, (red + green) / 3], axis=2).astype(np.uint8)
    cv2.circle(image, (w // 2, h // 2), min(h, w) // 4, (250, 220, 30), -1)
    cv2.rectangle(image, (3, 3), (w // 3, h - 5), (10, 60, 230), 2)
    cv2.line(image, (0, h - 1), (w - 1, 0), (255, 255, 255), 1)
    return image


def edge_map(h=40, w=56):
    """A binary one-pixel edge map (Canny's), which high_quality_resize thins again after resizing."""
    return cv2.cvtColor(cv2.Canny(drawing(h, w), 100, 200), cv2.COLOR_GRAY2RGB)


def blobs(h=40, w=56):
    """A binary map of filled shapes (a thresholded picture): resized, then thresholded again without thinning."""
    out = np.zeros((h, w, 3), np.uint8)
    cv2.circle(out, (w // 3, h // 2), h // 3, (255, 255, 255), -1)
    cv2.rectangle(out, (w // 2, 4), (w - 6, h // 2), (255, 255, 255), -1)
    return out


def segments(h=40, w=56):
    """A map of five flat colours: INTER_NEAREST."""
    out = np.zeros((h, w, 3), np.uint8)
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (120, 120, 0), (9, 9, 9)]):
        out[:, i * w // 5 :] = color
    return out


# ---- the modules ---------------------------------------------------------------------------------------------------

CASES = [  # module, reference, processor_res, threshold_a, threshold_b
    ("canny", ref_canny, 96, 100, 200),
    ("canny", ref_canny, 64, 30.7, 90.2),
    ("scribble_xdog", ref_xdog, 80, 32, None),
    ("scribble_xdog", ref_xdog, 64, 5, None),
    ("blur_gaussian", ref_blur, 100, 2.5, None),
    ("threshold", ref_threshold, 72, 127, None),
    ("threshold", ref_threshold, 64, 20.5, None),
    ("tile_resample", ref_tile_resample, 512, 1.0, None),
    ("tile_resample", ref_tile_resample, 512, 2.7, None),
    ("lineart_standard", ref_lineart_standard, 96, None, None),
    ("recolor_luminance", ref_recolor(cv2.COLOR_BGR2LAB, 0), 512, 0.6, None),
    ("recolor_intensity", ref_recolor(cv2.COLOR_BGR2HSV, 2), 512, 1.7, None),
    ("color", ref_color, 128, None, None),
    ("invert", lambda img, res, a, b: 255 - ref_hwc3(img), 512, None, None),
    ("none", lambda img, res, a, b: img, 512, None, None),
    ("tile_colorfix", lambda img, res, a, b: img, 512, 8, None),
    ("tile_colorfix+sharp", lambda img, res, a, b: img, 512, 8, 1.0),
]


@pytest.mark.parametrize(("module", "ref", "res", "a", "b"), CASES)
@pytest.mark.parametrize("shape", [(48, 72), (70, 44), (100, 80)])  # (100, 80): shrunk at resolution 64
def test_weight_free_modules_equal_the_extension(module, ref, res, a, b, shape):
    image = drawing(*shape)
    defaults = find_module(module)
    ref_a = defaults.threshold_a.value if a is None else a
    expected = ref_hwc3(ref(image, res, ref_a, b))
    got = detect(image, module, res, a, b)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_canny_is_opencv_on_the_padded_image():
    """Canny runs on the image scaled and edge-padded to a multiple of 64 (the padding reaches the border pixels)."""
    image = drawing(50, 75)
    scaled = cv2.resize(image, (96, 64), interpolation=cv2.INTER_CUBIC)  # shorter side 50 -> 64
    padded = np.pad(scaled, [[0, 0], [0, 32], [0, 0]], mode="edge")  # 96 -> 128
    expected = cv2.Canny(padded, 100, 200)[:, :96]
    np.testing.assert_array_equal(detect(image, "canny", 64, 100, 200), np.stack([expected] * 3, axis=2))


def test_image_forms_go_through_hwc3():
    rgb = drawing()
    gray = rgb[:, :, 1]
    rgba = np.concatenate([rgb, np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :, None].repeat(48, 0)], 2)
    for image in (gray, gray[:, :, None], rgba):
        np.testing.assert_array_equal(preprocessors.hwc3(image), ref_hwc3(image))
        np.testing.assert_array_equal(detect(image, "canny", 64), ref_canny(ref_hwc3(image), 64, 100, 200))


@pytest.mark.parametrize("seed", [0, 12345, 2**32 - 1])
def test_shuffle_draws_the_extensions_flow(seed):
    image = drawing(40, 60)
    np.testing.assert_array_equal(detect(image, "shuffle", seed=seed), ref_shuffle(image, 512, seed))
    _, shown = control_hint(image, "shuffle", size=(40, 64), pixel_perfect=True, seed=seed)
    res = ref_pixel_perfect(40, 60, 40, 64, "Crop and Resize")
    np.testing.assert_array_equal(
        shown, ref_detectmap_proc(ref_shuffle(image, res, seed), "shuffle", "Crop and Resize", 40, 64)
    )


def test_numpy_seed_is_set_numpy_seed():
    """controlnet.py set_numpy_seed: -1 takes p.all_seeds[0]; negatives count as 0; the sum wraps at 2**32."""
    assert preprocessors.numpy_seed(42, -1, 42) == 84
    assert preprocessors.numpy_seed(-1, -1, 7) == 14
    assert preprocessors.numpy_seed(5, 3, 99) == 8
    assert preprocessors.numpy_seed(-5, 3, 99) == 3
    assert preprocessors.numpy_seed(2**32 - 1, 2, 0) == 1


# ---- preparing the control image ---------------------------------------------------------------------------------

MAPS = {  # each takes its own branch of high_quality_resize
    "photo": drawing(40, 56),  # >= 200 colours: INTER_AREA shrinking, INTER_CUBIC enlarging
    "edges": edge_map(40, 56),  # binary, one-pixel edges: NMS, Otsu, thinning (and pruning when enlarging)
    "binary": blobs(40, 56),  # binary, thick: Otsu only
    "segments": segments(40, 56),  # 3..199 colours: INTER_NEAREST
}
SIZES = [(64, 96), (96, 64), (24, 32), (32, 24), (40, 56)]  # landscape, portrait, shrinking, enlarging, same


@pytest.mark.parametrize("kind", list(MAPS))
@pytest.mark.parametrize("mode", control_images.RESIZE_MODES)
@pytest.mark.parametrize("size", SIZES)
def test_prepare_control_is_detectmap_proc(kind, mode, size):
    h, w = size
    hint, shown = prepare_control(MAPS[kind], find_module("canny"), mode, h, w)
    expected = ref_detectmap_proc(MAPS[kind], "canny", mode, h, w)
    np.testing.assert_array_equal(shown, expected)
    assert hint.shape == (1, 3, h, w) and hint.dtype == torch.float32
    torch.testing.assert_close(hint, ref_hint(expected), rtol=0, atol=0)


def test_binary_edges_stay_one_pixel_wide_when_enlarged():
    """The reason for high_quality_resize: a Canny map enlarged stays a thin black-and-white map."""
    _, shown = prepare_control(edge_map(40, 56), find_module("canny"), "Just Resize", 80, 112)
    assert set(np.unique(shown)) <= {0, 255}
    assert (shown > 0).mean() < 2.5 * (edge_map(40, 56) > 0).mean()  # twice the length, not twice the width too


@pytest.mark.parametrize(
    ("raw", "target"), [((48, 72), (512, 768)), ((72, 48), (512, 512)), ((600, 400), (512, 768)), ((33, 33), (64, 40))]
)
@pytest.mark.parametrize("mode", control_images.RESIZE_MODES)
def test_pixel_perfect_resolution(raw, target, mode):
    got = control_images.pixel_perfect_resolution(raw, *target, mode)
    assert got == ref_pixel_perfect(*raw, *target, mode)


def test_pixel_perfect_feeds_the_preprocessor():
    image = drawing(48, 72)
    for mode, size in [("Resize and Fill", (64, 64)), ("Crop and Resize", (64, 64)), ("Just Resize", (128, 96))]:
        res = ref_pixel_perfect(48, 72, *size, mode)
        _, shown = control_hint(image, "canny", size=size, resize_mode=mode, pixel_perfect=True, processor_res=4000)
        np.testing.assert_array_equal(shown, ref_detectmap_proc(ref_canny(image, res, 100, 200), "canny", mode, *size))


def test_resize_mode_from_value():
    """external_code.py resize_mode_from_value (and ControlNetUnit's aliases)."""
    values = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill", 3: "Just Resize", 7: "Just Resize"}
    values |= {"Just Resize": "Just Resize", "Scale to Fit (Inner Fit)": "Crop and Resize"}
    values |= {"Envelope (Outer Fit)": "Resize and Fill", "Inner Fit (Scale to Fit)": "Crop and Resize"}
    values |= {"Outer Fit (Shrink to Fit)": "Resize and Fill", "Resize and Fill": "Resize and Fill"}
    for value, name in values.items():
        assert control_images.resize_mode_from_value(value) == name
    for bad in (-1, "Stretch", None):
        with pytest.raises(PreprocessorError, match="resize mode"):
            control_images.resize_mode_from_value(bad)


def test_size_is_aligned_to_multiples_of_eight():
    hint, shown = control_hint(drawing(), "canny", size=(70, 101), processor_res=64)
    assert hint.shape == (1, 3, 64, 96) and shown.shape == (64, 96, 3)


# ---- inpaint -----------------------------------------------------------------------------------------------------


def inpaint_case():
    image, mask = drawing(40, 56), np.zeros((40, 56), np.uint8)
    mask[8:30, 20:44] = 255
    return image, mask


@pytest.mark.parametrize("module", ["inpaint", "inpaint_only", "inpaint_global_harmonious"])
@pytest.mark.parametrize("mode", control_images.RESIZE_MODES)
@pytest.mark.parametrize("size", [(40, 56), (64, 80), (32, 32)])
def test_inpaint_hint_is_minus_one_where_masked(module, mode, size):
    image, mask = inpaint_case()
    hint, shown = control_hint(image, module, size=size, resize_mode=mode, mask=mask)
    rgba = np.concatenate([image, mask[:, :, None]], axis=2)  # ControlNetUnit.combine_image_and_mask
    expected = ref_detectmap_proc(rgba, "inpaint", mode, *size)
    assert hint.shape[1] == 4  # the extension's used_hint_cond: RGBA, which inpaint_only's fixes read
    torch.testing.assert_close(inpaint_protocol(hint), ref_hint(expected), rtol=0, atol=0)
    shown_ref = expected.copy()  # external_code.py visualize_inpaint_mask, then postprocess's clip and uint8
    shown_ref[:, :, 3] = 255 - shown_ref[:, :, 3] // 2
    np.testing.assert_array_equal(shown, shown_ref.clip(0, 255).astype(np.uint8))
    if size == (40, 56):
        seen = inpaint_protocol(hint)
        assert (seen[0, :, mask > 127] == -1).all() and (seen[0, :, mask <= 127] >= 0).all()


def test_detect_inpaint_shows_the_mask_and_needs_one():
    image, mask = inpaint_case()
    shown = detect(image, "inpaint_only", mask=mask)
    np.testing.assert_array_equal(shown[:, :, :3], image)
    np.testing.assert_array_equal(shown[:, :, 3], 255 - mask // 2)
    with pytest.raises(PreprocessorError, match="needs a mask"):
        detect(image, "inpaint_only")


def test_a_drawn_mask_is_the_input_of_other_modules():
    """choose_input_image's from_rgba_to_input: an all-clear or all-set mask is ignored; a drawn one is the input."""
    image, mask = inpaint_case()
    plain = control_hint(image, "canny", size=(40, 56), processor_res=64)[1]
    np.testing.assert_array_equal(
        control_hint(image, "canny", size=(40, 56), processor_res=64, mask=mask * 0)[1], plain
    )
    drawn = control_hint(image, "canny", size=(40, 56), processor_res=64, mask=mask)[1]
    expected = ref_detectmap_proc(ref_canny(ref_hwc3(mask), 64, 100, 200), "canny", "Crop and Resize", 40, 56)
    np.testing.assert_array_equal(drawn, expected)


# ---- the module table --------------------------------------------------------------------------------------------


def test_module_list_order_and_aliases():
    """supported_preprocessor.py get_sorted_preprocessors: "none", then str(priority).zfill(8) + label, descending."""
    listed = preprocessors.module_list(alias_names=True)["module_list"]
    rest = sorted((m for m in MODULES.values() if m.name != "none"), key=lambda m: str(m.priority).zfill(8) + m.label)
    assert listed == ["none", *[m.label for m in reversed(rest)]]
    assert listed[:4] == ["none", "ip-adapter-auto", "tile_resample", "softedge_pidinet"]
    names = preprocessors.module_list()["module_list"]
    assert len(names) == len(listed) == 72 and "inpaint" in names and "inpaint_global_harmonious" in listed
    for name, label in [
        ("depth", "depth_midas"),
        ("hed", "softedge_hed"),
        ("pidinet", "softedge_pidinet"),
        ("invert", "invert (from white bg & black line)"),
        ("inpaint", "inpaint_global_harmonious"),
        ("lineart", "lineart_realistic"),
        ("color", "t2ia_color_grid"),
        ("canny", "canny"),
    ]:
        assert find_module(name) is find_module(label) and find_module(name).label == label
    assert set(preprocessors.DETECTORS) <= set(MODULES)


def test_module_detail_reports_the_extensions_sliders():
    """PreprocessorParameter.api_json of each shown slider; legacy modules all show the base Resolution slider."""
    detail = preprocessors.module_list()["module_detail"]
    resolution = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    canny = [
        resolution,
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    assert detail["canny"] == {"model_free": False, "sliders": canny, "available": True}
    assert detail["shuffle"]["sliders"] == detail["invert"]["sliders"] == detail["inpaint"]["sliders"] == []
    assert detail["none"]["sliders"] == [resolution]
    rate = {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}
    assert detail["tile_resample"]["sliders"] == [resolution, rate]
    assert detail["threshold"]["sliders"][1] == {
        "name": "Binarization Threshold",
        "value": 127,
        "min": 0,
        "max": 255,
        "step": 0.01,
    }
    assert detail["mlsd"]["sliders"][2]["name"] == "MLSD Distance Threshold"
    assert detail["reference_only"]["model_free"] and detail["reference_only"]["available"]  # (`reference.py`)
    assert detail["revision_clipvision"]["model_free"] and not detail["revision_clipvision"]["available"]
    for weights in (
        "depth",
        "depth_zoe",
        "openpose",
        "dw_openpose_full",
        "lineart",
        "lineart_anime",
        "hed",
        "pidinet",
        "normal_bae",
        "oneformer_ade20k",
        "mlsd",
    ):
        assert detail[weights]["available"] is False
    assert all(detail[name]["available"] for name in preprocessors.DETECTORS)


def test_slider_values():
    canny = find_module("canny")
    assert preprocessors.resolve_sliders(canny, -1, None, -1) == (512, 100, 200)
    assert preprocessors.resolve_sliders(canny, 300, 1, 255) == (300, 1, 255)
    assert preprocessors.resolve_sliders(canny, 5000, 0, 900, strict=False) == (512, 100, 200)  # the extension
    assert preprocessors.resolve_sliders(find_module("none"), 512, 64, 64) == (512, 0.5, 0.5)  # hidden: ignored
    assert preprocessors.resolve_sliders(find_module("shuffle"), 64, None, None)[0] == 512  # "Fix res to 512."


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: control_hint(drawing(), "cany", size=(64, 64)), "unknown ControlNet module 'cany'"),
        (lambda: control_hint(drawing(), "depth_midas", size=(64, 64)), "'depth_midas' needs the controlnet_aux"),
        (lambda: detect(drawing(), "seg_ofade20k"), "'seg_ofade20k' needs model weights"),
        (lambda: detect(drawing(), "canny", 512, 0, 200), r"threshold_a \(Low Threshold\) 0 is outside 1..255"),
        (lambda: detect(drawing(), "tile_resample", 512, 64), r"threshold_a \(Down Sampling Rate\) 64"),
        (lambda: detect(drawing(), "canny", 4096), r"processor_res \(Resolution\) 4096 is outside 64..2048"),
        (lambda: detect("picture.png", "canny"), "expected a uint8 numpy image"),
        (lambda: detect(drawing().astype(np.float32), "canny"), "got float32 array"),
        (lambda: detect(np.zeros((8, 8, 5), np.uint8), "canny"), r"got \(8, 8, 5\)"),
        (lambda: detect(np.zeros((0, 8, 3), np.uint8), "canny"), r"got \(0, 8, 3\)"),
        (lambda: detect(drawing(), "inpaint", mask=np.zeros((5, 5), np.uint8)), "mask size"),
        (lambda: control_hint(drawing(), "canny", size=(4, 64)), "smaller than 8x8"),
        (lambda: control_hint(drawing(), "canny", size=(64, 64), resize_mode="Fill"), "unknown ControlNet resize"),
    ],
)
def test_bad_input_is_one_clear_line(call, match):
    with pytest.raises(PreprocessorError, match=match) as caught:
        call()
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


# ---- the annotator hook ------------------------------------------------------------------------------------------


def test_annotators_run_only_with_their_files(fake_controlnet_aux, tmp_path):
    with pytest.raises(PreprocessorError, match="'depth_leres' needs annotator weights .* no folder named"):
        detect(drawing(), "depth_leres")
    with pytest.raises(PreprocessorError, match=f"'depth_leres' needs res101.pth, latest_net_G.pth in {tmp_path}"):
        detect(drawing(), "depth_leres", annotator_folder=tmp_path)
    assert FakeDetector.built == []  # nothing loaded, nothing fetched
    (tmp_path / "res101.pth").write_bytes(b"weights")
    (tmp_path / "latest_net_G.pth").write_bytes(b"weights")
    assert preprocessors.module_list(annotator_folder=tmp_path)["module_detail"]["depth_leres"]["available"]
    shown = detect(drawing(), "depth_leres", 128, 20.0, 5.0, annotator_folder=tmp_path)
    assert shown.shape == (128, 128, 3) and FakeDetector.built == [str(tmp_path)]
    assert FakeDetector.calls == [
        {
            "detect_resolution": 128,
            "image_resolution": 128,
            "output_type": "np",
            "boost": False,
            "thr_a": 20.0,
            "thr_b": 5.0,
        }
    ]
    hint, _ = control_hint(drawing(), "depth_leres", size=(64, 64), annotator_folder=tmp_path)
    assert hint.shape == (1, 3, 64, 64) and FakeDetector.built == [str(tmp_path)]  # kept, not loaded again
    with pytest.raises(PreprocessorError, match="'depth_zoe' needs ZoeD_M12_N.pt"):
        detect(drawing(), "depth_zoe", annotator_folder=tmp_path)


class FakeSam:
    """Stands in for controlnet_aux's SamDetector: built from the folder with MobileSAM's options; paints the whole
    map in one colour drawn from NumPy's global generator, as its `show_anns` draws each mask's."""

    loads: ClassVar[list] = []

    @classmethod
    def from_pretrained(cls, folder, **load):
        cls.loads.append((folder, load))
        return cls()

    def __call__(self, image, detect_resolution, image_resolution, output_type):
        colour = [np.random.randint(255, dtype=np.uint8) for _ in range(3)]
        return np.broadcast_to(np.array(colour, np.uint8), (detect_resolution, detect_resolution, 3))


def test_mobile_sam_is_built_as_the_extension_builds_it_and_seeded_per_unit(fake_controlnet_aux, tmp_path):
    """The extension runs mobile_sam through controlnet_aux's SamDetector with MobileSAM's "vit_t" model, its mask
    colours drawn from NumPy's global generator after `set_numpy_seed`: the same draws here, the global state left
    as it was."""
    sys.modules["controlnet_aux"].SamDetector = FakeSam
    FakeSam.loads = []
    with pytest.raises(PreprocessorError, match="'mobile_sam' needs annotator weights \\(mobile_sam.pt\\)"):
        detect(drawing(), "mobile_sam")
    (tmp_path / "mobile_sam").mkdir()
    (tmp_path / "mobile_sam" / "mobile_sam.pt").write_bytes(b"weights")
    saved = np.random.get_state()
    np.random.seed(99)
    before = np.random.get_state()
    shown = detect(drawing(), "mobile_sam", 64, seed=1234, annotator_folder=tmp_path)
    assert FakeSam.loads == [(str(tmp_path / "mobile_sam"), {"model_type": "vit_t", "filename": "mobile_sam.pt"})]
    expected = np.random.RandomState(1234)
    assert shown.shape == (64, 64, 3)
    assert shown[0, 0].tolist() == [expected.randint(255, dtype=np.uint8) for _ in range(3)]
    after = np.random.get_state()
    np.random.set_state(saved)
    assert after[0] == before[0] and after[2:] == before[2:]
    np.testing.assert_array_equal(after[1], before[1])
    again = detect(drawing(), "mobile_sam", 64, seed=1234, annotator_folder=tmp_path)
    np.testing.assert_array_equal(again, shown)


def test_mediapipe_face_needs_mediapipe_and_no_files(fake_controlnet_aux, monkeypatch):
    """mediapipe_face runs controlnet_aux's MediapipeFaceDetector, built without files, where MediaPipe is installed;
    its Max Faces slider goes in as an integer, as the extension's `int(thr_a)`."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "mediapipe" else real_find_spec(n))
    with pytest.raises(PreprocessorError, match="'mediapipe_face' needs the mediapipe package, which is not installed"):
        detect(drawing(), "mediapipe_face")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    mediapipe = types.ModuleType("mediapipe")
    mediapipe.__spec__ = importlib.machinery.ModuleSpec("mediapipe", None)
    monkeypatch.setitem(sys.modules, "mediapipe", mediapipe)
    sys.modules["controlnet_aux"].MediapipeFaceDetector = FakeDetector
    assert preprocessors.module_list()["module_detail"]["mediapipe_face"]["available"]  # no annotator folder needed
    detect(drawing(), "mediapipe_face", 128, 3.0, 0.25)
    assert FakeDetector.calls == [
        {"detect_resolution": 128, "image_resolution": 128, "output_type": "np", "max_faces": 3, "min_confidence": 0.25}
    ]
    assert type(FakeDetector.calls[0]["max_faces"]) is int


def test_without_controlnet_aux_the_annotators_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import fails, as where it is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PreprocessorError, match="'openpose_full' needs the controlnet_aux package"):
        detect(drawing(), "openpose_full", annotator_folder="/nonexistent")


def test_module_table_is_complete():
    assert control_modules.MODULES["shuffle"].resolution.value == 512
    assert all(m.requires_mask == m.is_inpaint for m in MODULES.values())


def test_annotator_files_are_found_in_the_extensions_layout(fake_controlnet_aux, tmp_path):
    """The extension's annotator/downloads keeps each annotator's files in a folder of its own: naming the downloads
    folder finds them there; a module whose files are split over two folders is not runnable."""
    (tmp_path / "midas").mkdir(), (tmp_path / "leres").mkdir(), (tmp_path / "other").mkdir()
    (tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"weights")
    (tmp_path / "leres" / "res101.pth").write_bytes(b"weights")
    (tmp_path / "other" / "latest_net_G.pth").write_bytes(b"weights")
    detail = preprocessors.module_list(annotator_folder=tmp_path)["module_detail"]
    assert detail["depth"]["available"] and not detail["depth_leres"]["available"]
    assert detect(drawing(), "depth", 64, annotator_folder=tmp_path).shape == (64, 64, 3)
    assert FakeDetector.built == [str(tmp_path / "midas")]
    with pytest.raises(PreprocessorError, match=f"needs res101.pth, latest_net_G.pth in {tmp_path} or a folder in"):
        detect(drawing(), "depth_leres", annotator_folder=tmp_path)


def test_ip_adapter_modules_are_available_where_their_tower_is(tmp_path):
    """An IP-Adapter module can run where its CLIP image tower's file is in the folder (ip-adapter-auto: either
    tower); /controlnet/detect has no map to give for it."""
    (tmp_path / "clip_h.safetensors").write_bytes(b"")
    detail = preprocessors.module_list(clip_vision=tmp_path)["module_detail"]
    assert [detail[m]["available"] for m in ("ip-adapter_clip_sd15", "ip-adapter-auto", "ip-adapter_clip_sdxl")] == [
        True,
        True,
        False,
    ]
    assert not preprocessors.module_list()["module_detail"]["ip-adapter-auto"]["available"]
    reason = preprocessors.unavailable_reason(find_module("ip-adapter-auto"), clip_vision=tmp_path / "none")
    assert reason.endswith("needs a CLIP image tower, clip_h or clip_g (.pth/.safetensors/.bin), and neither is in "
                           f"{tmp_path / 'none'}")  # fmt: skip
    with pytest.raises(PreprocessorError, match="'ip-adapter_clip_h' makes no map"):
        detect(drawing(), "ip-adapter_clip_sd15")
