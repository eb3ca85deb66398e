"""`ldm txt2img/img2img/inpaint`'s control unit flags: `--controlnet FILE[:WEIGHT]` once per unit, in order, each with
its `--control-image` (`--controlnet None` for a reference or revision unit, which needs no file); the other
--control flags given once apply to every unit, given once per unit to each."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import ANNOTATOR_DIR_HELP, CLIP_VISION_DIR_HELP, UsageError
from .files import legacy_model_hash
from .pipeline.control_modules import CONTROL_TYPES, MODEL_FREE, PreprocessorError, find_module
from .pipeline.images import load_image
from .pipeline.request import CONTROL_MODES, HR_OPTIONS, RESIZE_MODES, UNION_TYPES, ControlUnit

PER_UNIT = {  # flag's dest -> (ControlUnit field, type)
    "control_module": ("module", str),
    "control_weight": ("weight", float),
    "control_start": ("guidance_start", float),
    "control_end": ("guidance_end", float),
    "control_mode": ("control_mode", str),
    "control_resize": ("resize_mode", str),
    "control_processor_res": ("processor_res", int),
    "control_threshold_a": ("threshold_a", float),
    "control_threshold_b": ("threshold_b", float),
    "control_hr_option": ("hr_option", str),
}

PER_UNIT_IMAGES = {"control_mask": "mask", "control_region": "region"}
UNION_NAMES = {label.lower().replace(" ", "-"): label for label in UNION_TYPES}  # openpose, soft-edge, ...
# A union ControlNet's kind of control image where --control-union-type is not given: that of the module's control type
# (the extension's page sets it so from the type a user picks, `ControlNetUnionControlType.from_str`)
UNION_BY_CONTROL_TYPE = {"OpenPose": "OpenPose", "Depth": "Depth", "SoftEdge": "Soft Edge", "Scribble": "Soft Edge",
                         "Canny": "Hard Edge", "Lineart": "Hard Edge", "MLSD": "Hard Edge", "NormalMap": "Normal Map",
                         "Segmentation": "Segmentation", "Tile": "Tile", "Inpaint": "Inpaint"}  # fmt: skip


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "control (ControlNet, T2I-Adapter, IP-Adapter)",
        "one unit per --controlnet, in order, each with its --control-image; the other flags once for all units or "
        "once per unit",
    )
    group.add_argument(
        "--controlnet",
        action="append",
        metavar="FILE[:WEIGHT]",
        help="a ControlNet, T2I-Adapter or IP-Adapter file (weight 1); None for the reference and revision modules",
    )
    group.add_argument("--control-image", action="append", metavar="IMAGE", help="the unit's image")
    group.add_argument(
        "--control-module", action="append", metavar="NAME", help="its preprocessor, e.g. canny (default: none)"
    )
    group.add_argument("--control-weight", action="append", type=float, help="its weight, where FILE has none (1)")
    group.add_argument("--control-start", action="append", type=float, help="first fraction of the steps (0)")
    group.add_argument("--control-end", action="append", type=float, help="last fraction of the steps (1)")
    group.add_argument(
        "--control-mode", action="append", choices=list(CONTROL_MODES), help="balanced, prompt or control (balanced)"
    )
    group.add_argument(
        "--control-resize", action="append", choices=list(RESIZE_MODES), help="resize, crop or fill (crop)"
    )
    group.add_argument("--control-processor-res", action="append", type=int, help="the preprocessor's resolution")
    group.add_argument("--control-threshold-a", action="append", type=float, help="the preprocessor's first slider")
    group.add_argument("--control-threshold-b", action="append", type=float, help="the preprocessor's second slider")
    group.add_argument(
        "--control-hr-option",
        action="append",
        choices=list(HR_OPTIONS),
        help="with --hires-scale: acts in both passes, the low-res or the high-res one (both)",
    )
    group.add_argument(
        "--control-mask",
        action="append",
        metavar="IMAGE",
        help="the unit's mask, white = repaint, the size of its image: the inpaint modules' (another module draws on it)",
    )
    group.add_argument(
        "--control-region",
        action="append",
        metavar="IMAGE",
        help="where the unit acts (white), any size, read as greyscale (transparency as white)",
    )
    group.add_argument(
        "--control-union-type",
        action="append",
        choices=[*UNION_NAMES, "unknown"],
        help="a union ControlNet's kind of control image (default: that of --control-module; unknown: none)",
    )
    group.add_argument("--control-pixel-perfect", action="store_true", help="the preprocessor at the image's size")
    group.add_argument("--clip-vision-dir", help=CLIP_VISION_DIR_HELP)
    group.add_argument("--annotator-dir", help=ANNOTATOR_DIR_HELP)


def controls_from_args(args) -> tuple[list[ControlUnit], dict[str, Path]]:
    """The units the flags describe, and their files by listed name "stem [hash]" (UsageError for a flag that does
    not fit)."""
    specs = getattr(args, "controlnet", None) or []
    images = getattr(args, "control_image", None) or []
    if not specs:
        if images or any(getattr(args, dest, None) for dest in (*PER_UNIT, *PER_UNIT_IMAGES, "control_union_type")):
            raise UsageError("the --control flags need --controlnet FILE, one per unit")
        return [], {}
    if len(images) != len(specs):
        raise UsageError(f"{len(specs)} --controlnet units need as many --control-image, not {len(images)}")
    files, units = {}, []
    for k, (spec, image) in enumerate(zip(specs, images)):
        settings = {field: _nth(args, dest, k, len(specs)) for dest, (field, _) in PER_UNIT.items()}
        if spec.partition(":")[0].lower() == "none":  # a reference or revision unit: no file
            if settings["module"] not in MODEL_FREE:
                modules = ", ".join(MODEL_FREE)
                raise UsageError(f"--controlnet {spec}: a unit without a file needs a --control-module of {modules}")
            weight, listed = _file_and_weight(spec, none=True)[1], "None"
        else:
            path, weight = _file_and_weight(spec)
            listed = f"{path.stem} [{legacy_model_hash(path)}]"
            files[listed] = path
        settings = {field: value for field, value in settings.items() if value is not None}
        if weight is not None:
            settings["weight"] = weight
        for dest, field in PER_UNIT_IMAGES.items():  # (greyscale: a mask, a region)
            if (path := _nth(args, dest, k, len(specs))) is not None:
                settings[field] = load_image(path, "L", None)
        union = _nth(args, "control_union_type", k, len(specs))
        settings["union_type"] = UNION_NAMES.get(union) if union else union_type_of(settings.get("module", "none"))
        picture = load_image(image, "RGB", None)
        units.append(ControlUnit(listed, picture, pixel_perfect=args.control_pixel_perfect, **settings))
    return units, files


def _file_and_weight(spec: str, none: bool = False) -> tuple[Path, float | None]:
    """FILE[:WEIGHT] -> (the file, the weight or None); a path with a colon and no weight stays a path. none: the
    spec is None[:WEIGHT], a reference unit's."""
    path, weight = spec, None
    head, _, tail = spec.rpartition(":")
    if head and (none or not Path(spec).is_file()):
        try:
            path, weight = head, float(tail)
        except ValueError:
            raise UsageError(f"--controlnet {spec}: FILE[:WEIGHT], the weight a number") from None
    if none:
        return Path(path), weight
    if not Path(path).is_file():
        raise UsageError(f"--controlnet {path}: no such file")
    return Path(path), weight


def _nth(args, dest: str, k: int, units: int):
    """Unit k's value of a per-unit flag: its only value, or its k-th where one is given per unit."""
    values = getattr(args, dest, None)
    if not values:
        return None
    if len(values) not in (1, units):
        flag = "--" + dest.replace("_", "-")
        raise UsageError(f"{flag}: give it once for all {units} units or once per unit, not {len(values)} times")
    return values[0] if len(values) == 1 else values[k]


def union_type_of(module: str) -> str | None:
    """The kind of control image a module makes, for a union ControlNet (None: no kind it knows, or no such module)."""
    try:
        name = find_module(module).name
    except PreprocessorError:
        return None  # (the unit's check names it)
    kinds = {UNION_BY_CONTROL_TYPE.get(t) for t, names in CONTROL_TYPES.items() if name in names} - {None}
    return kinds.pop() if len(kinds) == 1 else None
