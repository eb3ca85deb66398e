"""The AUTOMATIC1111 web UI's HTTP API as data and plain functions: its request models and defaults, which of its
fields this server does not implement (`ignored_fields`), its fields turned into a `GenerationRequest`, and the
shapes of its answers (its `modules/api/models.py` and `modules/processing.py`). No server state lives here:
`serving/server.py` routes requests to these.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ..pipeline.hires import LATENT_MODES, target_size
from ..pipeline.images import RASTER_FORMATS, png_text
from ..pipeline.infotext import web_ui_parameters
from ..pipeline.request import MAX_HIRES_SCALE, MAX_SIDE, GenerationRequest, HiresFix, RequestError
from ..sampling.samplers import SAMPLERS, Sampler, find_sampler
from ..sampling.sigma_schedules import SCHEDULERS
from .controlnet_units import enabled_units, ignored_unit_fields
from .job_queue import Job

WEB_UI_CFG_SCALE = 7.0  # the web UI's default guidance; a model's own (the built-in model's) wins


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
    "subseed_strength": (0,), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "s_min_uncond": (None, 0), "s_churn": (None, 0), "s_tmax": (None, 0, float("inf")), "s_tmin": (None, 0),
    "override_settings_restore_afterwards": (True,), "do_not_save_samples": (False, True),
    "do_not_save_grid": (False, True), "image_cfg_scale": None,  # any value: it is for instruct-pix2pix models
    "initial_noise_multiplier": (None, 1),
}  # fmt: skip
HIRES_FIELDS = ("hr_", "firstphase_", "denoising_strength")  # txt2img's denoising_strength is the hires pass's
SETTINGS = {
    "sd_model_checkpoint",
    "CLIP_stop_at_last_layers",
    "img2img_fix_steps",
    "use_old_scheduling",
    "control_net_no_detectmap",
}  # honoured
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
    styles: list[str] = Field(default_factory=list)  # prompt styles of the server's styles.csv, applied in order
    # The hires fix (txt2img's; `pipeline/hires.py`)
    enable_hr: bool = False
    denoising_strength: float = 0.75  # txt2img: the hires pass's
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None, "" or "Use same sampler": the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str = ""  # "": the first pass's
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None  # Forge's field; None: the first pass's guidance, as the web UI
    hr_checkpoint_name: str | None = None  # a checkpoint of the models folder; None, "", "Use same checkpoint": none


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)  # base64, or data:image/...;base64,...
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


def png_base64(image: Image.Image, parameters: str | dict[str, str]) -> str:
    """A PNG with the `parameters` text chunk (if any; or these text chunks, by key), base64-encoded, as the web UI's
    API sends images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_text(parameters or {}))
    return base64.b64encode(buffer.getvalue()).decode()


def ignored_fields(body: Txt2ImgRequest) -> list[str]:
    """The fields of the request this server does not implement that would change the web UI's result."""
    fields = dict(body.model_extra or {})
    if not body.enable_hr or isinstance(body, Img2ImgRequest):  # (img2img has no hires fix)
        fields = {name: value for name, value in fields.items() if not name.startswith(HIRES_FIELDS)}
    script = str(fields.get("script_name") or "").strip().lower()
    img2img_scripts = ("sd upscale", "outpainting mk2", "poor man's outpainting")
    if script == "x/y/z plot" or (script in img2img_scripts and isinstance(body, Img2ImgRequest)):  # (scripts run)
        fields = {name: value for name, value in fields.items() if name not in ("script_name", "script_args")}
    if not fields.get("subseed_strength"):
        fields.pop("subseed", None)
    scripts = fields.pop("alwayson_scripts", None)
    ignored = [
        name
        for name, value in fields.items()
        if (name not in NO_EFFECT and value not in (None, "", 0, False, -1, [], {}))
        or (NO_EFFECT.get(name) is not None and value not in NO_EFFECT[name])
    ]
    ignored += always_on_ignored(body, scripts, script)
    ignored += [f"override_settings.{name}" for name in (body.override_settings or {}) if name not in SETTINGS]
    if getattr(body, "mask", None) and getattr(body, "inpainting_fill", 0) in (2, 3):
        ignored.append("inpainting_fill")  # latent noise and latent nothing run as "original"
    return sorted(ignored)


