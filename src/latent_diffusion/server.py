"""`ldm serve`: the AUTOMATIC1111 web UI's HTTP API over one loaded model, so that its clients work unchanged.

It answers txt2img, img2img (and inpainting), the sampler/schedule/model lists, options (read), png-info,
progress (with a preview) and interrupt, with the web UI's paths, field names, defaults and response shapes (its
`modules/api/models.py`). Requests build a `GenerationRequest`, are validated before they queue, and run one at a
time in arrival order; a full queue is a 503, bad input a 422 naming the problem, and the server goes on serving.
Optional HTTP basic auth; bodies over a limit are refused before they are read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .files import claim_numbered
from .generate import NonFiniteError, Progress, generate
from .images import load_image, model_hash, parse_parameters, save_png, sha256_of, to_pil
from .latent_diffusion import LatentDiffusion
from .request import GenerationRequest, RequestError, lora_weights, validate
from .samplers import SAMPLERS, find_sampler
from .schedulers import SCHEDULERS

WEB_UI_CFG_SCALE = 7.0  # the web UI's default guidance; a model's own (the built-in model's) wins
MAX_IMAGES = 64  # batch_size × n_iter per request
MAX_QUEUE = 32  # generation jobs running or waiting; more are answered 503
MAX_BATCH = 8  # images of queued requests merged into one U-Net batch
MAX_BODY = 64 * 2**20  # bytes of a request body: an init image and a mask of 4096² as base64 PNGs fit


class Txt2ImgRequest(BaseModel):
    """The web UI's txt2img request: the fields used here; every other field of its model is accepted too, and
    reported in `info["ignored"]` where it holds something other than its default."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # the web UI's older field; sampler_name wins
    scheduler: str | None = None
    eta: float | None = None
    s_noise: float | None = None
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)  # base64, or data:image/...;base64,...
    denoising_strength: float = 0.75
    mask: str | None = None
    inpainting_mask_invert: int = 0


class PngInfoRequest(BaseModel):
    image: str


class ServerState:
    """The loaded model and the progress of the job running now."""

    def __init__(self, model: LatentDiffusion, outdir: Path | None):
        self.model, self.outdir = model, outdir
        self.counter = threading.Lock()  # guards `queued`
        self.queued = 0  # jobs running or waiting
        self.running = False  # a job is running now
        self.step, self.steps, self.job_no, self.job_count = 0, 0, 0, 0
        self.interrupted = False
        self.latent = None  # the x0 estimate of the step just done, first image of the batch: (1, 4, h, w)
        self.started = 0.0


class Interrupted(Exception):
    pass


@dataclass
class Job:
    """One API request waiting for (or run by) the worker."""

    body: Txt2ImgRequest
    request: GenerationRequest  # validated, the model's defaults filled in
    sampler_name: str
    scheduler: str
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict | None = None
    error: Exception | None = None

    @property
    def key(self) -> tuple | None:
        """Requests of equal keys can share U-Net batches (image i of a request stays the image its seed gives, by
        per-image generators); None: runs alone (init images, several iterations)."""
        r = self.request
        if r.init_image is not None or self.body.n_iter != 1:
            return None
        return (r.width, r.height, r.steps, r.sampler, r.scheduler, r.spacing, r.eta, r.s_noise, r.cfg_scale,
                r.clip_skip, r.prompt_syntax)  # fmt: skip


def image_bytes(data: str, field: str) -> bytes:
    """A request's base64 image, with or without a `data:image/...;base64,` prefix -> its bytes (RequestError)."""
    try:
        return base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data, validate=True)
    except binascii.Error:
        raise RequestError(f"{field}: not a base64-encoded image") from None


def decode_image(data: str) -> Image.Image:
    """A base64 image -> an opened (not decoded) PIL image, for its text chunks."""
    try:
        return Image.open(io.BytesIO(image_bytes(data, "image")))
    except (UnidentifiedImageError, OSError):
        raise RequestError("image: not a base64-encoded image") from None


def read_image(data: str, field: str, mode: str, size: tuple[int, int]):
    """A base64 image of a request -> (1, C, H, W) in [0, 1] at `size`; its pixel count is checked from the header
    before anything is decoded (`images.load_image`). RequestError naming the field otherwise."""
    try:
        return load_image(io.BytesIO(image_bytes(data, field)), mode, size, name=field)
    except ValueError as e:
        raise RequestError(str(e)) from None


