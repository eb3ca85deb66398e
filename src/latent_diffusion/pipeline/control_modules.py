"""The ControlNet extension's preprocessor modules (Mikubill/sd-webui-controlnet 1.1.455) as data: each module's
name, the label its UI shows, its sliders and its place in the list, as `/controlnet/module_list` reports them.

Two names reach one module: its name (the old API key, `depth`, `hed`, `inpaint`) and its label (`depth_midas`,
`softedge_hed`, `inpaint_global_harmonious`); the extension's `Preprocessor.get_preprocessor` takes either, and so
does `find_module`. `/controlnet/module_list?alias_names=true` lists labels, `false` names.

Three sliders per module, as the extension's `PreprocessorParameter`s: `resolution` (the request's
`processor_res`), `threshold_a` and `threshold_b` (its `slider_1`, `slider_2`; no module here uses a third). A
slider the module does not show still has a range and a default, which the extension applies to a request's value
(`ControlNetUnit.bound_check_params`): a hidden slider is 0..1 with default 0.5, except shuffle's hidden
resolution, whose default is 512. Its legacy modules (the ported `preprocessor_compiled.py` table) store their
resolution slider under `.resolution`, which nothing reads, so each of them shows the base class's Resolution
slider (64..2048, 512, step 8): that is what its `module_detail` reports, and what this table says.

Whether a module can run here (the weight-free ones in `preprocessors.py`, the annotators in `annotators.py`) is
not a property of this table: `preprocessors.module_table` adds it.
"""

from __future__ import annotations

from dataclasses import dataclass


class PreprocessorError(ValueError):
    """A control image that cannot be made: an unknown module, a module whose weights are absent, a slider value out
    of its range, an unusable image or mask. One line, naming the module or the value (the server answers 422)."""


@dataclass(frozen=True)
class Slider:
    """One slider of a module, as the extension's `PreprocessorParameter` (same field defaults)."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = True

    def api_json(self) -> dict:
        """The slider as `module_detail` lists it."""
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 64, 2048, 8, 512)  # the base class's slider: shown by every module that keeps it
HIDDEN = Slider(visible=False)


@dataclass(frozen=True)
class ControlModule:
    """One preprocessor: `name` is its API key, `label` what the UI shows; `priority` orders the list (the
    extension's `sorting_priority`); `model_free` means no ControlNet model is needed (the reference and revision
    modules); `requires_mask` modules take the inpainting mask."""

    name: str
    label: str
    priority: int = 0
    resolution: Slider = RESOLUTION
    threshold_a: Slider = HIDDEN
    threshold_b: Slider = HIDDEN
    model_free: bool = False
    requires_mask: bool = False

    @property
    def sliders(self) -> tuple[Slider, Slider, Slider]:
        return self.resolution, self.threshold_a, self.threshold_b

    @property
    def is_inpaint(self) -> bool:
        """The extension's test for its inpaint protocol (RGBA in, -1 in masked pixels): 'inpaint' in the name."""
        return "inpaint" in self.name


def _module(name: str, label: str | None = None, priority: int = 0, **fields) -> ControlModule:
    return ControlModule(name, label or name, priority, **fields)