def always_on_ignored(body: Txt2ImgRequest, scripts, script: str) -> list[str]:
    """The always-on scripts a request sets (`alwayson_scripts`): ControlNet's units run (the fields of theirs this
    server does not apply are named), except under SD upscale, which runs without them; any other script is named
    where it has arguments."""
    if not isinstance(scripts, dict):
        return [] if scripts in (None, "", [], {}) else ["alwayson_scripts"]
    named = [
        f"alwayson_scripts.{name}"
        for name, entry in scripts.items()
        if name.lower() != "controlnet" and entry not in (None, [], {}) and not _no_args(entry)
    ]
    img2img = isinstance(body, Img2ImgRequest)
    if script == "sd upscale" and img2img:
        try:
            return named + (["alwayson_scripts.ControlNet"] if enabled_units(body) else [])
        except RequestError:  # (not read: units that cannot be read are not run either)
            return [*named, "alwayson_scripts.ControlNet"]
    return named + ignored_unit_fields(body)


def _no_args(entry) -> bool:
    return isinstance(entry, dict) and entry.get("args") in (None, [], {})


def check_fields(body: Txt2ImgRequest, limits: ServerLimits, default_size: int = 512) -> None:
    """The checks of a request's fields that need no model, before any image is decoded (RequestError)."""
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
    if body.refiner_switch_at is not None and not 0 <= body.refiner_switch_at <= 1:
        raise RequestError(f"refiner_switch_at must be in [0, 1], not {body.refiner_switch_at}")
    if body.enable_hr and not isinstance(body, Img2ImgRequest):
        _check_hires_fields(body, limits, default_size)


def _check_hires_fields(body: Txt2ImgRequest, limits: ServerLimits, default_size: int) -> None:
    """The hires pass within this server's limits: its steps, and the size it enlarges to (with the loaded model's
    default size where the request gives none)."""
    if body.hr_second_pass_steps > limits.max_steps:
        raise RequestError(f"hr_second_pass_steps must be at most {limits.max_steps}, not {body.hr_second_pass_steps}")
    if max(len(body.hr_prompt), len(body.hr_negative_prompt)) > limits.max_prompt:
        raise RequestError(f"hr_prompt: over this server's limit of {limits.max_prompt} characters")
    width, height = body.width or default_size, body.height or default_size
    if not 0 < body.hr_scale <= MAX_HIRES_SCALE or min(width, height, body.hr_resize_x, body.hr_resize_y) < 0:
        return  # (`request.validate` names the field)
    size = target_size(width, height, body.hr_scale, body.hr_resize_x, body.hr_resize_y)
    if max(*size.upscale_to, body.hr_resize_x, body.hr_resize_y) > limits.max_side:
        to = f"{size.upscale_to[0]}x{size.upscale_to[1]}"
        raise RequestError(f"hr_scale: the hires fix would enlarge to {to}, over this server's {limits.max_side}")


def generation_request(body: Txt2ImgRequest) -> tuple[GenerationRequest, Sampler]:
    """The web UI's fields as a request (the web UI's defaults; the model's size and guidance come later) -> (the
    request, the sampler it names)."""
    try:
        sampler, legacy_schedule = find_sampler(body.sampler_name or body.sampler_index)
    except ValueError as e:
        raise RequestError(f"sampler_name: {e}") from None
    clip_skip = (body.override_settings or {}).get("CLIP_stop_at_last_layers")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)):
        raise RequestError("override_settings.CLIP_stop_at_last_layers: a whole number of layers")
    request = GenerationRequest.repeated(
        body.prompt,
        body.negative_prompt,
        seed=body.seed,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        width=body.width,
        height=body.height,
        steps=body.steps,
        sampler=sampler.name,
        scheduler=body.scheduler or legacy_schedule or "automatic",
        eta=body.eta,
        s_noise=body.s_noise,
        cfg_scale=body.cfg_scale,
        clip_skip=clip_skip,
        refiner_switch=0.8 if body.refiner_switch_at is None else body.refiner_switch_at,
        styles=body.styles,
        step_count="fixed" if (body.override_settings or {}).get("img2img_fix_steps") is True else "web_ui",
        old_edit_timelines=(body.override_settings or {}).get("use_old_scheduling") is True,
        hires=hires_fix(body) if body.enable_hr and not isinstance(body, Img2ImgRequest) else None,
    )
    return request, sampler


