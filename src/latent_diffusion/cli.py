"""The `ldm` command: one entry point, one subcommand per job (`cli_arguments.py` defines them). It checks the
arguments and calls the library."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch

from .cli_arguments import DTYPES, GENERATION_COMMANDS, UsageError, build_parser
from .cli_builtin import cmd_demo, cmd_eval
from .cli_common import describe, pick_dtype
from .cli_convert import cmd_convert
from .cli_generate import (
    apply_infotext,
    cmd_generate,
    folder_arg,
    pick_device,
    styles_arg,
    upscaler_args,
    weights_args,
)
from .cli_merge import cmd_merge
from .cli_upscale import cmd_upscale
from .cli_xyz import cmd_xyz
from .pipeline.control import find_control_models
from .pipeline.generate import NonFiniteError
from .pipeline.loading import Pipeline, load_pipeline
from .training.autoencoder import AutoencoderTrainConfig, train_autoencoder
from .training.common import TrainError, TrainingDiverged
from .training.config import ControlNetTrainConfig, TrainConfig
from .weights.checkpoint import BUILTIN_MODEL, CheckpointError, load_model
from .weights.embeddings import load_embeddings
from .weights.lora import find_loras


def cmd_info(args) -> None:
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    model = load_model(
        args.ckpt, args.config, device=device, dtype=dtype, ema=args.ema or None, unet_gguf=args.unet_gguf
    )
    print(f"{args.ckpt}: {describe(model)}")


def cmd_train(args, config_class=TrainConfig, run=None) -> None:
    """`ldm train` (with --lora: `train_lora`), and `ldm train-controlnet` with its config and run. The training
    modules are imported here: they bring torch.distributed's, which generation never needs (0.5 s)."""
    from .training.diffusion import train
    from .training.lora import train_lora

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    if values["sample_prompts"] is None:
        del values["sample_prompts"]
    run = run or (train_lora if values.get("lora") is not None else train)
    try:
        path = run(config_class(**values))
    except TrainError as e:
        raise UsageError(str(e)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path}")


def cmd_train_controlnet(args) -> None:
    from .training.controlnet import train_controlnet

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
    dtype = pick_dtype(args.dtype, device)
    files = dict(embeddings_dir=embeddings, loras=loras, upscalers=upscalers, styles=styles_arg(args.styles_file))
    files |= dict(controlnets=controlnets)
    files |= dict(clip_vision=folder_arg(args.clip_vision_dir, "--clip-vision-dir", "models/clip_vision"))
    files |= dict(annotators=folder_arg(args.annotator_dir, "--annotator-dir", "models/annotators"))
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
