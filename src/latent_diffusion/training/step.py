"""One optimizer step of stage 2 (`training/diffusion.py` runs them): the micro-batch with every random draw of the step made from
a generator seeded by (seed, step) (`make_batch`), the diffusion loss as a function of the network and the batch alone
(`diffusion_loss`), and the step with gradient accumulation over micro-batches (`train_step`). A global batch is
consecutive items of per-epoch permutations, or, with aspect-ratio buckets, one bucket's batch (`buckets.py`)."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..models.ldm import LatentDiffusion
from ..sampling.parameterization import min_snr_weight, noised, target
from .buckets import BucketBatches
from .common import TrainError, TrainingDiverged, get_lr
from .config import TrainConfig
from .data import shuffle_tags


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


@dataclass
class Batch:
    """One micro-batch with every random draw made: the loss is then a function of the network and the batch."""

    latents: torch.Tensor  # z, the scaled latents of the images (b, c, h, w)
    # {"crossattn": (b, 77, d)} (SDXL: and "vector"), or {"tokens": (b, k, 77)} when the text encoders train (SDXL:
    # and "dropped", "micro", the inputs of `sdxl_conditioning`);
    # ControlNet training: and "hint", the control images (b, 3, H, W) in [0, 1]
    cond: dict
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
    hints: bool = False  # the batches carry the items' control images (ControlNet training)
    batches: BucketBatches | None = field(init=False, default=None)  # with buckets: every epoch's batches

    def __post_init__(self):
        if self.cfg.enable_bucket:  # rows: the cache's, or the data set's items
            buckets = self.cache["bucket"] if self.cache else [self.dataset.bucket(i) for i in range(self.items)]
            self.batches = BucketBatches(buckets, self.cfg.batch_size, self.cfg.seed)

    @property
    def items(self) -> int:
        return len(self.cache["caption"]) if self.cache else len(self.dataset)

    @property
    def micro(self) -> int:
        """Samples per micro-batch on this process."""
        return self.cfg.batch_size // (self.world * self.cfg.grad_accum)


def global_batch(run: Run, step: int) -> tuple[list[int], tuple[int, int]]:
    """The rows of step `step`'s global batch, and their (width, height) in pixels."""
    if run.batches is None:
        size = run.cfg.image_size
        return global_batch_indices(step, run.cfg.batch_size, run.items, run.cfg.seed), (size, size)
    rows = run.batches.rows(step)
    return rows, run.batches.row_buckets[rows[0]]


def load_readable(run: Run, i: int, rng: random.Random):
    """Item i, or the next readable one (of its bucket: the batch keeps its shape): an unreadable image is replaced
    the same way in every run."""
    for j in range(run.items):
        k = (i + j) % run.items
        if run.batches and run.batches.row_buckets[k] != run.batches.row_buckets[i]:
            continue
        item = run.dataset.load(k, rng)
        if item is not None:
            return item
    raise TrainError("no image of the data set can be read")


