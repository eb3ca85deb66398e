"""The web UI's X/Y/Z plot (its `scripts/xyz_grid.py`): a request varied along up to three axes, one image per cell,
and a grid of them with the axes' values written along its edges.

An axis is one of the web UI's axis options (by its label, as "Steps" or "CFG Scale", or by its index in the web
UI's txt2img list, as API clients send it) and its values, written as the web UI reads them: comma-separated (CSV,
so a value may be quoted), and for numbers the ranges `1-5` (every whole number), `1-9 (+2)` (by a step) and
`0-1 [5]` (a count, evenly spaced). "Prompt S/R" takes its first value as the text to search for in the prompt and
negative prompt, and each value as its replacement. Cells whose requests differ only in prompt or seed share U-Net
batches.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..sampling.samplers import find_sampler
from .generate import generate_plan
from .images import to_pil
from .loading import Pipeline
from .plan import Plan, infotext, infotext_fields, merge, resolve
from .request import GenerationRequest, fail


def _field(name: str) -> Callable:
    return lambda r, value, values: dataclasses.replace(r, **{name: value})


def _hires(name: str) -> Callable:
    def apply(r: GenerationRequest, value, values) -> GenerationRequest:
        if r.hires is None:
            fail("the hires axes need the hires fix on (--hires-scale, enable_hr)")
        return dataclasses.replace(r, hires=dataclasses.replace(r.hires, **{name: value}))

    return apply


def _sampler_id(name: str) -> str:
    try:
        return find_sampler(name)[0].name
    except ValueError as e:
        fail(f"X/Y/Z plot: {e}")


def _denoising(r: GenerationRequest, value: float) -> GenerationRequest:
    """img2img's strength, or the hires pass's (txt2img's denoising_strength is the hires fix's)."""
    if r.hires is None:
        return dataclasses.replace(r, strength=value)
    return dataclasses.replace(r, hires=dataclasses.replace(r.hires, strength=value))


def _search_replace(r: GenerationRequest, value: str, values: list) -> GenerationRequest:
    """The web UI's Prompt S/R: the axis's first value replaced by this one in the prompts and negative prompts."""
    search, negatives = values[0], r.negative_prompts or [""] * len(r.prompts)
    if not any(search in text for text in (*r.prompts, *negatives)):
        fail(f"X/Y/Z plot: Prompt S/R did not find {search!r} in the prompt or negative prompt")
    prompts = [p.replace(search, value) for p in r.prompts]
    return dataclasses.replace(r, prompts=prompts, negative_prompts=[n.replace(search, value) for n in negatives])


@dataclass(frozen=True)
class Axis:
    label: str  # the web UI's
    kind: type  # its values' type: int, float or str
    apply: Callable[[GenerationRequest, object, list], GenerationRequest]  # (request, value, all values) -> request


AXES = [  # the web UI's txt2img axis options, in its order; None: not one this project varies
    Axis("Nothing", str, lambda r, value, values: r),
    Axis("Seed", int, lambda r, value, values: dataclasses.replace(r, seeds=[value + i for i in range(len(r.seeds))])),
    None,  # Var. seed
    None,  # Var. strength
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _hires("steps")),
    Axis("CFG Scale", float, _field("cfg_scale")),
    Axis("Prompt S/R", str, _search_replace),
    None,  # Prompt order
    Axis("Sampler", str, lambda r, value, values: dataclasses.replace(r, sampler=_sampler_id(value))),
    Axis("Hires sampler", str, lambda r, value, values: _hires("sampler")(r, _sampler_id(value), values)),
    None,  # Checkpoint name
    None,  # Negative Guidance minimum sigma
    None,  # Sigma Churn
    None,  # Sigma min
    None,  # Sigma max
    Axis("Sigma noise", float, _field("s_noise")),
    Axis("Schedule type", str, _field("scheduler")),
    None,  # Schedule min sigma
    None,  # Schedule max sigma
    None,  # Schedule rho
    Axis("Eta", float, _field("eta")),
    Axis("Clip skip", int, _field("clip_skip")),
    Axis("Denoising", float, lambda r, value, values: _denoising(r, value)),
    None,  # Initial noise multiplier
    None,  # Extra noise
    Axis("Hires upscaler", str, _hires("upscaler")),
    None,  # VAE
    Axis("Styles", str, lambda r, value, values: dataclasses.replace(r, styles=[*r.styles, *value.split(",")])),
]
BY_LABEL = {axis.label.lower(): axis for axis in AXES if axis is not None}

INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")
MAX_CELLS = 1000


def find_axis(name: str | int) -> Axis:
    """An axis by its label (any case) or its index in the web UI's txt2img list."""
    if isinstance(name, int) and not isinstance(name, bool):
        axis = AXES[name] if 0 <= name < len(AXES) else None
        if axis is None:
            fail(f"X/Y/Z plot: axis {name} is not one this project varies; these are: {', '.join(_labels())}")
        return axis
    if not isinstance(name, str) or name.strip().lower() not in BY_LABEL:
        fail(f"X/Y/Z plot: no axis {name!r}; these are: {', '.join(_labels())}")
    return BY_LABEL[name.strip().lower()]


