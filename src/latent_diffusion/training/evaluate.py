"""Prompt adherence on the shapes data: generate images for shape captions and read each attribute back
from the pixels with a deterministic analyser (no learned model).

Analyser: background = the palette colour nearest the median of the border pixels; colour = the palette colour
nearest the median of the pixels far from the background; the shape's pixels = those nearer that colour than
the background's; size from their bounding box; position from their centroid; shape from how much of the
bounding box they fill (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2). Positions are the nearest of `places`: the five
the built-in model knows, or with its LoRA's corners (`data.CORNERS`) nine.

Control adherence (`control_adherence`): the same, with a ControlNet and each shape's mask as its control image
(`data.draw(..., mask=True)`), for prompts that name no position or size: position and size are read from the
generated image and from the control image by the same analyser and compared; colour, shape and background
(where named) against the prompt.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch

from ..models.ldm import LatentDiffusion
from ..pipeline.generate import Progress, generate
from ..pipeline.loading import Pipeline
from ..pipeline.request import ControlUnit, GenerationRequest, GenerationResult
from .data import COLORS, CORNERS, EVAL_FORMS, HELD_OUT_PAIRS, PLACES, POSITIONS, SIZES, Shape, ShapesDataset

PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1  # (8, 3) in [-1, 1]
NAMES = list(COLORS)
ATTRIBUTES = ("shape", "color", "background", "size", "position")
CONTROLLED = ("position", "size")  # what the control image decides
BOTH = "size and position"  # both right in one image
CONTROL_FORMS = ("short", "on background")  # prompt forms that name neither: the control image alone says them


def nearest_color(rgb: torch.Tensor) -> str:
    return NAMES[int(((PALETTE - rgb) ** 2).sum(dim=1).argmin())]


def analyse(image: torch.Tensor, places: dict = POSITIONS) -> dict[str, str]:
    """image (3, H, W) in [-1, 1] -> {"shape", "color", "background", "size", "position"}; the position is the
    nearest of `places` (name -> (x, y))."""
    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 2H + 2W)
    background = nearest_color(border.median(dim=1).values)
    bg = PALETTE[NAMES.index(background)][:, None, None]
    nothing = {"shape": "none", "color": "none", "background": background, "size": "none", "position": "none"}
    far = ((image - bg) ** 2).sum(dim=0) > 0.3  # (H, W): clearly not background
    if far.sum() < 4:
        return nothing
    color = nearest_color(image[:, far].median(dim=1).values)
    # The shape's pixels: those nearer its colour than the background's. Splitting at the midpoint keeps a
    # blurred edge where it was and leaves out faint halos, which would widen the box and lower the fill.
    fg = ((image - PALETTE[NAMES.index(color)][:, None, None]) ** 2).sum(dim=0) < ((image - bg) ** 2).sum(dim=0)
    if fg.sum() < 4:  # e.g. a smudge whose nearest palette colour is the background's
        return nothing
    ys, xs = torch.nonzero(fg, as_tuple=True)
    box_h, box_w = (ys.max() - ys.min() + 1).item(), (xs.max() - xs.min() + 1).item()
    fill = fg.sum().item() / (box_h * box_w)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    side = max(box_h / h, box_w / w)
    size = min(SIZES, key=lambda s: abs(SIZES[s] - side))
    cy, cx = ys.float().mean().item() / h, xs.float().mean().item() / w
    if shape == "triangle":  # a triangle's centroid sits a sixth of its height below its box's centre
        cy -= box_h / h / 6
    position = min(places, key=lambda p: (places[p][0] - cx) ** 2 + (places[p][1] - cy) ** 2)
    return {"shape": shape, "color": color, "background": background, "size": size, "position": position}


# What the training data draws at random when a caption leaves it out, and how often each value then comes up
# over a split's images: position 1 in 5, size 1 in 2, background 1 in 8 (any colour but the shape's, whose
# colour varies from prompt to prompt).
LEFT_TO_CHANCE = {"position": 1 / len(POSITIONS), "size": 1 / len(SIZES), "background": 1 / len(COLORS)}


def score(
    specs: list[Shape], images: torch.Tensor, attributes: tuple[str, ...] = ATTRIBUTES, places: dict = POSITIONS
) -> dict:
    """Share of images whose analysed attribute equals the one asked for, per attribute in `attributes`. For each
    attribute that the prompts leave out, "most common": the value read most often and its share of the images.
    A prompt that does not name a position should get the shape anywhere, about 1 in 5 at each place; a model
    that puts it at the top for "a red circle" scores nothing wrong in `attributes`, and shows here."""
    found = [analyse(im, places) for im in images]
    row: dict = {a: sum(f[a] == getattr(s, a) for f, s in zip(found, specs)) / len(specs) for a in attributes}
    if unnamed := [a for a in LEFT_TO_CHANCE if a not in attributes]:
        read = {a: Counter(f[a] for f in found if f[a] != "none").most_common(1) for a in unnamed}  # [(value, n)]
        row["most common"] = {a: [value, n / len(specs)] for a, top in read.items() for value, n in top}
    return row


@torch.no_grad()
def prompt_adherence(
    pipeline: Pipeline | LatentDiffusion,
    count: int,
    settings: GenerationRequest,
    *,
    seed: int = 0,
    forms: tuple[str, ...] = tuple(EVAL_FORMS),
    progress: Callable[[Progress], None] | None = None,
    positions: tuple[str, ...] = tuple(POSITIONS),
) -> tuple[dict[str, dict], GenerationResult]:
    """Generate `count` images for prompts about seen (colour, shape) pairs and `count` for held-out pairs, drawn
    at `positions` (with a corner among them, the analyser reads positions among all nine `data.PLACES`), in each
    of the prompt `forms` (`data.EVAL_FORMS`), with the size, sampler, guidance and batch size of `settings` (its
    prompts and seeds are ignored), and score the attributes each form names:
    ({form: {"seen": {"images": n, "shape": share, ...}, "held-out": {...}}}, the last result: its request as run and
    its infotext fields). Image i of each
    split has seed seed + i and shows the same shape in every form, so forms differ only in their wording."""
    size = settings.width or 64
    splits = {
        "seen": ShapesDataset(count, size, seed=seed + 1, positions=positions),
        "held-out": ShapesDataset(count, size, seed=seed + 2, only=HELD_OUT_PAIRS, positions=positions),
    }
    places = PLACES if set(positions) & set(CORNERS) else POSITIONS
    report = {}
    for name in forms:
        form = EVAL_FORMS[name]
        for split, data in splits.items():
            request = dataclasses.replace(
                settings,
                prompts=[form.write(s) for s in data.specs],
                seeds=[seed + i for i in range(count)],
                negative_prompts=None,
            )
            result = generate(pipeline, request, progress)
            images = result.images.cpu() * 2 - 1
            row = score(data.specs, images, form.attributes, places)
            report.setdefault(name, {})[split] = {"images": count, **row}
    return report, result


def control_score(specs: list[Shape], images: torch.Tensor, hints: torch.Tensor, attributes: tuple[str, ...]) -> dict:
    """Share of images whose position and size, as the analyser reads them, are those it reads off the control image
    (`hints`, (n, 3, H, W) in [0, 1]), each and both (BOTH), and whose attributes named by the prompt (`attributes`)
    are the prompt's."""
    found = [analyse(im) for im in images]
    wanted = [analyse(hint * 2 - 1) for hint in hints]
    row = {a: sum(f[a] == w[a] for f, w in zip(found, wanted)) / len(specs) for a in CONTROLLED}
    row[BOTH] = sum(all(f[a] == w[a] for a in CONTROLLED) for f, w in zip(found, wanted)) / len(specs)
    named = [a for a in attributes if a not in CONTROLLED]
    return row | {a: sum(f[a] == getattr(s, a) for f, s in zip(found, specs)) / len(specs) for a in named}