def hires_fix(body: Txt2ImgRequest) -> HiresFix:
    """txt2img's hr_ fields as the request's hires fix (the web UI's "Use same ..." and "" as the first pass's)."""
    sampler = scheduler = None
    if body.hr_sampler_name not in (None, "", "Use same sampler"):
        try:
            found, scheduler = find_sampler(body.hr_sampler_name)
        except ValueError as e:
            raise RequestError(f"hr_sampler_name: {e}") from None
        sampler = found.name
    if body.hr_scheduler not in (None, "", "Use same scheduler"):
        scheduler = body.hr_scheduler
    return HiresFix(
        scale=body.hr_scale,
        resize_x=body.hr_resize_x,
        resize_y=body.hr_resize_y,
        upscaler=body.hr_upscaler,
        steps=body.hr_second_pass_steps,
        strength=body.denoising_strength,
        sampler=sampler,
        scheduler=scheduler,
        prompt=body.hr_prompt or None,
        negative_prompt=body.hr_negative_prompt or None,
        cfg_scale=body.hr_cfg,
    )


def mask_blur(body: Img2ImgRequest) -> tuple[float, float]:
    """The checks of img2img's own fields that need no image -> the mask blur (x, y) in pixels."""
    if len(body.init_images) != 1:  # the web UI takes one per image of a batch; this server, one for all
        raise RequestError(f"init_images: give one image (base64), not {len(body.init_images)}")
    if body.resize_mode not in (0, 1, 2):
        raise RequestError(
            f"resize_mode: 0 (just resize), 1 (crop and resize) or 2 (resize and fill), not {body.resize_mode}; "
            "3 (latent upscale) is not implemented"
        )
    if body.inpainting_fill not in (0, 1, 2, 3):
        raise RequestError(f"inpainting_fill: 0 (fill), 1 (original), 2 or 3, not {body.inpainting_fill}")
    if body.mask_blur is not None:  # both at once
        blurs = {"mask_blur": body.mask_blur}
    else:
        blurs = {"mask_blur_x": body.mask_blur_x, "mask_blur_y": body.mask_blur_y}
    for name, blur in blurs.items():  # (the field that is out of range, with its own value)
        if not 0 <= blur <= 64:  # the web UI's slider reaches 64
            raise RequestError(f"{name} must be between 0 and 64 pixels, not {blur:g}")
    if not 0 <= body.inpaint_full_res_padding <= MAX_SIDE:  # any padding past the image's side is the whole image
        raise RequestError(
            f"inpaint_full_res_padding must be between 0 and {MAX_SIDE}, not {body.inpaint_full_res_padding}"
        )
    x, y = blurs.values() if len(blurs) == 2 else (body.mask_blur, body.mask_blur)
    return x, y


def answer(body: Txt2ImgRequest, job: Job, images: list[Image.Image], model_hash: str | None) -> dict:
    """The web UI's response to one job: images, the request with its defaults, and `info`."""
    request, checkpoint = job.resolved, job.model_path
    info = {
        "prompt": body.prompt,
        "all_prompts": request.prompts[: len(images)],
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": request.negative_prompts[: len(images)],
        "seed": request.seeds[0],
        "all_seeds": request.seeds[: len(images)],
        "subseed": -1,
        "all_subseeds": [],
        "width": request.width,
        "height": request.height,
        "sampler_name": job.sampler_name,
        "scheduler": request.scheduler,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "sd_model_name": checkpoint.stem if checkpoint else "model",
        "sd_model_hash": model_hash,
        "infotexts": job.infotexts,
        "warnings": job.warnings,
        "interrupted": job.interrupted,
        "ignored": ignored_fields(body),
        "batched_with": job.batched_with,
    }
    resolved = {"seed": request.seeds[0], "cfg_scale": request.cfg_scale, "width": request.width}
    parameters = body.model_dump() | resolved | {"height": request.height, "sampler_name": job.sampler_name}
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters |= {"init_images": None, "mask": None}  # megabytes the client sent, as the web UI leaves out
    return {
        "images": [png_base64(i, t) for i, t in zip(images, job.infotexts)] if body.send_images else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }


def samplers() -> list[dict]:
    return [
        {"name": s.display_name, "aliases": [s.name], "options": {"scheduler": s.scheduler or ""}}
        for s in SAMPLERS.values()
    ]


def schedulers() -> list[dict]:
    return [
        {"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for s in SCHEDULERS.values()
    ]


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_MODES]


def nothing_to_refresh() -> dict:
    return {}  # the models folder is read at every listing


def png_info(body: PngInfoRequest) -> dict:
    """An image's infotext, its other text chunks, and the infotext read into the web UI's keys."""
    image = decode_image(body.image.strip())
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}  # the image's other text chunks
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": web_ui_parameters(text) if text else {}}
