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
and the checkpoint. What is trained and written is a `Trainee`: here the U-Net (`unet_trainee`); ControlNet
training (`controlnet.py`) runs the same loop with a ControlNet beside the frozen model, LoRA training (`lora.py`)
with adapters in it.

Determinism: the data order of epoch e is a permutation seeded by (seed, e) (with aspect-ratio buckets, the
shuffles of each bucket and of the order of its batches: `buckets.py`), and every random draw of step s
(timesteps, noise, prompt dropout, posterior samples, tag orders) comes from a generator seeded by (seed, s), drawn
for the whole global batch. Each process takes its slice. So N steps + resume + N steps equals 2N steps, and two
processes give the weights one process gives with the same global batch, with DDP or with --fsdp's shards
(`fsdp.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from tqdm import tqdm

from ..devices import resolve_device
from ..files import atomic_write, missing_folders, remove_empty, writable_folder
from ..models.conditioner import Conditioner
from ..models.config import preset
from ..models.family import UNET, VAE
from ..models.ldm import LatentDiffusion, encode_tokens
from ..weights.checkpoint import (
    CheckpointError,
    checkpoint_metadata,
    checkpoint_tensors,
    ema_key,
    load_model,
    read_state_dict,
)
from .checkpoints import Trainee, latest_checkpoint, log_row, restore, run_fingerprint, save_checkpoint
from .common import TrainError, build_dataset, get_lr, lock_outdir, resolve_precision
from .config import SAVE_PRECISIONS, TrainConfig, bucket_spec, check_config
from .fsdp import restore_sharded, save_sharded_checkpoint, shard
from .latent_cache import build_cache, by_shape
from .loss_plot import plot_loss
from .optimizers import build_optimizer, check_optimizer
from .step import Run, sdxl_conditioning, train_step

COMPILE_BACKEND = "inductor"  # the tests trace with "aot_eager": the same graphs, without building kernels


# Small pure pieces (tested on their own) ------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, num_updates: int) -> None:
    """CompVis's LitEma: with n updates so far (this one included), d = min(decay, (1 + n)/(10 + n)) and
    ema ← ema − (1 − d)·(ema − θ)."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    ema_params = list(ema.parameters())  # one foreach op, not a Python loop over the parameters
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters())], 1 - d)


# Set-up -------------------------------------------------------------------------------------------------------


def distributed(cfg: TrainConfig) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun, and with --fsdp always (on
    one process without torchrun: a group of one, so that the run shards and checkpoints as on many)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 and not cfg.fsdp:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: TrainConfig, dataset) -> LatentDiffusion:
    """The checkpoint to fine-tune, or the preset from scratch (with stage 1's autoencoder, if given); the
    autoencoder is frozen, the text encoder too unless it is trained."""
    if cfg.ckpt:
        model = load_model(cfg.ckpt)
        if any(p.dtype == torch.uint8 for p in model.parameters()):  # GGML blocks (`weights/ggml_quants.py`)
            raise TrainError(f"{cfg.ckpt}: a GGUF model holds quantized weights; training needs a float checkpoint")
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
    images = [it.image for i in range(min(count, len(dataset))) if (it := dataset.load(i)) is not None]
    if not images:
        raise TrainError("none of the first images could be read")
    encode = model.first_stage_model.encode
    z = [encode(torch.stack([images[i] for i in group]), batch_size=16).mean.flatten() for group in by_shape(images)]
    return round(1 / torch.cat(z).std().item(), 5)


class TrainedParts(nn.Module):
    """What the optimizer updates, as one module for DDP or FSDP to wrap or shard: the U-Net behind its conditioning
    wrapper, and the text encoders when they train (they then run inside forward, so that their gradients are
    synchronised too; `text_part`); for LoRA training, the frozen model and the `adapters` hooked into its layers
    (they alone train). Runs under the run's autocast."""

    def __init__(self, wrapper: nn.Module, text: nn.Module | None, autocast: dict, adapters: nn.Module | None = None):
        super().__init__()
        self.wrapper = wrapper
        self.text = text
        self.autocast = autocast
        self.adapters = adapters

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """cond: the wrapper's conditioning, or {"tokens": (b, k, 77), ...} when the text encoders train
        (`step.text_conditioning`)."""
        with torch.autocast(**self.autocast):
            if "tokens" in cond:
                cond = self.encode(cond)
            return self.wrapper(x_t, t, cond)

    def encode(self, cond: dict) -> dict:
        """The text encoders' tokens (and SDXL's "dropped" and "micro") -> the wrapper's conditioning."""
        if not isinstance(self.text, Conditioner):
            return {"crossattn": encode_tokens([self.text], cond["tokens"])[0]}
        context, pooled = encode_tokens(self.text.text_encoders, cond["tokens"])
        return sdxl_conditioning(self.text, context, pooled, cond["dropped"], cond["micro"])


def text_part(model: LatentDiffusion) -> nn.Module:
    """The module that holds the text encoders, which `TrainedParts` runs when they train: SD's text encoder, or
    SDXL's conditioner (both encoders and the weightless micro-conditioning embedders)."""
    return model.conditioner if model.cfg.micro_conditioning else model.cond_stage_model


def unet_trainee(cfg: TrainConfig, dataset, autocast: dict) -> Trainee:
    """`ldm train`'s: the U-Net (and the text encoder, where it is trained) of the whole model, written as the whole
    model with the EMA U-Net as `model_ema.*`."""
    model = build_model(cfg, dataset)

    def load(saved: dict, ema: nn.Module | None) -> None:
        model.load_state_dict({k: saved[k] for k in model.state_dict()})
        if ema is not None:
            ema.load_state_dict({k: saved[ema_key(UNET + k)] for k in ema.state_dict()})

    return Trainee(
        model=model,
        module=model.unet,
        net=TrainedParts(model.model, text_part(model) if cfg.train_text_encoder else None, autocast),
        file_name="model.safetensors",
        tensors=lambda ema: checkpoint_tensors(model, ema_unet=ema),
        metadata=lambda tensors: checkpoint_metadata(model),
        load=load,
        samples=lambda path: write_samples(model, cfg, path),
    )


# The loop ------------------------------------------------------------------------------------------------------


def setup(cfg: TrainConfig):
    """(outdir, device, rank, world size, the outdir's lock, what `discard` removes after a failure), checked
    before any work."""
    check_config(cfg)
    rank, world = distributed(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(
            f"batch size {cfg.batch_size} is not divisible by {world} processes × {cfg.grad_accum} accumulation steps"
        )
    try:
        device, created = resolve_device(cfg.device), missing_folders(cfg.outdir)  # the device first: no folder
        if device.type == "cuda" and dist.is_initialized():  # is made for a run refused over its device
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        check_optimizer(cfg.optimizer, device)  # (on this process's device)
        outdir = writable_folder(cfg.outdir)
    except ValueError as e:
        raise TrainError(str(e)) from None
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


def train(cfg: TrainConfig, make_trainee=unet_trainee, control: bool = False) -> Path:
    """Train; returns the path of the final file (`ldm train`: outdir/model.safetensors, with the EMA as
    model_ema.*). make_trainee(cfg, dataset, autocast) -> what is trained (`Trainee`); control: the data's items
    carry control images (ControlNet training)."""
    try:
        outdir, device, rank, world, lock, litter = setup(cfg)
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # the fingerprint's
        try:
            return run_training(cfg, outdir, device, rank, world, make_trainee, control)
        except BaseException:
            if lock and {p.name for p in outdir.iterdir()} <= {".lock"}:  # nothing written yet: leave nothing
                discard(litter)  # (the lock file goes while still locked: no other run can lock it in between)
            raise
        finally:
            if lock:
                lock.close()  # also when the run fails inside this process (a notebook, tests)
    finally:
        if dist.is_initialized() and "WORLD_SIZE" not in os.environ:
            dist.destroy_process_group()  # --fsdp's group of one, made by `distributed` (torchrun's: run_training)


def run_training(cfg: TrainConfig, outdir: Path, device, rank: int, world: int, make_trainee, control: bool) -> Path:
    quiet = cfg.quiet or rank != 0
    dataset = build_dataset(cfg, control=control, buckets=bucket_spec(cfg))
    if cfg.batch_size > len(dataset):
        raise TrainError(f"batch size {cfg.batch_size} is larger than the data set ({len(dataset)} images)")
    autocast = dict(
        device_type=device.type,
        dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
        enabled=cfg.precision != "fp32",
    )
    torch.manual_seed(cfg.seed)  # the initial weights of a from-scratch model (or of a ControlNet's hint block)
    try:
        trainee = make_trainee(cfg, dataset, autocast)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    trainee.saved_dtype = SAVE_PRECISIONS[cfg.save_precision]
    ema = copy.deepcopy(trainee.module).requires_grad_(False) if cfg.ema_decay > 0 else None
    state = None if cfg.fsdp else restore(cfg, outdir, trainee, ema)  # (sharded ones: once sharded, below)
    model = trainee.model.to(device)
    trainee.net.to(device)
    if ema is not None:
        ema.to(device)
    trained = [p for p in trainee.net.parameters() if p.requires_grad]  # (a frozen base model's are not)
    groups = trainee.param_groups or [{"params": trained}]
    if cfg.fsdp:  # in place, after the move: the parameters become DTensors on the device
        groups = shard(trainee, ema, device, cfg.precision, groups)
    if cfg.compile:  # in place: the module tree and so the checkpoint keys stay as they are
        trainee.net.compile(backend=COMPILE_BACKEND, dynamic=False)
    # FSDP: each process sees its gradient shards alone; the sharded scaler agrees on an overflow over all of them
    sharded_scaler = cfg.fsdp and cfg.precision == "fp16"
    optimizer = build_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, device, sharded_scaler)
    scaler = (ShardedGradScaler if cfg.fsdp else torch.amp.GradScaler)(device.type, enabled=cfg.precision == "fp16")
    if cfg.fsdp:
        state = restore_sharded(cfg, outdir, trainee, ema, trainee.net, optimizer)
    elif state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state is not None:
        scaler.load_state_dict(state["scaler"])
    cache = build_cache(model, dataset, device, cfg, quiet, outdir, rank, world) if cfg.cache_latents else None
    run = Run(cfg, model, dataset, cache, device, rank, world, hints=control)
    # A trained SD 2.x text encoder has parameters without gradients (its last block and projection).
    net = (
        trainee.net
        if world == 1 or cfg.fsdp
        else nn.parallel.DistributedDataParallel(
            trainee.net,
            device_ids=[device.index] if device.type == "cuda" else None,
            # (a text layer the context does not read; adapters that module dropout leaves out of a step)
            find_unused_parameters=cfg.train_text_encoder or cfg.lora_module_dropout > 0,
        )
    )
    loop(run, trainee, net, optimizer, scaler, ema, outdir, start=state["step"] if state else 0, quiet=quiet)
    if getattr(dataset, "skipped", 0) and rank == 0:
        tqdm.write(f"skipped {dataset.skipped} unreadable images")
    if dist.is_initialized() and "WORLD_SIZE" in os.environ:  # torchrun's group
        dist.destroy_process_group()
    return outdir / trainee.file_name


def loop(run: Run, trainee: Trainee, net, optimizer, scaler, ema, outdir: Path, start: int, quiet: bool) -> None:
    """Steps start..steps: train, EMA, log every log_every steps, checkpoint (and loss.png) every save_every,
    samples."""
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
    training_mode(trainee)
    for step in range(start, cfg.steps):
        losses.append(train_step(run, step, net, optimizer, scaler))
        if ema is not None:
            ema_update(ema, trainee.module, cfg.ema_decay, step + 1)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            if run.rank == 0:
                log_row(log_path, done, losses, time.perf_counter() - tick, get_lr(step, cfg))
            losses, tick = [], time.perf_counter()
        if done % cfg.save_every == 0 or done == cfg.steps:
            state = {"step": done, "scaler": scaler.state_dict(), "fingerprint": fingerprint}
            if cfg.fsdp:  # every process writes its shards (the optimizer's state among them)
                save_sharded_checkpoint(
                    outdir, done, trainee, ema, net, optimizer, state, cfg.keep_checkpoints, run.rank
                )
            elif run.rank == 0:
                state["optimizer"] = optimizer.state_dict()
                save_checkpoint(outdir, done, trainee, ema, state, cfg.keep_checkpoints)
            if run.rank == 0:
                plot_loss(log_path, outdir / "loss.png")
        if run.rank == 0 and cfg.sample_every and done % cfg.sample_every == 0:
            trainee.samples(outdir / "samples" / f"step-{done:07d}.png")
            training_mode(trainee)
        if run.world > 1:
            dist.barrier()
    bar.close()


def training_mode(trainee: Trainee) -> None:
    """What is trained in training mode, the rest (the autoencoder, frozen parts) in eval mode."""
    trainee.model.eval()
    trainee.net.train()


@torch.no_grad()
def write_samples(model: LatentDiffusion, cfg: TrainConfig, path: Path, controls=(), controlnets=None) -> None:
    """A grid of one image per sample prompt (DDIM, guidance 5), with the control units `controls` of the
    `controlnets` files where given; a failure is a warning, never the end of a long run."""
    from ..pipeline.generate import NonFiniteError, generate
    from ..pipeline.images import grid, save_png, to_pil
    from ..pipeline.loading import Pipeline
    from ..pipeline.request import GenerationRequest, RequestError

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
        controls=list(controls),
    )
    try:
        images = generate(Pipeline(model, controlnets=controlnets or {}), request).images
    except (RequestError, NonFiniteError) as e:  # a sample must never end a long run
        tqdm.write(f"ldm: warning: no sample images at {path.stem}: {e}", file=sys.stderr)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid([to_pil(im) for im in images]), path, "\n".join(cfg.sample_prompts))
