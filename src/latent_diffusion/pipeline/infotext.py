"""The web UI's infotexts, written and read: the `parameters` text of every image this project makes, in the form of
the most used Stable Diffusion web UI,

    a photograph of an astronaut riding a horse
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

and such a text read back into settings: `ldm txt2img --infotext image.png` runs with the settings an image was made
with (its `parameters` PNG chunk, a text file, or the text itself). Flags given on the command line win over the
infotext's values; fields this project does not use are named in a warning. (`plan.infotext_fields` gives a plan's
settings as these fields.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..sampling.samplers import find_sampler
from ..sampling.sigma_schedules import find_scheduler
from .request import CONTROL_MODES, RESIZE_MODES


def _quote(value) -> str:
    """A field's value as the web UI writes it: as a JSON string where it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # quoted but not JSON (as this project wrote before it escaped): the inside
        return value[1:-1]


def parameters_text(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The `parameters` chunk: prompt line, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(fields_text(fields))
    return "\n".join(lines)


def fields_text(fields: dict) -> str:
    """`Key: value, ...`, each value quoted where the web UI quotes it (its `infotext_utils.quote`)."""
    return ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())


FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """The inverse of parameters_text, read as the web UI reads it: {"prompt", "negative_prompt", and each field as
    a string}. The last line holds the fields if it has at least three `Key: value` pairs."""
    *head, last = text.strip().split("\n")
    if len(FIELD.findall(last)) < 3:  # no settings line: the whole text is the prompt
        head, last = [*head, last], ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in FIELD.findall(last):
        result[key.strip()] = _unquote(value.strip())
    return result


def web_ui_parameters(text: str) -> dict[str, str]:
    """An infotext read into the web UI's keys: "Prompt", "Negative prompt", then its fields, a `WxH` value split
    into "<key>-1" and "<key>-2" (as "Size-1", "Size-2")."""
    fields = parse_parameters(text)
    out = {"Prompt": fields.pop("prompt"), "Negative prompt": fields.pop("negative_prompt")}
    for key, value in fields.items():
        if m := re.fullmatch(r"(\d+)x(\d+)", value):
            out[f"{key}-1"], out[f"{key}-2"] = m.groups()
        else:
            out[key] = value
    return out


FIELDS = {
    "Steps": ("steps", int),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Eta": ("eta", float),
    "Eta DDIM": ("eta", float),
    "Sigma noise": ("s_noise", float),
    "Clip skip": ("clip_skip", int),
    "Denoising strength": ("strength", float),
    "Hires upscale": ("hires_scale", float),
    "Hires resize": ("hires_resize", str),
    "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str),
    "Hires CFG Scale": ("hires_cfg_scale", float),
    "Hires prompt": ("hires_prompt", str),
    "Hires negative prompt": ("hires_negative_prompt", str),
}
NOT_SETTINGS = {"prompt", "negative_prompt", "Sampler", "Schedule type", "Size", "Hires sampler", "Hires schedule type"}
NOT_SETTINGS |= {"Old prompt editing timelines"}  # (read with the version, below)
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
    version = re.fullmatch(r"v?(\d+)\.(\d+).*", fields.get("Version", ""))  # (the web UI's backcompat: before 1.6)
    old = version is not None and (int(version[1]), int(version[2])) < (1, 6) and "[" in fields["prompt"]
    if fields.get("Old prompt editing timelines") == "True" or old:
        settings["old_edit_timelines"] = True
    if "Hires upscale" in fields or "Hires resize" in fields:  # then the denoising strength is the hires pass's
        settings["hires_denoise"] = settings.pop("strength", 0.7)  # (the web UI's default, where the text has none)
        if "Hires sampler" in fields:  # (a legacy name holds its schedule: "DPM++ 2M Karras")
            settings["hires_sampler"], schedule = sampler_from_web_ui(fields["Hires sampler"], None)
            settings |= {"hires_scheduler": schedule} if schedule != "automatic" else {}
        if "Hires schedule type" in fields:  # (written where it differs from the first pass's)
            settings["hires_scheduler"] = find_scheduler(fields["Hires schedule type"]).name
    settings |= control_settings(fields)
    ignored = [k for k in fields if k not in FIELDS and k not in NOT_SETTINGS and k not in INFORMATIONAL]
    ignored = [k for k in ignored if not re.fullmatch(r"ControlNet \d+", k)]
    if "Model hash" in fields:
        settings["model_hash"] = fields["Model hash"]  # checked against the checkpoint used, once it is loaded
    return settings, ignored


def control_settings(fields: dict[str, str]) -> dict[str, list]:
    """The ControlNet extension's `ControlNet k: "Module: canny, Weight: 1.0, ..."` fields -> {the --control flag's
    destination: one value per unit, in unit order (None where a unit's text has none)}. Its "Model" names a file the
    command line gives with --controlnet."""
    units = sorted((int(m[1]), text) for key, text in fields.items() if (m := re.fullmatch(r"ControlNet (\d+)", key)))
    settings: dict[str, list] = {}
    for _, text in units:
        values = dict(item.strip().split(": ", 1) for item in text.split(",") if ": " in item)
        for name, (dest, read) in CONTROL_FIELDS.items():
            value = values.get(name)
            settings.setdefault(dest, []).append(None if value in (None, "None") else read(value))
    if any(settings.pop("control_pixel_perfect", [])):
        settings["control_pixel_perfect"] = True
    return settings


def _label(table: dict[str, str]):
    """A reader of the extension's label ("Crop and Resize") as our name ("crop")."""
    names = {label: name for name, label in table.items()}
    return lambda label: names.get(label) or _unknown(label)


def _resolution(text: str) -> int | None:
    """The "Processor Res" field: a whole number; a fraction is the default of a module that hides its resolution
    slider (the extension writes that slider's 0.5 for invert's), so None: the module's default again."""
    value = float(text)
    return int(value) if value.is_integer() else None


def _unknown(label: str):
    raise ValueError(f"the infotext's ControlNet field {label!r} is not one this project knows")


CONTROL_FIELDS = {
    "Module": ("control_module", str),
    "Weight": ("control_weight", float),
    "Resize Mode": ("control_resize", _label(RESIZE_MODES)),
    "Processor Res": ("control_processor_res", _resolution),
    "Threshold A": ("control_threshold_a", float),
    "Threshold B": ("control_threshold_b", float),
    "Guidance Start": ("control_start", float),
    "Guidance End": ("control_end", float),
    "Pixel Perfect": ("control_pixel_perfect", lambda v: v == "True"),
    "Control Mode": ("control_mode", _label(CONTROL_MODES)),
}


def _number(kind, key: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"the infotext's {key} is {value!r}, not a number") from None
