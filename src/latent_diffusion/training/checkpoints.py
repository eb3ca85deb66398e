"""Stage 2's checkpoints, and ControlNet training's: written atomically every `save_every` steps (the last
`keep_checkpoints` kept), and read back on resume only when they belong to this run (its fingerprint: every config
field but the resumable ones, and the model's architecture), so that N steps + resume + N steps equal 2N steps.
What a checkpoint holds is the `Trainee`'s file (the whole model, or the ControlNet) and the optimizer's state."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..models.ldm import LatentDiffusion
from ..weights.checkpoint import CheckpointError, read_state_dict, save_tensors
from .common import TrainError
from .config import RESUMABLE, TrainConfig


@dataclass
class Trainee:
    """What a run trains and writes: `ldm train`'s U-Net inside the whole model (`diffusion.unet_trainee`),
    `ldm train-controlnet`'s ControlNet beside the frozen model (`controlnet.controlnet_trainee`), or `ldm train
    --lora`'s adapters in it (`lora.lora_trainee`). The loop, the
    checkpoints and resume see only this."""

    model: LatentDiffusion  # the whole model: it encodes the data, and its config is part of the run's fingerprint
    module: nn.Module  # what the EMA follows: the U-Net, or the ControlNet
    net: nn.Module  # net(x_t, t, cond) -> ε or v, what the loss calls; its parameters that take gradients train
    file_name: str  # the run's weights, in each checkpoint folder and in outdir
    tensors: Callable[[nn.Module | None], dict[str, torch.Tensor]]  # that file's tensors, given the EMA copy
    metadata: Callable[[dict[str, torch.Tensor]], dict[str, str]]  # the file's metadata, given its tensors
    load: Callable[[dict[str, torch.Tensor], nn.Module | None], None]  # the file's tensors back into module and EMA
    samples: Callable[[Path], None]  # writes sample images to a path
    # the optimizer's parameter groups, each with an optional "lr_scale" on the schedule's rate (LoRA training's
    # text encoder); None: one group of every parameter of `net` that takes gradients
    param_groups: list[dict] | None = None
    saved_dtype: torch.dtype | None = None  # the outdir file's floats (--save-precision); None: as trained


def latest_checkpoint(outdir: Path) -> Path | None:
    found = sorted((outdir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def save_checkpoint(outdir: Path, step: int, trainee: Trainee, ema: nn.Module | None, state: dict, keep: int):
    """checkpoints/step-NNNNNNN/{the trainee's file, state.pt}, written in a temp folder and renamed into place,
    so a kill at any moment leaves the previous checkpoint whole; then the trainee's file in outdir, atomically."""
    finish_checkpoint(outdir, step, begin_checkpoint(outdir, step), trainee, trainee.tensors(ema), state, keep)


def begin_checkpoint(outdir: Path, step: int) -> Path:
    """The empty temp folder of step `step`'s checkpoint (a sharded one's processes write into it too: `fsdp.py`)."""
    root = outdir / "checkpoints"
    root.mkdir(exist_ok=True)
    tmp = temp_folder(outdir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def temp_folder(outdir: Path, step: int) -> Path:
    return outdir / "checkpoints" / f".tmp-step-{step:07d}"


def finish_checkpoint(outdir: Path, step: int, tmp: Path, trainee: Trainee, tensors: dict, state: dict, keep: int):
    """The trainee's file (of `tensors`) and state.pt into the temp folder, the folder renamed into place, the
    oldest checkpoints beyond `keep` removed, and the file in outdir."""
    root = outdir / "checkpoints"
    try:
        metadata = trainee.metadata(tensors)
        save_tensors(tensors, tmp / trainee.file_name, metadata, "training")
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(root / f"step-{step:07d}", ignore_errors=True)  # a damaged one that resume skipped
        os.replace(tmp, root / f"step-{step:07d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if (dtype := trainee.saved_dtype) is not None:  # its metadata (a LoRA's hashes) of the numbers written
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        metadata = trainee.metadata(tensors)
    save_tensors(tensors, outdir / trainee.file_name, metadata, "training")


def run_fingerprint(cfg: TrainConfig, model: LatentDiffusion) -> dict:
    """What a resumed run must share with the run it continues: every field but the RESUMABLE ones, and the model."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RESUMABLE}
    return {**fields, "model": model.cfg.to_json()}


def restore(cfg: TrainConfig, outdir: Path, trainee: Trainee, ema: nn.Module | None) -> dict | None:
    """On --resume: the state of the newest checkpoint that verifies, with its weights loaded into the trainee and
    the EMA copy. Damaged ones are skipped, with a note of each; a checkpoint of a run with other settings is an
    error. Else None."""
    if not cfg.resume:
        return None
    _, (state, saved) = newest_verified(outdir, lambda path: verified_checkpoint(path, cfg, trainee, ema))
    trainee.load(saved, ema)
    return state


def newest_verified(outdir: Path, verify, warn: bool = True):
    """(folder, verify(folder)) of the newest checkpoint folder that `verify` accepts; the damaged ones it skipped
    (DamagedCheckpoint) are named in a warning (`warn`: on the process that writes), none verifying is a TrainError."""
    found = sorted((outdir / "checkpoints").glob("step-*"), reverse=True)
    if not found:
        raise TrainError(f"--resume: no checkpoint in {outdir / 'checkpoints'}")
    skipped = []
    for checkpoint in found:
        try:
            verified = verify(checkpoint)
        except DamagedCheckpoint as e:
            skipped.append(f"{checkpoint.name} ({e})")
            continue
        if skipped and warn:
            tqdm.write(f"ldm: warning: resume skipped damaged checkpoints: {'; '.join(skipped)}", file=sys.stderr)
        return checkpoint, verified
    raise TrainError(f"--resume: no checkpoint in {outdir / 'checkpoints'} verifies: {'; '.join(skipped)}")


class DamagedCheckpoint(Exception):
    """A checkpoint folder with a missing, unreadable or incomplete file."""


def verified_checkpoint(path: Path, cfg: TrainConfig, trainee: Trainee, ema: nn.Module | None) -> tuple[dict, dict]:
    """(state, tensors) of checkpoint folder `path` once every file reads and every tensor has its expected shape."""
    state = read_state(path, cfg, trainee, ("step", "optimizer", "scaler", "fingerprint"))
    try:
        saved, _ = read_state_dict(path / trainee.file_name)
    except CheckpointError:
        raise DamagedCheckpoint(f"{trainee.file_name} is unreadable") from None
    if bad := [k for k, v in trainee.tensors(ema).items() if k not in saved or saved[k].shape != v.shape]:
        raise DamagedCheckpoint(f"{trainee.file_name} lacks {bad[0]} or has another shape")
    return state, saved


def read_state(path: Path, cfg: TrainConfig, trainee: Trainee, keys: tuple[str, ...]) -> dict:
    """Checkpoint folder `path`'s state.pt, once it reads and holds `keys`; TrainError where its run had other
    settings. A field the run's version of this code did not have counts as its default, the behaviour before it
    was added."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        missing = [k for k in ("fingerprint", *keys) if k not in state]
    except Exception as e:  # missing, truncated, empty: whatever torch.load says, the file is not usable
        raise DamagedCheckpoint(f"state.pt: {type(e).__name__}") from None
    if "fingerprint" in missing:
        raise DamagedCheckpoint("state.pt has no fingerprint")
    fingerprint = run_fingerprint(cfg, trainee.model)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if differs := [k for k in fingerprint if state["fingerprint"].get(k, defaults.get(k)) != fingerprint[k]]:
        raise TrainError(f"{path}: was written by a run with other settings ({', '.join(differs)})")
    if missing:  # (after the settings: a sharded checkpoint's state.pt holds no optimizer)
        raise DamagedCheckpoint(f"state.pt has no {missing[0]}")
    return state


def log_row(path: Path, step: int, losses: list[float], seconds: float, lr: float) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([step, f"{sum(losses) / len(losses):.6f}", f"{lr:.3e}", f"{len(losses) / seconds:.2f}"])
