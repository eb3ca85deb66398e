"""Stage 2 of latent diffusion: train the U-Net on latents of a frozen autoencoder, on one process or many.

Objective (Ho et al. 2020; v: Salimans & Ho 2022): t ~ U{0..T-1}, ε ~ N(0, I), x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε with
z the scaled latent of an image; loss = w(t)·|f(x_t, t, c) − target|², target ε or v = √ᾱ_t·ε − √(1−ᾱ_t)·z.
w(t) = 1, or min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, SNR = ᾱ/(1−ᾱ);
with `min_snr_floor` f, clamp(SNR, f, γ) in place of min(SNR, γ).
The prompt is replaced by "" with probability `prompt_dropout`, so that the model learns the unconditional
prediction that classifier-free guidance needs (SDXL: by zeros, text and pooled, as generative-models' `ucg_rate`
and as generation conditions on an empty negative prompt). SDXL also sees each image's micro-conditioning: its
original size and crop (`data.Item`), the training size as the target size.

The loop reads top to bottom in `train`: check the config, build the data, the model and the optimizer
(or restore them from the last checkpoint), then per step: the micro-batches (`make_batch`), the loss
(`diffusion_loss`, a function of the network and the batch alone), one optimizer step, the EMA, the log row
and the checkpoint.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and every random draw of step s
(timesteps, noise, prompt dropout, posterior samples) comes from a generator seeded by (seed, s), drawn for the
whole global batch. Each process takes its slice. So N steps + resume + N steps equals 2N steps, and two
processes give the weights one process gives with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import CheckpointError, ema_key, load_model, read_state_dict, save_model
from .config import preset
from .devices import resolve_device
from .family import UNET, VAE
from .files import atomic_write, missing_folders, remove_empty, writable_folder
from .latent_diffusion import LatentDiffusion
from .parameterization import PARAMETERIZATIONS, min_snr_weight, noised, target
from .training import (
    TrainError,
    TrainingDiverged,
    build_dataset,
    check_common,
    fast_optimizer_options,
    get_lr,
    lock_outdir,
    resolve_precision,
)


@dataclass
class TrainConfig:
    outdir: str
    data: str | None = None  # an image folder; None: the built-in shapes set
    shapes_count: int = 2000
    image_size: int = 64
    ckpt: str | None = None  # fine-tune this checkpoint ...
    preset: str = "tiny"  # ... or train this architecture from scratch
    parameterization: str | None = None  # from scratch: "eps" or "v" (default: the preset's)
    autoencoder: str | None = None  # first_stage_model.* weights for a from-scratch model (stage 1's output)
    train_text_encoder: bool = False  # needed when the text encoder is new too
    gradient_checkpointing: bool = False  # recompute the U-Net's blocks in the backward pass: less memory, ~30 % slower
    compile: bool = False  # torch.compile the trained modules' forward and backward (COMPILE_BACKEND)
    steps: int = 1000
    batch_size: int = 8  # global: samples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # or "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler), auto (bf16 if native)
    ema_decay: float = 0.9999  # 0: no EMA
    prompt_dropout: float = 0.1
    min_snr_gamma: float | None = None
    min_snr_floor: float = 0.0  # x0-loss weight clamp(SNR, floor, gamma) (parameterization.min_snr_weight)
    offset_noise: float = 0.0
    cache_latents: bool = True  # encode images and captions once; off for random flips
    flip: bool = False
    caption_default: str | None = None
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a small red circle on a blue background"])
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    quiet: bool = False


# The fields that may change when a run is resumed; every other field of TrainConfig defines the run.
RESUMABLE = (
    "outdir",
    "steps",
    "save_every",
    "keep_checkpoints",
    "sample_every",
    "sample_prompts",
    "log_every",
    "resume",
    "device",
    "quiet",
    "gradient_checkpointing",
    "compile",
)
COMPILE_BACKEND = "inductor"  # the tests trace with "aot_eager": the same graphs, without building kernels


# Small pure pieces (tested on their own) ------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, num_updates: int) -> None:
    """CompVis's LitEma: with n updates so far (this one included), d = min(decay, (1 + n)/(10 + n)) and
    ema ← ema − (1 − d)·(ema − θ)."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    ema_params = list(ema.parameters())  # one foreach op, not a Python loop over the parameters
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters())], 1 - d)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def global_batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The dataset indices of optimizer step `step`: consecutive slices of per-epoch permutations."""
    out, position = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[offset : offset + batch_size - len(out)].tolist()
        out.extend(take)
        position += len(take)
    return out


def check_config(cfg: TrainConfig) -> None:
    """Every check that needs nothing but the config: TrainError naming the problem."""
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    check_common(cfg, precisions=("fp32", "bf16", "fp16", "auto"))
    if cfg.parameterization not in (None, *PARAMETERIZATIONS):
        raise TrainError(f"parameterization must be eps or v, not {cfg.parameterization!r}")
    if cfg.min_snr_floor and not cfg.min_snr_gamma:
        raise TrainError("--min-snr-floor needs --min-snr-gamma")
    if not 0 <= cfg.min_snr_floor <= (cfg.min_snr_gamma or 0):
        raise TrainError(
            f"min-snr-floor must be between 0 and the gamma {cfg.min_snr_gamma:g}, not {cfg.min_snr_floor:g}"
        )
    if cfg.parameterization and cfg.ckpt:
        raise TrainError("--parameterization is for models trained from scratch; a --ckpt brings its own")
    if cfg.flip and cfg.cache_latents:
        raise TrainError("--flip needs --no-cache-latents (cached latents cannot be flipped)")


# Set-up -------------------------------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: TrainConfig, dataset) -> LatentDiffusion:
    """The checkpoint to fine-tune, or the preset from scratch (with stage 1's autoencoder, if given); the
    autoencoder is frozen, the text encoder too unless it is trained."""
    if cfg.ckpt:
        model = load_model(cfg.ckpt)
    else:
        config = preset(cfg.preset)
        config.parameterization = cfg.parameterization or config.parameterization
        config.image_size = cfg.image_size  # the model's default generation size
        model = LatentDiffusion(config)
        if cfg.autoencoder:
            sd, _ = read_state_dict(cfg.autoencoder)
            weights = {k.removeprefix(VAE): v for k, v in sd.items() if k.startswith(VAE)}
            try:
                model.first_stage_model.load_state_dict(weights, strict=True)
            except RuntimeError as e:
                raise TrainError(f"{cfg.autoencoder}: does not fit the {cfg.preset} autoencoder ({e})") from None
            model.cfg.scale_factor = latent_scale_factor(model, dataset)
    if cfg.train_text_encoder and model.cfg.micro_conditioning:
        raise TrainError("--train-text-encoder is not supported for SDXL models yet; their text encoders stay frozen")
    model.first_stage_model.requires_grad_(False)
    for encoder in model.text_encoders:
        encoder.requires_grad_(cfg.train_text_encoder)
    model.unet.checkpointing = cfg.gradient_checkpointing
    return model


@torch.no_grad()
def latent_scale_factor(model: LatentDiffusion, dataset, count: int = 256) -> float:
    """1 / std of the latents of the first `count` images: CompVis's `scale_by_std`, so that a new autoencoder's
    latents have unit variance as the noise schedule assumes (SD's 0.18215 was found the same way).
    Posterior means, not samples, so that the factor is the same in every run and on resume."""
    items = [it for i in range(min(count, len(dataset))) if (it := dataset.load(i)) is not None]
    if not items:
        raise TrainError("none of the first images could be read")
    z = model.first_stage_model.encode(torch.stack([it.image for it in items]), batch_size=16).mean
    return round(1 / z.std().item(), 5)


@torch.no_grad()
def build_cache(model: LatentDiffusion, dataset, device, cfg: TrainConfig, quiet: bool) -> dict:
    """Posterior mean and std of every image's latent, its micro-conditioning, and the text embedding (and pooled
    text, SDXL) of every distinct caption."""
    means, stds, captions, micro = [], [], [], []
    for start in tqdm(range(0, len(dataset), 16), desc="caching latents", disable=quiet, unit="batch"):
        items = [it for i in range(start, min(start + 16, len(dataset))) if (it := dataset.load(i)) is not None]
        if not items:
            continue
        posterior = model.first_stage_model.encode(torch.stack([it.image for it in items]).to(device))
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions.extend(it.caption for it in items)
        micro.extend((*it.original_size, *it.crop) for it in items)
    if not means:
        raise TrainError(f"none of the {len(dataset)} images of the data set can be read")
    unique = sorted(set(captions) | {""})
    embeddings = pooled = None
    if not cfg.train_text_encoder:
        parts = [model.get_text_conditioning(unique[i : i + 64], pooled=True) for i in range(0, len(unique), 64)]
        embeddings = torch.cat([context for context, _ in parts])
        pooled = torch.cat([p for _, p in parts]) if parts[0][1] is not None else None
    index = {c: i for i, c in enumerate(unique)}
    return {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "caption": [index[c] for c in captions],
        "captions": unique,
        "index": index,
        "embeddings": embeddings,
        "pooled": pooled,
        "micro": torch.tensor(micro, dtype=torch.float32),
    }


class TrainedParts(nn.Module):
    """What the optimizer updates, as one module for DistributedDataParallel: the U-Net behind its conditioning
    wrapper, and the text encoder when it is trained (it then runs inside forward, so that its gradients are
    synchronised too). Runs under the run's autocast."""

    def __init__(self, wrapper: nn.Module, text: nn.Module | None, autocast: dict):
        super().__init__()
        self.wrapper = wrapper
        self.text = text
        self.autocast = autocast

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """cond: the wrapper's conditioning, or {"tokens": (b, 77)} when the text encoder is trained."""
        with torch.autocast(**self.autocast):
            if "tokens" in cond:
                cond = {"crossattn": self.text(cond["tokens"])}
            return self.wrapper(x_t, t, cond)


# One step -------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch with every random draw made: the loss is then a function of the network and the batch."""

    latents: torch.Tensor  # z, the scaled latents of the images (b, c, h, w)
    cond: (
        dict  # {"crossattn": (b, 77, d)} (SDXL: and "vector"), or {"tokens": (b, 77)} when the text encoder is trained
    )
    timesteps: torch.Tensor  # (b,)
    noise: torch.Tensor  # ε (b, c, h, w)


def diffusion_loss(
    net,
    batch: Batch,
    alphas_cumprod: torch.Tensor,
    parameterization: str,
    min_snr_gamma: float | None = None,
    min_snr_floor: float = 0.0,
) -> torch.Tensor:
    """Mean over the batch of w(t)·mean|net(x_t, t, c) − target|² (the module docstring's objective)."""
    a = alphas_cumprod[batch.timesteps]
    prediction = net(noised(batch.latents, batch.noise, a), batch.timesteps, batch.cond)
    loss = F.mse_loss(prediction.float(), target(batch.latents, batch.noise, a, parameterization), reduction="none")
    loss = loss.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * min_snr_weight(a, min_snr_gamma, parameterization, min_snr_floor)
    return loss.mean()


@dataclass
class Run:
    """What the steps of one training run share."""

    cfg: TrainConfig
    model: LatentDiffusion
    dataset: object
    cache: dict | None
    device: torch.device
    rank: int
    world: int

    @property
    def items(self) -> int:
        return len(self.cache["caption"]) if self.cache else len(self.dataset)

    @property
    def micro(self) -> int:
        """Samples per micro-batch on this process."""
        return self.cfg.batch_size // (self.world * self.cfg.grad_accum)


def load_readable(run: Run, i: int, rng: random.Random):
    """Item i, or the next readable one: an unreadable image is replaced the same way in every run."""
    for j in range(run.items):
        item = run.dataset.load((i + j) % run.items, rng)
        if item is not None:
            return item
    raise TrainError("no image of the data set can be read")


def make_batch(run: Run, step: int, part: slice) -> Batch:
    """Samples `part` of step `step`'s global batch; every draw is made for the global batch (module docstring)."""
    cfg, model, cache = run.cfg, run.model, run.cache
    g = step_generator(cfg.seed, step)
    B = cfg.batch_size
    t = torch.randint(0, len(model.alphas_cumprod), (B,), generator=g)
    drop = torch.rand(B, generator=g) < cfg.prompt_dropout
    f = model.cfg.autoencoder.downsampling_factor
    shape = (model.cfg.autoencoder.embed_dim, cfg.image_size // f, cfg.image_size // f)
    noise = torch.randn((B, *shape), generator=g) + cfg.offset_noise * torch.randn((B, shape[0], 1, 1), generator=g)
    z_noise = torch.randn((B, *shape), generator=g)
    idx = global_batch_indices(step, B, run.items, cfg.seed)[part]
    if cache:
        z = cache["mean"][idx] + cache["std"][idx] * z_noise[part]
        captions = [cache["captions"][cache["caption"][i]] for i in idx]
        micro = cache["micro"][idx]
    else:
        items = [load_readable(run, i, random.Random(cfg.seed * 31 + step * 1009 + i)) for i in idx]
        with torch.no_grad():
            posterior = model.first_stage_model.encode(torch.stack([it.image for it in items]).to(run.device))
        z = posterior.sample(noise=z_noise[part])
        captions = [it.caption for it in items]
        micro = torch.tensor([(*it.original_size, *it.crop) for it in items], dtype=torch.float32)
    dropped = drop[part].tolist()
    captions = ["" if d else c for c, d in zip(captions, dropped)]
    latents = (model.scale_factor * z).to(run.device)
    cond = text_conditioning(run, captions)
    if model.cfg.micro_conditioning:  # SDXL: dropped captions are zeros; y from the pooled text and the sizes
        zero = torch.tensor(dropped, device=run.device)
        cond["crossattn"] = cond["crossattn"].masked_fill(zero[:, None, None], 0)
        pooled = cond.pop("pooled").masked_fill(zero[:, None], 0)
        cond["vector"] = model.conditioner.vector(pooled, training_micro_conditioning(micro, cfg.image_size))
    return Batch(latents, cond, t[part].to(run.device), noise[part].to(run.device))


def training_micro_conditioning(micro: torch.Tensor, image_size: int) -> dict[str, torch.Tensor]:
    """Rows (original height, width, crop top, left) -> SDXL's micro-conditioning inputs: the target size is the
    training size; the refiner's aesthetic score is 6 for every image (no scores in the data)."""
    b = len(micro)
    return {
        "original_size": micro[:, :2],
        "crop_coords": micro[:, 2:],
        "target_size": torch.full((b, 2), image_size),
        "aesthetic_score": torch.full((b, 1), 6.0),
    }


def text_conditioning(run: Run, captions: list[str]) -> dict:
    """The context of the captions (and, SDXL, their pooled text under "pooled"), from the cache when it has them,
    or their tokens when the text encoder is trained (it then runs inside the trained module's forward)."""
    if run.cfg.train_text_encoder:
        return {"tokens": run.model.cond_stage_model.tokenize(captions)[0]}
    if run.cache:
        rows = [run.cache["index"][c] for c in captions]
        cond = {"crossattn": run.cache["embeddings"][rows].to(run.device)}
        if run.cache["pooled"] is not None:
            cond["pooled"] = run.cache["pooled"][rows].to(run.device)
        return cond
    with torch.no_grad():
        context, pooled = run.model.get_text_conditioning(captions, pooled=True)
    return {"crossattn": context} | ({"pooled": pooled} if pooled is not None else {})


def train_step(run: Run, step: int, net: nn.Module, optimizer, scaler) -> float:
    """One optimizer step over grad_accum micro-batches per process; returns the step's mean loss."""
    cfg = run.cfg
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, cfg)
    step_loss = 0.0
    for k in range(cfg.grad_accum):
        first = (run.rank * cfg.grad_accum + k) * run.micro
        synced = run.world == 1 or k == cfg.grad_accum - 1  # one all-reduce per step, after the last micro-batch
        with contextlib.nullcontext() if synced else net.no_sync():
            batch = make_batch(run, step, slice(first, first + run.micro))
            loss = diffusion_loss(
                net, batch, run.model.alphas_cumprod, run.model.parameterization, cfg.min_snr_gamma, cfg.min_snr_floor
            )
            loss = loss / cfg.grad_accum
            scaler.scale(loss).backward()
        step_loss += loss.item()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
    if not scaler.is_enabled() and not (math.isfinite(step_loss) and torch.isfinite(norm)):  # fp16: the scaler skips
        raise TrainingDiverged(
            f"step {step + 1}: loss {step_loss:.4g}, gradient norm {norm.item():.4g}: not finite; "
            "the step was not applied and the last checkpoint is the last good one (lower --lr?)"
        )
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


# Checkpoints ---------------------------------------------------------------------------------------------------


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


# The loop ------------------------------------------------------------------------------------------------------


def setup(cfg: TrainConfig):
    """(outdir, device, rank, world size, the outdir's lock, what `discard` removes after a failure), checked
    before any work."""
    check_config(cfg)
    rank, world = distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(
            f"batch size {cfg.batch_size} is not divisible by {world} processes × {cfg.grad_accum} accumulation steps"
        )
    try:
        device, created = resolve_device(cfg.device), missing_folders(cfg.outdir)  # the device first: no folder
        outdir = writable_folder(cfg.outdir)  # is made for a run refused over its device
    except ValueError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    new_lock = not (outdir / ".lock").exists()
    lock = lock_outdir(outdir) if rank == 0 else None  # one run per folder (the other ranks only read from it)
    litter = ([outdir / ".lock"] if new_lock and lock else [], created)
    if not cfg.resume and latest_checkpoint(outdir) is not None:
        discard(litter)  # (the lock file goes while still locked: no other run can lock it in between)
        if lock:
            lock.close()
        raise TrainError(f"{outdir} holds checkpoints of an earlier run: pass --resume, or use another --outdir")
    return outdir, device, rank, world, lock, litter


def discard(litter: tuple[list[Path], list[Path]]) -> None:
    """After a run that failed before writing anything: its lock file, then the folders it made, while empty."""
    files, folders = litter
    for path in files:
        path.unlink(missing_ok=True)
    remove_empty(folders)


def train(cfg: TrainConfig) -> Path:
    """Train; returns the path of the final model (outdir/model.safetensors, with the EMA as model_ema.*)."""
    outdir, device, rank, world, lock, litter = setup(cfg)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # what the fingerprint holds
    try:
        return run_training(cfg, outdir, device, rank, world)
    except BaseException:
        if lock and {p.name for p in outdir.iterdir()} <= {".lock"}:  # nothing written yet: leave nothing
            discard(litter)  # (the lock file goes while still locked: no other run can lock it in between)
        raise
    finally:
        if lock:
            lock.close()  # also when the run fails inside this process (a notebook, tests)


def run_training(cfg: TrainConfig, outdir: Path, device: torch.device, rank: int, world: int) -> Path:
    quiet = cfg.quiet or rank != 0
    dataset = build_dataset(cfg)
    if cfg.batch_size > len(dataset):
        raise TrainError(f"batch size {cfg.batch_size} is larger than the data set ({len(dataset)} images)")
    torch.manual_seed(cfg.seed)  # the initial weights of a from-scratch model
    try:
        model = build_model(cfg, dataset)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    state, saved = restore(cfg, outdir, model, ema=cfg.ema_decay > 0)
    model = model.to(device)
    autocast = dict(
        device_type=device.type,
        dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
        enabled=cfg.precision != "fp32",
    )
    trainable = TrainedParts(model.model, model.cond_stage_model if cfg.train_text_encoder else None, autocast)
    ema = copy.deepcopy(model.unet).requires_grad_(False) if cfg.ema_decay > 0 else None
    if cfg.compile:  # in place: the module tree and so the checkpoint keys stay as they are
        trainable.compile(backend=COMPILE_BACKEND, dynamic=False)
    optimizer = torch.optim.AdamW(
        trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fast_optimizer_options(device)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    if state is not None:
        if ema is not None:
            ema.load_state_dict({k: saved[ema_key(UNET + k)] for k in ema.state_dict()})
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    cache = build_cache(model, dataset, device, cfg, quiet) if cfg.cache_latents else None
    run = Run(cfg, model, dataset, cache, device, rank, world)
    # A trained SD 2.x text encoder has parameters without gradients (its last block and projection).
    net = (
        trainable
        if world == 1
        else nn.parallel.DistributedDataParallel(
            trainable,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.train_text_encoder,
        )
    )
    loop(run, net, optimizer, scaler, ema, outdir, start=state["step"] if state else 0, quiet=quiet)
    if getattr(dataset, "skipped", 0) and rank == 0:
        tqdm.write(f"skipped {dataset.skipped} unreadable images")
    if world > 1:
        dist.destroy_process_group()
    return outdir / "model.safetensors"


def loop(run: Run, net, optimizer, scaler, ema, outdir: Path, start: int, quiet: bool) -> None:
    """Steps start..steps: train, EMA, log every log_every steps, checkpoint every save_every, samples."""
    cfg, model = run.cfg, run.model
    log_path = outdir / "log.csv"
    if run.rank == 0:  # a resumed run keeps the rows up to its checkpoint's step, and only those
        rows = log_path.read_text().splitlines()[1:] if cfg.resume and log_path.exists() else []
        kept = [row for row in rows if row.split(",")[0].isdigit() and int(row.split(",")[0]) <= start]
        with atomic_write(log_path) as tmp:
            tmp.write_text("\n".join(["step,loss,lr,steps_per_s", *kept]) + "\n")
    fingerprint = run_fingerprint(cfg, model)
    bar = tqdm(total=cfg.steps, initial=start, disable=quiet, unit="step", desc="train")
    losses, tick = [], time.perf_counter()
    model.train()
    model.first_stage_model.eval()
    for step in range(start, cfg.steps):
        losses.append(train_step(run, step, net, optimizer, scaler))
        if ema is not None:
            ema_update(ema, model.unet, cfg.ema_decay, step + 1)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            if run.rank == 0:
                log_row(log_path, done, losses, time.perf_counter() - tick, get_lr(step, cfg))
            losses, tick = [], time.perf_counter()
        if run.rank == 0 and (done % cfg.save_every == 0 or done == cfg.steps):
            state = {
                "step": done,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "fingerprint": fingerprint,
            }
            save_checkpoint(outdir, done, model, ema, state, cfg.keep_checkpoints)
        if run.rank == 0 and cfg.sample_every and done % cfg.sample_every == 0:
            write_samples(model, cfg, outdir / "samples" / f"step-{done:07d}.png")
        if run.world > 1:
            dist.barrier()
    bar.close()


@torch.no_grad()
def write_samples(model: LatentDiffusion, cfg: TrainConfig, path: Path) -> None:
    from .generate import NonFiniteError, generate
    from .images import grid, save_png, to_pil
    from .request import GenerationRequest, RequestError

    model.eval()
    n = len(cfg.sample_prompts)
    request = GenerationRequest(
        cfg.sample_prompts,
        list(range(n)),
        width=cfg.image_size,
        height=cfg.image_size,
        sampler="ddim",
        cfg_scale=5.0,
        batch_size=n,
    )
    try:
        images = generate(model, request).images
    except (RequestError, NonFiniteError) as e:  # a sample must never end a long run
        tqdm.write(f"ldm: warning: no sample images at {path.stem}: {e}", file=sys.stderr)
        return
    finally:
        model.train()
        model.first_stage_model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid([to_pil(im) for im in images]), path, "\n".join(cfg.sample_prompts))
