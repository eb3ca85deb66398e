"""`ldm serve`: the AUTOMATIC1111 web UI's HTTP API over a loaded model, so that its clients work unchanged, and a
web page at `/` that uses it.

It answers txt2img, img2img (and inpainting), the sampler/schedule/model lists, options (the checkpoint among the
files of `--models-dir`), png-info, progress (with a preview) and interrupt, with the web UI's paths, field names,
defaults and response shapes (its `modules/api/models.py` and `modules/processing.py`). Requests are validated
before they queue (`job_queue.py` runs them, merging those that can share a U-Net batch). Bad input is a 4xx naming
the problem and the server goes on serving; every size a request can ask for has a limit (`ServerLimits`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import io
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from . import vae_tiling
from .checkpoint import CheckpointError
from .files import claim_numbered
from .images import RASTER_FORMATS, as_mode, from_pil, model_hash, open_image, parse_parameters, save_png, to_pil
from .job_queue import Job, Load, QueueFull, Task, Worker
from .latent_diffusion import LatentDiffusion
from .masking import img2img_inputs, scaled_size
from .pipeline import Pipeline, as_pipeline
from .request import MAX_SIDE, GenerationRequest, RequestError, validate
from .samplers import SAMPLERS, find_sampler
from .schedulers import SCHEDULERS

WEB_UI_CFG_SCALE = 7.0  # the web UI's default guidance; a model's own (the built-in model's) wins
WEB_PAGE = resources.files("latent_diffusion") / "web"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how much the server takes on; each a flag of `ldm serve`."""

    max_body: int = 64 * 2**20  # bytes of a request body: an init image and a mask of 4096² as base64 PNGs fit
    max_side: int = 2048  # width and height
    max_steps: int = 300
    max_images: int = 64  # batch_size × n_iter
    max_prompt: int = 20_000  # characters of a prompt or negative prompt (about 65 chunks of 75 tokens; a 2 MB
    # prompt took 29 s and 1.2 GB to encode on 2 CPU cores, so the body limit alone would let one exhaust memory)
    max_pixels: int = 4096 * 4096  # of an init image or mask, read from its header before it is decoded
    max_queue: int = 32  # jobs running or waiting; more are answered 503
    max_batch: int = 8  # images of queued requests merged into one U-Net batch (1: never merged)
    request_timeout: float = 600.0  # seconds from arrival to answer; then the job is cancelled and answered 503
    batch_window: float = 0.05  # seconds a job that can be merged waits for others


# The web UI's request fields (`StableDiffusionProcessingTxt2Img`/`Img2Img` and its API model) that this server does
# not implement, with the values that give the web UI's result as if the field were absent (its default, and what
# it treats the same: s_tmax 0 is infinity, a seed resize of 0 is off). A request that sets one to anything else is
# served, and the field is named in info["ignored"]. Other fields are ignored where empty (None, "", 0, False, -1,
# [], {}); the hires fields only matter with enable_hr.
NO_EFFECT = {
    "styles": ([],), "subseed_strength": (0,), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "s_min_uncond": (None, 0), "s_churn": (None, 0), "s_tmax": (None, 0, float("inf")), "s_tmin": (None, 0),
    "override_settings_restore_afterwards": (True,), "do_not_save_samples": (False, True),
    "do_not_save_grid": (False, True), "image_cfg_scale": None,  # any value: it is for instruct-pix2pix models
    "initial_noise_multiplier": (None, 1),
}  # fmt: skip
HIRES_FIELDS = ("hr_", "firstphase_", "denoising_strength")  # txt2img's denoising_strength is the hires pass's
SETTINGS = {"sd_model_checkpoint", "CLIP_stop_at_last_layers"}  # the options (and override_settings) honoured
# Levels of lists and objects in one field of a request's own (a field this server does not read, override_settings):
# clients nest a few (alwayson_scripts). Some hundreds still parse, and echoing them recursed past Python's limit.
MAX_NESTING = 64


