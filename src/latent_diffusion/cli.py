"""The `ldm` command: one entry point, one subcommand per job. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import BUILTIN_MODEL, CheckpointError, load_model
from .data import EVAL_FORMS, HELD_OUT_PAIRS, ShapesDataset
from .devices import emulated_bfloat16_warning, has_native_bfloat16, resolve_device
from .evaluate import ATTRIBUTES, LEFT_TO_CHANCE, prompt_adherence
from .files import atomic_write, claim_numbered, missing_folders, remove_empty, writable_folder
from .generate import NonFiniteError, generate
from .images import grid, load_image, model_hash, parameters_text, save_png, to_pil
from .infotext import read_infotext, settings_from_infotext
from .latent_diffusion import LatentDiffusion
from .lora import find_loras
from .pipeline import Pipeline, load_pipeline
from .request import GenerationRequest, RequestError, infotext_fields, validate
from .samplers import SAMPLERS, find_sampler
from .schedule import SPACINGS
from .schedulers import SCHEDULERS
from .train import TrainConfig, train
from .train_autoencoder import AutoencoderTrainConfig, train_autoencoder
from .training import TrainError, TrainingDiverged

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


def describe(model: LatentDiffusion) -> str:
    cfg = model.cfg
    lines = [
        f"variant {cfg.variant} ({cfg.family.title}, {cfg.parameterization}-prediction), {model.dtype}, {model.device}",
        f"  U-Net        model.diffusion_model   {count(model.model)}  in_channels={cfg.unet.in_channels}"
        f" model_channels={cfg.unet.model_channels} channel_mult={cfg.unet.channel_mult}"
        + (f" vector y={cfg.unet.adm_in_channels}" if cfg.unet.adm_in_channels else ""),
        f"  autoencoder  first_stage_model       {count(model.first_stage_model)}"
        f"  {cfg.autoencoder.downsampling_factor}x smaller per side, scale_factor={cfg.scale_factor}",
    ]
    xl = bool(cfg.micro_conditioning)
    for i, (t, encoder) in enumerate(zip(cfg.texts, model.text_encoders)):
        where = f"conditioner.embedders.{i}" if xl else "cond_stage_model"
        lines.append(
            f"  text         {where:<23} {count(encoder)}  {t.kind} width={t.width} layers={t.layers} ({t.layer}"
            f" layer{'' if t.final_norm else ', no final norm'}){', pooled into y' if t.pooled else ''}"
            + ("; no text_projection or logit_scale in the file (unused)" if not t.projection else "")
        )
    if xl:
        lines.append(
            f"  micro-conditioning ({cfg.micro_conditioning_width} wide each): {', '.join(cfg.micro_conditioning)}"
        )
    return "\n".join(lines)


def cmd_info(args) -> None:
    model = load_model(
        args.ckpt, args.config, device=pick_device(args.device), dtype=DTYPES[args.dtype], ema=args.ema or None
    )
    print(f"{args.ckpt}: {describe(model)}")


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
}


def checked(request: GenerationRequest, pipeline: Pipeline | None = None) -> GenerationRequest:
    """`validate`, with its errors in the command line's words."""
    try:
        return validate(request, pipeline)
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
    )


def folder_arg(value: str | None, flag: str, default: str) -> Path | None:
    """A folder flag: it must exist if given; by default `default` where it exists."""
    if value is None:
        return Path(default) if Path(default).is_dir() else None
    if not Path(value).is_dir():
        raise UsageError(f"{flag} {value}: no such folder")
    return Path(value)


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
    for dest, value in settings.items():
        flag = "--" + dest.replace("_", "-")
        if hasattr(args, dest) and flag not in given and not other_flags.get(dest, set()) & given:
            setattr(args, dest, value)
    if ignored:
        print(f"ldm: warning: infotext fields not used here: {', '.join(ignored)}", file=sys.stderr)


