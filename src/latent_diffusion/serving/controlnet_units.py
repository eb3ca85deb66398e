"""The web UI's ControlNet extension in a generation request: `alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}`
read as the extension reads a unit (its `ControlNetUnit` of Mikubill/sd-webui-controlnet 1.1.455,
`internal_controlnet/args.py`: the field names, their legacy aliases and defaults, the bound check of the
preprocessor's sliders), and each enabled unit turned into a `ControlUnit` of the request (`pipeline/request.py`).

What the extension does with a unit's image is followed too (`Script.choose_input_image`, `try_crop_image_with_a1111_
mask` of its `scripts/controlnet.py`): in img2img a unit without an image takes the init image as it was sent, with
img2img's resize mode (and, for the inpaint modules, img2img's mask); in "only masked" inpainting every unit's image
is cut to the region that is inpainted, as the picture is.

A unit is refused (RequestError, a 422) for a field of the wrong type, an unknown module or model, a module that
cannot run here, a weight or guidance window out of range, or an image that is not one; the message names the unit by
its place in `args` and the field. Slider values out of a module's range take its default, as the extension does
silently (webuiapi sends threshold_a=64 for every module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from ..pipeline.control import find_model
from ..pipeline.control_images import resize_mode_from_value
from ..pipeline.control_modules import CONTROL_TYPES, MODEL_FREE, ControlModule, PreprocessorError, Slider, find_module
from ..pipeline.image_prompts import AUTO
from ..pipeline.images import as_mode, from_pil
from ..pipeline.loading import Pipeline
from ..pipeline.preprocessors import unavailable_reason
from ..pipeline.request import (
    CONTROL_MODES,
    HR_OPTIONS,
    MAX_CONTROL_WEIGHT,
    MAX_UNIT_INPUTS,
    RESIZE_MODES,
    UNION_TYPES,
    ControlUnit,
    RequestError,
)
from .img2img_inputs import blur_mask, resize_image

MAX_UNITS = 10  # the extension's "Multi-ControlNet: ControlNet unit number" setting reaches 10
UNIT_COUNT = 3  # that setting's default, which `/controlnet/settings` reports
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
# Fields of the extension's unit that this server does not apply, with the values under which the web UI's result is
# the same: a unit that sets another is served, and the field is named in info["ignored"]. (low_vram and the UI's
# batch fields change nothing of the result.)
NOT_APPLIED = {
    "ipadapter_input": (None, [], ""),
}


@dataclass(frozen=True)
class InitImage:
    """img2img's picture as the extension sees it, for the units: the image as sent (RGB), img2img's resize mode
    (0, 1, 2), its mask prepared as the extension's `prepare_mask` (L, inverted if asked, blurred), and in "only
    masked" inpainting the region inpainted (a box of the picture) and the size it is worked at."""

    image: Image.Image
    resize_mode: int
    mask: Image.Image | None = None
    box: tuple[int, int, int, int] | None = None
    size: tuple[int, int] = (0, 0)  # (width, height)


def unit_args(body) -> list:
    """The ControlNet script's args of a request (its key in any case: "ControlNet", "controlnet"); [] without."""
    scripts = (body.model_extra or {}).get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return []  # (not the web UI's shape: `ignored_fields` names it)
    entry = next((value for key, value in scripts.items() if key.lower() == "controlnet"), None)
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or len(args) > MAX_UNITS:
        raise RequestError(f'alwayson_scripts.ControlNet: {{"args": [unit, ...]}} with at most {MAX_UNITS} units')
    for i, unit in enumerate(args):
        if not isinstance(unit, dict | None):
            raise RequestError(f"ControlNet unit {i}: an object of the extension's unit fields, not {unit!r:.40}")
    return args


def enabled_units(body) -> list[tuple[int, dict]]:
    """(place in args, fields with the legacy names renamed) of the units that run: enabled (the extension's default
    is off) and naming a model ("None" or "": none), or with a reference module, which needs none."""
    units = []
    for i, raw in enumerate(unit_args(body)):
        fields = dict(raw or {})
        for alias, name in ALIASES.items():
            if (value := fields.pop(alias, None)) is not None:
                if fields.get(name) is not None:
                    raise RequestError(f"ControlNet unit {i}: give {name} or its alias {alias}, not both")
                fields[name] = value
        model = fields.get("model", "None")
        named = model not in (None, "") and str(model).lower() != "none"
        if fields.get("enabled", False) in (True, "true") and (named or fields.get("module") in MODEL_FREE):
            units.append((i, fields))
    return units


