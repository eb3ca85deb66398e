"""The web UI's scripts through its API (`script_name`, `script_args`): img2img's "SD upscale"
(`pipeline/sd_upscale.py`), "Outpainting mk2" and "Poor man's outpainting" (`pipeline/outpainting.py`), and
txt2img's and img2img's "X/Y/Z plot" (`pipeline/xyz_plot.py`). Each runs on the server's worker in the queue's turn,
and answers as the request it came in would.
"""

from __future__ import annotations

import dataclasses
import math
import time

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..pipeline.images import as_mode, from_pil, to_pil
from ..pipeline.loading import Pipeline
from ..pipeline.outpainting import (
    FILLS,
    MK2,
    POOR_MAN,
    SIDES,
    check_settings,
    mk2_passes,
    outpainting_mk2,
    poor_mans_layout,
    poor_mans_outpainting,
)
from ..pipeline.request import MAX_HIRES_SCALE, RequestError
from ..pipeline.sd_upscale import sd_upscale
from ..pipeline.upscalers import RESAMPLERS
from ..pipeline.xyz_plot import AXES, axis_values, find_axis, xyz_plot
from . import web_ui_api
from .job_queue import Call


def script_name(body) -> str:
    """The request's script, lower case ("": none)."""
    return str((body.model_extra or {}).get("script_name") or "").strip().lower()