def cmd_generate(args) -> None:
    """txt2img, img2img and inpaint: check, load, sample batch after batch, write PNGs (and a grid)."""
    loras, tags = lora_args(args)
    if tags:
        args.prompt = f"{args.prompt} {tags}"
    request = checked(request_from_args(args))
    embeddings = folder_arg(args.embeddings_dir, "--embeddings-dir", "embeddings")
    for flag, path in (("--vae", args.vae), ("--refiner", args.refiner)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and not has_native_bfloat16(device):
        print(emulated_bfloat16_warning(device), file=sys.stderr)
    outdir = Path(args.outdir)
    created = prepare_outdir(outdir)
    try:
        write_images(args, request, outdir, embeddings, loras, device, dtype)
    except BaseException:
        remove_empty(created)  # leave nothing behind where nothing was written
        raise


def write_images(args, request: GenerationRequest, outdir: Path, embeddings, loras, device, dtype) -> None:
    """cmd_generate once its folder is there: load, sample batch after batch, write each image as it is done."""
    pipeline = load_pipeline(
        args.ckpt or BUILTIN_MODEL,
        args.config,
        device=device,
        dtype=dtype,
        ema=args.ema or None,
        vae=args.vae,
        refiner=args.refiner,
        embeddings_dir=embeddings,
        loras=loras,
    )
    if pipeline.model.cfg.inpainting and args.command != "inpaint":
        raise UsageError(f"{args.ckpt} is an inpainting model: use `ldm inpaint`")
    for notice in pipeline.notices:
        print(f"ldm: warning: {notice}", file=sys.stderr)
    request = checked(with_images(request, args, pipeline.model), pipeline)
    file = pipeline.checkpoint
    if getattr(args, "infotext_model_hash", None) and args.infotext_model_hash != model_hash(file):
        print(
            f"ldm: warning: the infotext's image was made with model hash {args.infotext_model_hash}; "
            f"{file} has {model_hash(file)}",
            file=sys.stderr,
        )
    bar = tqdm(total=args.n_iter * request.steps_run, disable=args.quiet, unit="step", desc=args.command)
    images, warned, n = [], set(), args.batch_size
    for start in range(0, len(request.prompts), n):  # one batch at a time, each written as soon as it is done
        batch = dataclasses.replace(
            request,
            prompts=request.prompts[start : start + n],
            negative_prompts=request.negative_prompts[start : start + n],
            seeds=request.seeds[start : start + n],
        )
        result = generate(pipeline, batch, progress=lambda p: bar.update(1))
        for warning in set(result.warnings) - warned:
            tqdm.write(f"ldm: warning: {warning}", file=sys.stderr)
        warned |= set(result.warnings)
        for seed, tensor, info in zip(batch.seeds, result.images, result.infotexts):
            image, path = to_pil(tensor), claim_numbered(outdir, f"{seed}.png")
            try:
                save_png(image, path, info)
            except BaseException:
                path.unlink(missing_ok=True)  # the claimed name, still empty
                raise
            images.append((image, info, path))
            if not args.quiet:
                tqdm.write(f"wrote {path}")
    bar.close()
    if args.grid and len(images) > 1:  # named after this run's last image, which no other run can take
        path = outdir / f"grid-{images[-1][2].name[:5]}.png"
        save_png(grid([im for im, _, _ in images], args.batch_size), path, images[0][1])
        print(f"wrote {path}")


DEMO_PROMPTS = (  # the template caption, then shorter and reordered wordings (data.EVAL_FORMS)
    "a large yellow square in the center on a black background",
    "a yellow circle",
    "a purple square on a white background",
    "red triangle, green background",
    "a blue background with a small orange circle at the left",
    "a green triangle on a white background",  # a held-out (colour, shape) pair
)


def cmd_demo(args) -> None:
    """The built-in model draws a grid: one row per prompt, one column per seed."""
    if args.columns < 1:
        raise UsageError("--columns must be at least 1")
    outdir = Path(args.outdir)
    created = prepare_outdir(outdir)
    try:
        draw_demo(args, outdir)
    except BaseException:
        remove_empty(created)
        raise


def draw_demo(args, outdir: Path) -> None:
    start = time.perf_counter()
    pipeline = load_pipeline(BUILTIN_MODEL)
    print(f"built-in model {BUILTIN_MODEL}: {describe(pipeline.model)}")
    seeds = [args.seed + i for i in range(args.columns)]
    rows = []
    for prompt in DEMO_PROMPTS:  # the model's own defaults: its size and guidance scale
        result = generate(pipeline, GenerationRequest([prompt] * len(seeds), seeds, batch_size=len(seeds)))
        rows += [to_pil(im) for im in result.images]
        print(f"  row {len(rows) // len(seeds)}: {prompt}")
    fields = {**infotext_fields(result.request, pipeline), "Seed": args.seed}
    path = outdir / "demo-grid.png"
    save_png(grid(rows, len(seeds)), path, parameters_text(" | ".join(DEMO_PROMPTS), "", fields))
    print(f"wrote {path} ({len(DEMO_PROMPTS)} prompts x {len(seeds)} seeds) in {time.perf_counter() - start:.1f} s")
    print('next: ldm txt2img --prompt "a large red square at the right on a white background" --batch-size 4 --grid')


TRAIN_HELP = {
    "outdir": "folder for checkpoints, log.csv, samples and the final model.safetensors",
    "data": "image folder: NAME.jpg + NAME.txt captions, or a metadata.jsonl (default: the built-in shapes set)",
    "shapes_count": "images in the built-in shapes set",
    "image_size": "training resolution in pixels (images are resized and center-cropped)",
    "ckpt": "fine-tune this checkpoint",
    "preset": "train this architecture from scratch (when no --ckpt)",
    "parameterization": "from scratch: what the U-Net predicts, eps or v (default: the preset's)",
    "autoencoder": "first_stage_model weights (from `ldm train-autoencoder`) for a from-scratch model",
    "train_text_encoder": "train the text encoder too (frozen by default; not for SDXL)",
    "gradient_checkpointing": "recompute the U-Net's activations in the backward pass: less memory, slower steps",
    "compile": "torch.compile the training step's forward and backward (the first step waits for the compilation)",
    "steps": "optimizer steps in all",
    "batch_size": "global batch: samples per optimizer step over all processes and accumulation steps",
    "grad_accum": "gradient accumulation steps",
    "lr": "AdamW learning rate",
    "warmup": "linear learning-rate warm-up steps",
    "lr_schedule": "learning rate after the warm-up: constant, or cosine decay to 0 at the last step",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "precision": "fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler), or auto: bf16 where the device "
    "has native bfloat16 (CUDA since Ampere, CPUs with AVX-512 BF16 or AMX), else fp32",
    "ema_decay": "EMA decay of the U-Net weights, saved as model_ema.* (0: off)",
    "prompt_dropout": "probability of training on the empty prompt (for classifier-free guidance)",
    "min_snr_gamma": "min-SNR-gamma loss weighting (e.g. 5; default off)",
    "min_snr_floor": "with --min-snr-gamma: the x0 loss's weight is clamp(SNR, floor, gamma), not min(SNR, gamma); "
    "lifts the highest noise levels, where the layout is decided (default 0)",
    "offset_noise": "offset-noise strength (e.g. 0.05; default off)",
    "cache_latents": "encode images and captions once and train from the cache (--no-cache-latents for --flip)",
    "flip": "random horizontal flips (needs --no-cache-latents)",
    "caption_default": "caption for images without one (default: such images are an error)",
    "seed": "seed of the data order, noise and initial weights",
    "save_every": "checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "sample_every": "write sample images every N steps (0: never)",
    "sample_prompts": "prompts of the sample images (repeat the flag for more)",
    "log_every": "log loss and learning rate every N steps",
    "resume": "continue from the last checkpoint in --outdir",
    "device": "auto, cpu, cuda",
    "quiet": "no progress bar",
}


AUTOENCODER_HELP = {
    **TRAIN_HELP,
    "outdir": "folder for autoencoder.safetensors (first_stage_model.* weights)",
    "preset": "whose autoencoder architecture to train",
    "steps": "optimizer steps",
    "batch_size": "images per step",
    "lr": "Adam learning rate",
    "loss": "reconstruction loss: l1 or l2",
    "precision": "fp32, or bf16 autocast, or auto: bf16 where the device has native bfloat16, else fp32",
    "kl_weight": "weight of the KL term (CompVis: 1e-6)",
    "disc_start": "step from which the patch-GAN discriminator loss is on (-1: never)",
    "disc_weight": "weight of the generator's adversarial loss",
    "holdout": "share of images held out for the reported PSNR",
    "caption_default": "captions are not needed for stage 1; images without one get this",
}


def add_config_arguments(p: argparse.ArgumentParser, config_class, helps: dict) -> None:
    """One flag per field of a config dataclass, with its default and type."""
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "outdir":
            p.add_argument(flag, required=True, help=helps[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name])
        elif isinstance(default, list):
            p.add_argument("--sample-prompt", dest=f.name, action="append", help=helps[f.name])
        else:
            kind = {"min_snr_gamma": float}.get(f.name, type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=default, help=helps[f.name])


def cmd_train(args) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["sample_prompts"] is None:
        del values["sample_prompts"]
    try:
        path = train(TrainConfig(**values))
    except TrainError as e:
        raise UsageError(str(e)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path}")


def writable_later(folder: Path) -> None:
    """UsageError unless `folder` could be made and written: it, or the nearest folder above it that exists, is a
    writable folder. Nothing is created (a server that never saves leaves no empty folder)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {folder}: {existing} is not a writable folder")


def cmd_serve(args) -> None:
    """Load once, then serve until interrupted."""
    import uvicorn

    from .server import ServerLimits, checkpoint_files, create_app

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, not {args.port}")
    limits = ServerLimits(
        max_body=args.max_body_mb * 2**20,
        max_side=args.max_size,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_prompt=args.max_prompt,
        max_pixels=args.max_init_pixels,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        request_timeout=args.request_timeout,
    )
    if bad := [f.name for f in dataclasses.fields(limits) if not getattr(limits, f.name) > 0]:
        raise UsageError(f"--{bad[0].replace('_', '-')} must be positive")
    if args.api_auth is not None and ":" not in args.api_auth:
        raise UsageError("--api-auth must be USER:PASSWORD")
    models_dir = Path(args.models_dir) if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        raise UsageError(f"--models-dir {models_dir}: not a folder")
    loras = find_loras(folder) if (folder := folder_arg(args.lora_dir, "--lora-dir", "models/Lora")) else {}
    embeddings = folder_arg(args.embeddings_dir, "--embeddings-dir", "embeddings")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    def load(path) -> Pipeline:
        pipeline = load_pipeline(
            path, device=device, dtype=dtype, embeddings_dir=embeddings, loras=loras, compile=args.compile
        )
        for notice in pipeline.notices:
            print(f"ldm: warning: {notice}", file=sys.stderr)
        return pipeline

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET  # as uvicorn picks it
    try:
        socket.getaddrinfo(args.host, args.port, family)
    except socket.gaierror:
        raise UsageError(f"--host {args.host}: not an address of this machine") from None
    with socket.create_server((args.host, args.port), family=family):
        pass  # the address is free and ours to take (else OSError, exit 1), before the model loads
    writable_later(Path(args.outdir))  # where save_images writes: a bad folder is found now, none is made
    found = list(checkpoint_files(models_dir).values()) if models_dir else []
    pipeline = load(args.ckpt or (found[0] if found else BUILTIN_MODEL))
    print(
        f"ldm: serving {pipeline.checkpoint} on http://{args.host}:{args.port}/ (API: /sdapi/v1/, schema: /docs)",
        file=sys.stderr,
    )
    app = create_app(
        pipeline,
        args.outdir,
        load=load,
        models_dir=models_dir,
        api_auth=args.api_auth,
        limits=limits,
        cors_allow_origins=args.cors_allow_origins,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_train_autoencoder(args) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AutoencoderTrainConfig)}
    try:
        path, report = train_autoencoder(AutoencoderTrainConfig(**values))
    except TrainError as e:
        raise UsageError(str(e)) from None
    print(
        f"held-out PSNR ({report['images']} images): {report['psnr_start']:.2f} dB at the start, "
        f"{report['psnr']:.2f} dB now"
    )
    print(f"wrote {path}")


def cmd_eval(args) -> None:
    """Prompt adherence of a model trained on the shapes data."""
    if args.count < 1 or args.image_size % 8 or args.image_size <= 0:
        raise UsageError("--count must be at least 1 and --image-size a positive multiple of 8")
    if args.json and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: a folder, not a file")
    sampler, scheduler = sampler_and_scheduler(args)
    settings = checked(
        GenerationRequest(
            [""],
            [0],
            width=args.image_size,
            height=args.image_size,
            steps=args.steps,
            sampler=sampler,
            scheduler=scheduler,
            cfg_scale=args.cfg_scale,
            batch_size=args.batch_size,
        )
    )
    forms = tuple(f.strip() for f in args.forms.split(",")) if args.forms else tuple(EVAL_FORMS)
    if unknown := [f for f in forms if f not in EVAL_FORMS]:
        raise UsageError(f"--forms: no prompt form {unknown[0]!r}; the forms are {', '.join(EVAL_FORMS)}")
    pipeline = load_pipeline(args.ckpt, device=pick_device(args.device))
    batches = -(-args.count // max(1, args.batch_size))  # per split
    bar = tqdm(total=2 * len(forms) * batches * settings.steps, disable=args.quiet, unit="step", desc="eval")
    report, settings = prompt_adherence(
        pipeline, args.count, settings, seed=args.seed, forms=forms, progress=lambda p: bar.update(1)
    )
    bar.close()
    held_out = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS))
    fields = infotext_fields(settings, pipeline)
    sampler = " ".join(filter(None, (fields["Sampler"], fields.get("Schedule type"))))
    print(
        f"{args.ckpt}: {settings.steps} steps {sampler}, CFG {settings.cfg_scale}, "
        f"{args.image_size}x{args.image_size}; held-out pairs: {held_out}"
    )
    print(f"{'form':18s}{'split':10s}{'images':>8s}" + "".join(f"{a:>12s}" for a in ATTRIBUTES))
    example = ShapesDataset(1, seed=args.seed + 1).specs[0]  # the first seen-split shape
    for form, splits in report.items():
        print(f"{form:18s}e.g. {EVAL_FORMS[form].write(example)!r}")
        for split, row in splits.items():
            cells = "".join(f"{row[a]:12.1%}" if a in row else f"{unnamed(row, a):>12s}" for a in ATTRIBUTES)
            print(f"{'':18s}{split:10s}{row['images']:8d}{cells}")
    if any("most common" in row for splits in report.values() for row in splits.values()):
        chance = ", ".join(f"{a} {share:.0%}" for a, share in LEFT_TO_CHANCE.items())
        print(f"~: not in the prompt, so not scored; the value read most often and its share (chance: {chance})")
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))


def unnamed(row: dict, attribute: str) -> str:
    """An eval cell for an attribute the prompt leaves out: "~top 91%", the value read most often, or "-"."""
    value, share = row.get("most common", {}).get(attribute, (None, 0))
    return f"~{value} {share:.0%}" if value else "-"


GENERATE_HELP = {
    "txt2img": "Generate images from a text prompt with a Stable Diffusion checkpoint (SD 1.x, 2.x).",
    "img2img": "Redraw --init-image following the prompt. --strength sets how much of the noise schedule is "
    "run: 1.0 ignores the image, small values keep it close.",
    "inpaint": "Repaint the white part of --mask in --init-image. With an inpainting checkpoint (9 input "
    "channels) the model sees the mask; with a standard one the known region is held at every step. Pixels "
    "outside the mask are kept as they were; a grey (soft) mask edge blends the two, fully repainted from half "
    "grey up, as the web UI lays in a blurred mask.",
}
EPILOG = (
    "Files are named NNNNN-SEED.png; each carries the settings in a `parameters` PNG text chunk, in the form the "
    "Stable Diffusion web UI writes. Image i of a batch uses seed SEED+i, so it can be regenerated alone."
)


def add_generation_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.epilog = EPILOG
    p.add_argument(
        "--ckpt",
        help="Stable Diffusion checkpoint (.safetensors or .ckpt), original layout "
        "(default: the built-in model, trained by this project on the shapes data)",
    )
    p.add_argument("--config", help="CompVis inference YAML (optional: the architecture is read off the keys)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    p.add_argument("--vae", help="a separate autoencoder file (original layout) in place of the checkpoint's")
    p.add_argument("--refiner", help="a second checkpoint (SDXL's refiner) that denoises the end of the schedule")
    p.add_argument(
        "--refiner-switch",
        type=float,
        default=0.8,
        help="with --refiner: the part of the timestep range, from the noisiest, the model denoises "
        "before the refiner takes over (default 0.8)",
    )
    p.add_argument("--prompt", help="what to draw, in the web UI's prompt language, any length")
    p.add_argument(
        "--infotext",
        help="settings from a web UI infotext: an image with a `parameters` chunk, a text "
        "file, or the text; flags given here win",
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from (empty: the unconditional prompt)")
    if command == "txt2img":
        p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's, 512 for SD)")
        p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's, 512 for SD)")
    else:
        p.add_argument("--init-image", required=True, help="the image to start from")
        if command == "inpaint":
            p.add_argument("--mask", required=True, help="same size as the image; white = repaint, black = keep")
        p.add_argument(
            "--strength",
            type=float,
            default=1.0 if command == "inpaint" else 0.75,
            help="fraction of the schedule to run, in (0, 1]",
        )
        p.add_argument("--resize", action="store_true", help="resize the image (and mask) to --width x --height")
        p.add_argument("--width", type=int, help="with --resize: pixels, a multiple of 8 (default: as txt2img's)")
        p.add_argument("--height", type=int, help="with --resize: pixels, a multiple of 8 (default: as txt2img's)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    add_sampler_arguments(p)
    p.add_argument(
        "--spacing",
        default="leading",
        choices=SPACINGS,
        help="timestep spacing of ddim, plms and ddpm, as diffusers' (leading: 901, 801, ..., 1 for 10 steps)",
    )
    p.add_argument("--eta", type=float, help="eta of the samplers that take one (default: theirs; DDIM: 0)")
    p.add_argument("--s-noise", type=float, help="noise scale of the ancestral samplers (default: 1)")
    p.add_argument(
        "--clip-skip",
        type=int,
        help="use the text encoder's hidden state N layers from the end, as the "
        "web UI's CLIP skip (1: the last; default: the model's own)",
    )
    p.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        help="encode and decode in overlapping tiles, for images too large for memory at once (default: "
        "when the whole image would not fit)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net and VAE decoder (CUDA graphs on a GPU): the first image of each size "
        "waits for the compilation, later ones are faster on a GPU (on a CPU, slower than eager: "
        "BENCHMARKS.md); compiled kernels are cached across runs in $TORCHINDUCTOR_CACHE_DIR",
    )
    p.add_argument(
        "--lora-dir",
        help="LoRA files, used by <lora:NAME:WEIGHT> in the prompt, NAME a file's name "
        "(default: models/Lora where it exists)",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="apply this LoRA file (repeatable): adds <lora:NAME:WEIGHT> to the prompt",
    )
    p.add_argument(
        "--embeddings-dir",
        help="textual-inversion embeddings, used by writing a file's name in the prompt "
        "(default: embeddings/ where it exists)",
    )
    p.add_argument(
        "--prompt-syntax",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the web UI's emphasis, (word:1.2), [word] and BREAK (--no-prompt-syntax: plain text)",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale (1: none; default: the model's own, 7.5 for Stable Diffusion, "
        "1.75 for the built-in model)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the first image, 0 <= seed < 2^64 (default and -1: random, written in the PNG)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per U-Net batch")
    p.add_argument("--n-iter", type=int, default=1, help="how many batches")
    p.add_argument("--outdir", default="outputs", help="where the PNGs go")
    p.add_argument("--grid", action="store_true", help="also write a grid of all images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line like every other error (the usage is --help's)."""

    def error(self, message: str):
        command = self.prog.removeprefix("ldm").strip()  # "txt2img", or "" for the top level
        self.exit(2, f"ldm: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm",
        allow_abbrev=False,  # --infotext must see every flag given as it is spelt
        description="Latent diffusion (Stable Diffusion) in the original checkpoint layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  ldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --prompt "a red sofa" --seed 42 --batch-size 4 --grid
  ldm img2img --ckpt model.safetensors --init-image photo.png --strength 0.6 --prompt "an oil painting"
  ldm inpaint --ckpt sd-v1-5-inpainting.ckpt --init-image photo.png --mask mask.png --prompt "a cat"
  ldm train --outdir runs/ft --ckpt model.safetensors --data my_images/ --image-size 512
  torchrun --nproc_per_node 8 -m latent_diffusion.cli train ...      (several GPUs)
  ldm info model.safetensors

Each command has its own --help. Bad input is one line on stderr and exit code 2.""",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = command(
        sub,
        "info",
        cmd_info,
        "load a checkpoint and describe it",
        "Load a .safetensors or .ckpt Stable Diffusion checkpoint (SD 1.x, 2.x, inpainting) and print its "
        "variant and parts. Without --config the architecture is read off the keys.",
    )
    info.add_argument("ckpt", help="checkpoint file (.safetensors or .ckpt)")
    info.add_argument("--config", help="CompVis inference YAML (optional)")
    info.add_argument("--ema", action="store_true", help="load the model_ema.* U-Net weights")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", default="float32", choices=DTYPES)
    for name, help_text in (
        ("txt2img", "generate images from a prompt"),
        ("img2img", "redraw an image following a prompt"),
        ("inpaint", "repaint the white part of a mask"),
    ):
        add_generation_arguments(command(sub, name, cmd_generate, help_text, GENERATE_HELP[name]), name)
    add_config_arguments(
        command(
            sub,
            "train",
            cmd_train,
            "train the U-Net in the latent space of a frozen autoencoder",
            "Train (or fine-tune) the diffusion U-Net on latents of the frozen autoencoder. Several processes: "
            "torchrun --nproc_per_node N -m latent_diffusion.cli train ...",
        ),
        TrainConfig,
        TRAIN_HELP,
    )
    add_config_arguments(
        command(
            sub,
            "train-autoencoder",
            cmd_train_autoencoder,
            "train the KL autoencoder (stage 1)",
            "Train the KL autoencoder: L1/L2 reconstruction + KL, optionally a patch-GAN after a warm-up. Writes "
            "first_stage_model.* weights for `ldm train --autoencoder` and reports held-out PSNR.",
        ),
        AutoencoderTrainConfig,
        AUTOENCODER_HELP,
    )
    add_eval_arguments(
        command(
            sub,
            "eval",
            cmd_eval,
            "prompt adherence of a model trained on the shapes data",
            "Generate images for captions of seen and held-out (colour, shape) pairs and read shape, colour, "
            "background, size and position back from the pixels with a deterministic analyser.",
        )
    )
    serve = command(
        sub,
        "serve",
        cmd_serve,
        "serve the web UI's HTTP API (/sdapi/v1/...)",
        "Load the model once and answer the AUTOMATIC1111 web UI's API on HOST:PORT, so that its clients "
        "work unchanged (txt2img, img2img, samplers, schedulers, sd-models, options, progress, interrupt, "
        "png-info), and a web page at /.",
    )
    serve.add_argument("--ckpt", help="checkpoint file (default: the first of --models-dir, or the built-in model)")
    serve.add_argument("--models-dir", help="checkpoints that clients may switch to (sd_model_checkpoint)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    serve.add_argument("--dtype", choices=DTYPES, help="default: float16 on cuda, float32 on cpu")
    serve.add_argument("--outdir", default="outputs", help="where save_images writes")
    serve.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model loaded (see txt2img --compile): the first request of each size "
        "waits for the compilation",
    )
    serve.add_argument("--api-auth", metavar="USER:PASSWORD", help="require HTTP basic auth with these credentials")
    serve.add_argument(
        "--cors-allow-origins",
        nargs="+",
        metavar="ORIGIN",
        help="origins whose pages may call the API (none by default)",
    )
    serve.add_argument("--lora-dir", help="LoRA files for <lora:NAME:WEIGHT> (default: models/Lora where it exists)")
    serve.add_argument("--embeddings-dir", help="textual-inversion embeddings (default: embeddings/ where it exists)")
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="images of queued requests with the same settings run as one U-Net batch (1: never)",
    )
    limits.add_argument("--max-queue", type=int, default=32, help="jobs running or waiting; more are answered 503")
    limits.add_argument("--max-size", type=int, default=2048, help="largest width and height")
    limits.add_argument("--max-steps", type=int, default=300)
    limits.add_argument("--max-images", type=int, default=64, help="largest batch_size x n_iter")
    limits.add_argument("--max-prompt", type=int, default=20_000, help="characters of a prompt or negative prompt")
    limits.add_argument(
        "--max-init-pixels",
        type=int,
        default=4096 * 4096,
        help="largest init image or mask, in pixels (read from its header before decoding)",
    )
    limits.add_argument("--max-body-mb", type=int, default=64, help="largest request body, in MiB")
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=600,
        help="seconds a request may wait and run; then it is cancelled and answered 503",
    )
    demo = command(
        sub,
        "demo",
        cmd_demo,
        "a grid of images from the built-in model",
        "The built-in model (trained by this project on the shapes data) draws a 64x64 image per prompt "
        "and seed for a handful of prompts, with the default sampler and settings, into one grid.",
    )
    demo.add_argument("--outdir", default="out", help="folder for the grid")
    demo.add_argument("--columns", type=int, default=6, help="seeds per prompt")
    demo.add_argument("--seed", type=int, default=0, help="seed of the first column")
    return parser


def command(sub, name: str, run, help_text: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_text,
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.set_defaults(run=run)
    return p


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sampler",
        default="dpmpp_2m",
        help=f"one of: {', '.join(SAMPLERS)}; or the web UI's name, e.g. 'DPM++ 2M SDE'",
    )
    p.add_argument(
        "--scheduler",
        default="automatic",
        help=f"noise schedule of the sigma-space samplers, the web UI's 'Schedule type': "
        f"{', '.join(SCHEDULERS)} (automatic: the sampler's own, as the web UI)",
    )
    p.add_argument("--karras", dest="scheduler", action="store_const", const="karras", help="--scheduler karras")
    p.add_argument("--no-karras", dest="scheduler", action="store_const", const="uniform", help="--scheduler uniform")


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--ckpt", default=str(BUILTIN_MODEL), help="a model trained on the built-in shapes data")
    ev.add_argument("--count", type=int, default=200, help="images per split (seen, held-out)")
    ev.add_argument("--steps", type=int, default=20)
    add_sampler_arguments(ev)
    ev.add_argument("--cfg-scale", type=float, help="default: the model's own (1.75 for the built-in model)")
    ev.add_argument("--image-size", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--forms", help=f"comma-separated prompt forms to score (default: all: {', '.join(EVAL_FORMS)})")
    ev.add_argument("--json", help="also write the scores to this file")
    ev.add_argument("--quiet", action="store_true")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input (found before the work starts); 1 a failure of the environment or of the
    run (disk full, out of memory, a non-finite result). One line on stderr either way; --debug adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "infotext", None):
            apply_infotext(args, sys.argv[1:] if argv is None else argv)
        if getattr(args, "run", None) is cmd_generate and args.prompt is None:
            raise UsageError("--prompt is needed (or --infotext)")
        args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays, a half-written file does not (atomic writes)
        print("ldm: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, UsageError, ValueError) as e:
        return fail(args, e, 2)
    except (OSError, MemoryError, torch.OutOfMemoryError, NonFiniteError, TrainingDiverged) as e:
        return fail(args, e, 1)
    except Exception as e:  # a failure nobody foresaw: still one line, and --debug shows where
        return fail(args, RuntimeError(f"{type(e).__name__}: {e} (--debug shows the traceback)"), 1)
    return 0


def fail(args, error: BaseException, code: int) -> int:
    if args.debug:
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and error.filename:
        message = f"{error.filename}: {error.strerror or message}"
    print(f"ldm: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
