"""Stage 1 of latent diffusion: train the KL autoencoder that the diffusion model later works inside.

Loss (Rombach et al. 2022, appendix G; CompVis `LPIPSWithDiscriminator` without the perceptual term):
|x − D(z)|₁ (or ²) per pixel + kl_weight·KL(q(z|x) ‖ N(0, I)) per image, plus, after `disc_start` steps,
disc_weight·(−D_patch(x̂)) against a patch-GAN discriminator trained with the hinge loss. Saves the
`first_stage_model.*` weights in the original layout, and reports the reconstruction PSNR on held-out images.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..devices import resolve_device
from ..files import atomic_write, writable_folder
from ..models.autoencoder import AutoencoderKL
from ..models.config import preset
from ..models.family import VAE
from .common import (
    RunConfig,
    TrainError,
    TrainingDiverged,
    build_dataset,
    check_common,
    fast_optimizer_options,
    get_lr,
    resolve_precision,
)
from .config import TRAIN_HELP


@dataclass
class AutoencoderTrainConfig(RunConfig):
    lr: float = 1e-3
    warmup: int = 50
    caption_default: str | None = "-"  # stage 1 needs no captions
    loss: str = "l1"  # or "l2"
    kl_weight: float = 1e-6
    disc_start: int = -1  # step from which the patch-GAN loss is on (-1: never)
    disc_weight: float = 0.5
    holdout: float = 0.05  # share of images kept out of training for the PSNR


# Each field's `ldm train-autoencoder` flag help: `ldm train`'s, and the fields of its own
AUTOENCODER_HELP = {
    **TRAIN_HELP,
    "outdir": "folder for autoencoder.safetensors (first_stage_model.* weights)",
    "preset": "whose autoencoder architecture to train",
    "steps": "optimizer steps",
    "batch_size": "images per step",
    "lr": "Adam learning rate",
    "loss": "reconstruction loss: l1 or l2",
    "precision": "fp32, or bf16 autocast, or auto: bf16 where the device has native bfloat16, else fp32",
    "kl_weight": "weight of the KL term (CompVis: 1e-6)",
    "disc_start": "step from which the patch-GAN discriminator loss is on (-1: never)",
    "disc_weight": "weight of the generator's adversarial loss",
    "holdout": "share of images held out for the reported PSNR",
    "caption_default": "captions are not needed for stage 1; images without one get this",
}


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al. 2017) as CompVis's NLayerDiscriminator: one logit per ~70x70 patch."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        mods = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(width * min(2 ** (i - 1), 8), width * min(2**i, 8), 4, stride, 1, bias=False),
                nn.BatchNorm2d(width * min(2**i, 8)),
                nn.LeakyReLU(0.2),
            ]
        mods.append(nn.Conv2d(width * min(2**layers, 8), 1, 4, 1, 1))
        super().__init__(*mods)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


def autoencoder_loss(
    model: AutoencoderKL,
    disc: nn.Module | None,
    x: torch.Tensor,
    step: int,
    cfg: AutoencoderTrainConfig,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> (loss, the reconstruction x̂, its parts {"rec", "kl", and "gan" once the discriminator is on}):
    rec + kl_weight·KL/pixels, minus disc_weight·D(x̂) from step disc_start (the module docstring's loss)."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
        posterior = model.encode(x)
        x_rec = model.decode(posterior.sample(generator=g)).float()
    rec = ((x_rec - x).abs() if cfg.loss == "l1" else (x_rec - x) ** 2).mean()
    parts = {"rec": rec, "kl": cfg.kl_weight * posterior.kl().mean() / x[0].numel()}
    if disc is not None and step >= cfg.disc_start:
        parts["gan"] = -cfg.disc_weight * disc(x_rec).mean()
    return sum(parts.values()), x_rec, parts


def discriminator_step(disc: nn.Module, opt_d, x: torch.Tensor, x_rec: torch.Tensor) -> float:
    """One step of the hinge loss (Lim & Ye 2017): push D(x) above 1 and D(x̂) below −1."""
    d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_rec.detach())).mean())
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return d_loss.item()


@torch.no_grad()
def held_out_psnr(model: AutoencoderKL, images: torch.Tensor) -> float:
    model.eval()
    rec = torch.cat([model.decode(z) for z in model.encode(images, batch_size=16).mode().split(16)])
    model.train()
    return psnr(rec, images)


def check(cfg: AutoencoderTrainConfig) -> tuple[Path, torch.device]:
    if cfg.loss not in ("l1", "l2"):
        raise TrainError(f"loss must be l1 or l2, not {cfg.loss!r}")
    check_common(cfg, precisions=("fp32", "bf16", "auto"))
    try:
        device = resolve_device(cfg.device)  # first: no folder is made for a run refused over its device
        return writable_folder(cfg.outdir), device
    except ValueError as e:
        raise TrainError(str(e)) from None


def train_autoencoder(cfg: AutoencoderTrainConfig) -> tuple[Path, dict]:
    """-> (outdir/autoencoder.safetensors, {"images": held-out count, "psnr_start": dB, "psnr": dB})."""
    outdir, device = check(cfg)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    # Every colour-shape pair, the held-out ones too: they are held out of the captions, to test whether the
    # denoiser composes words it never saw together. The autoencoder reads no captions, and one that never saw
    # a small white square cannot draw one whatever the denoiser asks (as the SD VAE saw every kind of image).
    dataset = build_dataset(cfg, exclude=frozenset())
    n_holdout = max(1, int(len(dataset) * cfg.holdout))
    n_train = len(dataset) - n_holdout
    if cfg.batch_size > n_train:
        raise TrainError(f"batch size {cfg.batch_size} is larger than the training split ({n_train} images)")
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(preset(cfg.preset).autoencoder).to(device)
    disc = PatchDiscriminator().to(device) if cfg.disc_start >= 0 else None
    fast = fast_optimizer_options(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9), **fast)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), **fast) if disc else None
    g = torch.Generator().manual_seed(cfg.seed)
    flip_rng = random.Random(cfg.seed)
    holdout = [it.image for i in range(n_train, len(dataset)) if (it := dataset.load(i))]
    if not holdout:
        raise TrainError(f"none of the {n_holdout} held-out images can be read, so PSNR cannot be reported")
    holdout = torch.stack(holdout).to(device)
    start_psnr = held_out_psnr(model, holdout)
    bar = tqdm(range(cfg.steps), disable=cfg.quiet, unit="step", desc="train-autoencoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg)
        idx = torch.randint(0, n_train, (cfg.batch_size,), generator=g).tolist()
        items = [it for i in idx if (it := dataset.load(i, rng=flip_rng)) is not None]
        if not items:
            continue
        x = torch.stack([it.image for it in items]).to(device)
        loss, x_rec, parts = autoencoder_loss(model, disc, x, step, cfg, g)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss.item()}; nothing was saved (lower --lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if "gan" in parts:
            discriminator_step(disc, opt_d, x, x_rec)
        if step % 10 == 0:
            bar.set_postfix(rec=f"{parts['rec'].item():.4f}")
    path = outdir / "autoencoder.safetensors"
    tensors = {VAE + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp)
    return path, {"images": n_holdout, "psnr_start": start_psnr, "psnr": held_out_psnr(model, holdout)}