def control_units(
    body, pipeline: Pipeline, open_image: Callable[[str, str], Image.Image], init: InitImage | None = None
) -> list[ControlUnit]:
    """The request's enabled units as `ControlUnit`s: models named as the pipeline lists them, modules that can run
    with its folders, images opened by `open_image(base64, field)` (which checks their size); in img2img, `init` for
    units without one."""
    return [_control_unit(i, fields, pipeline, open_image, init) for i, fields in enabled_units(body)]


def _control_unit(i: int, fields: dict, pipeline: Pipeline, open_image, init: InitImage | None) -> ControlUnit:
    where = f"ControlNet unit {i}"
    value = _reader(fields, where)
    module_name = value("module", str, "none", "a module name")
    try:
        module = find_module(module_name)
    except PreprocessorError as e:
        raise RequestError(f"{where}: {e}") from None
    # (ip-adapter-auto: the model decides what it needs, a tower or InsightFace's faces; generation says what is missing)
    if module.name != AUTO and (reason := unavailable_reason(module, pipeline.annotators, pipeline.clip_vision)):
        raise RequestError(f"{where}: {reason}")
    model = "None" if module.model_free else find_model(str(fields.get("model")), pipeline.controlnets)
    if model is None:
        raise RequestError(
            f"{where}: no control model {fields['model']!r} here (GET /controlnet/model_list lists them)"
        )
    weight = value("weight", float, 1.0, "a number")
    start, end = value("guidance_start", float, 0.0, "a number"), value("guidance_end", float, 1.0, "a number")
    if not 0 <= weight <= MAX_CONTROL_WEIGHT:
        raise RequestError(f"{where}: weight must be between 0 and {MAX_CONTROL_WEIGHT:g}, not {weight}")
    if not 0 <= start <= end <= 1:
        raise RequestError(f"{where}: guidance_start and guidance_end must be in [0, 1], start not after end")
    image, mask, resize_mode = _unit_images(i, fields, module, open_image, init)
    return ControlUnit(
        model,
        image,
        module=module_name,
        weight=weight,
        guidance_start=start,
        guidance_end=end,
        control_mode=_control_mode(fields.get("control_mode", "Balanced"), where),
        resize_mode=resize_mode,
        processor_res=_bounded(module.resolution, value("processor_res", int, -1, "a whole number")),
        threshold_a=_bounded(module.threshold_a, value("threshold_a", float, -1, "a number")),
        threshold_b=_bounded(module.threshold_b, value("threshold_b", float, -1, "a number")),
        pixel_perfect=value("pixel_perfect", bool, False, "true or false"),
        mask=mask,
        hr_option=_hr_option(fields.get("hr_option") or "Both", where),
        advanced_weighting=_advanced_weighting(fields.get("advanced_weighting"), where),
        title=where,  # (its place in args: the units that do not run count too)
        region=_region(fields.get("effective_region_mask"), where, open_image),
        union_type=_union_type(fields.get("union_control_type"), where),
    )


def _union_type(value, where: str) -> str | None:
    """union_control_type: a label of the extension's `ControlNetUnionControlType` -> ours; "Unknown" (its default)
    is None."""
    if value is None or value == "Unknown":
        return None
    if value not in UNION_TYPES:
        raise RequestError(
            f"{where}: union_control_type must be one of {', '.join(UNION_TYPES)} or Unknown, not {value!r:.40}"
        )
    return value


