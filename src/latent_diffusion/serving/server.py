"""`ldm serve`: the AUTOMATIC1111 web UI's HTTP API over a loaded model, so that its clients work unchanged, and a
web page at `/` that uses it.

It answers txt2img, img2img (and inpainting), the sampler/schedule/model lists, options (the checkpoint among the
files of `--models-dir`), png-info, progress (with a preview) and interrupt, with the web UI's paths, field names,
defaults and response shapes (its `modules/api/models.py` and `modules/processing.py`). Requests are validated
before they queue (`serving/job_queue.py` runs them, merging those that can share a U-Net batch). Bad input is a 4xx naming
the problem and the server goes on serving; every size a request can ask for has a limit (`ServerLimits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import math
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..devices import memory_report
from ..files import claim_numbered, model_hash
from ..models import vae_tiling
from ..models.config import preset
from ..models.ldm import LatentDiffusion
from ..pipeline.generate import NonFiniteError
from ..pipeline.images import as_mode, from_pil, open_image, save_png, to_pil
from ..pipeline.loading import Pipeline, as_pipeline
from ..pipeline.request import RequestError, validate
from ..pipeline.upscalers import RESAMPLERS
from ..weights.checkpoint import CheckpointError
from . import web_ui_api
from .checkpoints import Checkpoints
from .controlnet_routes import ControlNetRoutes
from .http_edge import ERROR_HANDLERS, EdgeMiddleware, NotFound, SafeJSON
from .img2img_inputs import img2img_inputs, scaled_size
from .job_queue import Call, Job, Load, Task, Worker
from .model_routes import ModelRoutes
from .script_routes import XYZ_PLOT, ScriptRoutes, script_info, script_name, scripts
from .upscaling_routes import UpscalingRoutes
from .web_ui_api import WEB_UI_CFG_SCALE, Img2ImgRequest, ServerLimits, Txt2ImgRequest, png_base64

WEB_PAGE = resources.files("latent_diffusion") / "web"
__all__ = ["ServerLimits", "create_app"]
# The web UI's show_progress_type. Approx NN and TAESD need weights this server does not have: shown as Approx cheap.
PREVIEW_TYPES = ("Full", "Approx cheap", "Approx NN", "TAESD")


class ServerState:
    """What the server holds between requests, and its endpoints as methods: the worker that runs jobs on the
    loaded pipeline, the checkpoints it may switch to and the one chosen for the requests from now on, its limits,
    and the last progress preview."""

    def __init__(
        self,
        pipeline: Pipeline,
        outdir: Path | None,
        load: Callable[[Path], Pipeline] | None,
        models_dir: Path | None,
        limits: ServerLimits,
        controlnet_dir: Path | None = None,
        vae_dir: Path | None = None,
    ):
        self.first = pipeline.checkpoint or Path("model")
        self.checkpoints = Checkpoints(models_dir, self.first)
        if pipeline.checkpoint:
            self.checkpoints.hashes[self.first] = model_hash(self.first)
        self.outdir, self.load, self.limits = outdir, load, limits
        self.rescan: Callable[[Pipeline], Pipeline] | None = None  # (create_app's)
        self.selected = pipeline.checkpoint  # by the options; override_settings choose for one request
        self.worker = Worker(
            pipeline,
            self.load_and_hash,
            max_queue=limits.max_queue,
            max_batch=limits.max_batch,
            window=limits.batch_window,
        )
        self.preview: tuple[torch.Tensor, str] | None = None  # (latent, its PNG): one decode per step, however polled
        self.preview_type = "Approx cheap"  # the option show_progress_type
        self.upscaling = UpscalingRoutes(self)  # the extras routes
        self.scripts = ScriptRoutes(self)  # SD upscale, the X/Y/Z plot
        self.controlnet = ControlNetRoutes(self, controlnet_dir)  # the ControlNet extension's API
        self.models = ModelRoutes(self, vae_dir)  # VAE files, unloading and reloading
        self.worker.before_job = lambda: self.models.unpark(self.worker.pipeline)  # (after /unload-checkpoint)
        self.preview_lock = threading.Lock()

    def load_and_hash(self, path: Path) -> Pipeline:
        if self.load is None:
            raise RequestError("this server was started without --models-dir: it serves one checkpoint")
        # A file that cannot be loaded (damaged, refused) is the choice of a client: named as the list names it,
        # never by the server's path, which the errors' texts hold.
        name = self.checkpoints.name_of(path)
        try:
            new = self.models.with_vae(self.load(path))  # (the VAE chosen by sd_vae, for every checkpoint)
            self.controlnet.adopt(new)
            self.checkpoints.hashes[path] = model_hash(path)
        except CheckpointError as e:
            raise RequestError(f"checkpoint {name}: {str(e).replace(str(path), '').removeprefix(': ')}") from None
        except OSError as e:
            raise RequestError(f"checkpoint {name}: cannot read it ({e.strerror or type(e).__name__})") from None
        return new

    def current_title(self) -> str:
        path = self.worker.pipeline.checkpoint or self.first
        return self.checkpoints.title(self.checkpoints.name_of(path), path)

    # Lists and options --------------------------------------------------------------------------------------

    def loras(self) -> list[dict]:
        return [
            {"name": name, "alias": name, "path": str(path), "metadata": {}}
            for name, path in self.worker.pipeline.loras.items()
        ]

    def upscalers(self) -> list[dict]:
        """The web UI's resamplers, then the upscaler model files (their scale is known once one is loaded)."""
        rows = [{"name": name, "model_name": None, "model_path": None, "scale": None} for name in RESAMPLERS]
        for name, path in self.worker.pipeline.upscalers.items():
            rows.append({"name": name, "model_name": name, "model_path": str(path), "scale": None})
        return [{**row, "model_url": None} for row in rows]

    def embeddings(self) -> dict:
        loaded = {
            name: {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": e.vectors.shape[1],
                "vectors": e.vectors.shape[0],
            }
            for name, e in self.worker.pipeline.embeddings.items()
        }
        return {"loaded": loaded, "skipped": {}}

    def options(self) -> dict:
        return {
            "sd_model_checkpoint": self.current_title(),
            "sd_vae": self.models.chosen,
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "show_progress_type": self.preview_type,
        }

    async def set_options(self, body: dict[str, Any], http: Request) -> dict:
        """sd_model_checkpoint loads that checkpoint (after the jobs already queued), sd_vae puts that VAE in place
        (`model_routes.py`); other options are accepted and ignored, as `ignored` in the answer says."""
        if "sd_model_checkpoint" in body:
            if not isinstance(body["sd_model_checkpoint"], str):
                raise RequestError("sd_model_checkpoint: a checkpoint's title or name")
            path, before = self.checkpoints.find(body["sd_model_checkpoint"]), self.selected
            self.selected = path  # for the requests from now on, whose jobs queue after this load
            try:
                await self.wait(Load(path), http)
            except Exception:
                if self.selected == path:  # (another request may have chosen since)
                    self.selected = before
                raise
        if "sd_vae" in body:
            await self.models.choose(body["sd_vae"], http)
        if (kind := body.get("show_progress_type")) is not None:
            if kind not in PREVIEW_TYPES:
                raise RequestError(f"show_progress_type: one of {', '.join(PREVIEW_TYPES)}, not {kind!r}")
            self.preview_type = kind
        applied = {"sd_model_checkpoint", "sd_vae"} | ({"show_progress_type"} if kind in PREVIEW_TYPES[:2] else set())
        return {"ignored": sorted(set(body) - applied)}

    # Progress -----------------------------------------------------------------------------------------------

    def progress(self, skip_current_image: bool = False) -> dict:
        """The running job's progress, and (unless skipped) a preview decoded from its current x0 estimate."""
        worker = self.worker
        step, steps, part, parts, latent = worker.step, worker.steps, worker.part, worker.parts, worker.latent
        fraction = (part + step / steps) / parts if steps and parts else 0.0  # one read: the worker may reset them
        elapsed = time.monotonic() - worker.started
        state = {
            "skipped": False,
            "interrupted": worker.interrupted,
            "job": "",
            "job_count": parts,
            "job_timestamp": "0",
            "job_no": part,
            "sampling_step": step,
            "sampling_steps": steps,
        }
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction else 0.0,
            "textinfo": None,
            "current_image": None if latent is None or skip_current_image else self.preview_of(latent),
            "state": state,
        }

    def preview_of(self, latent: torch.Tensor) -> str:
        """The x0 estimate (1, c, h, w) as a PNG: the web UI's "Approx cheap" (a fixed linear map of the latent, at
        its size) where the model's autoencoder is its family's, else (and for show_progress_type Full) decoded in
        full."""
        with self.preview_lock:  # polls wait for the one decode rather than each starting their own
            if self.preview is None or self.preview[0] is not latent:
                model = self.worker.pipeline.model
                with torch.no_grad():
                    image = None if self.preview_type == "Full" else cheap_preview(model, latent[0])
                    if image is None:
                        tiled = latent.shape[-1] > vae_tiling.TILE or latent.shape[-2] > vae_tiling.TILE
                        image = model.autoencoder_decode(latent, tiled=tiled)[0].float()
                self.preview = latent, png_base64(to_pil((image / 2 + 0.5).clamp(0, 1)), "")
            return self.preview[1]

    def interrupt(self) -> dict:
        self.worker.interrupt()
        return {}

    def prompt_styles(self) -> list[dict]:
        return [
            {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in self.worker.pipeline.styles.values()
        ]

    async def refresh(self, http: Request) -> dict:
        """/refresh-loras, /refresh-embeddings: the folders read again, on the worker between jobs (without a way to,
        as a server made without `rescan`: nothing to read)."""
        if self.rescan is not None:

            def work(pipeline: Pipeline) -> None:
                self.worker.pipeline = self.rescan(self.worker.pipeline)

            await self.wait(Call(work=work), http)
        return {}

    def skip(self) -> dict:
        self.worker.skip()
        return {}

    # Generation ---------------------------------------------------------------------------------------------

    async def txt2img(self, body: Txt2ImgRequest, http: Request):
        if script_name(body) == XYZ_PLOT:
            return await self.scripts.xyz_plot(body, http)
        arrived = time.monotonic()
        job = await run_in_threadpool(self.build_job, body)
        return await self.respond(body, job, http, arrived)

    async def img2img(self, body: Img2ImgRequest, http: Request):
        if (script := self.scripts.img2img_script(body)) is not None:  # SD upscale, outpainting, X/Y/Z plot
            return await script(body, http)
        arrived = time.monotonic()
        job = await run_in_threadpool(self.build_img2img_job, body)
        return await self.respond(body, job, http, arrived)

    def build_job(self, body: Txt2ImgRequest, check_model: bool = True) -> Job:
        """The web UI's fields as a job (defaults: the web UI's, the model's size and its own guidance); every
        check that needs no model is done here, before any image is decoded."""
        web_ui_api.check_fields(body, self.limits, self.worker.pipeline.model.cfg.default_size)
        request, sampler = web_ui_api.generation_request(body)
        if not isinstance(body, Img2ImgRequest):  # (img2img's, once its picture is open: units may take it)
            request.controls = self.controlnet.units(body)
        wanted = (body.override_settings or {}).get("sd_model_checkpoint")
        checkpoint = self.checkpoints.find(str(wanted)) if wanted is not None else self.selected
        refiner = None
        if body.refiner_checkpoint not in (None, "", "None"):  # the web UI's "None" is no refiner
            refiner = self.checkpoints.find(body.refiner_checkpoint)
        hires = None
        if request.hires is not None and body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
            hires = self.checkpoints.find(body.hr_checkpoint_name)
        job = Job(
            validate(request),
            checkpoint,
            refiner,
            hires_checkpoint=hires,
            batch_size=body.batch_size,
            sampler_name=sampler.display_name,
            cfg_scale=WEB_UI_CFG_SCALE,
        )
        if check_model:
            self.check_against_model(job)
        return job

    def build_img2img_job(self, body: Img2ImgRequest) -> Job:
        """The init image (the first) and the mask (white = repaint) prepared as the web UI does (`serving/img2img_inputs.py`:
        resize mode, mask blur, inversion, fill, only-masked crop); denoising_strength is the request's strength.
        The result is laid into the picture here (`Img2ImgInputs.paste`), against the unfilled original."""
        blur_x, blur_y = web_ui_api.mask_blur(body)
        job = self.build_job(body, check_model=False)  # checked against the model once the images are in
        width = job.request.width or self.worker.pipeline.model.cfg.default_size
        height = job.request.height or self.worker.pipeline.model.cfg.default_size
        image = self.open_request_image(body.init_images[0], "init_images[0]", (width, height), body.resize_mode)
        mask = self.open_request_image(body.mask, "mask", (width, height), body.resize_mode) if body.mask else None
        try:  # a mode Pillow cannot convert (a LAB TIFF) is the client's
            image = as_mode(image, "RGB", "init_images[0]")
            if mask is not None and mask.mode != "RGBA":
                mask = as_mode(mask, "L", "mask")
        except ValueError as e:
            raise RequestError(str(e)) from None
        inputs = img2img_inputs(
            image,
            mask,
            width,
            height,
            resize_mode=body.resize_mode,
            mask_blur_x=blur_x,
            mask_blur_y=blur_y,
            invert=bool(body.inpainting_mask_invert),
            fill=body.inpainting_fill == 0,
            only_masked=body.inpaint_full_res,
            padding=body.inpaint_full_res_padding,
        )
        images = {"init_image": from_pil(inputs.image), "mask": from_pil(inputs.mask) if mask else None}
        images["controls"] = self.controlnet.img2img_units(
            body, image, mask, inputs.box, (width, height), (blur_x, blur_y)
        )
        job.request = validate(
            dataclasses.replace(
                job.request, **images, width=width, height=height, strength=body.denoising_strength, paste=False
            )
        )
        job.paste = inputs.paste
        self.check_against_model(job)
        return job

    def open_request_image(self, data: str, field: str, size: tuple[int, int], resize_mode: int) -> Image.Image:
        """A base64 image of a request, opened; its pixel count, and the count it would have scaled to cover `size`,
        are checked from the header before anything is decoded. RequestError naming the field otherwise."""
        limit = self.limits.max_pixels
        try:
            image = open_image(io.BytesIO(web_ui_api.image_bytes(data, field)), name=field, max_pixels=limit)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if math.prod(scaled_size(image.size, *size, resize_mode)) > limit:
            raise RequestError(
                f"{field}: a {image.width}x{image.height} image scaled to cover {size[0]}x{size[1]} "
                f"would be over the limit of {limit} pixels"
            )
        return image

    def check_against_model(self, job: Job) -> None:
        """The job resolved against the loaded pipeline now, where it runs on it: bad input never waits, and the
        worker takes the plan as it is (unless the model changes first, or the job needs a refiner)."""
        pipeline = self.worker.pipeline
        if job.checkpoint is None or (pipeline.checkpoint or Path()).resolve() == job.checkpoint.resolve():
            job.resolve(pipeline)

    async def wait(self, job: Task, http: Request, arrived: float | None = None) -> bool:
        """Queue the job and wait for it; cancel it if the client goes away (False) or its time, counted from the
        request's arrival, runs out (503)."""
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        job.notify = lambda: loop.call_soon_threadsafe(finished.set)
        self.worker.submit(job)
        deadline = (arrived or time.monotonic()) + self.limits.request_timeout
        while not job.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.25)
                break
            if await http.is_disconnected():
                job.cancelled = True
                return False
            if time.monotonic() > deadline:
                job.cancelled = True
                raise HTTPException(503, f"the request took over {self.limits.request_timeout:g} s and was cancelled")
        if isinstance(job.error, RequestError | NotFound):
            raise job.error
        if isinstance(job.error, NonFiniteError):  # (its text names the seeds, nothing of the server's)
            raise HTTPException(500, str(job.error))
        if job.error is not None:
            raise job.error  # a failure of the server: `http_edge.internal_error` answers it in one line
        return True

    async def respond(self, body: Txt2ImgRequest, job: Job, http: Request, arrived: float):
        if not await self.wait(job, http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        return await run_in_threadpool(self.answer, body, job)

    def answer(self, body: Txt2ImgRequest, job: Job) -> dict:
        """The web UI's answer, with the images laid into the client's picture and saved if it asks."""
        images = [job.paste(image) for image in job.images]
        if self.outdir and body.save_images:
            self.outdir.mkdir(parents=True, exist_ok=True)
            for image, text, seed in zip(images, job.infotexts, job.resolved.seeds):
                save_png(image, claim_numbered(self.outdir, f"{seed}.png"), text)
        answer = web_ui_api.answer(body, job, images, self.checkpoints.hashes.get(job.model_path))
        answer["images"] += self.controlnet.detected_maps(body, job)  # (after the images, as the extension's)
        return answer


def page() -> str:
    return (WEB_PAGE / "index.html").read_text()


def cheap_preview(model: LatentDiffusion, latent: torch.Tensor) -> torch.Tensor | None:
    """A latent (c, h, w) -> (3, h, w) about [-1, 1] by the family's fixed latent-to-RGB map, where the model has its
    family's autoencoder (another, such as the built-in model's, has latents of its own): else None."""
    family = model.cfg.family
    if family.preview_rgb is None or model.cfg.autoencoder != preset(family.preset).autoencoder:
        return None
    return torch.einsum("lhw,lr->rhw", latent.float(), torch.tensor(family.preview_rgb, device=latent.device))


def create_app(
    pipeline: Pipeline | LatentDiffusion,
    outdir: str | Path | None = None,
    *,
    load: Callable[[Path], Pipeline] | None = None,
    rescan: Callable[[Pipeline], Pipeline] | None = None,
    models_dir: str | Path | None = None,
    controlnet_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    api_auth: str | None = None,
    limits: ServerLimits | None = None,
    cors_allow_origins: list[str] | None = None,
    debug: bool = False,
):
    """The ASGI application serving `pipeline` (a model and its LoRA files and embeddings). load: a checkpoint path ->
    a pipeline set up the same way (for switching among `models_dir`); rescan: a pipeline -> it with its LoRA files
    and embeddings read again (/refresh-loras, /refresh-embeddings); controlnet_dir: the folder of the control
    models, read again by /controlnet/model_list (`serving/controlnet_routes.py`); vae_dir: the VAE files of
    /sd-vae and the option sd_vae (`serving/model_routes.py`); api_auth: "user:password" for HTTP basic
    auth; limits: what a request may ask for (`ServerLimits()` by default); cors_allow_origins: origins whose pages
    may call the API (none by default); debug: log the traceback of a failure of the server, not one line."""
    limits = limits or ServerLimits()
    folders = [Path(folder) if folder else None for folder in (outdir, models_dir, controlnet_dir, vae_dir)]
    state = ServerState(as_pipeline(pipeline), folders[0], load, folders[1], limits, *folders[2:])
    state.rescan = rescan

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.worker.stop()  # the worker thread ends with the server

    app = FastAPI(
        title="latent_diffusion",
        version="1",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=SafeJSON,
    )
    if cors_allow_origins:
        methods = ["GET", "POST"]
        app.add_middleware(CORSMiddleware, allow_origins=cors_allow_origins, allow_methods=methods, allow_headers=["*"])
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.add_api_route("/", page, response_class=HTMLResponse, include_in_schema=False)
    app.mount("/web", StaticFiles(directory=str(WEB_PAGE)), name="web")
    app.state.server = state  # (for tests and embedding applications)
    add_routes(app, state)
    state.controlnet.add_routes(app)
    state.models.add_routes(app)
    return EdgeMiddleware(app, api_auth, limits.max_body, debug)


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The web UI's API paths (`/sdapi/v1/...`), each answered by a method of the state or a plain function."""
    routes = {
        "GET": {
            "samplers": web_ui_api.samplers,
            "schedulers": web_ui_api.schedulers,
            "sd-models": state.checkpoints.listing,
            "loras": state.loras,
            "embeddings": state.embeddings,
            "options": state.options,
            "progress": state.progress,
            "upscalers": state.upscalers,
            "realesrgan-models": state.upscaling.realesrgan_models,
            "latent-upscale-modes": web_ui_api.latent_upscale_modes,
            "prompt-styles": state.prompt_styles,
            "memory": memory_report,
            "scripts": scripts,
            "script-info": script_info,
        },
        "POST": {
            "refresh-checkpoints": web_ui_api.nothing_to_refresh,
            "refresh-loras": state.refresh,
            "refresh-embeddings": state.refresh,
            "options": state.set_options,
            "interrupt": state.interrupt,
            "skip": state.skip,
            "png-info": web_ui_api.png_info,
            "txt2img": state.txt2img,
            "img2img": state.img2img,
            "extra-single-image": state.upscaling.single_image,
            "extra-batch-images": state.upscaling.batch_images,
        },
    }
    for method, endpoints in routes.items():
        for path, endpoint in endpoints.items():
            app.add_api_route(f"/sdapi/v1/{path}", endpoint, methods=[method])