class ScriptRoutes:
    """The scripts over the server's state (its worker, limits, `wait`, `build_job` and `answer`)."""

    def __init__(self, state):
        self.state = state

    def img2img_script(self, body: web_ui_api.Img2ImgRequest):
        """The route of an img2img request's script_name (None: none, or one this server does not run)."""
        routes = {SD_UPSCALE.lower(): self.sd_upscale, XYZ_PLOT: self.xyz_plot}
        return (routes | dict.fromkeys(OUTPAINTING, self.outpaint)).get(script_name(body))

    async def xyz_plot(self, body: web_ui_api.Txt2ImgRequest, http: Request):
        """txt2img or img2img with script_name "X/Y/Z plot": the grid first, then (with its include_lone_images) each
        cell's image, as the web UI answers."""
        arrived = time.monotonic()
        job, axes, legend, lone = await run_in_threadpool(self.xyz_job, body)

        def work(pipeline: Pipeline) -> None:
            limit = self.state.limits.max_batch
            plot = xyz_plot(pipeline, job.request_for(pipeline), axes, draw_legend=legend, max_batch=limit)
            job.request, job.model_path = plot.request, pipeline.checkpoint
            job.images = [plot.grid, *([to_pil(t) for t in plot.images] if lone else [])]
            job.infotexts = [plot.grid_infotext, *(plot.infotexts if lone else [])]

        if not await self.state.wait(Call(work=work), http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        return await run_in_threadpool(self.state.answer, body, job)

    def xyz_job(self, body: web_ui_api.Txt2ImgRequest) -> tuple:
        """The request every cell starts from (with its images, for img2img) and the script's arguments checked:
        [x type, x values, x values (a list), y ..., z ..., draw legend, include lone images, ...], the web UI's
        defaults where they are missing -> (the job, the axes, draw the legend, include each cell's image)."""
        given = (body.model_extra or {}).get("script_args") or []
        if not isinstance(given, list):
            raise RequestError("script_args: a list of the X/Y/Z plot's arguments")
        args = given[:11] + XYZ_DEFAULTS[len(given[:11]) :]
        axes = []
        for i in range(3):
            kind, text, listed = args[3 * i : 3 * i + 3]
            if not isinstance(text, str) or not isinstance(listed, list):
                raise RequestError("script_args: an axis's values are text (and a list of them)")
            text = text if text.strip() or not listed else ",".join(f'"{v}"' for v in map(str, listed))
            axis = find_axis(kind)
            axes.append((axis, text))
            axis_values(axis, text)  # (RequestError naming the problem, before any work)
        cells = math.prod(len(axis_values(axis, text)) for axis, text in axes)
        if cells > self.state.limits.max_images:
            raise RequestError(
                f"script_args: {cells} cells, over this server's limit of {self.state.limits.max_images}"
            )
        build = self.state.build_img2img_job if isinstance(body, web_ui_api.Img2ImgRequest) else self.state.build_job
        job = build(body)
        return job, axes, bool(args[9]), bool(args[10])

    async def sd_upscale(self, body: web_ui_api.Img2ImgRequest, http: Request):
        """img2img with script_name "SD upscale": its init image enlarged and redrawn in tiles of width x height,
        one result per n_iter, batch_size tiles per U-Net call; answered as img2img is."""
        arrived = time.monotonic()
        job, settings = await run_in_threadpool(self.sd_upscale_job, body)

        def work(pipeline: Pipeline) -> None:
            request = job.request_for(pipeline)
            side = pipeline.model.cfg.default_size
            request = dataclasses.replace(request, width=request.width or side, height=request.height or side)
            result = sd_upscale(pipeline, request, *settings)
            job.request, job.model_path = result.request, pipeline.checkpoint
            job.images, job.infotexts, job.warnings = (
                [to_pil(t) for t in result.images],
                result.infotexts,
                result.warnings,
            )

        if not await self.state.wait(Call(work=work), http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        return await run_in_threadpool(self.state.answer, body, job)

    def sd_upscale_job(self, body: web_ui_api.Img2ImgRequest) -> tuple:
        """The checks that need no model, and the init image decoded (not resized: it is the picture) -> (the job, its
        (upscaler, scale, overlap))."""
        if len(body.init_images) != 1 or body.mask:
            raise RequestError(f"init_images: {SD_UPSCALE} takes one image (base64) and no mask")
        names = [*RESAMPLERS, *self.state.worker.pipeline.upscalers]
        settings = sd_upscale_settings(body, names)
        job = self.state.build_job(body, check_model=False)
        image = self.state.open_request_image(body.init_images[0], "init_images[0]", (1, 1), 0)
        upscaled = [int(side * settings[1] // 8 * 8) if settings[0] != "None" else side for side in image.size]
        if max(upscaled) > self.state.limits.max_side:
            raise RequestError(
                f"script_args: {SD_UPSCALE} would enlarge the {image.width}x{image.height} image to "
                f"{upscaled[0]}x{upscaled[1]}, over this server's {self.state.limits.max_side}"
            )
        image = from_pil(as_mode(image, "RGB", "init_images[0]"))
        n = body.n_iter  # one result per iteration; its tiles batch_size at a time
        request = job.request
        job.request = dataclasses.replace(
            request,
            prompts=request.prompts[:n],
            negative_prompts=request.negative_prompts[:n],
            seeds=[request.seeds[0] + k for k in range(n)],
            init_image=image,
            strength=body.denoising_strength,
        )
        return job, settings  # (each batch of tiles is validated as a request of its own)

    async def outpaint(self, body: web_ui_api.Img2ImgRequest, http: Request):
        """img2img with script_name "Outpainting mk2" or "Poor man's outpainting": its init image extended (mk2: a
        result per image of batch_size x n_iter; poor man's: one, as the web UI's), answered as img2img is."""
        arrived = time.monotonic()
        job, run, settings = await run_in_threadpool(self.outpaint_job, body)

        def work(pipeline: Pipeline) -> None:
            result = run(pipeline, job.request_for(pipeline), **settings)
            job.request, job.model_path = result.request, pipeline.checkpoint
            job.images, job.infotexts, job.warnings = (
                [to_pil(t) for t in result.images],
                result.infotexts,
                result.warnings,
            )

        if not await self.state.wait(Call(work=work), http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        return await run_in_threadpool(self.state.answer, body, job)

    def outpaint_job(self, body: web_ui_api.Img2ImgRequest) -> tuple:
        """The script's arguments, the init image (as it is: the script extends it) and the work's sizes checked
        before any work -> (the job, the script's function, its settings)."""
        mk2 = script_name(body) == MK2.lower()
        script = MK2 if mk2 else POOR_MAN
        if len(body.init_images) != 1 or body.mask:
            raise RequestError(f"init_images: {script} takes one image (base64) and no mask (it draws its own)")
        settings = mk2_settings(body) if mk2 else poor_mans_settings(body)
        job = self.state.build_job(body, check_model=False)
        image = self.state.open_request_image(body.init_images[0], "init_images[0]", (1, 1), 0)
        side = self.state.worker.pipeline.model.cfg.default_size
        most = (job.request.width or side, job.request.height or side)
        if mk2:
            passes = mk2_passes(image.size, most, settings["pixels"], settings["mask_blur"], settings["sides"])
            canvas = max(max(step.canvas) for step in passes)
        else:
            layout = poor_mans_layout(image.size, most, settings["pixels"], settings["mask_blur"], settings["sides"])
            canvas = max(layout.canvas)
        if canvas > self.state.limits.max_side:
            raise RequestError(
                f"script_args: {script} would work on a canvas of {canvas} pixels a side, over this "
                f"server's {self.state.limits.max_side}"
            )
        try:  # a mode Pillow cannot convert (a LAB TIFF) is the client's
            image = from_pil(as_mode(image, "RGB", "init_images[0]"))
        except ValueError as e:
            raise RequestError(str(e)) from None
        n = len(job.request.prompts) if mk2 else 1  # (poor man's: one image, its first seed)
        job.request = dataclasses.replace(
            job.request,
            prompts=job.request.prompts[:n],
            negative_prompts=job.request.negative_prompts[:n],
            seeds=job.request.seeds[:n],
            init_image=image,
            strength=body.denoising_strength,
        )
        return job, outpainting_mk2 if mk2 else poor_mans_outpainting, settings


XYZ_PLOT = "x/y/z plot"
# Its script_args where a client sends fewer: x (Seed), y, z (Nothing) with their values, draw legend, lone images
XYZ_DEFAULTS = [1, "", [], 0, "", [], 0, "", [], True, False]
SD_UPSCALE = "SD upscale"
SD_UPSCALE_DEFAULTS = [None, 64, 0, 2.0]  # its script_args: info (a label), overlap, upscaler (index or name), scale


def sd_upscale_settings(body, names: list[str]) -> tuple[str, float, int]:
    """The script's arguments, the web UI's defaults where they are missing -> (upscaler name, scale, overlap). The
    upscaler is an index into the upscalers' list (the web UI's radio) or a name in any case, as its script reads."""
    given = list((body.model_extra or {}).get("script_args") or [])
    if not isinstance(given, list):
        raise RequestError(f"script_args: a list of {SD_UPSCALE}'s [info, overlap, upscaler, scale]")
    _, overlap, upscaler, scale = given[:4] + SD_UPSCALE_DEFAULTS[len(given[:4]) :]
    if isinstance(upscaler, int) and not isinstance(upscaler, bool) and 0 <= upscaler < len(names):
        upscaler = names[upscaler]
    lower = {name.lower(): name for name in names}
    if not isinstance(upscaler, str) or upscaler.lower() not in lower:
        raise RequestError(f"script_args: no upscaler {upscaler!r} here; these are: {', '.join(names)}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise RequestError(f"script_args: the overlap must be a whole number of pixels, not {overlap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_HIRES_SCALE:
        raise RequestError(f"script_args: the scale must be above 0 and at most {MAX_HIRES_SCALE:g}, not {scale!r}")
    return lower[upscaler.lower()], float(scale), overlap


OUTPAINTING = (MK2.lower(), POOR_MAN.lower())
# their script_args where a client sends fewer: mk2's info (a label), pixels, mask blur, direction, fall-off exponent,
# colour variation; poor man's pixels, mask blur, masked content (an index of FILLS), direction
MK2_DEFAULTS = [None, 128, 8, list(SIDES), 1.0, 0.05]
POOR_MAN_DEFAULTS = [128, 4, 0, list(SIDES)]


def _script_args(body, defaults: list, script: str) -> list:
    given = (body.model_extra or {}).get("script_args") or []
    if not isinstance(given, list):
        raise RequestError(f"script_args: a list of {script}'s arguments")
    return given[: len(defaults)] + defaults[len(given[: len(defaults)]) :]


def _whole(value):
    """A number with no fraction as an int (clients' sliders send 8.0), anything else as it is (checked later)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def mk2_settings(body) -> dict:
    """Outpainting mk2's script_args, the web UI's defaults where missing, checked -> `outpainting_mk2`'s keywords."""
    _, pixels, mask_blur, sides, falloff, color_variation = _script_args(body, MK2_DEFAULTS, MK2)
    pixels, mask_blur = _whole(pixels), _whole(mask_blur)
    settings = dict(pixels=pixels, mask_blur=mask_blur, sides=sides, falloff=falloff, color_variation=color_variation)
    check_settings(f"script_args: {MK2}", **settings)
    return settings


def poor_mans_settings(body) -> dict:
    """Poor man's script_args, the web UI's defaults where missing, checked -> `poor_mans_outpainting`'s keywords.
    The masked content is an index of FILLS (the web UI's radio) or a name in any case."""
    pixels, mask_blur, fill, sides = _script_args(body, POOR_MAN_DEFAULTS, POOR_MAN)
    pixels, mask_blur, fill = _whole(pixels), _whole(mask_blur), _whole(fill)
    if isinstance(fill, int) and not isinstance(fill, bool) and 0 <= fill < len(FILLS):
        fill = FILLS[fill]
    fill = fill.lower() if isinstance(fill, str) else fill
    settings = dict(pixels=pixels, mask_blur=mask_blur, fill=fill, sides=sides)
    check_settings(f"script_args: {POOR_MAN}", **settings)
    return settings


def scripts() -> dict:
    """The web UI's /sdapi/v1/scripts: the scripts a request may name, by tab."""
    return {"txt2img": [XYZ_PLOT], "img2img": [SD_UPSCALE.lower(), *OUTPAINTING, XYZ_PLOT]}


def script_info() -> list[dict]:
    """The web UI's /sdapi/v1/script-info: each script's arguments in `script_args` order, with their defaults and
    choices (the X/Y/Z plot's axis types list the labels this server varies, at their indices in the web UI's)."""

    def arg(label: str, value, choices=None, minimum=None, maximum=None, step=None) -> dict:
        return {
            "label": label,
            "value": value,
            "minimum": minimum,
            "maximum": maximum,
            "step": step,
            "choices": choices,
        }

    axes = [axis.label if axis is not None else None for axis in AXES]
    xyz = []
    for name, kind in (("X", "Seed"), ("Y", "Nothing"), ("Z", "Nothing")):
        xyz += [arg(f"{name} type", kind, axes), arg(f"{name} values", ""), arg(f"{name} values", [])]
    xyz += [arg("Draw legend", True), arg("Include Sub Images", False)]
    upscalers = list(RESAMPLERS)
    upscale = [arg("Info", None), arg("Tile overlap", 64), arg("Upscaler", "None", upscalers), arg("Scale Factor", 2.0)]
    # (the web UI's sliders' ranges; this server takes any whole number of pixels, and a mask blur up to 256)
    pixels, direction = arg("Pixels to expand", 128, None, 8, 256, 8), arg("Outpainting direction", list(SIDES), SIDES)
    mk2 = [pixels, arg("Mask blur", 8, None, 0, 64, 1), direction]
    mk2 += [
        arg("Fall-off exponent (lower=higher detail)", 1.0, None, 0, 4, 0.01),
        arg("Color variation", 0.05, None, 0, 1, 0.01),
    ]
    poor_man = [pixels, arg("Mask blur", 4, None, 0, 64, 1), arg("Masked content", "fill", FILLS), direction]
    return [
        {"name": XYZ_PLOT, "is_alwayson": False, "is_img2img": False, "args": xyz},
        {"name": XYZ_PLOT, "is_alwayson": False, "is_img2img": True, "args": xyz},
        {"name": SD_UPSCALE.lower(), "is_alwayson": False, "is_img2img": True, "args": upscale},
        {"name": MK2.lower(), "is_alwayson": False, "is_img2img": True, "args": [arg("Info", None), *mk2]},
        {"name": POOR_MAN.lower(), "is_alwayson": False, "is_img2img": True, "args": poor_man},
    ]
