"""Stage 2's checkpoints: written atomically every `save_every` steps (the last `keep_checkpoints` kept), and read
back on resume only when they belong to this run (its fingerprint: every config field but the resumable ones, and the
model's architecture), so that N steps + resume + N steps equal 2N steps."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..models.family import UNET
from ..models.ldm import LatentDiffusion
from ..weights.checkpoint import CheckpointError, ema_key, read_state_dict, save_model
from .common import TrainError
from .config import RESUMABLE, TrainConfig


def latest_checkpoint(outdir: Path) -> Path | None:
    found = sorted((outdir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def save_checkpoint(outdir: Path, step: int, model: LatentDiffusion, ema: nn.Module | None, state: dict, keep: int):
    """checkpoints/step-NNNNNNN/{model.safetensors, state.pt}, written in a temp folder and renamed into place,
    so a kill at any moment leaves the previous checkpoint whole; then model.safetensors, atomically."""
    root = outdir / "checkpoints"
    root.mkdir(exist_ok=True)
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, tmp / "model.safetensors", ema_unet=ema)
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(root / f"step-{step:07d}", ignore_errors=True)  # a damaged one that resume skipped
        os.replace(tmp, root / f"step-{step:07d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    save_model(model, outdir / "model.safetensors", ema_unet=ema)


def run_fingerprint(cfg: TrainConfig, model: LatentDiffusion) -> dict:
    """What a resumed run must share with the run it continues: every field but the RESUMABLE ones, and the model."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RESUMABLE}
    return {**fields, "model": model.cfg.to_json()}


def restore(cfg: TrainConfig, outdir: Path, model: LatentDiffusion, ema: bool) -> tuple[dict | None, dict | None]:
    """On --resume: the newest checkpoint that verifies, as (state, tensors), with its weights loaded into the
    model (the tensors are read once: weights and EMA). Damaged ones are skipped, with a note of each; a checkpoint
    of a run with other settings is an error. Else (None, None)."""
    if not cfg.resume:
        return None, None
    found = sorted((outdir / "checkpoints").glob("step-*"), reverse=True)
    if not found:
        raise TrainError(f"--resume: no checkpoint in {outdir / 'checkpoints'}")
    skipped = []
    for checkpoint in found:
        try:
            state, saved = verified_checkpoint(checkpoint, cfg, model, ema)
        except DamagedCheckpoint as e:
            skipped.append(f"{checkpoint.name} ({e})")
            continue
        if skipped:
            tqdm.write(f"ldm: warning: resume skipped damaged checkpoints: {'; '.join(skipped)}", file=sys.stderr)
        model.load_state_dict({k: saved[k] for k in model.state_dict()})
        return state, saved
    raise TrainError(f"--resume: no checkpoint in {outdir / 'checkpoints'} verifies: {'; '.join(skipped)}")


class DamagedCheckpoint(Exception):
    """A checkpoint folder with a missing, unreadable or incomplete file."""


def verified_checkpoint(path: Path, cfg: TrainConfig, model: LatentDiffusion, ema: bool) -> tuple[dict, dict]:
    """(state, tensors) of checkpoint folder `path` once every file reads and every tensor has its expected shape."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        missing = [k for k in ("step", "optimizer", "scaler", "fingerprint") if k not in state]
    except Exception as e:  # missing, truncated, empty: whatever torch.load says, the file is not usable
        raise DamagedCheckpoint(f"state.pt: {type(e).__name__}") from None
    if missing:
        raise DamagedCheckpoint(f"state.pt has no {missing[0]}")
    fingerprint = run_fingerprint(cfg, model)
    if differs := [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]:
        raise TrainError(f"{path}: was written by a run with other settings ({', '.join(differs)})")
    try:
        saved, _ = read_state_dict(path / "model.safetensors")
    except CheckpointError:
        raise DamagedCheckpoint("model.safetensors is unreadable") from None
    expected = dict(model.state_dict())
    if ema:
        expected |= {ema_key(UNET + k): v for k, v in model.unet.state_dict().items()}
    if bad := [k for k, v in expected.items() if k not in saved or saved[k].shape != v.shape]:
        raise DamagedCheckpoint(f"model.safetensors lacks {bad[0]} or has another shape")
    return state, saved


def log_row(path: Path, step: int, losses: list[float], seconds: float, lr: float) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([step, f"{sum(losses) / len(losses):.6f}", f"{lr:.3e}", f"{len(losses) / seconds:.2f}"])
