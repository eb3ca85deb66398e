"""What both training stages share: the error type, the learning-rate schedule, the common checks, the data."""

from __future__ import annotations

import math

from .data import DataError, ImageCaptionFolder, ShapesDataset

LR_SCHEDULES = ("constant", "cosine")


class TrainError(ValueError):
    """A training run that cannot start as configured; the message says why."""


def get_lr(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (as CompVis's SD fine-tuning) or, with
    lr_schedule "cosine", lr·½(1 + cos(π·step/steps)) down to 0 at the last step."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return lr


def check_common(cfg, precisions: tuple[str, ...]) -> None:
    """The checks of a stage-1 or stage-2 config that both share: TrainError naming the problem."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise TrainError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")
    if cfg.precision not in precisions:
        raise TrainError(f"precision must be {' or '.join(precisions)}, not {cfg.precision!r}")
    if cfg.image_size % 8 or cfg.image_size <= 0:
        raise TrainError(f"image size must be a positive multiple of 8, not {cfg.image_size}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise TrainError("steps and batch size must be at least 1")


def build_dataset(cfg):
    """The config's image folder, or the built-in shapes set when it names none."""
    if cfg.data is None:
        return ShapesDataset(cfg.shapes_count, cfg.image_size, seed=cfg.seed)
    try:
        return ImageCaptionFolder(cfg.data, cfg.image_size, flip=cfg.flip, caption_default=cfg.caption_default)
    except DataError as e:
        raise TrainError(str(e)) from None
