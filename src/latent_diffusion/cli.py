"""The `ldm` command: one entry point, one subcommand per job (`cli_arguments.py` defines them). It checks the
arguments and calls the library."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .cli_arguments import DTYPES, GENERATION_COMMANDS, UsageError, build_parser
from .cli_convert import cmd_convert
from .cli_generate import (
    apply_infotext,
    checked,
    cmd_generate,
    folder_arg,
    pick_device,
    prepare_outdir,
    sampler_and_scheduler,
    styles_arg,
    upscaler_args,
    weights_args,
)
from .cli_merge import cmd_merge
from .cli_upscale import cmd_upscale
from .cli_xyz import cmd_xyz
from .files import atomic_write, remove_empty
from .models.ldm import LatentDiffusion
from .pipeline.control import find_control_models
from .pipeline.generate import NonFiniteError, generate
from .pipeline.images import grid, save_png, to_pil
from .pipeline.infotext import parameters_text
from .pipeline.loading import Pipeline, load_pipeline
from .pipeline.request import ControlUnit, GenerationRequest
from .training.autoencoder import AutoencoderTrainConfig, train_autoencoder
from .training.common import TrainError, TrainingDiverged
from .training.config import TrainConfig
from .training.controlnet import ControlNetTrainConfig, train_controlnet
from .training.data import EVAL_FORMS, HELD_OUT_PAIRS, SHAPES, STAR, Shape, ShapesDataset, draw, to_hint
from .training.diffusion import train
from .training.evaluate import ATTRIBUTES, BOTH, CONTROL_FORMS, LEFT_TO_CHANCE, control_adherence, prompt_adherence
from .training.lora import train_lora
from .weights.checkpoint import BUILTIN_CONTROLNET, BUILTIN_MODEL, CheckpointError, load_model
from .weights.embeddings import load_embeddings
from .weights.ggml_quants import parameter_count, storage
from .weights.lora import LoRAError, apply_lora, find_loras, read_lora


def count(module: torch.nn.Module) -> str:
    return f"{parameter_count(module) / 1e6:.1f} M"


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
    for part, module in (("U-Net", model.unet), *(("text", e) for e in model.text_encoders)):
        if found := storage(module):
            types = ", ".join(f"{n} {t}" for t, n in sorted(found.items(), key=lambda item: -item[1]))
            lines.append(f"  {part} layers in GGUF blocks, dequantized as they run: {types}")
    if xl:
        lines.append(
            f"  micro-conditioning ({cfg.micro_conditioning_width} wide each): {', '.join(cfg.micro_conditioning)}"
        )
    return "\n".join(lines)


def cmd_info(args) -> None:
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    model = load_model(
        args.ckpt, args.config, device=device, dtype=dtype, ema=args.ema or None, unet_gguf=args.unet_gguf
    )
    print(f"{args.ckpt}: {describe(model)}")


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


# The control row's shapes, one per column: the ControlNet gets each one's mask and the prompt names its colours.
DEMO_CONTROLS = (
    Shape("circle", "red", "blue", "small", "left"),
    Shape("square", "yellow", "black", "large", "right"),
    Shape("triangle", "green", "white", "small", "top"),  # a held-out (colour, shape) pair
    Shape("circle", "orange", "purple", "large", "center"),
    Shape("square", "white", "red", "small", "bottom"),  # held out too
    Shape("triangle", "blue", "yellow", "large", "left"),
)


def draw_demo(args, outdir: Path) -> None:
    start = time.perf_counter()
    pipeline = load_pipeline(BUILTIN_MODEL, controlnets={BUILTIN_CONTROLNET.stem: BUILTIN_CONTROLNET})
    print(f"built-in model {BUILTIN_MODEL}: {describe(pipeline.model)}")
    seeds = [args.seed + i for i in range(args.columns)]
    rows = []
    for prompt in DEMO_PROMPTS:  # the model's own defaults: its size and guidance scale
        result = generate(pipeline, GenerationRequest([prompt] * len(seeds), seeds, batch_size=len(seeds)))
        rows += [to_pil(im) for im in result.images]
        print(f"  row {len(rows) // len(seeds)}: {prompt}")
    rows += control_rows(pipeline, seeds)
    fields = {**result.fields, "Seed": args.seed}
    path = outdir / "demo-grid.png"
    save_png(grid(rows, len(seeds)), path, parameters_text(" | ".join(DEMO_PROMPTS), "", fields))
    print(
        f"wrote {path} ({len(DEMO_PROMPTS)} prompts x {len(seeds)} seeds, then control images and the images drawn "
        f"from them) in {time.perf_counter() - start:.1f} s"
    )
    print('next: ldm txt2img --prompt "a large red square at the right on a white background" --batch-size 4 --grid')


def control_rows(pipeline: Pipeline, seeds: list[int]) -> list:
    """Two rows: the built-in ControlNet's control images (shape masks), and the images it draws from them, each
    prompt naming the colours and shape but not where or how large."""
    shapes = [DEMO_CONTROLS[i % len(DEMO_CONTROLS)] for i in range(len(seeds))]
    masks = torch.stack([to_hint(draw(s, pipeline.model.cfg.image_size, mask=True)) for s in shapes])
    prompts = [EVAL_FORMS["on background"].write(s) for s in shapes]
    unit = ControlUnit(BUILTIN_CONTROLNET.stem, masks, resize_mode="resize")
    result = generate(pipeline, GenerationRequest(prompts, seeds, batch_size=len(seeds), controls=[unit]))
    print(f"  rows of the built-in ControlNet {BUILTIN_CONTROLNET.name}: its control images, then e.g. {prompts[0]!r}")
    return [to_pil(m) for m in masks] + [to_pil(im) for im in result.images]


def cmd_train(args, config_class=TrainConfig, run=train) -> None:
    """`ldm train` (with --lora: `train_lora`), and `ldm train-controlnet` with its config and run."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    if values["sample_prompts"] is None:
        del values["sample_prompts"]
    run = train_lora if values.get("lora") is not None and run is train else run
    try:
        path = run(config_class(**values))
    except TrainError as e:
        raise UsageError(str(e)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path}")


