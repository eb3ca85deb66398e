"""Stage 2's optimizer (`--optimizer`): torch's AdamW, or bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization"), which keeps Adam's two moments in 8 bits, quantized per block of 256
values with the block's absolute maximum: 2 bytes per parameter instead of 8. Tensors under 4096 values keep 32-bit
states (bitsandbytes' `min_8bit_size`). Both save and load their state as a torch optimizer does, so that resume is
exact either way.

bitsandbytes is optional; `check_optimizer` runs before any work, so that a run it cannot serve (no package, a
device without its 8-bit kernels) stops with one line."""

from __future__ import annotations

import logging

import torch

from .common import TrainError, fast_optimizer_options


def import_bitsandbytes():
    """The bitsandbytes package, or TrainError saying how to get it."""
    # On CPUs with AVX-512 BF16 its import tries to fetch a 4-bit matmul kernel from a hub and logs a warning when
    # it cannot; training uses none of its matmuls, so that warning is noise here.
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise TrainError("--optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def check_optimizer(name: str, device: torch.device) -> None:
    """TrainError unless `name` can run on `device`: for adamw8bit, one step of AdamW8bit on a tensor just big
    enough for 8-bit states, since which devices a bitsandbytes release serves varies (CUDA, ROCm, XPU; CPU
    since 0.48)."""
    if name != "adamw8bit":
        return
    bnb = import_bitsandbytes()
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe]).step()
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(
            f"--optimizer adamw8bit: bitsandbytes {bnb.__version__} has no 8-bit AdamW for device {device} ({reason})"
        ) from None


def build_optimizer(
    name: str, groups: list[dict], lr: float, weight_decay: float, device: torch.device, sharded_scaler: bool = False
):
    """The optimizer over the parameter groups (each group's "lr_scale" stays a key of its group). sharded_scaler:
    fp16 under FSDP, whose gradient scaler hands a fused AdamW an overflow flag of another shape (1,) than its
    step counts' (): foreach there, which the scaler skips by itself."""
    if name == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    options = {"foreach": True} if sharded_scaler else fast_optimizer_options(device)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **options)