class Txt2ImgRequest(BaseModel):
    """The web UI's txt2img request: the fields used here; every other field of its model is accepted too."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = -1  # -1 or null: random
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
    override_settings: dict[str, Any] | None = None
    refiner_checkpoint: str | None = None  # a checkpoint of the models folder, by any name sd_model_checkpoint takes
    refiner_switch_at: float | None = None  # the part of the timestep range the model denoises first (default 0.8)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)  # base64, or data:image/...;base64,...
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill
    mask: str | None = None
    mask_blur_x: float = 4
    mask_blur_y: float = 4
    mask_blur: float | None = None  # both at once
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing (2 and 3: as 1, reported)
    inpaint_full_res: bool = True  # "only masked": work on the box around the mask, at width x height
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False  # echo init_images and mask in the answer's parameters (as the web UI)


class PngInfoRequest(BaseModel):
    image: str


class SafeJSON(JSONResponse):
    """Every answer's JSON, whatever a request echoed into it: NaN and infinities (valid Python floats, not JSON)
    become null, lone surrogates travel as \\u escapes; FastAPI's own encoder would fail on both with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def too_deep(value, limit: int) -> bool:
    """Whether lists and dicts nest in `value` more than `limit` levels deep; walked without recursion."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth == limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


class NotFound(Exception):
    """A name that names nothing this server has (a 404)."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """The checkpoint files of a folder and its subfolders, by name relative to it ("sub/name.safetensors")."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
    return {p.relative_to(folder).as_posix(): p for p in paths}


class Checkpoints:
    """The checkpoints the server can load: the files of `--models-dir` (and its subfolders) and the one it started
    with. Requests name one by its title ("sub/name.safetensors [hash]"), file name, or name without suffix;
    nothing a request sends reaches the file system except as a key of this table."""

    def __init__(self, models_dir: Path | None, first: Path):
        self.models_dir, self.first = models_dir, first
        self.hashes: dict[Path, str] = {}  # files hashed once loaded (hashing a 2 GB file takes seconds)

    def files(self) -> dict[str, Path]:
        """Name (relative to the folder) -> path."""
        return {self.first.name: self.first} | (checkpoint_files(self.models_dir) if self.models_dir else {})

    def title(self, name: str, path: Path) -> str:
        return f"{name} [{self.hashes[path]}]" if path in self.hashes else name

    def find(self, wanted: str) -> Path:
        for name, path in self.files().items():
            if wanted in (name, self.title(name, path), Path(name).stem, Path(name).with_suffix("").as_posix()):
                return path
        raise NotFound(f"no checkpoint named {wanted!r}; GET /sdapi/v1/sd-models lists them")

    def name_of(self, path: Path) -> str:
        return next((n for n, p in self.files().items() if p == path), path.name)