def cmd_train_controlnet(args) -> None:
    cmd_train(args, ControlNetTrainConfig, train_controlnet)


def writable_later(folder: Path) -> None:
    """UsageError unless `folder` could be made and written: it, or the nearest folder above it that exists, is a
    writable folder. Nothing is created (a server that never saves leaves no empty folder)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {folder}: {existing} is not a writable folder")


def cmd_serve(args) -> None:
    """Load once, then serve until interrupted."""
    import uvicorn

    from .serving.checkpoints import checkpoint_files
    from .serving.server import create_app

    limits = server_limits(args)
    if args.api_auth is not None and ":" not in args.api_auth:
        raise UsageError("--api-auth must be USER:PASSWORD")
    models_dir = Path(args.models_dir) if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        raise UsageError(f"--models-dir {models_dir}: not a folder")
    lora_folder = folder_arg(args.lora_dir, "--lora-dir", "models/Lora")
    loras = find_loras(lora_folder) if lora_folder else {}
    embeddings = folder_arg(args.embeddings_dir, "--embeddings-dir", "embeddings")
    upscalers = upscaler_args(args.upscaler_dir)
    controlnet_folder = folder_arg(args.controlnet_dir, "--controlnet-dir", "models/ControlNet")
    controlnets = find_control_models(controlnet_folder) if controlnet_folder else {}
    vae_folder = folder_arg(args.vae_dir, "--vae-dir", "models/VAE")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    files = dict(embeddings_dir=embeddings, loras=loras, upscalers=upscalers, styles=styles_arg(args.styles_file))
    files |= dict(controlnets=controlnets)
    files |= weights_args(args)

    def load(path) -> Pipeline:
        pipeline = load_pipeline(path, device=device, dtype=dtype, compile=args.compile, **files)
        for notice in pipeline.notices:
            print(f"ldm: warning: {notice}", file=sys.stderr)
        return pipeline

    def rescan(pipeline: Pipeline) -> Pipeline:
        """The LoRA files and the embeddings read again from their folders (the web UI's refresh), for this
        pipeline and the ones loaded after it."""
        files["loras"] = find_loras(lora_folder) if lora_folder else {}
        width = pipeline.model.cfg.unet.context_dim
        found = load_embeddings(embeddings, width)[0] if embeddings else {}
        return dataclasses.replace(pipeline, loras=files["loras"], embeddings=found)

    claim_address(args.host, args.port)
    writable_later(Path(args.outdir))  # where save_images writes: a bad folder is found now, none is made
    found = list(checkpoint_files(models_dir).values()) if models_dir else []
    pipeline = load(args.ckpt or (found[0] if found else BUILTIN_MODEL))
    where = f"http://{args.host}:{args.port}/ (API: /sdapi/v1/, schema: /docs)"
    print(f"ldm: serving {pipeline.checkpoint} on {where}", file=sys.stderr)
    options = dict(load=load, rescan=rescan, models_dir=models_dir, controlnet_dir=controlnet_folder, limits=limits)
    options |= dict(vae_dir=vae_folder)
    options |= dict(api_auth=args.api_auth, cors_allow_origins=args.cors_allow_origins, debug=args.debug)
    app = create_app(pipeline, args.outdir, **options)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def server_limits(args):
    """`ldm serve`'s limit flags as `ServerLimits`; each must be positive."""
    from .serving.server import ServerLimits

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
    return limits


def claim_address(host: str, port: int) -> None:
    """UsageError unless host:port is an address of this machine; OSError (exit 1) unless it is free to take,
    both before the model loads."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, not {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    try:
        socket.getaddrinfo(host, port, family)
    except socket.gaierror:
        raise UsageError(f"--host {host}: not an address of this machine") from None
    with socket.create_server((host, port), family=family):
        pass


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
    """Prompt adherence of a model trained on the shapes data; with --controlnet, control adherence."""
    if args.count < 1 or args.image_size % 8 or args.image_size <= 0:
        raise UsageError("--count must be at least 1 and --image-size a positive multiple of 8")
    if args.json and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: a folder, not a file")
    if args.controlnet and not Path(args.controlnet).is_file():
        raise UsageError(f"--controlnet {args.controlnet}: no such file")
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
    default = CONTROL_FORMS if args.controlnet else tuple(EVAL_FORMS)
    forms = tuple(f.strip() for f in args.forms.split(",")) if args.forms else default
    if unknown := [f for f in forms if f not in EVAL_FORMS]:
        raise UsageError(f"--forms: no prompt form {unknown[0]!r}; the forms are {', '.join(EVAL_FORMS)}")
    if args.shape is not None and args.shape not in (*SHAPES, STAR):
        raise UsageError(f"--shape: one of {', '.join((*SHAPES, STAR))}, not {args.shape!r}")
    lora_path, _, weight = (args.lora or "").partition(":")
    if args.lora and not Path(lora_path).is_file():
        raise UsageError(f"--lora {lora_path}: no such file")
    controlnets = {"control": Path(args.controlnet)} if args.controlnet else {}
    pipeline = load_pipeline(args.ckpt, device=pick_device(args.device), controlnets=controlnets)
    if args.lora:
        try:
            apply_lora(pipeline.model, read_lora(lora_path), float(weight or 1))
        except (LoRAError, ValueError) as e:
            raise UsageError(f"--lora {args.lora}: {e}") from None
    shapes = (args.shape,) if args.shape else SHAPES
    batches = -(-args.count // max(1, args.batch_size))  # per split
    splits = 1 if args.shape == STAR else 2
    bar = tqdm(total=splits * len(forms) * batches * settings.steps, disable=args.quiet, unit="step", desc="eval")
    options = dict(seed=args.seed, forms=forms, progress=lambda p: bar.update(1))
    if args.controlnet:
        report, result = control_adherence(
            pipeline, "control", args.count, settings, weight=args.control_weight, **options
        )
    else:
        report, result = prompt_adherence(pipeline, args.count, settings, shapes=shapes, **options)
    bar.close()
    print_report(args, report, result)
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))


def print_report(args, report: dict, result) -> None:
    """`ldm eval`'s table: a row per prompt form and split, a column per attribute."""
    held_out = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS))
    settings, fields = result.request, result.fields
    sampler = " ".join(filter(None, (fields["Sampler"], fields.get("Schedule type"))))
    control = f"; ControlNet {args.controlnet} at weight {args.control_weight:g}" if args.controlnet else ""
    lora = f"; LoRA {args.lora}" if args.lora else ""
    print(
        f"{args.ckpt}: {settings.steps} steps {sampler}, CFG {settings.cfg_scale}, "
        f"{args.image_size}x{args.image_size}; held-out pairs: {held_out}{control}{lora}"
    )
    columns = (*ATTRIBUTES, BOTH) if args.controlnet else ATTRIBUTES
    print(f"{'form':18s}{'split':10s}{'images':>8s}" + "".join(f"{a:>12s}" for a in columns))
    shapes = (args.shape,) if args.shape else SHAPES
    example = ShapesDataset(1, seed=args.seed + 1, shapes=shapes).specs[0]  # the first seen-split shape
    for form, splits in report.items():
        print(f"{form:18s}e.g. {EVAL_FORMS[form].write(example)!r}")
        for split, row in splits.items():
            cells = "".join(f"{row[a]:12.1%}" if a in row else f"{unnamed(row, a):>12s}" for a in columns)
            print(f"{'':18s}{split:10s}{row['images']:8d}{cells}")
    if args.controlnet:
        print("size, position and both: against each image's control image (the mask of the prompt's shape)")
    if any("most common" in row for splits in report.values() for row in splits.values()):
        chance = ", ".join(f"{a} {share:.0%}" for a, share in LEFT_TO_CHANCE.items())
        print(f"~: not in the prompt, so not scored; the value read most often and its share (chance: {chance})")


def unnamed(row: dict, attribute: str) -> str:
    """An eval cell for an attribute the prompt leaves out: "~top 91%", the value read most often, or "-"."""
    value, share = row.get("most common", {}).get(attribute, (None, 0))
    return f"~{value} {share:.0%}" if value else "-"


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input (found before the work starts); 1 a failure of the environment or of the
    run (disk full, out of memory, a non-finite result). One line on stderr either way; --debug adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "infotext", None):
            apply_infotext(args, sys.argv[1:] if argv is None else argv)
        if args.command in (*GENERATION_COMMANDS, "xyz") and args.prompt is None:
            raise UsageError("--prompt is needed (or --infotext)")
        COMMANDS[args.command](args)
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


COMMANDS = {
    "info": cmd_info,
    **dict.fromkeys(GENERATION_COMMANDS, cmd_generate),
    "xyz": cmd_xyz,
    "upscale": cmd_upscale,
    "merge": cmd_merge,
    "convert": cmd_convert,
    "train": cmd_train,
    "train-controlnet": cmd_train_controlnet,
    "train-autoencoder": cmd_train_autoencoder,
    "eval": cmd_eval,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


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
