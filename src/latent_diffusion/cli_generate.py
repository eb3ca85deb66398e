"""txt2img, img2img and inpaint from the command line: flags into a request, the pipeline loaded, images written as
each batch is done. Also the checks of flags that the other commands share (device, folders, sampler)."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .cli_common import UsageError, pick_dtype
from .cli_control import controls_from_args
from .devices import resolve_device
from .files import claim_numbered, missing_folders, model_hash, remove_empty, writable_folder
from .models.ldm import LatentDiffusion
from .pipeline.generate import generate_plan
from .pipeline.images import grid, load_image, save_png, to_pil
from .pipeline.infotext import read_infotext, settings_from_infotext
from .pipeline.loading import Pipeline, load_pipeline
from .pipeline.outpainting import MK2, POOR_MAN, check_settings, outpainting_mk2, poor_mans_outpainting
from .pipeline.plan import Plan, resolve
from .pipeline.request import GenerationRequest, HiresFix, RequestError, validate
from .pipeline.sd_upscale import sd_upscale
from .pipeline.upscalers import FOLDERS, list_upscalers
from .prompts.styles import find_styles
from .sampling.samplers import find_sampler
from .weights.checkpoint import BUILTIN_MODEL
from .weights.lora import find_loras
from .weights.storage import STORAGE


def pick_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def prepare_outdir(outdir: Path) -> list[Path]:
    """Create the folder and prove it writable before any work, so a bad folder costs nothing; -> the folders it
    created (`remove_empty` takes them away again if the run fails before writing into them)."""
    try:
        created = missing_folders(outdir)
        writable_folder(outdir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # e.g. a name over the file system's limit
        raise UsageError(f"cannot write to the output folder {outdir}: {e.strerror}") from None
    return created


# The outpainting scripts' settings, as their errors name them after the script's name
OUTPAINT_FLAGS = {
    "pixels to expand": "--outpaint",
    "mask blur": "--outpaint-mask-blur",
    "sides": "--outpaint-sides",
    "masked content": "--outpaint-fill",
    "falloff": "--outpaint-falloff",
    "color variation": "--outpaint-color-variation",
}
# The request fields whose errors name a flag of their own (the messages begin with the field's name).
FLAGS = {
    "width and height": "--width and --height",
    "batch_size": "--batch-size",
    "steps": "--steps",
    "strength": "--strength",
    "eta": "--eta",
    "s_noise": "--s-noise",
    "cfg_scale": "--cfg-scale",
    "clip_skip": "--clip-skip",
    "refiner_switch": "--refiner-switch",
    "hr_scale": "--hires-scale",
    "hr_resize_x": "--hires-resize's width",
    "hr_resize_y": "--hires-resize's height",
    "hr_second_pass_steps": "--hires-steps",
    "hr_upscaler": "--hires-upscaler",
    "hires pass: strength": "--hires-denoise",
    "hires pass: cfg_scale": "--hires-cfg-scale",
    "SD upscale: the overlap": "--sd-upscale-overlap",
    **{f"{script}: the {name}": flag for script in (MK2, POOR_MAN) for name, flag in OUTPAINT_FLAGS.items()},
    **{f"{script}:": "--outpaint:" for script in (MK2, POOR_MAN)},
    "styles": "--style",
}


def checked(request: GenerationRequest) -> GenerationRequest:
    """`validate`, with its errors in the command line's words."""
    with in_flag_words():
        return validate(request)


def planned(request: GenerationRequest, pipeline: Pipeline) -> Plan:
    """`plan.resolve`, with its errors in the command line's words."""
    with in_flag_words():
        return resolve(request, pipeline)


@contextlib.contextmanager
def in_flag_words():
    """A RequestError as a UsageError that names the flag where the request's message names a field."""
    try:
        yield
    except RequestError as e:
        message = str(e)
        for field, flag in FLAGS.items():
            if message.startswith((field + " ", field + ":")):
                message = flag + message[len(field) :]
        raise UsageError(message) from None


MAX_IMAGES = 100_000  # images of one command