def _labels() -> list[str]:
    return [f"{i}: {axis.label}" for i, axis in enumerate(AXES) if axis is not None]


def axis_values(axis: Axis, text: str) -> list:
    """An axis's values from its text, as the web UI reads them (CSV, ranges for numbers)."""
    if axis.label == "Nothing":
        return [None]
    try:
        items = [v.strip() for row in csv.reader(io.StringIO(text)) for v in row]
    except csv.Error as e:
        fail(f"X/Y/Z plot: {axis.label} values: {e}")
    values = []
    for item in items:
        if axis.kind is int and (m := INT_RANGE.fullmatch(item) or INT_COUNT.fullmatch(item)):
            start, end = int(m[1].replace(" ", "")), int(m[2].replace(" ", ""))
            if m.re is INT_RANGE:
                values += list(range(start, end + 1, int(m[3]) if m[3] else 1))
            else:
                values += [int(v) for v in np.linspace(start, end, int(m[3]) if m[3] else 1).tolist()]
        elif axis.kind is float and (m := FLOAT_RANGE.fullmatch(item) or FLOAT_COUNT.fullmatch(item)):
            start, end = float(m[1].replace(" ", "")), float(m[2].replace(" ", ""))
            if m.re is FLOAT_RANGE:
                step = float(m[3]) if m[3] else 1.0
                values += np.arange(start, end + step, step).tolist() if step else []
            else:
                values += np.linspace(start, end, int(m[3]) if m[3] else 1).tolist()
        else:
            values.append(item)
        if len(values) > MAX_CELLS:
            fail(f"X/Y/Z plot: {axis.label} has over {MAX_CELLS} values")
    try:
        values = [axis.kind(v) for v in values]
    except ValueError:
        fail(f"X/Y/Z plot: {axis.label} values must be {axis.kind.__name__}s, not {text!r}")
    if not values:
        fail(f"X/Y/Z plot: {axis.label} has no values")
    return values


@dataclass
class Plot:
    grid: Image.Image  # the cells with the axes' values along the edges (the z axis's grids side by side)
    grid_infotext: str  # the first cell's, with the plot's axes
    images: torch.Tensor  # (cells, 3, h, w) in [0, 1], x fastest, then y, then z
    infotexts: list[str]
    seeds: list[int]
    request: GenerationRequest  # the first cell's, as it ran


