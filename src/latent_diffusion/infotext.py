"""The web UI's infotexts read back into settings: `ldm txt2img --infotext image.png` runs with the settings an
image was made with (its `parameters` PNG chunk, a text file, or the text itself). Flags given on the command line
win over the infotext's values; fields this project does not use are named in a warning."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .images import parse_parameters
from .samplers import find_sampler
from .schedulers import find_scheduler

FIELDS = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Eta": ("eta", float),
          "Eta DDIM": ("eta", float), "Sigma noise": ("s_noise", float), "Clip skip": ("clip_skip", int),
          "Denoising strength": ("strength", float)}  # fmt: skip
NOT_SETTINGS = {"prompt", "negative_prompt", "Sampler", "Schedule type", "Size"}
# Which files and program made the image: the flags say which are used here.
INFORMATIONAL = {"Model hash", "Model", "Version", "TI hashes", "Lora hashes"}


def read_infotext(source: str) -> str:
    """A PNG's `parameters` text, a text file's contents, or `source` itself when it names no file."""
    path = Path(source)
    try:
        is_file, is_folder = path.is_file(), path.is_dir()
    except OSError:  # e.g. a text too long to be a file name: then it is the text itself
        is_file = is_folder = False
    if is_folder:  # (a path, never an infotext)
        raise ValueError(f"{source}: a folder, not an image or a text file")
    if not is_file:
        if "\n" not in source and path.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg", ".txt"):
            raise ValueError(f"{source}: no such file")  # a file was meant, not a one-word infotext
        return source
    try:
        if path.suffix.lower() not in (".png", ".webp", ".jpg", ".jpeg"):
            return path.read_text(encoding="utf-8")
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except (OSError, UnidentifiedImageError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read an infotext from it ({type(e).__name__})") from None
    if text is None:
        raise ValueError(f"{path}: holds no `parameters` infotext")
    return text


def sampler_from_web_ui(name: str, schedule: str | None) -> tuple[str, str]:
    """The web UI's sampler (its current name and "Schedule type", or a legacy name such as "DPM++ 2M Karras" with
    the schedule in it) -> (our sampler id, our scheduler id). An infotext without a schedule type ran on the
    sampler's automatic one."""
    sampler, legacy_schedule = find_sampler(name)
    scheduler = find_scheduler(schedule).name if schedule else legacy_schedule or "automatic"
    return sampler.name, scheduler


def settings_from_infotext(text: str) -> tuple[dict, list[str]]:
    """An infotext -> ({command-line destination: value}, names of the fields not used)."""
    fields = parse_parameters(text)
    settings = {"prompt": fields["prompt"], "negative_prompt": fields["negative_prompt"]}
    for key, (dest, kind) in FIELDS.items():
        if key in fields:
            settings[dest] = _number(kind, key, fields[key])
    if "Size" in fields:
        width, _, height = fields["Size"].partition("x")
        settings["width"], settings["height"] = _number(int, "Size", width), _number(int, "Size", height)
    if "Sampler" in fields:
        settings["sampler"], settings["scheduler"] = sampler_from_web_ui(fields["Sampler"], fields.get("Schedule type"))
    ignored = [k for k in fields if k not in FIELDS and k not in NOT_SETTINGS and k not in INFORMATIONAL]
    if "Model hash" in fields:
        settings["model_hash"] = fields["Model hash"]  # checked against the checkpoint used, once it is loaded
    return settings, ignored


def _number(kind, key: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"the infotext's {key} is {value!r}, not a number") from None