def make_batch(run: Run, step: int, part: slice) -> Batch:
    """Samples `part` of step `step`'s global batch; every draw is made for the global batch (module docstring)."""
    cfg, model, cache = run.cfg, run.model, run.cache
    g = step_generator(cfg.seed, step)
    B = cfg.batch_size
    rows, (width, height) = global_batch(run, step)
    t = torch.randint(0, len(model.alphas_cumprod), (B,), generator=g)
    drop = torch.rand(B, generator=g) < cfg.prompt_dropout
    f = model.cfg.autoencoder.downsampling_factor
    shape = (model.cfg.autoencoder.embed_dim, height // f, width // f)  # the batch's bucket, in latents
    noise = torch.randn((B, *shape), generator=g) + cfg.offset_noise * torch.randn((B, shape[0], 1, 1), generator=g)
    z_noise = torch.randn((B, *shape), generator=g)
    # one seed per caption's tag order, drawn for the global batch like every other draw
    tag_seeds = torch.randint(0, 2**62, (B,), generator=g)[part].tolist() if cfg.shuffle_caption else None
    idx = rows[part]
    if cache:  # (c, h, w) rows of one bucket -> (b, c, h, w)
        means, stds = zip(*(cache["latents"][i] for i in idx))  # (from memory, or read from disk now)
        z = torch.stack(means) + torch.stack(stds) * z_noise[part]
        captions = [cache["captions"][cache["caption"][i]] for i in idx]
        micro = cache["micro"][idx]
        hints = [cached_hint(run, i) for i in idx] if run.hints else None
    else:
        items = [load_readable(run, i, random.Random(cfg.seed * 31 + step * 1009 + i)) for i in idx]
        with torch.no_grad():
            posterior = model.first_stage_model.encode(torch.stack([it.image for it in items]).to(run.device))
        z = posterior.sample(noise=z_noise[part])
        captions = [it.caption for it in items]
        micro = torch.tensor([(*it.original_size, *it.crop) for it in items], dtype=torch.float32)
        hints = [it.hint for it in items] if run.hints else None
    if tag_seeds is not None:
        captions = [shuffle_tags(c, cfg.keep_tokens, random.Random(s)) for c, s in zip(captions, tag_seeds)]
    dropped = drop[part].tolist()
    captions = ["" if d else c for c, d in zip(captions, dropped)]
    latents = (model.scale_factor * z).to(run.device)
    cond = text_conditioning(run, captions)
    if model.cfg.micro_conditioning:  # SDXL: the vector from the pooled text and the sizes
        rows, sizes = torch.tensor(dropped, device=run.device), training_micro_conditioning(micro, (height, width))
        if "tokens" in cond:  # the text encoders train: `diffusion.TrainedParts` encodes in its forward
            cond |= {"dropped": rows, "micro": sizes}
        else:
            cond = sdxl_conditioning(model.conditioner, cond["crossattn"], cond["pooled"], rows, sizes)
    if hints is not None:
        cond["hint"] = torch.stack(hints).to(run.device)
    return Batch(latents, cond, t[part].to(run.device), noise[part].to(run.device))


def cached_hint(run: Run, row: int) -> torch.Tensor:
    """The control image of the cache's row `row`, read again from the data set (a control image is not encoded, so
    the cache keeps only where each row came from)."""
    hint = run.dataset.hint(run.cache["source"][row])
    if hint is None:
        raise TrainError(f"the control image of item {run.cache['source'][row]} can no longer be read")
    return hint


def training_micro_conditioning(micro: torch.Tensor, target: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rows (original height, width, crop top, left) -> SDXL's micro-conditioning inputs: the target size is the
    batch's (height, width) (the training size, or the bucket); the refiner's aesthetic score is 6 for every image
    (no scores in the data)."""
    b = len(micro)
    return {
        "original_size": micro[:, :2],
        "crop_coords": micro[:, 2:],
        "target_size": torch.tensor([target]).repeat(b, 1),
        "aesthetic_score": torch.full((b, 1), 6.0),
    }


def sdxl_conditioning(
    conditioner, context: torch.Tensor, pooled: torch.Tensor, dropped: torch.Tensor, micro: dict
) -> dict:
    """SDXL's conditioning for training: a dropped caption's text and pooled text are zeros (generative-models'
    `ucg_rate`, as generation conditions on an empty negative prompt); y is the pooled text and the sizes."""
    pooled = pooled.masked_fill(dropped[:, None], 0)
    return {"crossattn": context.masked_fill(dropped[:, None, None], 0), "vector": conditioner.vector(pooled, micro)}


def text_conditioning(run: Run, captions: list[str]) -> dict:
    """The context of the captions (and, SDXL, their pooled text under "pooled"), from the cache when it has them,
    or their tokens (b, k, 77), a row per text encoder, when the text encoders train (they then run inside the
    trained module's forward)."""
    if run.cfg.train_text_encoder:
        return {"tokens": run.model.tokenize(captions)[0]}
    if run.cache and run.cache["embeddings"] is not None:  # (shuffled tags: captions not in the cache)
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
        group["lr"] = get_lr(step, cfg) * group.get("lr_scale", 1.0)
    step_loss = 0.0
    for k in range(cfg.grad_accum):
        first = (run.rank * cfg.grad_accum + k) * run.micro
        synced = run.world == 1 or k == cfg.grad_accum - 1  # one all-reduce per step, after the last micro-batch
        with contextlib.nullcontext() if synced else gradients_kept_local(net):
            batch = make_batch(run, step, slice(first, first + run.micro))
            # Dropout (a LoRA's, a U-Net's) draws from the global generator: seeded per micro-batch, so that resume
            # is exact (with dropout, N processes draw other masks than one does)
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + run.rank * cfg.grad_accum + k)
            loss = diffusion_loss(
                net, batch, run.model.alphas_cumprod, run.model.parameterization, cfg.min_snr_gamma, cfg.min_snr_floor
            )
            loss = loss / cfg.grad_accum
            scaler.scale(loss).backward()
        step_loss += loss.item()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
    if isinstance(norm, DTensor):  # FSDP: the norm over every process's shards, the same on each
        norm = norm.full_tensor()
    if not scaler.is_enabled() and not (math.isfinite(step_loss) and torch.isfinite(norm)):  # fp16: the scaler skips
        raise TrainingDiverged(
            f"step {step + 1}: loss {step_loss:.4g}, gradient norm {norm.item():.4g}: not finite; "
            "the step was not applied and the last checkpoint is the last good one (lower --lr?)"
        )
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


@contextlib.contextmanager
def gradients_kept_local(net: nn.Module):
    """Gradient accumulation's earlier micro-batches: their gradients add up on each process, and are synchronised
    once, with the last one's (DDP's no_sync; FSDP's gradient sync off, so that they add up unsharded)."""
    if not isinstance(net, FSDPModule):
        with net.no_sync():
            yield
        return
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)