@torch.no_grad()
def control_adherence(
    pipeline: Pipeline,
    controlnet: str,
    count: int,
    settings: GenerationRequest,
    *,
    weight: float = 1.0,
    seed: int = 0,
    forms: tuple[str, ...] = CONTROL_FORMS,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[dict[str, dict], GenerationResult]:
    """As `prompt_adherence`, each image with one control unit: the pipeline's `controlnet` (by name) at `weight`
    (0: the images the model draws without it, to compare with), its control image the mask of the shape the prompt
    describes. -> ({form: {"seen": {"images": n, "position": share, ...}, "held-out": {...}}}, the last result)."""
    size = settings.width or 64
    splits = {
        "seen": ShapesDataset(count, size, seed=seed + 1, control=True),
        "held-out": ShapesDataset(count, size, seed=seed + 2, only=HELD_OUT_PAIRS, control=True),
    }
    report = {}
    for name in forms:
        form = EVAL_FORMS[name]
        for split, data in splits.items():
            hints = torch.stack([data.hint(i) for i in range(count)])
            request = dataclasses.replace(
                settings,
                prompts=[form.write(s) for s in data.specs],
                seeds=[seed + i for i in range(count)],
                negative_prompts=None,
                controls=[ControlUnit(controlnet, hints, weight=weight, resize_mode="resize")],
            )
            result = generate(pipeline, request, progress)
            images = result.images.cpu() * 2 - 1
            report.setdefault(name, {})[split] = {
                "images": count,
                **control_score(data.specs, images, hints, form.attributes),
            }
    return report, result