def xyz_plot(
    pipeline: Pipeline,
    request: GenerationRequest,
    axes: list[tuple[Axis, str]],
    draw_legend: bool = True,
    max_batch: int = 8,
) -> Plot:
    """`request` (one image) varied along up to three axes [(axis, its values' text)]: x, then y, then z. Every
    cell's request is checked before any is run (RequestError naming the problem); cells that can share U-Net
    batches (same settings, prompts of the same length, the same LoRAs) do, up to `max_batch` images."""
    if len(request.prompts) != 1:
        fail(f"X/Y/Z plot: one image per cell; the request asks for {len(request.prompts)}")
    axes = [*axes, *[(AXES[0], "")] * (3 - len(axes))]
    values = [axis_values(axis, text) for axis, text in axes]
    shape = [len(v) for v in values]  # (x, y, z)
    if math.prod(shape) > MAX_CELLS:
        fail(f"X/Y/Z plot: {' x '.join(map(str, shape))} cells, over {MAX_CELLS}")
    plans = []
    for iz, iy, ix in np.ndindex(*shape[::-1]):
        r = request
        for (axis, _), vals, i in zip(axes, values, (ix, iy, iz)):  # (the web UI applies x, then y, then z)
            r = axis.apply(r, vals[i], vals)
        plans.append(resolve(r, pipeline))
    images, infotexts = [None] * len(plans), [None] * len(plans)
    for group in _batches(plans, max_batch):
        result = generate_plan(merge([plans[i] for i in group]))
        for i, image, text in zip(group, result.images, result.infotexts):
            images[i], infotexts[i] = image, text
    grid = _grid([to_pil(t) for t in images], axes, values, shape, draw_legend)
    seeds = [plan.request.seeds[0] for plan in plans]
    return Plot(grid, _grid_infotext(plans[0], axes), torch.stack(images), infotexts, seeds, plans[0].request)


def _batches(plans: list[Plan], max_batch: int) -> list[list[int]]:
    """The cells' indices grouped by what lets them share a U-Net batch, in groups of at most max_batch."""
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(plan.batch_key(), []).append(i)
    return [g[i : i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def _label(axis: Axis, value) -> str:
    """A cell's value as the web UI writes it along the grid: "Steps: 20"; a sampler, a prompt replacement bare."""
    if axis.label == "Nothing":
        return ""
    value = round(value, 8) if isinstance(value, float) else value
    return str(value) if axis.label in ("Prompt S/R", "Sampler") else f"{axis.label}: {value}"


def _grid(cells: list[Image.Image], axes, values, shape, draw_legend: bool) -> Image.Image:
    """The cells in rows of x, one grid per z value side by side; the x values above the columns, the y values
    left of the rows and the z values above each grid."""
    nx, ny, nz = shape
    w, h = cells[0].size
    font = ImageFont.load_default(size=max(10, min(w, h) // 10))
    widths = [font.getlength(_label(axes[1][0], v)) for v in values[1]]
    top, left = (int(font.size * 2), int(max(widths) + font.size)) if draw_legend else (0, 0)
    title = top if draw_legend and axes[2][0].label != "Nothing" else 0
    grid = Image.new("RGB", (nz * (left + nx * w), title + top + ny * h), "white")
    draw = ImageDraw.Draw(grid)

    def label(centre: tuple[float, float], axis: int, index: int) -> None:
        draw.text(centre, _label(axes[axis][0], values[axis][index]), "black", font, "mm")

    for iz in range(nz):
        x0 = iz * (left + nx * w)
        if title:
            label((x0 + left + nx * w / 2, title / 2), 2, iz)
        for iy in range(ny):
            if draw_legend:
                label((x0 + left / 2, title + top + iy * h + h / 2), 1, iy)
            for ix in range(nx):
                grid.paste(cells[ix + iy * nx + iz * nx * ny], (x0 + left + ix * w, title + top + iy * h))
        for ix in range(nx if draw_legend else 0):
            label((x0 + left + ix * w + w / 2, title + top / 2), 0, ix)
    return grid


def _grid_infotext(plan: Plan, axes) -> str:
    """The first cell's infotext with the web UI's "Script", "X Type", "X Values" (and Y, Z) fields."""
    fields = infotext_fields(plan) | {"Script": "X/Y/Z plot"}
    for name, (axis, text) in zip("XYZ", axes):
        if axis.label != "Nothing":
            fields |= {f"{name} Type": axis.label, f"{name} Values": text}
    return infotext(plan.request, 0, fields)