def request_from_args(args) -> GenerationRequest:
    """The flags of txt2img, img2img and inpaint as a request (without the images, which need the model's
    default size for --resize)."""
    if args.batch_size < 1 or args.n_iter < 1:
        raise UsageError("--batch-size and --n-iter must be at least 1")
    count = args.batch_size * args.n_iter
    if count > MAX_IMAGES:  # the request holds a prompt and a seed per image: refuse before building it
        raise UsageError(f"--batch-size × --n-iter must be at most {MAX_IMAGES}, not {count}")
    sampler, scheduler = sampler_and_scheduler(args)
    return GenerationRequest.repeated(
        args.prompt,
        args.negative_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        n_iter=args.n_iter,
        width=args.width,
        height=args.height,
        steps=args.steps,
        sampler=sampler,
        scheduler=scheduler,
        spacing=args.spacing,
        eta=args.eta,
        s_noise=args.s_noise,
        cfg_scale=args.cfg_scale,
        clip_skip=args.clip_skip,
        prompt_syntax=args.prompt_syntax,
        strength=getattr(args, "strength", 1.0),
        vae_tiling=args.vae_tiling,
        refiner_switch=args.refiner_switch,
        compile=args.compile,
        hires=hires_from_args(args),
        styles=args.style or [],
        step_count=getattr(args, "step_count", "web_ui"),
        old_edit_timelines=args.old_edit_timelines,
    )


HIRES_FLAGS = ("hires_upscaler", "hires_steps", "hires_denoise", "hires_sampler", "hires_scheduler", "hires_cfg_scale")


def hires_from_args(args) -> HiresFix | None:
    """--hires-scale or --hires-resize (and the other --hires flags) as the request's hires fix."""
    scale, resize = getattr(args, "hires_scale", None), getattr(args, "hires_resize", None)
    if scale is None and resize is None:
        if any(
            getattr(args, name, None) is not None for name in (*HIRES_FLAGS, "hires_prompt", "hires_negative_prompt")
        ):
            raise UsageError("the --hires flags need --hires-scale or --hires-resize, which turn the hires fix on")
        return None
    if scale is not None and resize is not None:
        raise UsageError("give --hires-scale or --hires-resize, not both")
    width, height = 0, 0
    if resize is not None:
        m = re.fullmatch(r"(\d+)x(\d+)", resize)
        if not m or resize == "0x0":
            raise UsageError(
                f"--hires-resize: WIDTHxHEIGHT in pixels (0 for one side: keep the aspect), not {resize!r}"
            )
        width, height = int(m[1]), int(m[2])
    sampler = scheduler = None
    if args.hires_sampler is not None:
        try:
            found, schedule = find_sampler(args.hires_sampler)
        except ValueError as e:
            raise UsageError(f"--hires-sampler: {e}") from None
        sampler, scheduler = found.name, schedule
    return HiresFix(
        scale=2.0 if scale is None else scale,
        resize_x=width,
        resize_y=height,
        upscaler=args.hires_upscaler,
        steps=args.hires_steps or 0,
        strength=0.7 if args.hires_denoise is None else args.hires_denoise,
        sampler=sampler,
        scheduler=args.hires_scheduler or scheduler,
        prompt=args.hires_prompt or None,  # (empty: the first pass's, as the web UI)
        negative_prompt=args.hires_negative_prompt or None,
        cfg_scale=args.hires_cfg_scale,
    )


def folder_arg(value: str | None, flag: str, default: str) -> Path | None:
    """A folder flag: it must exist if given; by default `default` where it exists."""
    if value is None:
        return Path(default) if Path(default).is_dir() else None
    if not Path(value).is_dir():
        raise UsageError(f"{flag} {value}: no such folder")
    return Path(value)


def styles_arg(value: str | None) -> dict:
    """--styles-file's styles (it must exist), or styles.csv's where it exists."""
    try:
        return find_styles(value)
    except ValueError as e:
        raise UsageError(f"--styles-file {e}") from None


def upscaler_args(value: str | None) -> dict[str, Path]:
    """--upscaler-dir's model files by name; by default those of the web UI's upscaler folders that exist."""
    folders = [folder_arg(value, "--upscaler-dir", "")] if value else [f for f in FOLDERS if Path(f).is_dir()]
    return {name: row.path for name, row in list_upscalers(*folders).items() if row.path is not None}


