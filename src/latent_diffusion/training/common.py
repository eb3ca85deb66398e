"""What both training stages share: the error type, the learning-rate schedule, the common checks, the data, and
the command-line flags of their configs."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import emulated_warning, has_native_bfloat16
from .buckets import BucketSpec
from .data import HELD_OUT_PAIRS, PLACES, POSITIONS, DataError, ImageCaptionFolder, ShapesDataset

LR_SCHEDULES = ("constant", "cosine")


class TrainError(ValueError):
    """A training run that cannot start as configured; the message says why."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops before the step is applied; its checkpoints stay as they were."""


def lock_outdir(outdir: Path):
    """An exclusive OS lock on outdir/.lock (released when the process ends, however it ends), holding our process
    id; TrainError naming the holder's if another run has it. Keep the returned file open while training."""
    f = open(outdir / ".lock", "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise TrainError(
            f"{outdir} is in use by another training run (process {holder}); wait or use another --outdir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def get_lr(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (as CompVis's SD fine-tuning) or, with
    lr_schedule "cosine", lr·½(1 + cos(π·step/steps)) down to 0 at the last step."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return lr


def resolve_precision(precision: str, device: torch.device) -> str:
    """Precision "auto" -> bf16 where the device computes in bfloat16 natively, else fp32. An explicit bf16
    without native support is kept, with a one-line warning: it is correct, only many times slower than fp32."""
    native = has_native_bfloat16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        print(
            f"{emulated_warning(torch.bfloat16, device)} (--precision auto picks fp32 on such devices)", file=sys.stderr
        )
    return precision


def fast_optimizer_options(device: torch.device) -> dict:
    """Keyword arguments for Adam/AdamW: one fused kernel per update on CUDA and CPU (on 2 CPU cores the tiny
    model's AdamW step takes 7 ms fused, 27 ms foreach, 16-19 ms as a Python loop over the parameters); foreach
    elsewhere, each update op once over all parameters."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


@dataclass
class RunConfig:
    """What the configs of both training stages share (`config.TrainConfig`, `autoencoder.AutoencoderTrainConfig`)."""

    outdir: str
    data: str | None = None  # an image folder; None: the built-in shapes set
    shapes_count: int = 2000
    # where the built-in set draws its shapes, comma-separated (one named twice: twice as often)
    positions: str = ",".join(POSITIONS)
    image_size: int = 64
    preset: str = "tiny"  # the architecture (stage 2 from scratch) or whose autoencoder (stage 1)
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # or "cosine"
    precision: str = "fp32"  # "bf16" (autocast: about twice as fast on CPUs with AVX-512 BF16, many times slower
    # where bf16 is emulated), "auto" (bf16 where native, else fp32); stage 2 also "fp16"
    seed: int = 0
    caption_default: str | None = None
    flip: bool = False
    device: str = "auto"
    quiet: bool = False


def check_common(cfg: RunConfig, precisions: tuple[str, ...]) -> None:
    """The checks of a stage-1 or stage-2 config that both share: TrainError naming the problem."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise TrainError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")
    if cfg.precision not in precisions:
        raise TrainError(f"precision must be {' or '.join(precisions)}, not {cfg.precision!r}")
    if cfg.image_size % 8 or cfg.image_size <= 0:
        raise TrainError(f"image size must be a positive multiple of 8, not {cfg.image_size}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise TrainError("steps and batch size must be at least 1")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainError(f"{f.name.replace('_', '-')} must be a finite number, not {value}")
    if unknown := [p for p in position_names(cfg) if p not in PLACES]:
        raise TrainError(f"--positions: no place {unknown[0]!r}; the shapes set draws at {', '.join(PLACES)}")
    if cfg.lr <= 0:  # a negative learning rate trains backwards, a zero one not at all
        raise TrainError(f"lr must be above 0, not {cfg.lr:g}")


def build_dataset(cfg, exclude=HELD_OUT_PAIRS, control: bool = False, buckets: BucketSpec | None = None):
    """The config's image folder, or the built-in shapes set when it names none, without the `exclude` pairs;
    control: with each image's control image (ControlNet training); buckets: the folder's images each in its
    aspect-ratio bucket (the shapes are all square: they fall into the square bucket)."""
    if cfg.data is None:
        return ShapesDataset(
            cfg.shapes_count,
            cfg.image_size,
            seed=cfg.seed,
            exclude=exclude,
            control=control,
            positions=position_names(cfg),
        )
    try:
        return ImageCaptionFolder(
            cfg.data,
            cfg.image_size,
            flip=cfg.flip,
            caption_default=cfg.caption_default,
            control=control,
            buckets=buckets,
        )
    except DataError as e:
        raise TrainError(str(e)) from None


# The type of the fields whose default is None (and that are no strings)
NONE_BY_DEFAULT = {
    "min_snr_gamma": float,
    "lora": int,
    "lora_alpha": float,
    "lora_conv_rank": int,
    "lora_conv_alpha": float,
    "text_encoder_lr": float,
}


def position_names(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(p.strip() for p in cfg.positions.split(","))


def add_config_arguments(p: argparse.ArgumentParser, config_class, helps: dict, skip: tuple[str, ...] = ()) -> None:
    """One `ldm` flag per field of a training config dataclass but the `skip` ones (`helps`: each field's help), with
    its default and type."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "outdir":
            p.add_argument(flag, required=True, help=helps[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name])
        elif isinstance(default, list):
            p.add_argument("--sample-prompt", dest=f.name, action="append", help=helps[f.name])
        else:
            kind = NONE_BY_DEFAULT.get(f.name, type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=default, help=helps[f.name])