def _region(text, where: str, open_image) -> torch.Tensor | None:
    """effective_region_mask: a base64 image whose first channel, as stored (an RGBA's red, not composited), says
    where the unit acts -> (1, 1, H, W) in [0, 1]; None for none."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise RequestError(f"{where}: effective_region_mask must be one base64-encoded image")
    field = f"{where}: effective_region_mask"
    image = open_image(text, field)
    try:
        first = image.getchannel(0) if image.mode in ("RGB", "RGBA", "L", "LA") else as_mode(image, "L", field)
    except ValueError as e:
        raise RequestError(str(e)) from None
    return from_pil(first)


def _reader(fields: dict, where: str):
    """value(name, kind, default, what): a unit's field of that kind (an int is a float too; a bool is no number;
    a whole float is an int), or RequestError naming the field."""

    def value(name: str, kind: type, default, what: str):
        found = fields.get(name)
        if found is None:
            return default
        if kind is int and isinstance(found, float) and found.is_integer():
            found = int(found)
        accepted = (int, float) if kind is float else kind
        if isinstance(found, accepted) and (kind is bool or not isinstance(found, bool)):
            return kind(found)
        raise RequestError(f"{where}: {name} must be {what}, not {found!r:.40}")

    return value


def _bounded(slider: Slider, value: float) -> float | None:
    """The extension's bound check (`ControlNetUnit.bound_check_params`): a slider's value outside its range, -1
    included, is its default (None here)."""
    return value if slider.minimum <= value <= slider.maximum else None


def _control_mode(value, where: str) -> str:
    """A control mode by the extension's label or its place in the list (0, 1, 2) -> our name."""
    names = list(CONTROL_MODES)
    labels = {label: name for name, label in CONTROL_MODES.items()}
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in labels:
        return labels[value]
    raise RequestError(f"{where}: control_mode must be one of {', '.join(labels)} (or 0, 1, 2), not {value!r:.40}")