def weights_args(args) -> dict[str, torch.dtype | str | None]:
    """--unet-weights-dtype and --text-weights-dtype as `load_pipeline`'s keywords."""
    return {key: STORAGE.get(getattr(args, key)) for key in ("unet_weights_dtype", "text_weights_dtype")}


def lora_args(args) -> tuple[dict[str, Path], str]:
    """--lora-dir's files and each --lora PATH[:WEIGHT] by name, and the tags that --lora adds to the prompt (so that
    the infotext says which LoRAs made the image, as the web UI's does)."""
    folder = folder_arg(args.lora_dir, "--lora-dir", "models/Lora")
    loras, tags = find_loras(folder) if folder else {}, []
    for value in args.lora or []:
        path, _, weight = value.rpartition(":")
        try:
            path, weight = (path, float(weight)) if path else (value, 1.0)
        except ValueError:
            path, weight = value, 1.0
        if not Path(path).is_file():
            raise UsageError(f"--lora {path}: no such file")
        name = re.sub(r"[:<>]", "_", Path(path).stem)  # a name the tag can hold (`:` and `>` end it)
        loras[name] = Path(path)
        tags.append(f"<lora:{name}:{weight:g}>")
    return loras, " ".join(tags)


def sampler_and_scheduler(args) -> tuple[str, str]:
    """--sampler as our id or the web UI's name (a legacy one such as "DPM++ 2M Karras" names the schedule too)."""
    try:
        sampler, schedule = find_sampler(args.sampler)
    except ValueError as e:
        raise UsageError(f"--sampler: {e}") from None
    return sampler.name, args.scheduler if args.scheduler != "automatic" or schedule is None else schedule


def with_images(request: GenerationRequest, args, model: LatentDiffusion) -> GenerationRequest:
    """img2img and inpaint: the request with --init-image and --mask, resized with --resize."""
    if args.command == "txt2img":
        return request
    side = model.cfg.default_size
    size = (args.width or side, args.height or side) if args.resize else None
    image = load_image(args.init_image, "RGB", size)
    asked = (args.width or image.shape[-1], args.height or image.shape[-2])
    if size is None and asked != (image.shape[-1], image.shape[-2]):  # else the size asked for would be ignored
        raise UsageError(
            f"--width and --height ask for {asked[0]}x{asked[1]}, the init image is "
            f"{image.shape[-1]}x{image.shape[-2]}: add --resize to scale it"
        )
    mask = load_image(args.mask, "L", size) if args.command == "inpaint" else None
    width, height = (None, None) if size is None else size
    return dataclasses.replace(request, init_image=image, mask=mask, width=width, height=height)


def apply_infotext(args, argv: list[str]) -> None:
    """Fill in the settings of --infotext, except those of flags given on the command line, and its size where an
    init image keeps its own (no --resize)."""
    settings, ignored = settings_from_infotext(read_infotext(args.infotext))
    if getattr(args, "init_image", None) and not args.resize:
        settings = {k: v for k, v in settings.items() if k not in ("width", "height")}
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    other_flags = {"scheduler": {"--karras", "--no-karras"}}  # other flags that set the same setting
    args.infotext_model_hash = settings.pop("model_hash", None)
    if not getattr(args, "controlnet", None) and any(k.startswith("control_") for k in settings):
        settings = {k: v for k, v in settings.items() if not k.startswith("control_")}
        ignored.append("ControlNet units (give --controlnet FILE and --control-image for each)")
    for dest, value in settings.items():
        flag = "--" + dest.replace("_", "-")
        if hasattr(args, dest) and flag not in given and not other_flags.get(dest, set()) & given:
            setattr(args, dest, value)
    if ignored:
        print(f"ldm: warning: infotext fields not used here: {', '.join(ignored)}", file=sys.stderr)


