"""Stage 2 of latent diffusion: train the U-Net on latents of a frozen autoencoder, on one process or many.

Objective (Ho et al. 2020; v: Salimans & Ho 2022): t ~ U{0..T-1}, ε ~ N(0, I), x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε with
z the scaled latent of an image; loss = w(t)·|f(x_t, t, c) − target|², target ε or v = √ᾱ_t·ε − √(1−ᾱ_t)·z.
w(t) = 1, or min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, SNR = ᾱ/(1−ᾱ).
The prompt is replaced by "" with probability `prompt_dropout`, so that the model learns the unconditional
prediction that classifier-free guidance needs.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and every random draw of step s
(timesteps, noise, prompt dropout, posterior samples) comes from a generator seeded by (seed, s), drawn for the
whole global batch. Each process takes its slice. So N steps + resume + N steps equals 2N steps, and two
processes give the weights one process gives with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import parameterization
from .checkpoint import UNET, CheckpointError, ema_key, load_model, read_state_dict, save_model
from .config import preset
from .data import DataError, ImageCaptionFolder, ShapesDataset
from .devices import resolve_device
from .files import writable_folder
from .latent_diffusion import LatentDiffusion


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
    steps: int = 1000
    batch_size: int = 8  # global: samples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # or "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)
    ema_decay: float = 0.9999  # 0: no EMA
    prompt_dropout: float = 0.1
    min_snr_gamma: float | None = None
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

    # What a resumed run must share with the run it continues.
    RUN_DEFINING = ("data", "shapes_count", "image_size", "ckpt", "preset", "parameterization", "autoencoder",
                    "train_text_encoder", "batch_size", "grad_accum", "lr", "warmup", "lr_schedule", "weight_decay",
                    "precision", "ema_decay", "prompt_dropout", "min_snr_gamma", "offset_noise", "cache_latents", "flip",
                    "seed")  # fmt: skip


class TrainError(ValueError):
    """A training run that cannot start as configured; the message says why."""


# Small pure pieces (tested on their own) ------------------------------------------------------------------------


LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(cfg: TrainConfig) -> None:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise TrainError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (as CompVis's SD fine-tuning) or, with
    lr_schedule "cosine", lr·½(1 + cos(π·step/steps)) down to 0 at the last step."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return lr


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


# Set-up -------------------------------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: TrainConfig, dataset) -> LatentDiffusion:
    if cfg.ckpt:
        model = load_model(cfg.ckpt)
    else:
        config = preset(cfg.preset)
        config.parameterization = cfg.parameterization or config.parameterization
        model = LatentDiffusion(config)
        if cfg.autoencoder:
            sd, _ = read_state_dict(cfg.autoencoder)
            prefix = "first_stage_model."
            weights = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            try:
                model.first_stage_model.load_state_dict(weights, strict=True)
            except RuntimeError as e:
                raise TrainError(f"{cfg.autoencoder}: does not fit the {cfg.preset} autoencoder ({e})") from None
            model.cfg.scale_factor = latent_scale_factor(model, dataset)
    model.first_stage_model.requires_grad_(False)
    model.cond_stage_model.requires_grad_(cfg.train_text_encoder)
    return model


@torch.no_grad()
def latent_scale_factor(model: LatentDiffusion, dataset, count: int = 256) -> float:
    """1 / std of the latents of the first `count` images: CompVis's `scale_by_std`, so that a new autoencoder's
    latents have unit variance as the noise schedule assumes (SD's 0.18215 was found the same way).
    Posterior means, not samples, so that the factor is the same in every run and on resume."""
    items = [it for i in range(min(count, len(dataset))) if (it := dataset.load(i)) is not None]
    if not items:
        raise TrainError("none of the first images could be read")
    images = torch.stack([im for im, _ in items])
    z = torch.cat([model.first_stage_model.encode(images[i : i + 16]).mean for i in range(0, len(images), 16)])
    return round(1 / z.std().item(), 5)


def build_dataset(cfg: TrainConfig):
    if cfg.data is None:
        return ShapesDataset(cfg.shapes_count, cfg.image_size, seed=cfg.seed)
    try:
        return ImageCaptionFolder(cfg.data, cfg.image_size, flip=cfg.flip, caption_default=cfg.caption_default)
    except DataError as e:
        raise TrainError(str(e)) from None


@torch.no_grad()
def build_cache(model: LatentDiffusion, dataset, device, cfg: TrainConfig, quiet: bool) -> dict:
    """Posterior mean and std of every image's latent, and the text embedding of every distinct caption."""
    means, stds, captions = [], [], []
    for start in tqdm(range(0, len(dataset), 16), desc="caching latents", disable=quiet, unit="batch"):
        items = [dataset.load(i) for i in range(start, min(start + 16, len(dataset)))]
        items = [it for it in items if it is not None]
        if not items:
            continue
        posterior = model.first_stage_model.encode(torch.stack([im for im, _ in items]).to(device))
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions.extend(c for _, c in items)
    unique = sorted(set(captions) | {""})
    embeddings = None
    if not cfg.train_text_encoder:
        embeddings = torch.cat([model.get_text_conditioning(unique[i : i + 64]) for i in range(0, len(unique), 64)])
    index = {c: i for i, c in enumerate(unique)}
    return {"mean": torch.cat(means), "std": torch.cat(stds), "caption": [index[c] for c in captions],
            "captions": unique, "embeddings": embeddings}  # fmt: skip


class TrainedParts(nn.Module):
    """What the optimizer updates, as one module for DistributedDataParallel: the U-Net, and the text
    encoder when it is trained (then it runs inside forward, so that its gradients are synchronised too)."""

    def __init__(self, unet: nn.Module, text: nn.Module | None):
        super().__init__()
        self.unet = unet
        self.text = text

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, tokens=None) -> torch.Tensor:
        return self.unet(x_t, t, {"crossattn": self.text(tokens) if tokens is not None else context})


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
    save_model(model, tmp / "model.safetensors", ema_unet=ema)
    torch.save(state, tmp / "state.pt")
    os.replace(tmp, root / f"step-{step:07d}")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    save_model(model, outdir / "model.safetensors", ema_unet=ema)


