"""The web UI's two outpainting scripts, on the img2img inpainting path: a picture extended by some pixels on chosen
sides, the new border redrawn to continue it.

Both first work out the canvas as the web UI's scripts do (`scripts/poor_mans_outpainting.py` and
`scripts/outpainting_mk_2.py`, their `run`): `pixels` asked for on each chosen side, each axis of the canvas rounded
up to a multiple of 64, and the rounding shared between the two sides of an axis, the first (left, up) taking
⌊pixels · extra / (its pixels + the other's)⌋ of the `extra` columns (rows) and the second the rest.

- **Poor man's outpainting**: the picture pasted into a black canvas; a mask, white but for a black box over the
  picture inset by 2·blur on each new side, blurred by σ = 2·blur (the box's inset keeps the blur off the picture);
  a sharper latent mask inset by ⌊blur / 2⌋. The canvas is cut into the tiles of the SD upscale script
  (`sd_upscale.tile_origins`: the request's width × height, overlapping by `pixels`), each tile that reaches outside
  the picture is inpainted alone with its crops of the masks, with the script's "masked content" (fill, original,
  latent noise, latent nothing), and the tiles are joined as SD upscale joins them. One result per request; tile k
  (in rows, skipping the tiles inside the picture) takes seed + k, as the web UI moves its seed on per tile.
- **Outpainting mk2**: one pass per chosen side, in the order left, right, up, down, each over the result of the
  last: the picture (as it now is) in a canvas of its size plus that side's pixels (rounded up to 64), the new
  border painted with `matched_noise` (the picture's colours and grain), then the part next to it inpainted as
  "original": across, the request's width (height), or the picture plus the pixels where that is smaller; along,
  the whole canvas. Its mask's box is inset by blur, the latent mask's by 2·blur, and the mask is blurred by
  σ = 4·blur along the axes that grow. batch_size results at a time, each batch redrawn in one U-Net batch.

Seeds, as the web UI's: poor man's tile k takes seed + k (its script sets the seed to the last tile's plus one);
mk2's passes all reuse the batch's seeds (its script never moves them on), and its colour noise is numpy's
`default_rng(0)`, the same for every seed. The web UI's mk2 also reuses one batch's seeds in every iteration of
n_iter (a fixed seed gives n_iter identical copies); here iteration k takes the request's own seeds, seed +
k·batch_size + j, so that n_iter 1 is the web UI's image for image, and more iterations give new images.

The work of each pass is `generate`'s inpainting of a prepared image and mask, then laid over that image through
the blurred mask (`masking.paste_through`), as the web UI's processing prepares a script's `image_mask` and
`latent_mask`: so the generation is the tested img2img path, and only the preparation is here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .generate import Progress, generate_plan
from .images import from_pil, to_pil
from .loading import Pipeline
from .masking import blur_mask, fill_masked, paste_through
from .matched_noise import matched_noise
from .plan import resolve
from .request import MAX_SIDE, GenerationRequest, GenerationResult, fail
from .sd_upscale import combine, tile_origins

POOR_MAN = "Poor man's outpainting"
MK2 = "Outpainting mk2"
SIDES = ("left", "right", "up", "down")
FILLS = ("fill", "original", "latent noise", "latent nothing")  # poor man's "Masked content", at its indices
LATENT_FILL = {"latent noise": "noise", "latent nothing": "nothing"}  # (`GenerationRequest.latent_fill`)
MAX_MASK_BLUR = 256  # pixels; the web UI's slider reaches 64
MAX_FALLOFF = 4.0  # mk2's fall-off exponent, as its slider


def check_settings(script: str, pixels, mask_blur, sides: Sequence[str], **more) -> None:
    """The scripts' own settings, before any work (RequestError naming the script and the setting): whole numbers of
    pixels (above 0) and of mask blur, a choice of sides, poor man's `fill` (a name of FILLS), mk2's `falloff` and
    `color_variation` in the ranges of the web UI's sliders."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or not 0 < pixels <= MAX_SIDE:
        fail(f"{script}: the pixels to expand must be a whole number from 1 to {MAX_SIDE}, not {pixels!r}")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or not 0 <= mask_blur <= MAX_MASK_BLUR:
        fail(f"{script}: the mask blur must be a whole number from 0 to {MAX_MASK_BLUR}, not {mask_blur!r}")
    if isinstance(sides, str) or not sides or any(side not in SIDES for side in sides):
        fail(f"{script}: the sides must be one or more of {', '.join(SIDES)}, not {sides!r}")
    if "fill" in more and more["fill"] not in FILLS:
        fail(f"{script}: the masked content must be one of {', '.join(FILLS)}, not {more['fill']!r}")
    for name, most in (("falloff", MAX_FALLOFF), ("color_variation", 1.0)):
        value = more.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= most:
            fail(f"{script}: the {name.replace('_', ' ')} must be a number from 0 to {most:g}, not {value!r}")