_GAMMA = Slider("Gamma Correction", 0.1, 2.0, 0.001, 1.0)
_SAFE_STEPS = Slider("Safe Steps", 0, 10, 1, 2)
_STYLE_FIDELITY = Slider("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.01, 0.5)
_NEAR, _BACKGROUND = Slider("Remove Near %", 0, 100, 0.1, 0), Slider("Remove Background %", 0, 100, 0.1, 0)
_VARIATION = Slider("Variation", 3.0, 32.0, 1.0, 8.0)
_NOISE = Slider("Noise Augmentation", 0.0, 1.0, 0.01, 0.0)
_INPAINT = {"resolution": HIDDEN, "requires_mask": True}

# `scripts/preprocessor/*.py` (the classes), then `legacy/preprocessor_compiled.py` (the dict), in that order.
_MODULES = [
    _module("none", priority=10),
    _module(
        "canny",
        priority=100,
        threshold_a=Slider("Low Threshold", 1, 255, 1, 100),
        threshold_b=Slider("High Threshold", 1, 255, 1, 200),
    ),
    _module("invert", "invert (from white bg & black line)", 20, resolution=HIDDEN),
    _module("blur_gaussian", threshold_a=Slider("Sigma", 0.01, 64.0, 0.01, 9.0)),
    _module("scribble_xdog", threshold_a=Slider("XDoG Threshold", 1, 64, 0.01, 32)),
    _module("shuffle", resolution=Slider(value=512, visible=False)),  # "Fix res to 512."
    _module("inpaint", "inpaint_global_harmonious", **_INPAINT),
    _module("inpaint_only", priority=100, **_INPAINT),
    _module("inpaint_only+lama", **_INPAINT),
    _module("softedge_teed", threshold_a=_SAFE_STEPS),
    _module("softedge_anyline", resolution=Slider("Resolution", 64, 2048, 8, 1280), threshold_a=_SAFE_STEPS),
    _module("facexlib", resolution=HIDDEN),
    _module("ip-adapter_pulid", resolution=HIDDEN),
    _module("ip-adapter-auto", priority=1000),
    _module("normal_dsine", threshold_a=Slider("Fov", 0, 360, 0.1, 60), threshold_b=Slider("Iterations", 1, 20, 1, 5)),
    _module("mobile_sam"),
    _module("animal_openpose"),
    _module("densepose", "densepose (pruple bg & purple torso)"),
    _module("densepose_parula", "densepose_parula (black bg & blue torso)"),
    _module("depth_anything"),
    _module("depth_anything_v2"),
    _module("depth_hand_refiner"),
    _module("depth_leres", threshold_a=_NEAR, threshold_b=_BACKGROUND),
    _module("depth_leres++", threshold_a=_NEAR, threshold_b=_BACKGROUND),
    _module("depth", "depth_midas", 100),
    _module("depth_zoe"),
    _module("dw_openpose_full"),
    _module("instant_id_face_embedding"),
    _module("instant_id_face_keypoints"),
    _module("ip-adapter_clip_sd15", "ip-adapter_clip_h", 100),
    _module("ip-adapter_clip_sdxl", "ip-adapter_clip_g"),
    _module("ip-adapter_clip_sdxl_plus_vith"),
    _module("ip-adapter_face_id"),
    _module("ip-adapter_face_id_plus"),
    _module("lineart_anime"),
    _module("lineart_anime_denoise"),
    _module("lineart_coarse"),
    _module("lineart", "lineart_realistic"),
    _module("lineart_standard", "lineart_standard (from white bg & black line)", 100),
    _module(
        "mediapipe_face",
        threshold_a=Slider("Max Faces", 1, 10, 1, 1),
        threshold_b=Slider("Min Face Confidence", 0.01, 1.0, 0.01, 0.5),
    ),
    _module(
        "mlsd",
        priority=100,
        threshold_a=Slider("MLSD Value Threshold", 0.01, 2.0, 0.01, 0.1),
        threshold_b=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.01, 0.1),
    ),
    _module("normal_bae", priority=100),
    _module("normal_map", "normal_midas", threshold_a=Slider("Normal Background Threshold", 0.0, 1.0, 0.01, 0.4)),
    _module("openpose"),
    _module("openpose_face"),
    _module("openpose_faceonly"),
    _module("openpose_full", priority=100),
    _module("openpose_hand"),
    _module("recolor_intensity", threshold_a=_GAMMA),
    _module("recolor_luminance", priority=100, threshold_a=_GAMMA),
    _module("reference_adain", threshold_a=_STYLE_FIDELITY, model_free=True),
    _module("reference_adain+attn", threshold_a=_STYLE_FIDELITY, model_free=True),
    _module("reference_only", priority=100, threshold_a=_STYLE_FIDELITY, model_free=True),
    _module("revision_clipvision", priority=100, threshold_a=_NOISE, model_free=True),
    _module("revision_ignore_prompt", threshold_a=_NOISE, model_free=True),
    _module("scribble_hed"),
    _module("pidinet_scribble", "scribble_pidinet", 100),
    _module("anime_face_segment", "seg_anime_face"),
    _module("oneformer_ade20k", "seg_ofade20k", 100),
    _module("oneformer_coco", "seg_ofcoco"),
    _module("segmentation", "seg_ufade20k"),
    _module("hed", "softedge_hed"),
    _module("hed_safe", "softedge_hedsafe"),
    _module("pidinet", "softedge_pidinet", 100),
    _module("pidinet_safe", "softedge_pidisafe"),
    _module("color", "t2ia_color_grid"),
    _module("pidinet_sketch", "t2ia_sketch_pidi"),
    _module("clip_vision", "t2ia_style_clipvision"),
    _module("threshold", threshold_a=Slider("Binarization Threshold", 0, 255, 0.01, 127)),
    _module("tile_colorfix", threshold_a=_VARIATION),
    _module("tile_colorfix+sharp", threshold_a=_VARIATION, threshold_b=Slider("Sharpness", 0.0, 2.0, 0.01, 1.0)),
    _module("tile_resample", priority=100, threshold_a=Slider("Down Sampling Rate", 1.0, 8.0, 0.01, 1.0)),
]
MODULES: dict[str, ControlModule] = {m.name: m for m in _MODULES}
MODEL_FREE = tuple(m.name for m in _MODULES if m.model_free)  # the units that take model "None"
# The modules whose units change the U-Net's output while sampling (`control_fixes.py`): their thresholds and draws act
# there, not only on their maps
COLOR_FIX = ("tile_colorfix", "tile_colorfix+sharp")
INPAINT_ONLY = ("inpaint_only", "inpaint_only+lama")
_BY_LABEL = {m.label: m for m in _MODULES}