def run_fingerprint(cfg: TrainConfig, model: LatentDiffusion) -> dict:
    return {**{k: getattr(cfg, k) for k in TrainConfig.RUN_DEFINING}, "model": model.cfg.to_json()}


# The loop ------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train; returns the path of the final model (outdir/model.safetensors, with the EMA as model_ema.*)."""
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if cfg.image_size % 8 or cfg.image_size <= 0:
        raise TrainError(f"image size must be a positive multiple of 8, not {cfg.image_size}")
    rank, world = distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(f"batch size {cfg.batch_size} is not divisible by {world} processes × {cfg.grad_accum} "
                         "accumulation steps")  # fmt: skip
    if cfg.parameterization not in (None, "eps", "v"):
        raise TrainError(f"parameterization must be eps or v, not {cfg.parameterization!r}")
    if cfg.parameterization and cfg.ckpt:
        raise TrainError("--parameterization is for models trained from scratch; a --ckpt brings its own")
    check_lr_schedule(cfg)
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise TrainError(f"precision must be fp32, bf16 or fp16, not {cfg.precision!r}")
    try:
        outdir, device = writable_folder(cfg.outdir), resolve_device(cfg.device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    quiet = cfg.quiet or rank != 0

    dataset = build_dataset(cfg)
    if cfg.batch_size > len(dataset):
        raise TrainError(f"batch size {cfg.batch_size} is larger than the data set ({len(dataset)} images)")
    if not cfg.resume and latest_checkpoint(outdir) is not None:
        raise TrainError(f"{outdir} holds checkpoints of an earlier run: pass --resume, or use another --outdir")
    torch.manual_seed(cfg.seed)  # the initial weights of a from-scratch model
    try:
        model = build_model(cfg, dataset)
        state, last = None, latest_checkpoint(outdir) if cfg.resume else None
        if cfg.resume:
            if last is None:
                raise TrainError(f"--resume: no checkpoint in {outdir / 'checkpoints'}")
            state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
            fingerprint = run_fingerprint(cfg, model)
            differs = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
            if differs:
                raise TrainError(f"{last}: was written by a run with other settings ({', '.join(differs)})")
            saved, _ = read_state_dict(last / "model.safetensors")  # read once: weights and EMA
            model.load_state_dict({k: saved[k] for k in model.state_dict()})
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    except KeyError as e:
        raise TrainError(f"{last}: an incomplete checkpoint (no {e.args[0]})") from None
    model = model.to(device)
    unet, text = model.unet, model.cond_stage_model
    trainable = TrainedParts(model.model, text if cfg.train_text_encoder else None)
    ema = copy.deepcopy(unet).requires_grad_(False) if cfg.ema_decay > 0 else None
    # foreach: each update op runs once over all parameters rather than in a Python loop over them. torch
    # picks it by itself on CUDA only; on 2 CPU cores it takes the tiny model's AdamW step from 16-19 to 11 ms.
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start_step, fingerprint = 0, run_fingerprint(cfg, model)
    if state is not None:
        if ema is not None:
            ema.load_state_dict({k: saved[ema_key(UNET + k)] for k in ema.state_dict()})
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]

    cache = build_cache(model, dataset, device, cfg, quiet) if cfg.cache_latents else None
    n_items = len(cache["caption"]) if cache else len(dataset)
    if world > 1:
        # A trained SD 2.x text encoder has parameters without gradients (its last block and projection).
        ddp = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.train_text_encoder,
        )  # fmt: skip
    else:
        ddp = trainable
    alphas_cumprod = model.alphas_cumprod.to(device)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                    enabled=cfg.precision != "fp32")  # fmt: skip

    def load_readable(i: int, rng: random.Random):
        """Item i, or the next readable one: an unreadable image is replaced the same way in every run."""
        for j in range(n_items):
            item = dataset.load((i + j) % n_items, rng)
            if item is not None:
                return item
        raise TrainError("no image of the data set can be read")

    def batch_inputs(step: int, part: slice):
        """Latents z, contexts, timesteps, noise of samples `part` of step `step`'s global batch."""
        g = step_generator(cfg.seed, step)
        B = cfg.batch_size
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=g)
        drop = torch.rand(B, generator=g) < cfg.prompt_dropout
        shape = (model.cfg.autoencoder.embed_dim, cfg.image_size // 8, cfg.image_size // 8)
        noise = torch.randn((B, *shape), generator=g) + cfg.offset_noise * torch.randn((B, shape[0], 1, 1), generator=g)
        z_noise = torch.randn((B, *shape), generator=g)
        idx = global_batch_indices(step, B, n_items, cfg.seed)[part]
        if cache:
            z = cache["mean"][idx] + cache["std"][idx] * z_noise[part]
            captions = [cache["captions"][cache["caption"][i]] for i in idx]
        else:
            items = [load_readable(i, random.Random(cfg.seed * 31 + step * 1009 + i)) for i in idx]
            with torch.no_grad():
                posterior = model.first_stage_model.encode(torch.stack([im for im, _ in items]).to(device))
            z = posterior.sample(noise=z_noise[part])
            captions = [c for _, c in items]
        captions = ["" if d else c for c, d in zip(captions, drop[part].tolist())]
        z = (model.scale_factor * z).to(device)
        return z, captions, t[part].to(device), noise[part].to(device)

    caption_index = {c: i for i, c in enumerate(cache["captions"])} if cache else {}

    def model_inputs(captions: list[str]) -> dict:
        """The context, or the tokens when the text encoder is trained (it then runs inside forward)."""
        if cfg.train_text_encoder:
            return {"context": None, "tokens": text.tokenize(captions)[0]}
        if cache:
            return {"context": cache["embeddings"][[caption_index[c] for c in captions]].to(device)}
        with torch.no_grad():
            return {"context": model.get_text_conditioning(captions)}

    def loss_of(z, captions, t, noise) -> torch.Tensor:
        a = alphas_cumprod[t]
        x_t = parameterization.noised(z, noise, a)
        target = parameterization.target(z, noise, a, model.parameterization)
        with torch.autocast(**autocast):
            pred = ddp(x_t, t, **model_inputs(captions))
        loss = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            loss = loss * parameterization.min_snr_weight(a, cfg.min_snr_gamma, model.parameterization)
        return loss.mean()

    log_path = outdir / "log.csv"
    if rank == 0 and not (cfg.resume and log_path.exists()):
        log_path.write_text("step,loss,lr,steps_per_s\n")
    bar = tqdm(total=cfg.steps, initial=start_step, disable=quiet, unit="step", desc="train")
    losses, tick = [], time.perf_counter()
    model.train()
    model.first_stage_model.eval()
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg)
        step_loss = 0.0
        for k in range(cfg.grad_accum):
            first = (rank * cfg.grad_accum + k) * micro
            last_micro = k == cfg.grad_accum - 1
            with ddp.no_sync() if world > 1 and not last_micro else contextlib.nullcontext():  # one all-reduce
                loss = loss_of(*batch_inputs(step, slice(first, first + micro))) / cfg.grad_accum
                scaler.scale(loss).backward()
            step_loss += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, unet, cfg.ema_decay, step + 1)
        losses.append(step_loss)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = len(losses) / (time.perf_counter() - tick)
            mean = sum(losses) / len(losses)
            bar.set_postfix(loss=f"{mean:.4f}", steps_s=f"{rate:.1f}")
            if rank == 0:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([done, f"{mean:.6f}", f"{get_lr(step, cfg):.3e}", f"{rate:.2f}"])
            losses, tick = [], time.perf_counter()
        if rank == 0 and (done % cfg.save_every == 0 or done == cfg.steps):
            state = {"step": done, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "fingerprint": fingerprint}  # fmt: skip
            save_checkpoint(outdir, done, model, ema, state, cfg.keep_checkpoints)
        if rank == 0 and cfg.sample_every and done % cfg.sample_every == 0:
            write_samples(model, cfg, outdir / "samples" / f"step-{done:07d}.png")
        if world > 1:
            dist.barrier()
    bar.close()
    if getattr(dataset, "skipped", 0) and rank == 0:
        tqdm.write(f"skipped {dataset.skipped} unreadable images")
    if world > 1:
        dist.destroy_process_group()
    return outdir / "model.safetensors"


@torch.no_grad()
def write_samples(model: LatentDiffusion, cfg: TrainConfig, path: Path) -> None:
    from .generate import generate
    from .images import grid, save_png, to_pil
    from .request import GenerationRequest

    model.eval()
    n = len(cfg.sample_prompts)
    request = GenerationRequest(cfg.sample_prompts, list(range(n)), width=cfg.image_size, height=cfg.image_size,
                                sampler="ddim", cfg_scale=5.0, batch_size=n)  # fmt: skip
    images = generate(model, request).images
    model.train()
    model.first_stage_model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid([to_pil(im) for im in images]), path, "\n".join(cfg.sample_prompts))
