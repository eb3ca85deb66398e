"""Fully sharded data parallel training (`--fsdp`): PyTorch's FSDP2 (`fully_shard`), in which every parameter of the
trained module is a DTensor split along its first dimension over the processes, so that each holds 1/N of the
weights, gradients, optimizer states and EMA. A sharded block gathers its whole weights just before it runs and
frees them after (again for the backward pass), and its gradients are reduce-scattered: each process keeps the
mean gradient of its own shard. The sum over the global batch is the one DDP takes, so the determinism contract
holds (`diffusion.py`: each process takes its slice of every step's draws).

The plan: each U-Net block (input_blocks[i], middle_block, output_blocks[i]; a ControlNet's too) is one unit, the
trained root module (`Trainee.net`) the last, holding what no block holds (the time embedding, the output layer,
a trained text encoder, LoRA adapters). The EMA copy is sharded the same way, so that its update is a local
lerp of shards.

Checkpoints: checkpoints/step-N/ holds `sharded/` (torch.distributed.checkpoint: one file per process and a
.metadata; it can be read back by another number of processes), state.pt (step, scaler, fingerprint) and the
trainee's usual file, gathered whole, as `outdir`'s copy is; written in a temp folder renamed into place, as
`checkpoints.save_checkpoint` does. The processes must share the outdir's file system."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..models.unet import UNetEncoder
from .checkpoints import (
    DamagedCheckpoint,
    Trainee,
    begin_checkpoint,
    finish_checkpoint,
    newest_verified,
    read_state,
    temp_folder,
)
from .config import TrainConfig

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Only what trains is saved: frozen weights are rebuilt by the run's set-up as the first run built them. Loading
# is not strict, or the frozen weights would be missing keys; dcp.load is: each trained key must be in the files
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def sharded_blocks(root: nn.Module) -> list[nn.Module]:
    """The units of the plan below the root: every block of every U-Net and ControlNet in `root`."""
    blocks = []
    for module in root.modules():
        if isinstance(module, UNetEncoder):  # the U-Net's encoder half, and the ControlNet
            blocks += [*module.input_blocks, module.middle_block, *getattr(module, "output_blocks", [])]
    return blocks


def shard(trainee: Trainee, ema: nn.Module | None, device: torch.device, precision: str, groups: list[dict]):
    """Shards the trainee's trained module, and the EMA copy, in place over every process (module docstring);
    returns the optimizer's parameter `groups` with the sharded parameters that replaced theirs.
    bf16 / fp16: the gathered weights are cast for the forward and backward passes; gradients are reduced and the
    shards kept in float32 (the run's autocast stays on, so that the ops autocast keeps in float32 still are)."""
    names = {id(p): name for name, p in trainee.net.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = PRECISIONS.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for module, mp in ((trainee.net, policy), (ema, MixedPrecisionPolicy())):  # the EMA never runs a forward
        if module is None:
            continue
        for block in sharded_blocks(module):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)
    sharded = dict(trainee.net.named_parameters())
    return [{**group, "params": [sharded[names[id(p)]] for p in group["params"]]} for group in groups]


def full_tensors(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The tensors whole, on the CPU of rank 0 (an empty dict elsewhere): each sharded one gathered in turn, so
    that one whole tensor at a time is on the device. Every process must call it, with the same keys."""
    whole = {}
    for key, value in tensors.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if rank == 0:
            whole[key] = value.detach().cpu()
    return whole


def sharded_state(net: nn.Module, optimizer, ema: nn.Module | None) -> dict:
    """The sharded checkpoint's contents: this process's shards of the trained weights, optimizer state and EMA."""
    model, optim = get_state_dict(net, optimizer, options=OPTIONS)
    return {"model": model, "optimizer": optim} | ({"ema": ema.state_dict()} if ema is not None else {})


def save_sharded_checkpoint(
    outdir: Path, step: int, trainee: Trainee, ema, net, optimizer, state: dict, keep: int, rank: int
) -> None:
    """checkpoints/step-NNNNNNN/{sharded/, state.pt, the trainee's file}, atomically (module docstring); the
    trainee's file in outdir too. Every process calls it."""
    tensors = full_tensors(trainee.tensors(ema), rank)
    if rank == 0:
        begin_checkpoint(outdir, step)
    dist.barrier()  # the temp folder exists before anyone writes into it
    tmp = temp_folder(outdir, step)
    try:
        dcp.save(sharded_state(net, optimizer, ema), checkpoint_id=tmp / "sharded")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:  # (dcp.save returns once every process's shard and the metadata are written)
        finish_checkpoint(outdir, step, tmp, trainee, tensors, state, keep)


def restore_sharded(cfg: TrainConfig, outdir: Path, trainee: Trainee, ema, net, optimizer) -> dict | None:
    """On --resume: the state of the newest sharded checkpoint whose files are there, its shards loaded into the
    sharded modules and the optimizer (resharded, if the number of processes changed); else None."""
    if not cfg.resume:
        return None

    def verify(checkpoint: Path) -> dict:
        state = read_state(checkpoint, cfg, trainee, ("step", "scaler", "fingerprint"))
        if not (checkpoint / "sharded" / ".metadata").is_file():
            raise DamagedCheckpoint("sharded/.metadata is missing: not a --fsdp checkpoint, or incomplete")
        return state

    checkpoint, state = newest_verified(outdir, verify, warn=dist.get_rank() == 0)
    saved = sharded_state(net, optimizer, ema)  # filled in place by dcp.load, then set into the modules
    dcp.load(saved, checkpoint_id=checkpoint / "sharded")
    set_state_dict(
        net, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"], options=OPTIONS
    )
    if ema is not None:
        ema.load_state_dict(saved["ema"])
    return state