def cmd_generate(args, write: Callable | None = None) -> None:
    """txt2img, img2img and inpaint: check, load, sample batch after batch, write PNGs (and a grid). write: what
    runs once the checks are made and the folder is there (`write_images`; the X/Y/Z plot's own)."""
    loras, tags = lora_args(args)
    if tags:
        args.prompt = f"{args.prompt} {tags}"
        if getattr(args, "hires_prompt", None):  # (a LoRA of --lora is for both passes)
            args.hires_prompt = f"{args.hires_prompt} {tags}"
    units, args.control_files = controls_from_args(args)
    request = checked(dataclasses.replace(request_from_args(args), controls=units))
    args.outpaint_settings = outpaint_settings(args) if args.command == "img2img" else None
    embeddings = folder_arg(args.embeddings_dir, "--embeddings-dir", "embeddings")
    hires_checkpoint = getattr(args, "hires_checkpoint", None)
    if hires_checkpoint is not None and request.hires is None:
        raise UsageError("--hires-checkpoint needs --hires-scale or --hires-resize, which turn the hires fix on")
    for flag, path in (("--vae", args.vae), ("--refiner", args.refiner), ("--hires-checkpoint", hires_checkpoint)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    outdir = Path(args.outdir)
    created = prepare_outdir(outdir)
    try:
        (write or write_images)(args, request, outdir, embeddings, loras, device, dtype)
    except BaseException:
        remove_empty(created)  # leave nothing behind where nothing was written
        raise


def load_from_args(args, embeddings, loras, device, dtype) -> Pipeline:
    """The pipeline the flags name, its notices printed (UsageError for an inpainting model outside `ldm inpaint`)."""
    pipeline = load_pipeline(
        args.ckpt or BUILTIN_MODEL,
        args.config,
        device=device,
        dtype=dtype,
        ema=args.ema or None,
        vae=args.vae,
        unet_gguf=args.unet_gguf,
        refiner=args.refiner,
        embeddings_dir=embeddings,
        loras=loras,
        upscalers=upscaler_args(args.upscaler_dir),
        controlnets=getattr(args, "control_files", None),
        clip_vision=folder_arg(getattr(args, "clip_vision_dir", None), "--clip-vision-dir", "models/clip_vision"),
        annotators=folder_arg(getattr(args, "annotator_dir", None), "--annotator-dir", "models/annotators"),
        hires_checkpoint=getattr(args, "hires_checkpoint", None),
        styles=styles_arg(args.styles_file),
        **weights_args(args),
    )
    for notice in pipeline.notices:
        print(f"ldm: warning: {notice}", file=sys.stderr)
    return pipeline


def write_images(args, request: GenerationRequest, outdir: Path, embeddings, loras, device, dtype) -> None:
    """cmd_generate once its folder is there: load, sample batch after batch, write each image as it is done."""
    pipeline = load_from_args(args, embeddings, loras, device, dtype)
    if getattr(args, "sd_upscale", None) is not None:
        return write_sd_upscale(args, request, pipeline, outdir)
    if getattr(args, "outpaint_settings", None) is not None:
        return write_outpaint(args, request, pipeline, outdir)
    plan = planned(with_images(request, args, pipeline.model), pipeline)
    request = plan.request
    file = pipeline.checkpoint
    if getattr(args, "infotext_model_hash", None) and args.infotext_model_hash != model_hash(file):
        print(
            f"ldm: warning: the infotext's image was made with model hash {args.infotext_model_hash}; "
            f"{file} has {model_hash(file)}",
            file=sys.stderr,
        )
    steps = sum(p.request.steps_run for p in (plan, plan.hires) if p is not None)
    bar = tqdm(total=args.n_iter * steps, disable=args.quiet, unit="step", desc=args.command)
    images, warned, n = [], set(), args.batch_size
    for start in range(0, len(request.prompts), n):  # one batch at a time, each written as soon as it is done
        batch = plan.part(start, start + n)
        result = generate_plan(batch, progress=lambda p: bar.update(1))
        for warning in set(result.warnings) - warned:
            tqdm.write(f"ldm: warning: {warning}", file=sys.stderr)
        warned |= set(result.warnings)
        for seed, tensor, info in zip(batch.request.seeds, result.images, result.infotexts):
            images.append(write_png(outdir, seed, tensor, info, args.quiet))
    bar.close()
    if args.grid and len(images) > 1:  # named after this run's last image, which no other run can take
        path = outdir / f"grid-{images[-1][2].name[:5]}.png"
        save_png(grid([im for im, _, _ in images], args.batch_size), path, images[0][1])
        print(f"wrote {path}")


def write_png(outdir: Path, seed: int, tensor: torch.Tensor, info: str, quiet: bool) -> tuple:
    """One image as the next numbered PNG with its infotext -> (the image, its infotext, its path)."""
    image, path = to_pil(tensor), claim_numbered(outdir, f"{seed}.png")
    try:
        save_png(image, path, info)
    except BaseException:
        path.unlink(missing_ok=True)  # the claimed name, still empty
        raise
    if not quiet:
        tqdm.write(f"wrote {path}")
    return image, info, path


def write_sd_upscale(args, request: GenerationRequest, pipeline: Pipeline, outdir: Path) -> None:
    """img2img --sd-upscale: the init image enlarged and redrawn in tiles of --width x --height (the web UI's SD
    upscale), one result per --n-iter, its tiles --batch-size per U-Net call."""
    side = pipeline.model.cfg.default_size
    seeds = [request.seeds[0] + k for k in range(args.n_iter)]
    request = dataclasses.replace(
        request,
        prompts=request.prompts[: args.n_iter],
        negative_prompts=request.negative_prompts[: args.n_iter],
        seeds=seeds,
        init_image=load_image(args.init_image, "RGB"),
        width=args.width or side,
        height=args.height or side,
    )
    with in_flag_words():
        result = sd_upscale(pipeline, request, args.sd_upscale_upscaler, args.sd_upscale, args.sd_upscale_overlap)
    for seed, tensor, info in zip(seeds, result.images, result.infotexts):
        write_png(outdir, seed, tensor, info, args.quiet)


def outpaint_settings(args) -> dict | None:
    """img2img --outpaint: the script's settings from its flags, checked before any work (None: not asked for)."""
    extras = ("outpaint_mask_blur", "outpaint_fill", "outpaint_falloff", "outpaint_color_variation")
    if args.outpaint is None:
        if given := [name for name in extras if getattr(args, name) is not None]:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --outpaint PIXELS")
        return None
    if args.sd_upscale is not None or args.resize:
        raise UsageError("--outpaint takes the init image as it is, without --sd-upscale or --resize")
    mk2 = args.outpaint_method == "mk2"
    for name in ("outpaint_fill",) if mk2 else ("outpaint_falloff", "outpaint_color_variation"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} is for --outpaint-method {'poor-man' if mk2 else 'mk2'}")
    if not mk2 and args.batch_size * args.n_iter > 1:
        raise UsageError("--outpaint-method poor-man makes one image, as the web UI's: drop --batch-size, --n-iter")
    sides = [side.strip() for side in args.outpaint_sides.split(",") if side.strip()]
    settings = {"pixels": args.outpaint, "sides": sides, "mask_blur": args.outpaint_mask_blur}
    if mk2:
        settings |= {"falloff": args.outpaint_falloff, "color_variation": args.outpaint_color_variation}
    else:
        settings["fill"] = args.outpaint_fill and args.outpaint_fill.replace("-", " ")
    settings = {name: value for name, value in settings.items() if value is not None}  # (the script's defaults)
    with in_flag_words():
        check_settings(MK2 if mk2 else POOR_MAN, **{"mask_blur": 0, **settings})  # (0: a stand-in for the default)
    return settings


def write_outpaint(args, request: GenerationRequest, pipeline: Pipeline, outdir: Path) -> None:
    """img2img --outpaint: the init image extended by the script --outpaint-method names (mk2: one result per image
    of --batch-size x --n-iter; poor man's: one), each pass (tile) at most --width x --height."""
    request = dataclasses.replace(request, init_image=load_image(args.init_image, "RGB"))
    run = outpainting_mk2 if args.outpaint_method == "mk2" else poor_mans_outpainting
    with in_flag_words():
        result = run(pipeline, request, **args.outpaint_settings)
    for seed, tensor, info in zip(result.request.seeds, result.images, result.infotexts):
        write_png(outdir, seed, tensor, info, args.quiet)
