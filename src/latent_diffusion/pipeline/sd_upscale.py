"""The web UI's "SD upscale" script (its `scripts/sd_upscale.py`, the core of the "Ultimate SD upscale" extension):
an image enlarged by an upscaler, cut into overlapping tiles of the request's width × height, each tile redrawn by
img2img, and the tiles laid back together with linear ramps over the overlaps. An image larger than memory holds at
once is refined tile by tile.

As the web UI: the tiles are spread evenly over the image (its `images.split_grid`), redrawn `batch_size` at a time,
batch i of result k with seeds seed + k + i, seed + k + i + 1, ... (it moves its seed on by one per batch), and
joined in 8 bits with its masks (`images.combine_grid`): each tile's first `overlap` columns over the row so far,
each row's first `overlap` rows over the image so far.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from .generate import generate_plan
from .images import from_pil, to_pil
from .loading import Pipeline
from .plan import infotext, resolve
from .request import GenerationRequest, GenerationResult, fail
from .upscalers import RESAMPLERS, Upscaler, UpscalerError, upscale

SCRIPT = "SD upscale"


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles of one axis start: as few as cover `size` with `overlap` shared, spread evenly, the last one
    flush with the end."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), size - tile) for i in range(count)]


def combine(tiles: list[list[Image.Image]], xs: list[int], ys: list[int], size: tuple[int, int], overlap: int):
    """Tiles (rows of them, at xs × ys) -> one image of `size`, each overlap crossed by an 8-bit linear ramp from the
    earlier tile to the later one."""
    width, _ = size
    tile_w, tile_h = tiles[0][0].size
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / max(overlap, 1)).astype(np.uint8)  # the later tile's weight
    across = Image.fromarray(np.tile(ramp, (tile_h, 1)), "L")  # (tile_h, overlap)
    down = Image.fromarray(np.tile(ramp[:, None], (1, width)), "L")  # (overlap, width)
    image = Image.new("RGB", size)
    for y, row in zip(ys, tiles):
        strip = Image.new("RGB", (width, tile_h))
        for x, tile in zip(xs, row):
            if x > 0 and overlap:
                strip.paste(tile.crop((0, 0, overlap, tile_h)), (x, 0), mask=across)
            strip.paste(tile.crop((overlap if x > 0 else 0, 0, tile_w, tile_h)), (x + (overlap if x > 0 else 0), 0))
        if y > 0 and overlap:
            image.paste(strip.crop((0, 0, width, overlap)), (0, y), mask=down)
        image.paste(strip.crop((0, overlap if y > 0 else 0, width, tile_h)), (0, y + (overlap if y > 0 else 0)))
    return image


def sd_upscale(
    pipeline: Pipeline,
    request: GenerationRequest,
    upscaler: str = "None",
    scale: float = 2.0,
    overlap: int = 64,
    progress=None,
) -> GenerationResult:
    """One enlarged image per prompt of an img2img `request` (its init image, one for all; width × height: the tile
    size; its seeds: one per result), redrawn tile by tile (RequestError before any work for settings that cannot
    run). `upscaler`: a resampler or one of the pipeline's model files ("None": the image as it is)."""
    r = request
    if r.init_image is None or len(r.init_image) != 1 or r.mask is not None:
        fail(f"{SCRIPT} redraws one init image, without a mask")
    if not 0 <= overlap < min(r.width or 1, r.height or 1):
        fail(f"{SCRIPT}: the overlap must be at least 0 and below the tile's sides, not {overlap}")
    known = {**RESAMPLERS, **{name: Upscaler(name, path) for name, path in pipeline.upscalers.items()}}
    try:
        enlarged = r.init_image if upscaler == "None" else upscale(r.init_image, upscaler, scale=scale, upscalers=known)
    except UpscalerError as e:
        fail(f"{SCRIPT}: {e}")
    height, width = enlarged.shape[-2:]
    if width < r.width or height < r.height:
        fail(f"{SCRIPT}: the enlarged image is {width}x{height}, smaller than a {r.width}x{r.height} tile")
    xs, ys = tile_origins(width, r.width, overlap), tile_origins(height, r.height, overlap)
    crops = torch.cat([enlarged[..., y : y + r.height, x : x + r.width] for y in ys for x in xs])
    images, infotexts, warnings, first = [], [], [], None
    for k, (prompt, negative) in enumerate(zip(r.prompts, r.negative_prompts or [""] * len(r.prompts))):
        done, seed = [], r.seeds[k]
        for start in range(0, len(crops), r.batch_size):
            batch = crops[start : start + r.batch_size]
            tiles = dataclasses.replace(
                r,
                prompts=[prompt] * len(batch),
                negative_prompts=[negative] * len(batch),
                init_image=batch,
                seeds=[seed + j for j in range(len(batch))],
                batch_size=len(batch),
            )
            result = generate_plan(resolve(tiles, pipeline), progress)
            first = first or result
            if not infotexts[k:]:  # the first batch's first infotext, with the script's fields, as the web UI's
                fields = _with_script_fields(result.fields, overlap, upscaler)
                infotexts.append(infotext(result.request, 0, fields))
            warnings += [w for w in result.warnings if w not in warnings]
            done += [to_pil(image) for image in result.images]
            seed += 1
        rows = [done[i : i + len(xs)] for i in range(0, len(done), len(xs))]
        images.append(from_pil(combine(rows, xs, ys, (width, height), overlap)))
    resolved = dataclasses.replace(
        first.request,
        prompts=r.prompts,
        negative_prompts=r.negative_prompts or [""] * len(r.prompts),
        seeds=r.seeds,
        init_image=r.init_image,
        batch_size=r.batch_size,
    )
    return GenerationResult(torch.cat(images), infotexts, warnings, resolved, first.fields)  # (as run: the defaults)


def _with_script_fields(fields: dict, overlap: int, upscaler: str) -> dict:
    """The infotext's fields with the script's two after the settings and before the networks', as the web UI's
    (its extra generation parameters are set before the networks add theirs)."""
    later = ("Lora hashes", "TI hashes", "Refiner", "Refiner switch at")
    ours = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
    head = {k: v for k, v in fields.items() if k not in later}
    return head | ours | {k: v for k, v in fields.items() if k in later}