# The extension's control types (each module's `tags`; its UI's "Control Type" radio and `/controlnet/control_types`):
# the modules tagged with each, by name. facexlib, mediapipe_face and threshold have none.
CONTROL_TYPES = {
    "Canny": ("canny", "invert"),
    "Depth": (
        "depth",
        "depth_anything",
        "depth_anything_v2",
        "depth_hand_refiner",
        "depth_leres",
        "depth_leres++",
        "depth_zoe",
    ),
    "IP-Adapter": (
        "ip-adapter-auto",
        "ip-adapter_pulid",
        "ip-adapter_clip_sd15",
        "ip-adapter_clip_sdxl",
        "ip-adapter_clip_sdxl_plus_vith",
        "ip-adapter_face_id",
        "ip-adapter_face_id_plus",
    ),
    "Inpaint": ("inpaint", "inpaint_only", "inpaint_only+lama"),
    "Instant-ID": ("instant_id_face_embedding", "instant_id_face_keypoints"),
    "InstructP2P": ("none",),
    "Lineart": ("invert", "lineart", "lineart_anime", "lineart_anime_denoise", "lineart_coarse", "lineart_standard"),
    "MLSD": ("invert", "mlsd"),
    "NormalMap": ("normal_dsine", "normal_bae", "normal_map"),
    "OpenPose": (
        "animal_openpose",
        "densepose",
        "densepose_parula",
        "dw_openpose_full",
        "openpose",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
        "openpose_hand",
    ),
    "Recolor": ("recolor_intensity", "recolor_luminance"),
    "Reference": ("reference_adain", "reference_adain+attn", "reference_only"),
    "Revision": ("revision_clipvision", "revision_ignore_prompt"),
    "Scribble": ("invert", "scribble_xdog", "scribble_hed", "pidinet_scribble"),
    "Segmentation": ("mobile_sam", "anime_face_segment", "oneformer_ade20k", "oneformer_coco", "segmentation"),
    "Shuffle": ("shuffle",),
    "SoftEdge": ("softedge_teed", "softedge_anyline", "hed", "hed_safe", "pidinet", "pidinet_safe"),
    "SparseCtrl": ("scribble_xdog", "scribble_hed", "pidinet_scribble"),
    "T2I-Adapter": ("color", "pidinet_sketch", "clip_vision"),
    "Tile": ("blur_gaussian", "tile_colorfix", "tile_colorfix+sharp", "tile_resample"),
}


def find_module(name: str) -> ControlModule:
    """A module by its name or its label (labels first, as the extension looks them up)."""
    found = _BY_LABEL.get(name) or MODULES.get(name)
    if found is None:
        raise PreprocessorError(f"unknown ControlNet module {name!r} (GET /controlnet/module_list lists them)")
    return found


def sorted_modules() -> list[ControlModule]:
    """The extension's list order (`Preprocessor.get_sorted_preprocessors`): "none" first, then by the key
    str(priority).zfill(8) + label, descending; so priority 1000 before 100 before 20 before 10 before 0."""
    rest = [m for m in _MODULES if m.name != "none"]
    return [MODULES["none"], *sorted(rest, key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)]


def tagged(control_type: str) -> list[ControlModule]:
    """The modules of a control type in list order, "none" among them (`Preprocessor.get_filtered_preprocessors`)."""
    names = CONTROL_TYPES[control_type]
    return [m for m in sorted_modules() if m.name in names or m.name == "none"]


def module_detail(module: ControlModule) -> dict:
    """One entry of `module_detail`: `model_free` and the sliders the module shows."""
    return {"model_free": module.model_free, "sliders": [s.api_json() for s in module.sliders if s.visible]}