@dataclass(frozen=True)
class Margins:
    """Columns (rows) added on each side of the picture, as the web UI shares them out (`margins`)."""

    left: int
    right: int
    up: int
    down: int


def margins(size: tuple[int, int], pixels: int, sides: Sequence[str]) -> Margins:
    """The web UI's expansion of a width × height picture (module docstring): `pixels` on each chosen side, each
    axis rounded up to a multiple of 64, the extra shared between the axis's two sides."""

    def share(first: int, second: int, side: int) -> tuple[int, int]:
        extra = math.ceil((side + first + second) / 64) * 64 - side
        first = first * extra // (first + second) if first else 0
        return first, extra - first if second else 0

    asked = {side: pixels if side in sides else 0 for side in SIDES}
    left, right = share(asked["left"], asked["right"], size[0])
    up, down = share(asked["up"], asked["down"], size[1])
    return Margins(left, right, up, down)


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """An L mask of `size`, white (repaint) but for the box (x0, y0, x1, y1) black, both corners inclusive as the web
    UI draws it (Pillow's rectangle, clipped to the mask)."""
    x0, y0, x1, y1 = box
    mask = np.full((size[1], size[0]), 255, np.uint8)
    mask[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = 0
    return Image.fromarray(mask)


def inpaint(
    pipeline: Pipeline,
    request: GenerationRequest,
    images: list[Image.Image],
    mask: Image.Image,
    latent_mask: Image.Image,
    blur: tuple[float, float],
    fill: str = "original",
    progress: Callable[[Progress], None] | None = None,
) -> tuple[list[Image.Image], GenerationResult]:
    """One pass of a script: `images` (one per prompt of `request`, all of one size) inpainted as the web UI's
    processing prepares a script's masks: the mask blurred by σ = blur (x, y); the images filled from around the
    latent mask's white unless `fill` is "original"; the latent held by the latent mask, its masked part replaced
    for the latent fills; each result laid over its image through the blurred mask. -> (the images, the result)."""
    blurred = blur_mask(mask, *blur)
    starts = images if fill == "original" else [fill_masked(image, latent_mask) for image in images]
    width, height = images[0].size
    run = dataclasses.replace(
        request,
        init_image=torch.cat([from_pil(image) for image in starts]),
        mask=from_pil(blurred),
        latent_mask=from_pil(latent_mask),
        latent_fill=LATENT_FILL.get(fill),
        paste=False,
        width=width,
        height=height,
        batch_size=len(images),
    )
    result = generate_plan(resolve(run, pipeline), progress)
    return [paste_through(to_pil(t), image, blurred) for t, image in zip(result.images, images)], result


def _rows(request: GenerationRequest, k: int, seeds: list[int]) -> GenerationRequest:
    """Prompts k, k + 1, ... of a request, one per seed of `seeds`."""
    n, negatives = len(seeds), request.negative_prompts or [""] * len(request.prompts)
    return dataclasses.replace(
        request, prompts=request.prompts[k : k + n], negative_prompts=negatives[k : k + n], seeds=seeds
    )


def _picture(request: GenerationRequest, script: str) -> Image.Image:
    """The request's one init image, as the 8-bit picture the web UI's script gets."""
    if request.init_image is None or len(request.init_image) != 1 or request.mask is not None:
        fail(f"{script} extends one init image, without a mask (it draws its own)")
    return to_pil(request.init_image[0])


def _as_run(request: GenerationRequest, first: GenerationResult, n: int) -> GenerationRequest:
    """The script's request as run (its first pass's settings, resolved), for its first n prompts."""
    negatives = request.negative_prompts or [""] * len(request.prompts)
    return dataclasses.replace(
        first.request,
        prompts=request.prompts[:n],
        negative_prompts=negatives[:n],
        seeds=request.seeds[:n],
        init_image=request.init_image,
        mask=None,
        latent_mask=None,
        latent_fill=None,
        batch_size=request.batch_size,
    )


def _check_box(box: tuple[int, int, int, int], script: str) -> None:
    if box[2] < box[0] or box[3] < box[1]:
        fail(f"{script}: the mask blur leaves nothing of the picture to keep; lower it, or enlarge the picture")


def _check_canvas(size: tuple[int, int], script: str) -> None:
    if max(size) > MAX_SIDE:
        fail(f"{script}: the canvas would be {size[0]}x{size[1]}, over {MAX_SIDE} pixels a side")


@dataclass(frozen=True)
class PoorMansLayout:
    """Where poor man's outpainting works: its canvas, its masks' boxes and the tiles it redraws."""

    canvas: tuple[int, int]  # (width, height)
    margins: Margins
    tile: tuple[int, int]  # (width, height)
    mask_box: tuple[int, int, int, int]  # black (kept) in the mask, inclusive
    latent_box: tuple[int, int, int, int]  # black in the latent mask
    xs: list[int]  # the tiles' left and top edges (`sd_upscale.tile_origins`)
    ys: list[int]
    redrawn: list[tuple[int, int]]  # (x, y) of the tiles that reach outside the picture, in rows


def poor_mans_layout(
    size: tuple[int, int], tile: tuple[int, int], pixels: int, mask_blur: int, sides: Sequence[str]
) -> PoorMansLayout:
    """Poor man's canvas, masks and tiles for a picture of `size` and tiles of `tile` (the request's width × height)
    overlapping by `pixels`; RequestError where the tiles cannot cover the canvas or the blur leaves no box."""
    m = margins(size, pixels, sides)
    # (an axis with no side chosen is rounded up to 64 all the same, the picture at its start: black bars, kept)
    width, height = (
        math.ceil((side + extra) / 64) * 64 for side, extra in zip(size, (m.left + m.right, m.up + m.down))
    )
    _check_canvas((width, height), POOR_MAN)

    def box(inset: int) -> tuple[int, int, int, int]:  # the picture, inset on its new sides
        x0, y0 = m.left + (inset if m.left else 0), m.up + (inset if m.up else 0)
        return x0, y0, width - m.right - (inset if m.right else 0), height - m.down - (inset if m.down else 0)

    tile_w, tile_h = tile
    if pixels >= min(tile_w, tile_h):
        fail(
            f"{POOR_MAN}: the tiles overlap by the pixels to expand ({pixels}), which must be below their sides "
            f"({tile_w}x{tile_h}); raise the width and height"
        )
    if width < tile_w or height < tile_h:
        fail(
            f"{POOR_MAN}: the canvas is {width}x{height}, smaller than a {tile_w}x{tile_h} tile; lower the width "
            "and height"
        )
    xs, ys = tile_origins(width, tile_w, pixels), tile_origins(height, tile_h, pixels)
    inside = lambda x, y: m.left <= x and x + tile_w <= width - m.right and m.up <= y and y + tile_h <= height - m.down  # noqa: E731
    redrawn = [(x, y) for y in ys for x in xs if not inside(x, y)]
    layout = PoorMansLayout((width, height), m, tile, box(2 * mask_blur), box(mask_blur // 2), xs, ys, redrawn)
    _check_box(layout.mask_box, POOR_MAN)
    _check_box(layout.latent_box, POOR_MAN)
    return layout


def poor_mans_outpainting(
    pipeline: Pipeline,
    request: GenerationRequest,
    pixels: int = 128,
    mask_blur: int = 4,
    fill: str = "fill",
    sides: Sequence[str] = SIDES,
    progress: Callable[[Progress], None] | None = None,
) -> GenerationResult:
    """The web UI's "Poor man's outpainting" (module docstring) of an img2img request's one init image: one result,
    from its first prompt, the tiles at its width × height (None: the model's size), tile k with seed seeds[0] + k.
    Its defaults are the script's; RequestError before any work for settings that cannot run."""
    check_settings(POOR_MAN, pixels, mask_blur, sides, fill=fill)
    picture, r = _picture(request, POOR_MAN), request
    side = pipeline.model.cfg.default_size
    layout = poor_mans_layout(picture.size, (r.width or side, r.height or side), pixels, mask_blur, sides)
    (tile_w, tile_h), m = layout.tile, layout.margins
    canvas = Image.new("RGB", layout.canvas)  # black where the picture is not
    canvas.paste(picture, (m.left, m.up))
    mask, latent_mask = (box_mask(layout.canvas, box) for box in (layout.mask_box, layout.latent_box))
    tiles = {(x, y): canvas.crop((x, y, x + tile_w, y + tile_h)) for y in layout.ys for x in layout.xs}
    first, warnings = None, []
    for k, (x, y) in enumerate(layout.redrawn):
        crop = (x, y, x + tile_w, y + tile_h)
        one = _rows(r, 0, [r.seeds[0] + k])
        blur = (2 * mask_blur, 2 * mask_blur)
        done, result = inpaint(
            pipeline, one, [tiles[x, y]], mask.crop(crop), latent_mask.crop(crop), blur, fill, progress
        )
        tiles[x, y], first = done[0], first or result
        warnings += [w for w in result.warnings if w not in warnings]
    joined = combine([[tiles[x, y] for x in layout.xs] for y in layout.ys], layout.xs, layout.ys, layout.canvas, pixels)
    return GenerationResult(from_pil(joined), first.infotexts[:1], warnings, _as_run(r, first, 1), first.fields)


@dataclass(frozen=True)
class Mk2Pass:
    """One side's pass of Outpainting mk2, in the coordinates of its canvas."""

    side: str
    canvas: tuple[int, int]  # the picture plus this side's pixels, rounded up to 64 a side
    size: tuple[int, int]  # the picture plus this side's pixels: what the canvas is cut back to
    offset: tuple[int, int]  # where the picture goes
    mask_box: tuple[int, int, int, int]  # black (kept) in the mask, inclusive
    crop: tuple[int, int, int, int]  # the part of the canvas redrawn
    latent_box: tuple[int, int, int, int]  # black in the latent mask, in the crop's coordinates

    @property
    def work(self) -> tuple[int, int]:
        return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]


def mk2_passes(
    size: tuple[int, int], most: tuple[int, int], pixels: int, mask_blur: int, sides: Sequence[str]
) -> list[Mk2Pass]:
    """mk2's passes over a picture of `size`, each redrawing at most `most` (the request's width × height) across
    the axis it grows; RequestError where a pass cannot run (no box to keep, sides that are not multiples of 8)."""
    m = margins(size, pixels, sides)
    blur_x = mask_blur if m.left or m.right else 0
    blur_y = mask_blur if m.up or m.down else 0
    (w, h), passes = size, []
    for side in (s for s in SIDES if getattr(m, s)):
        p, across = getattr(m, side), side in ("left", "right")
        left, right, up, down = (side == s for s in SIDES)
        res_w, res_h = (w + p, h) if across else (w, h + p)
        canvas = (math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64)
        _check_canvas(canvas, MK2)
        work_w, work_h = (min(most[0], res_w), canvas[1]) if across else (canvas[0], min(most[1], res_h))
        crop = (
            0 if left else canvas[0] - work_w,
            0 if up else canvas[1] - work_h,
            work_w if left else canvas[0],
            work_h if up else canvas[1],
        )
        mask_box = (
            p + blur_x if left else 0,
            p + blur_y if up else 0,
            canvas[0] - p - blur_x if right else res_w,
            canvas[1] - p - blur_y if down else res_h,
        )
        latent_box = (
            p + 2 * blur_x if left else 0,
            p + 2 * blur_y if up else 0,
            work_w - p - 2 * blur_x if right else res_w,
            work_h - p - 2 * blur_y if down else res_h,
        )
        passes.append(
            Mk2Pass(side, canvas, (res_w, res_h), (p if left else 0, p if up else 0), mask_box, crop, latent_box)
        )
        _check_box(mask_box, MK2)
        _check_box(latent_box, MK2)
        if work_w % 8 or work_h % 8:
            fail(
                f"{MK2}: its {side} pass would redraw {work_w}x{work_h}; sides must be multiples of 8 (the web UI "
                "fails there too): change the pixels to expand, or the picture's size"
            )
        w, h = res_w, res_h
    return passes


def outpainting_mk2(
    pipeline: Pipeline,
    request: GenerationRequest,
    pixels: int = 128,
    mask_blur: int = 8,
    sides: Sequence[str] = SIDES,
    falloff: float = 1.0,
    color_variation: float = 0.05,
    progress: Callable[[Progress], None] | None = None,
) -> GenerationResult:
    """The web UI's "Outpainting mk2" (module docstring) of an img2img request's one init image: a result per
    prompt, batch_size at a time through all the passes, with the request's seeds (module docstring: the web UI's
    for one batch). Its defaults are the script's; RequestError before any work for settings that cannot run."""
    check_settings(MK2, pixels, mask_blur, sides, falloff=falloff, color_variation=color_variation)
    picture, r = _picture(request, MK2), request
    side = pipeline.model.cfg.default_size
    passes = mk2_passes(picture.size, (r.width or side, r.height or side), pixels, mask_blur, sides)
    grows = {"left", "right"} & set(sides), {"up", "down"} & set(sides)
    blur = (4 * mask_blur if grows[0] else 0, 4 * mask_blur if grows[1] else 0)
    images, infotexts, warnings, first = [], [], [], None
    for k in range(0, len(r.prompts), r.batch_size):
        batch = _rows(r, k, r.seeds[k : k + r.batch_size])
        pictures = [picture] * len(batch.prompts)
        for i, step in enumerate(passes):
            pictures, result = _mk2_pass(pipeline, batch, pictures, step, blur, (falloff, color_variation), progress)
            infotexts += result.infotexts if i == 0 else []  # (each image's first pass, as the web UI's info)
            first = first or result
            warnings += [w for w in result.warnings if w not in warnings]
        images += pictures
    images = torch.cat([from_pil(image) for image in images])
    return GenerationResult(images, infotexts, warnings, _as_run(r, first, len(r.prompts)), first.fields)


def _mk2_pass(
    pipeline: Pipeline,
    request: GenerationRequest,
    pictures: list[Image.Image],
    step: Mk2Pass,
    blur: tuple[int, int],
    noise: tuple[float, float],
    progress: Callable[[Progress], None] | None,
) -> tuple[list[Image.Image], GenerationResult]:
    """One side's pass over the pictures (one per prompt of `request`): each in its canvas with the border painted
    by `matched_noise` (falloff, colour variation), the crop inpainted, pasted back and cut to the new size."""
    mask = box_mask(step.canvas, step.mask_box)
    noise_mask = np.asarray(mask, np.float64) / 255
    canvases, painted = [], {}
    for picture in pictures:
        if id(picture) not in painted:  # (a first pass's pictures are one picture, repeated)
            canvas = Image.new("RGB", step.canvas)
            canvas.paste(picture, step.offset)
            noised = matched_noise(np.asarray(canvas, np.float64) / 255, noise_mask, *noise)
            painted[id(picture)] = Image.fromarray((noised * 255).astype(np.uint8))  # (truncated, as the web UI)
        canvases.append(painted[id(picture)].copy())
    latent_mask = box_mask(step.work, step.latent_box)
    crops = [canvas.crop(step.crop) for canvas in canvases]
    redrawn, result = inpaint(pipeline, request, crops, mask.crop(step.crop), latent_mask, blur, "original", progress)
    for canvas, part in zip(canvases, redrawn):
        canvas.paste(part, step.crop[:2])
    return [canvas.crop((0, 0, *step.size)) for canvas in canvases], result