def _hr_option(value, where: str) -> str:
    """Which hires passes a unit acts in, by the extension's label or, as its versions before 1.1.448 took it, its
    place in the list (0, 1, 2) or its enum's name ("HiResFixOption.LOW_RES_ONLY") -> our name."""
    names, labels = list(HR_OPTIONS), {label: name for name, label in HR_OPTIONS.items()}
    enum_names = {
        "HiResFixOption.BOTH": "both",
        "HiResFixOption.LOW_RES_ONLY": "low",
        "HiResFixOption.HIGH_RES_ONLY": "high",
    }
    if isinstance(value, str) and value in enum_names:
        return enum_names[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in labels:
        return labels[value]
    raise RequestError(f"{where}: hr_option must be one of {', '.join(labels)} (or 0, 1, 2), not {value!r:.40}")


def _advanced_weighting(value, where: str) -> tuple[float, ...] | None:
    """The unit's list of residual scales as numbers (the request layer checks their count and range); an empty list
    is none, as a client that sends [] means (the extension would give such a unit no control at all)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in value):
        raise RequestError(f"{where}: advanced_weighting must be a list of numbers, not {value!r:.40}")
    return tuple(float(w) for w in value)


def _resize_mode(value, where: str) -> str:
    """A resize mode by the extension's name (its old names too) or 0, 1, 2 -> our name (`resize_mode_from_value`)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(f"{where}: resize_mode must be a name or 0, 1, 2, not {value!r:.40}")
    try:
        label = resize_mode_from_value(value)
    except PreprocessorError as e:
        raise RequestError(f"{where}: resize_mode: {e}") from None
    return {label: name for name, label in RESIZE_MODES.items()}[label]


def _unit_images(i: int, fields: dict, module: ControlModule, open_image, init: InitImage | None):
    """The unit's image (1, 3, H, W), its mask (1, 1, H, W) or None, and its resize mode: its own image, or in
    img2img the init image with img2img's resize mode; cut to the inpainted region in "only masked" inpainting. An
    IP-Adapter unit's several images (the extension's multiple inputs, averaged) are a tuple of each, uncut."""
    where = f"ControlNet unit {i}"
    entries = _image_fields(fields, where)
    resize_mode = _resize_mode(fields.get("resize_mode", "Crop and Resize"), where)
    if len(entries) > 1:
        if module.name not in CONTROL_TYPES["IP-Adapter"]:
            raise RequestError(f"{where}: several images are an IP-Adapter unit's inputs; {module.label} takes one")
        pairs = [_opened_pair(image, mask, where, open_image) for image, mask in entries]
        masks = tuple(from_pil(alpha) if alpha is not None else None for _, alpha in pairs)
        return tuple(from_pil(p) for p, _ in pairs), masks if any(m is not None for m in masks) else None, resize_mode
    if entries:
        picture, alpha = _opened_pair(*entries[0], where, open_image)
    elif init is not None:  # (the extension's last source: img2img's own picture, at img2img's resize mode)
        picture, resize_mode = init.image, list(RESIZE_MODES)[init.resize_mode]
        alpha = init.mask if module.is_inpaint else None
    else:
        raise RequestError(f"{where}: no image (give image, base64-encoded)")
    cut = fields.get("inpaint_crop_input_image", True) is not False and "reference" not in module.name
    if cut and init is not None and init.box is not None:
        picture, alpha = (_crop(x, resize_mode, init) if x is not None else None for x in (picture, alpha))
    return from_pil(picture), from_pil(alpha) if alpha is not None else None, resize_mode


def _opened_pair(image: str, mask: str | None, where: str, open_image) -> tuple[Image.Image, Image.Image | None]:
    """An image and its mask (its red channel, over white as HWC3 reads an RGBA mask), of one size."""
    picture, alpha = (
        _opened(text, f"{where}: {name}", open_image) for name, text in (("image", image), ("mask", mask))
    )
    alpha = alpha.getchannel("R") if alpha is not None else None
    if alpha is not None and alpha.size != picture.size:
        sizes = f"{alpha.width}x{alpha.height}, the image {picture.width}x{picture.height}"
        raise RequestError(f"{where}: the mask is {sizes}; they must be the same size")
    return picture, alpha


def _opened(text: str | None, field: str, open_image) -> Image.Image | None:
    """A base64 image as RGB, alpha over white as the extension's HWC3 reads it (None for None)."""
    if text is None:
        return None
    try:
        return as_mode(open_image(text, field), "RGB", field)
    except ValueError as e:  # (a mode Pillow cannot convert)
        raise RequestError(str(e)) from None


def _image_fields(fields: dict, where: str) -> list[tuple[str, str | None]]:
    """The unit's images and masks as base64 text from the extension's forms: image as text (mask beside it), as
    {"image": ..., "mask": ...}, as [image, mask], or as a list of such objects (several: an IP-Adapter's inputs);
    [] for no image."""
    image, mask = fields.get("image"), fields.get("mask")
    if isinstance(image, list) and len(image) == 2 and not isinstance(image[0], dict):
        image = {"image": image[0], "mask": image[1]}
    entries = image if isinstance(image, list) and image and all(isinstance(e, dict) for e in image) else [image]
    if len(entries) > MAX_UNIT_INPUTS:
        raise RequestError(f"{where}: at most {MAX_UNIT_INPUTS} images, not {len(entries)}")
    pairs = []
    for entry in entries:
        if isinstance(entry, dict):
            if mask is not None:
                raise RequestError(f"{where}: a mask in image and another in mask; give one")
            entry = (entry.get("image"), entry.get("mask"))
        else:
            entry = (entry, mask)
        for name, text in zip(("image", "mask"), entry):
            if text is not None and not isinstance(text, str):
                raise RequestError(f"{where}: {name} must be base64-encoded images, not a {type(text).__name__}")
        pairs.append((entry[0] or None, entry[1] or None))
    if len(pairs) > 1 and any(image is None for image, _ in pairs):
        raise RequestError(f"{where}: each entry of image needs its image")
    return [pair for pair in pairs if pair[0] is not None]


def _crop(image: Image.Image, resize_mode: str, init: InitImage) -> Image.Image:
    """`try_crop_image_with_a1111_mask`: an image brought to the picture's size by the unit's resize mode, cut to the
    inpainted region, and fitted into the size it is worked at ("Resize and Fill")."""
    mode = list(RESIZE_MODES).index(resize_mode)
    cut = resize_image(image, *init.image.size, mode).crop(init.box)
    return resize_image(cut, *init.size, mode=2)


def prepared_mask(mask: Image.Image, invert: bool, blur_x: float, blur_y: float) -> Image.Image:
    """The extension's `prepare_mask` of img2img's mask: grey, inverted if asked, blurred as img2img blurs it."""
    grey = mask.convert("L")
    return blur_mask(ImageOps.invert(grey) if invert else grey, blur_x, blur_y)


def ignored_unit_fields(body) -> list[str]:
    """The fields of the enabled units that this server does not apply and that would change the web UI's result."""
    ignored = []
    for i, fields in enabled_units(body):
        for name, no_effect in NOT_APPLIED.items():
            if fields.get(name) not in no_effect:
                ignored.append(f"alwayson_scripts.ControlNet.args[{i}].{name}")
    return ignored


def saves_detected_maps(body) -> list[bool]:
    """Per enabled unit, whether its detected maps come back with the images (`save_detected_map`, default true)."""
    return [fields.get("save_detected_map", True) is not False for _, fields in enabled_units(body)]