def png_base64(image: Image.Image, parameters: str) -> str:
    """A PNG with the `parameters` text chunk (if any), base64-encoded, as the web UI's API sends images."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def ignored_fields(body: Txt2ImgRequest) -> list[str]:
    """Fields of the web UI's model that this server does not implement and that hold a value other than an empty
    one (its defaults are empty, zero, false or -1, except those named here)."""
    defaults = {"denoising_strength": 0.75, "s_churn": 0.0, "s_tmax": None, "s_tmin": 0.0, "hr_scale": 2.0,
                "hr_second_pass_steps": 0, "hr_upscaler": None, "do_not_save_samples": False,
                "do_not_save_grid": False, "sampler_index": "Euler", "subseed": -1, "subseed_strength": 0,
                "seed_resize_from_h": -1, "seed_resize_from_w": -1, "mask_blur": 4, "inpaint_full_res": True,
                "inpaint_full_res_padding": 0, "image_cfg_scale": 1.5, "initial_noise_multiplier": 1.0}  # fmt: skip
    ignored = []
    for name, value in (body.model_extra or {}).items():
        if value != defaults[name] if name in defaults else value not in (None, "", 0, False, -1, [], {}):
            ignored.append(name)
    return sorted(ignored)


def authorized(header: str | None, credentials: str) -> bool:
    """HTTP basic auth against "user:password", compared in constant time (no early exit on the first mismatch)."""
    scheme, _, value = (header or "").partition(" ")
    try:
        given = base64.b64decode(value, validate=True) if scheme.lower() == "basic" else b""
    except binascii.Error:
        given = b""
    return hmac.compare_digest(given, credentials.encode())


def create_app(
    model: LatentDiffusion, outdir: str | Path | None = None, *, api_auth: str | None = None,
    max_body: int = MAX_BODY, max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH, batch_window: float = 0.05,
):  # fmt: skip
    """The FastAPI application serving `model` (with its `loras` and `embeddings` set by the caller). api_auth:
    "user:password" for HTTP basic auth; max_body: the largest request body in bytes; max_queue: jobs running or
    waiting at once (more is a 503); max_batch: images per merged U-Net batch (1: no merging); batch_window: seconds
    a job that can be merged waits for others."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.put(None)  # the worker ends when the server does

    app = FastAPI(title="latent_diffusion", docs_url=None, redoc_url=None, lifespan=lifespan)
    state = ServerState(model, Path(outdir) if outdir else None)

    @app.middleware("http")
    async def limits(request, call_next):
        """Auth first, then the declared body size (a body sent without a length is read by the handler)."""
        if api_auth is not None and not authorized(request.headers.get("authorization"), api_auth):
            return JSONResponse(status_code=401, content={"detail": "Incorrect username or password"},
                                headers={"WWW-Authenticate": "Basic"})  # fmt: skip
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > max_body:
            return JSONResponse(status_code=413, content={"detail": f"request body over {max_body} bytes"})
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(request, e: RequestError):
        return JSONResponse(status_code=422, content={"error": "RequestError", "detail": str(e)})

    def model_title() -> str:
        name = Path(model.checkpoint).name if model.checkpoint else "model"
        return f"{name} [{model_hash(model.checkpoint)}]" if model.checkpoint else name

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": s.display_name, "aliases": [s.name], "options": {"scheduler": s.scheduler or ""}}
                for s in SAMPLERS.values()]  # fmt: skip

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for s in SCHEDULERS.values()]  # fmt: skip

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        path = model.checkpoint
        return [{"title": model_title(), "model_name": Path(path).stem if path else "model",
                 "hash": model_hash(path) if path else None, "sha256": sha256_of(path) if path else None,
                 "filename": str(path) if path else "", "config": None}]  # fmt: skip

    @app.get("/sdapi/v1/options")
    def options():
        return {"sd_model_checkpoint": model_title(), "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        """The running job's progress, and (unless skipped) a preview decoded from its current x0 estimate."""
        fraction = state.step / state.steps if state.steps else 0.0
        elapsed = time.monotonic() - state.started
        eta = elapsed / fraction - elapsed if fraction else 0.0
        latent, preview = state.latent, None
        if latent is not None and not skip_current_image:
            with torch.no_grad():
                preview = png_base64(to_pil((model.autoencoder_decode(latent)[0].float() / 2 + 0.5).clamp(0, 1)), "")
        return {"progress": fraction, "eta_relative": eta, "current_image": preview, "textinfo": None,
                "state": {"skipped": False, "interrupted": state.interrupted, "job": "", "job_count": state.job_count,
                          "job_timestamp": "0", "job_no": state.job_no, "sampling_step": state.step,
                          "sampling_steps": state.steps}}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        if state.running:
            state.interrupted = True
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoRequest):
        image = decode_image(body.image)
        text = image.info.get("parameters")
        if not isinstance(text, str):
            return {"info": "", "items": {}, "parameters": {}}
        return {"info": text, "items": {"parameters": text}, "parameters": parse_parameters(text)}

    @app.post("/sdapi/v1/txt2img")
    def txt2img(body: Txt2ImgRequest):
        return respond(body, *build_request(body))

    @app.post("/sdapi/v1/img2img")
    def img2img(body: Img2ImgRequest):
        """The init image (the first; the web UI's "just resize" to width × height) and the mask (white = repaint,
        inverted with inpainting_mask_invert) go into the request; denoising_strength is its strength."""
        if not body.init_images:
            raise RequestError("init_images: give one image (base64)")
        request, sampler_name, scheduler = build_request(body)
        size = (request.width or model.cfg.default_size, request.height or model.cfg.default_size)
        image = read_image(body.init_images[0], "init_images[0]", "RGB", size)
        mask = read_image(body.mask, "mask", "L", size) if body.mask else None
        if mask is not None and body.inpainting_mask_invert:
            mask = 1 - mask
        request = dataclasses.replace(request, init_image=image, mask=mask, width=size[0], height=size[1],
                                      strength=body.denoising_strength)  # fmt: skip
        return respond(body, request, sampler_name, scheduler)

    def build_request(body: Txt2ImgRequest) -> tuple[GenerationRequest, str, str]:
        """The web UI's fields as a request (defaults: the web UI's, the model's size and its own guidance)."""
        count = body.batch_size * body.n_iter
        if body.batch_size < 1 or body.n_iter < 1 or count > MAX_IMAGES:
            raise RequestError(f"batch_size × n_iter must be between 1 and {MAX_IMAGES}, not {count}")
        try:
            sampler, legacy_schedule = find_sampler(body.sampler_name or body.sampler_index)
        except ValueError as e:
            raise RequestError(f"sampler_name: {e}") from None
        scheduler = body.scheduler or legacy_schedule or "automatic"
        seed = random.randrange(2**32) if body.seed == -1 else body.seed
        cfg_scale = body.cfg_scale
        if cfg_scale is None:
            cfg_scale = model.cfg.cfg_scale if model.cfg.cfg_scale is not None else WEB_UI_CFG_SCALE
        request = GenerationRequest(
            prompts=[body.prompt] * count, negative_prompts=[body.negative_prompt] * count,
            seeds=[seed + i for i in range(count)], width=body.width, height=body.height, steps=body.steps,
            sampler=sampler.name, scheduler=scheduler, eta=body.eta, s_noise=body.s_noise, cfg_scale=cfg_scale,
            batch_size=body.batch_size,
        )  # fmt: skip
        validate(request)  # the checks that need no model, before any image is decoded
        return request, sampler.display_name, scheduler

    def respond(body: Txt2ImgRequest, request: GenerationRequest, sampler_name: str, scheduler: str):
        """Validate, queue, wait for the worker, answer (or raise what the job raised)."""
        job = Job(body, validate(request, model), sampler_name, scheduler)  # bad input never waits
        with state.counter:
            if state.queued >= max_queue:
                raise HTTPException(status_code=503, detail=f"the queue is full ({max_queue} jobs); try again later")
            state.queued += 1
        jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answer

    def worker() -> None:
        """Takes jobs in arrival order; a job that can share a U-Net batch waits up to `batch_window` seconds for
        others that can (`Job.key`), up to `max_batch` images, and they run as one request. Ends at a None."""
        carried = None
        while (first := carried or jobs.get()) is not None:
            group = [first]
            carried, deadline = None, time.monotonic() + batch_window
            while group[0].key is not None and sum(len(j.request.prompts) for j in group) < max_batch:
                try:
                    job = jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    jobs.put(None)  # stop after this group
                    break
                if not mergeable(group, job):
                    carried = job  # the next group starts with it: the order is kept
                    break
                group.append(job)
            state.running = True
            try:
                run_group(group)
            except Exception as e:  # the job's error goes to its client; the worker goes on
                for job in group:
                    job.error = e if isinstance(e, RequestError | HTTPException) else HTTPException(500, str(e))
            finally:
                state.running = False
                with state.counter:
                    state.queued -= len(group)
                for job in group:
                    job.done.set()

    def mergeable(group: list[Job], job: Job) -> bool:
        if job.key != group[0].key or sum(len(j.request.prompts) for j in group) + len(job.request.prompts) > max_batch:
            return False
        try:  # one LoRA weight per name across the merged batch
            lora_weights([p for j in [*group, job] for p in j.request.prompts], model)
        except RequestError:
            return False
        return True

    def run_group(group: list[Job]) -> None:
        state.interrupted, state.started = False, time.monotonic()
        state.job_count = group[0].body.n_iter if len(group) == 1 else 1
        if len(group) == 1:
            job = group[0]
            parts = [job.request.prompts[i : i + job.body.batch_size] for i in range(0, len(job.request.prompts),
                                                                                        job.body.batch_size)]  # fmt: skip
            outputs = execute(job.request, [len(p) for p in parts])
            job.answer = answer(job, *outputs, batched_with=1)
            return
        merged = dataclasses.replace(
            group[0].request, prompts=[p for j in group for p in j.request.prompts],
            negative_prompts=[p for j in group for p in j.request.negative_prompts],
            seeds=[s for j in group for s in j.request.seeds], batch_size=max_batch,
        )  # fmt: skip
        images, infotexts, warnings = execute(merged, [len(merged.prompts)])
        start = 0
        for job in group:
            n = len(job.request.prompts)
            job.answer = answer(job, images[start : start + n], infotexts[start : start + n], warnings,
                                batched_with=len(group))  # fmt: skip
            start += n

    def execute(request: GenerationRequest, batches: list[int]):
        """Run a resolved request in U-Net batches of these sizes -> (PIL images, infotexts, warnings); stops early
        on an interrupt."""
        images, infotexts, warnings, start = [], [], [], 0

        def step_done(p: Progress) -> None:
            state.step, state.steps = p.step, p.total
            state.latent = p.sampler_step.denoised[:1].to(model.dtype)
            if state.interrupted:
                raise Interrupted

        try:
            for number, size in enumerate(batches):
                state.job_no, state.step = number, 0
                part = slice(start, start + size)
                batch = dataclasses.replace(request, prompts=request.prompts[part], seeds=request.seeds[part],
                                            negative_prompts=request.negative_prompts[part])  # fmt: skip
                result = generate(model, batch, progress=step_done)
                images += [to_pil(t) for t in result.images]
                infotexts += result.infotexts
                warnings += [w for w in result.warnings if w not in warnings]
                start += size
        except Interrupted:
            pass
        except NonFiniteError as e:
            raise HTTPException(status_code=500, detail=str(e)) from None
        finally:
            state.step, state.steps, state.latent = 0, 0, None
        return images, infotexts, warnings

    def answer(job: Job, images: list, infotexts: list[str], warnings: list[str], batched_with: int) -> dict:
        """The web UI's response to one job: images, the request with its defaults, and `info`."""
        body, request = job.body, job.request
        if state.outdir and body.save_images:
            state.outdir.mkdir(parents=True, exist_ok=True)
            for image, text, seed in zip(images, infotexts, request.seeds):
                save_png(image, claim_numbered(state.outdir, f"{seed}.png"), text)
        info = {
            "prompt": body.prompt, "all_prompts": request.prompts[: len(images)],
            "negative_prompt": body.negative_prompt, "all_negative_prompts": request.negative_prompts[: len(images)],
            "seed": request.seeds[0], "all_seeds": request.seeds[: len(images)], "subseed": -1, "all_subseeds": [],
            "width": request.width, "height": request.height, "sampler_name": job.sampler_name,
            "scheduler": job.scheduler, "cfg_scale": request.cfg_scale, "steps": request.steps,
            "batch_size": body.batch_size, "n_iter": body.n_iter,
            "sd_model_name": Path(model.checkpoint).stem if model.checkpoint else "model",
            "sd_model_hash": model_hash(model.checkpoint) if model.checkpoint else None,
            "infotexts": infotexts, "warnings": warnings, "interrupted": state.interrupted,
            "ignored": ignored_fields(body), "batched_with": batched_with,
        }  # fmt: skip
        parameters = body.model_dump() | {"seed": request.seeds[0], "cfg_scale": request.cfg_scale,
                                          "width": request.width, "height": request.height,
                                          "sampler_name": job.sampler_name}  # fmt: skip
        return {
            "images": [png_base64(i, t) for i, t in zip(images, infotexts)] if body.send_images else [],
            "parameters": parameters,
            "info": json.dumps(info),
        }

    jobs: queue.Queue[Job | None] = queue.Queue()  # None: stop
    threading.Thread(target=worker, daemon=True, name="ldm-serve-worker").start()
    return app