class LimitsMiddleware:
    """Auth first (HTTP basic, compared in constant time), then the body size: a declared Content-Length over the
    limit is refused before anything is read, and a body sent in chunks is counted as it arrives."""

    def __init__(self, app, api_auth: str | None, max_body: int):
        self.app, self.api_auth, self.max_body = app, api_auth, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        preflight = scope["method"] == "OPTIONS"  # a browser's CORS preflight carries no credentials
        if self.api_auth is not None and not preflight and not authorized(headers.get(b"authorization"), self.api_auth):
            answer = JSONResponse(status_code=401, content={"error": "Unauthorized", "detail": "Incorrect username or "
                                  "password"}, headers={"WWW-Authenticate": "Basic"})  # fmt: skip
            return await answer(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            answer = JSONResponse(status_code=413, content={"error": "PayloadTooLarge", "detail": f"request body "
                                  f"over {self.max_body} bytes"})  # fmt: skip
            return await answer(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # raised inside the body read: FastAPI answers it as raised
                raise HTTPException(status_code=413, detail=f"request body over {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)


def authorized(header: bytes | None, credentials: str) -> bool:
    """HTTP basic auth against "user:password", compared in constant time (no early exit on the first mismatch)."""
    scheme, _, value = (header or b"").decode("latin-1").partition(" ")
    try:
        given = base64.b64decode(value, validate=True) if scheme.lower() == "basic" else b""
    except ValueError:  # binascii.Error, and the ValueError of a header with non-ASCII characters
        given = b""
    return hmac.compare_digest(given, credentials.encode())


def image_bytes(data: str, field: str) -> bytes:
    """A request's base64 image, with or without a `data:image/...;base64,` prefix -> its bytes (RequestError).
    URLs are refused: the server fetches nothing a request points at."""
    if data.startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(f"{field}: URLs are not fetched; send the image itself, base64-encoded")
    data = data.partition(",")[2] if data.startswith("data:") else data
    try:  # line breaks and spaces are allowed, as base64 tools write them and the web UI reads them
        return base64.b64decode("".join(data.split()), validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise RequestError(f"{field}: not a base64-encoded image") from None


def decode_image(data: str) -> Image.Image:
    """A base64 image -> an opened (not decoded) PIL image, for its text chunks."""
    try:
        return Image.open(io.BytesIO(image_bytes(data, "image")), formats=RASTER_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):  # ValueError: a text
        # chunk that decompresses beyond Pillow's limit
        raise RequestError("image: not a base64-encoded image of a size this server reads") from None


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


def png_base64(image: Image.Image, parameters: str) -> str:
    """A PNG with the `parameters` text chunk (if any), base64-encoded, as the web UI's API sends images."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def ignored_fields(body: Txt2ImgRequest) -> list[str]:
    """The fields of the request this server does not implement that would change the web UI's result."""
    fields = dict(body.model_extra or {})
    if not fields.get("enable_hr"):
        fields = {name: value for name, value in fields.items() if not name.startswith(HIRES_FIELDS)}
    if not fields.get("subseed_strength"):
        fields.pop("subseed", None)
    ignored = [name for name, value in fields.items()
               if (name not in NO_EFFECT and value not in (None, "", 0, False, -1, [], {}))
               or (NO_EFFECT.get(name) is not None and value not in NO_EFFECT[name])]  # fmt: skip
    ignored += [f"override_settings.{name}" for name in (body.override_settings or {}) if name not in SETTINGS]
    if getattr(body, "mask", None) and getattr(body, "inpainting_fill", 0) in (2, 3):
        ignored.append("inpainting_fill")  # latent noise and latent nothing run as "original"
    return sorted(ignored)


def create_app(
    pipeline: Pipeline | LatentDiffusion, outdir: str | Path | None = None, *, load: Callable[[Path], Pipeline] | None = None,
    models_dir: str | Path | None = None, api_auth: str | None = None, limits: ServerLimits = ServerLimits(),
    cors_allow_origins: list[str] | None = None,
):  # fmt: skip
    """The ASGI application serving `pipeline` (a model and its LoRA files and embeddings). load: a checkpoint path ->
    a pipeline set up the same way (for switching among `models_dir`); api_auth: "user:password" for HTTP basic
    auth; cors_allow_origins: origins whose pages may call the API (none by default)."""
    pipeline = as_pipeline(pipeline)
    first = pipeline.checkpoint or Path("model")
    checkpoints = Checkpoints(Path(models_dir) if models_dir else None, first)
    if pipeline.checkpoint:
        checkpoints.hashes[first] = model_hash(first)

    def load_and_hash(path: Path) -> Pipeline:
        if load is None:
            raise RequestError("this server was started without --models-dir: it serves one checkpoint")
        # A file that cannot be loaded (damaged, refused) is the choice of a client: named as the list names it,
        # never by the server's path, which the errors' texts hold.
        name = checkpoints.name_of(path)
        try:
            new = load(path)
            checkpoints.hashes[path] = model_hash(path)
        except CheckpointError as e:
            raise RequestError(f"checkpoint {name}: {str(e).replace(str(path), '').removeprefix(': ')}") from None
        except OSError as e:
            raise RequestError(f"checkpoint {name}: cannot read it ({e.strerror or type(e).__name__})") from None
        return new

    # The checkpoint chosen by the options, for the requests from now on (override_settings choose for one request).
    selected = [pipeline.checkpoint]
    worker = Worker(pipeline, load_and_hash, max_queue=limits.max_queue, max_batch=limits.max_batch,
                    window=limits.batch_window)  # fmt: skip
    outdir = Path(outdir) if outdir else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()  # the worker thread ends with the server

    app = FastAPI(title="latent_diffusion", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan,
                  default_response_class=SafeJSON)  # fmt: skip
    if cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip

    def error(status: int, kind: str, detail: str, errors=None, headers=None) -> JSONResponse:
        """The web UI's error body."""
        return SafeJSON(status_code=status, headers=headers,
                            content={"error": kind, "detail": detail, "body": "", "errors": errors or ""})  # fmt: skip

    @app.exception_handler(RequestError)
    async def bad_request(request, e: RequestError):
        return error(422, "RequestError", str(e))

    @app.exception_handler(NotFound)
    async def not_found(request, e: NotFound):
        return error(404, "NotFound", str(e.args[0]))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in x['loc'][1:]) or 'body'}: {x['msg']}" for x in e.errors()]
        return error(422, "RequestValidationError", "; ".join(problems), errors=str(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, type(e).__name__, str(e.detail), headers=e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return error(503, "QueueFull", str(e), headers={"Retry-After": "5"})

    def current_title() -> str:
        path = worker.pipeline.checkpoint or first
        return checkpoints.title(checkpoints.name_of(path), path)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return (WEB_PAGE / "index.html").read_text()

    app.mount("/web", StaticFiles(directory=str(WEB_PAGE)), name="web")

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
        return [{"title": checkpoints.title(name, path), "model_name": Path(name).with_suffix("").as_posix(),
                 "hash": checkpoints.hashes.get(path), "sha256": None, "filename": str(path), "config": None}
                for name, path in checkpoints.files().items()]  # fmt: skip

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return {}  # the folder is read at every listing

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in worker.pipeline.loras.items()]  # fmt: skip

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        loaded = worker.pipeline.embeddings
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": e.vectors.shape[1], "vectors": e.vectors.shape[0]}
                           for name, e in loaded.items()}, "skipped": {}}  # fmt: skip

    @app.get("/sdapi/v1/upscalers")
    @app.get("/sdapi/v1/latent-upscale-modes")
    @app.get("/sdapi/v1/sd-vae")
    @app.get("/sdapi/v1/prompt-styles")
    def not_provided():
        return []  # this server has no upscalers, separate VAEs or styles: an empty list, as the web UI with none

    @app.get("/sdapi/v1/options")
    def options():
        return {"sd_model_checkpoint": current_title(), "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any], http: Request):
        """sd_model_checkpoint loads that checkpoint (after the jobs already queued); other options are accepted
        and ignored, as `ignored` in the answer says."""
        if "sd_model_checkpoint" in body:
            if not isinstance(body["sd_model_checkpoint"], str):
                raise RequestError("sd_model_checkpoint: a checkpoint's title or name")
            path, before = checkpoints.find(body["sd_model_checkpoint"]), selected[0]
            selected[0] = path  # for the requests from now on, whose jobs queue after this load
            try:
                await wait(Load(path), http)
            except Exception:
                if selected[0] == path:  # (another request may have chosen since)
                    selected[0] = before
                raise
        return {"ignored": sorted(set(body) - {"sd_model_checkpoint"})}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        """The running job's progress, and (unless skipped) a preview decoded from its current x0 estimate."""
        step, steps, part, parts, latent = worker.step, worker.steps, worker.part, worker.parts, worker.latent
        fraction = (part + step / steps) / parts if steps and parts else 0.0  # one read: the worker may reset them
        elapsed = time.monotonic() - worker.started
        eta = elapsed / fraction - elapsed if fraction else 0.0
        return {"progress": fraction, "eta_relative": eta, "textinfo": None,
                "current_image": None if latent is None or skip_current_image else preview_of(latent),
                "state": {"skipped": False, "interrupted": worker.interrupted, "job": "", "job_count": parts,
                          "job_timestamp": "0", "job_no": part, "sampling_step": step, "sampling_steps": steps}}  # fmt: skip

    previews: dict = {}  # the last preview, by the latent it was decoded from: one decode per step, however polled
    preview_lock = threading.Lock()

    def preview_of(latent: torch.Tensor) -> str:
        with preview_lock:  # polls wait for the one decode rather than each starting their own
            if previews.get("latent") is not latent:
                with torch.no_grad():
                    tiled = latent.shape[-1] > vae_tiling.TILE or latent.shape[-2] > vae_tiling.TILE
                    image = worker.pipeline.model.autoencoder_decode(latent, tiled=tiled)[0].float()
                previews.update(latent=latent, png=png_base64(to_pil((image / 2 + 0.5).clamp(0, 1)), ""))
            return previews["png"]

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoRequest):
        image = decode_image(body.image.strip())
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}  # the image's other text chunks
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": web_ui_parameters(text) if text else {}}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, http: Request):
        arrived = time.monotonic()
        job = await run_in_threadpool(build_job, body)
        return await respond(body, job, http, arrived)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, http: Request):
        arrived = time.monotonic()
        job = await run_in_threadpool(build_img2img_job, body)
        return await respond(body, job, http, arrived)

    def build_img2img_job(body: Img2ImgRequest) -> Job:
        """The init image (the first) and the mask (white = repaint) prepared as the web UI does (`masking.py`:
        resize mode, mask blur, inversion, fill, only-masked crop); denoising_strength is the request's strength.
        The result is laid into the picture here (`Img2ImgInputs.paste`), against the unfilled original."""
        if len(body.init_images) != 1:  # the web UI takes one per image of a batch; this server, one for all
            raise RequestError(f"init_images: give one image (base64), not {len(body.init_images)}")
        if body.resize_mode not in (0, 1, 2):
            raise RequestError(f"resize_mode: 0 (just resize), 1 (crop and resize) or 2 (resize and fill), not "
                               f"{body.resize_mode}; 3 (latent upscale) is not implemented")  # fmt: skip
        if body.inpainting_fill not in (0, 1, 2, 3):
            raise RequestError(f"inpainting_fill: 0 (fill), 1 (original), 2 or 3, not {body.inpainting_fill}")
        blur_x, blur_y = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x,
                                                                                             body.mask_blur_y)  # fmt: skip
        names = ["mask_blur"] * 2 if body.mask_blur is not None else ["mask_blur_x", "mask_blur_y"]
        for name, blur in zip(names, (blur_x, blur_y)):  # (the field that is out of range, with its own value)
            if not 0 <= blur <= 64:  # the web UI's slider reaches 64
                raise RequestError(f"{name} must be between 0 and 64 pixels, not {blur:g}")
        if not 0 <= body.inpaint_full_res_padding <= MAX_SIDE:  # any padding past the image's side is the whole image
            raise RequestError(f"inpaint_full_res_padding must be between 0 and {MAX_SIDE}, not "
                               f"{body.inpaint_full_res_padding}")  # fmt: skip
        job = build_job(body, check_model=False)  # checked against the model once the images are in
        width = job.request.width or worker.pipeline.model.cfg.default_size
        height = job.request.height or worker.pipeline.model.cfg.default_size
        image = open_request_image(body.init_images[0], "init_images[0]")
        mask = open_request_image(body.mask, "mask") if body.mask else None
        for name, im in (("init_images[0]", image), ("mask", mask)):
            if im is not None and math.prod(scaled_size(im.size, width, height, body.resize_mode)) > limits.max_pixels:
                raise RequestError(f"{name}: a {im.width}x{im.height} image scaled to cover {width}x{height} would "
                                   f"be over the limit of {limits.max_pixels} pixels")  # fmt: skip
        try:  # a mode Pillow cannot convert (a LAB TIFF) is the client's
            image = as_mode(image, "RGB", "init_images[0]")
            if mask is not None and mask.mode != "RGBA":
                mask = as_mode(mask, "L", "mask")
        except ValueError as e:
            raise RequestError(str(e)) from None
        inputs = img2img_inputs(
            image, mask, width, height, resize_mode=body.resize_mode, mask_blur_x=blur_x,
            mask_blur_y=blur_y, invert=bool(body.inpainting_mask_invert), fill=body.inpainting_fill == 0,
            only_masked=body.inpaint_full_res, padding=body.inpaint_full_res_padding,
        )  # fmt: skip
        job.request = validate(dataclasses.replace(
            job.request, init_image=from_pil(inputs.image), mask=from_pil(inputs.mask) if mask else None,
            width=width, height=height, strength=body.denoising_strength, paste=False,
        ))  # fmt: skip
        job.paste = inputs.paste
        check_against_model(job)
        return job

    def open_request_image(data: str, field: str) -> Image.Image:
        """A base64 image of a request, decoded; its pixel count is checked from the header before anything is
        decoded. RequestError naming the field otherwise."""
        try:
            return open_image(io.BytesIO(image_bytes(data, field)), name=field, max_pixels=limits.max_pixels)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def build_job(body: Txt2ImgRequest, check_model: bool = True) -> Job:
        """The web UI's fields as a job (defaults: the web UI's, the model's size and its own guidance); every
        check that needs no model is done here, before any image is decoded."""
        for name, value in {**(body.model_extra or {}), "override_settings": body.override_settings}.items():
            if too_deep(value, MAX_NESTING):
                raise RequestError(f"{name}: nested over {MAX_NESTING} levels deep")
        count = body.batch_size * body.n_iter
        if body.batch_size < 1 or body.n_iter < 1:
            raise RequestError(f"batch_size and n_iter must be at least 1, not {body.batch_size} and {body.n_iter}")
        if count > limits.max_images:
            raise RequestError(f"batch_size × n_iter must be between 1 and {limits.max_images}, not {count}")
        if bad := [side for side in (body.width, body.height) if side is not None and side > limits.max_side]:
            raise RequestError(f"width and height must be at most {limits.max_side} on this server, not {bad[0]}")
        if (longest := max(len(body.prompt), len(body.negative_prompt))) > limits.max_prompt:
            raise RequestError(f"prompt: {longest} characters, over this server's limit of {limits.max_prompt}")
        if body.steps > limits.max_steps:
            raise RequestError(f"steps must be at most {limits.max_steps} on this server, not {body.steps}")
        try:
            sampler, legacy_schedule = find_sampler(body.sampler_name or body.sampler_index)
        except ValueError as e:
            raise RequestError(f"sampler_name: {e}") from None
        overrides = body.override_settings or {}
        wanted = overrides.get("sd_model_checkpoint")
        checkpoint = checkpoints.find(str(wanted)) if wanted is not None else selected[0]
        clip_skip = overrides.get("CLIP_stop_at_last_layers")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)):
            raise RequestError("override_settings.CLIP_stop_at_last_layers: a whole number of layers")
        if body.refiner_switch_at is not None and not 0 <= body.refiner_switch_at <= 1:
            raise RequestError(f"refiner_switch_at must be in [0, 1], not {body.refiner_switch_at}")
        refiner = None
        if body.refiner_checkpoint not in (None, "", "None"):  # the web UI's "None" is no refiner
            refiner = checkpoints.find(body.refiner_checkpoint)
        seed = random.randrange(2**32) if body.seed in (None, -1) else body.seed
        request = GenerationRequest(
            prompts=[body.prompt] * count, negative_prompts=[body.negative_prompt] * count,
            seeds=[seed + i for i in range(count)], width=body.width, height=body.height, steps=body.steps,
            sampler=sampler.name, scheduler=body.scheduler or legacy_schedule or "automatic", eta=body.eta,
            s_noise=body.s_noise, cfg_scale=body.cfg_scale, batch_size=body.batch_size, clip_skip=clip_skip,
            refiner_switch=0.8 if body.refiner_switch_at is None else body.refiner_switch_at,
        )  # fmt: skip
        job = Job(validate(request), checkpoint, refiner, batch_size=body.batch_size,
                  sampler_name=sampler.display_name, cfg_scale=WEB_UI_CFG_SCALE)  # fmt: skip
        if check_model:
            check_against_model(job)
        return job

    def check_against_model(job: Job) -> None:
        """The loaded model's checks now, where the job runs on it: bad input never waits."""
        pipeline = worker.pipeline
        if job.checkpoint is None or (pipeline.checkpoint or Path()).resolve() == job.checkpoint.resolve():
            validate(job.request, pipeline)

    async def wait(job: Task, http: Request, arrived: float | None = None) -> bool:
        """Queue the job and wait for it; cancel it if the client goes away (False) or its time, counted from the
        request's arrival, runs out (503)."""
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        job.notify = lambda: loop.call_soon_threadsafe(finished.set)
        worker.submit(job)
        deadline = (arrived or time.monotonic()) + limits.request_timeout
        while not job.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.25)
                break
            if await http.is_disconnected():
                job.cancelled = True
                return False
            if time.monotonic() > deadline:
                job.cancelled = True
                raise HTTPException(503, f"the request took over {limits.request_timeout:g} s and was cancelled")
        if job.error is not None:
            raise job.error if isinstance(job.error, RequestError | NotFound) else HTTPException(500, str(job.error))
        return True

    async def respond(body: Txt2ImgRequest, job: Job, http: Request, arrived: float):
        if not await wait(job, http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        return await run_in_threadpool(answer, body, job)

    def answer(body: Txt2ImgRequest, job: Job) -> dict:
        """The web UI's response to one job: images, the request with its defaults, and `info`."""
        request, images = job.resolved, [job.paste(image) for image in job.images]
        if outdir and body.save_images:
            outdir.mkdir(parents=True, exist_ok=True)
            for image, text, seed in zip(images, job.infotexts, request.seeds):
                save_png(image, claim_numbered(outdir, f"{seed}.png"), text)
        checkpoint = Path(job.model_path) if job.model_path else None
        info = {
            "prompt": body.prompt, "all_prompts": request.prompts[: len(images)],
            "negative_prompt": body.negative_prompt, "all_negative_prompts": request.negative_prompts[: len(images)],
            "seed": request.seeds[0], "all_seeds": request.seeds[: len(images)], "subseed": -1, "all_subseeds": [],
            "width": request.width, "height": request.height, "sampler_name": job.sampler_name,
            "scheduler": request.scheduler, "cfg_scale": request.cfg_scale, "steps": request.steps,
            "batch_size": body.batch_size, "n_iter": body.n_iter,
            "sd_model_name": checkpoint.stem if checkpoint else "model",
            "sd_model_hash": checkpoints.hashes.get(checkpoint), "infotexts": job.infotexts,
            "warnings": job.warnings, "interrupted": job.interrupted, "ignored": ignored_fields(body),
            "batched_with": job.batched_with,
        }  # fmt: skip
        parameters = body.model_dump() | {"seed": request.seeds[0], "cfg_scale": request.cfg_scale,
                                          "width": request.width, "height": request.height,
                                          "sampler_name": job.sampler_name}  # fmt: skip
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:
            parameters |= {"init_images": None, "mask": None}  # megabytes the client sent, as the web UI leaves out
        return {
            "images": [png_base64(i, t) for i, t in zip(images, job.infotexts)] if body.send_images else [],
            "parameters": parameters,
            "info": json.dumps(info),
        }

    return LimitsMiddleware(app, api_auth, limits.max_body)


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", timeout: float = 30):
    """Run an ASGI app with uvicorn in a thread of this process, on a free port of `host` -> its base URL; the
    server stops when the block ends. For tests, benchmarks and embedding (`ldm serve` runs uvicorn itself)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
