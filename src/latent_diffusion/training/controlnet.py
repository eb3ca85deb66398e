"""ControlNet training (`ldm train-controlnet`), as Zhang, Rao & Agrawala (2023) and lllyasviel's `cldm` train it.

The ControlNet starts as a copy of the base U-Net's encoder (every weight whose name the U-Net shares: `time_embed`,
`label_emb`, `input_blocks`, `middle_block`, as lllyasviel's `tool_add_control.py` copies them), with its zero
convolutions and the hint block's last convolution at zero: at step 0 its residuals are zero and the base model's
output is unchanged. The base model is frozen (cldm's `sd_locked`); the loss is the base U-Net's usual diffusion
loss (`step.diffusion_loss`), the ControlNet's residuals added to its skips and middle block:

    loss = |f(x_t, t, c, ControlNet(x_t, hint, t, c)) − target|²     target ε or v, as the base model predicts

The run is `ldm train`'s (`diffusion.train`: config, data order, checkpoints, exact resume, DDP under torchrun), with
a `Trainee` that trains the ControlNet and writes it alone, in lllyasviel's original layout (bare keys, which
`weights/controlnet.load_controlnet` and the web UI's ControlNet extension read), the U-Net config in its metadata
(the attention heads, which no weight's shape shows). The data are (image, control image, caption): a folder with a
metadata.jsonl naming each conditioning_image, or the shapes set with each shape's mask (`data.py`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.controlnet import ControlNet
from ..models.ldm import LatentDiffusion
from ..models.unet import UNetModel
from ..weights.checkpoint import BUILTIN_MODEL, load_model, save_tensors
from ..weights.controlnet import CONFIG_METADATA_KEY, check_controlnet_fits, load_controlnet
from ..weights.reader import first_line
from .checkpoints import Trainee
from .common import TrainError
from .config import ControlNetTrainConfig
from .diffusion import train, write_samples

HINT_DOWNSAMPLING = 8  # the hint block's three stride-2 convolutions: control images at 8× the latent's side


def check_controlnet_config(cfg: ControlNetTrainConfig) -> None:
    """The checks that only ControlNet training has (TrainError naming the problem); `ldm train`'s follow."""
    if cfg.train_text_encoder:
        raise TrainError("ControlNet training keeps the base model frozen, its text encoder too")
    if cfg.parameterization or cfg.autoencoder:
        raise TrainError("ControlNet training takes a trained base model (--ckpt), not the parts of a new one")
    if cfg.ema_decay:
        raise TrainError("ControlNet training keeps no EMA (the original layout has no place for one): --ema-decay 0")


def train_controlnet(cfg: ControlNetTrainConfig) -> Path:
    """Train a ControlNet for the frozen `cfg.ckpt`; returns outdir/controlnet.safetensors."""
    check_controlnet_config(cfg)
    return train(cfg, controlnet_trainee, control=True)


def controlnet_from_unet(unet: UNetModel, hint_channels: int = 3) -> ControlNet:
    """A new ControlNet for this U-Net: its encoder a copy of the U-Net's, its zero convolutions and the hint block's
    last convolution at zero, the hint block's other convolutions at PyTorch's default initialisation."""
    controlnet = ControlNet(unet.cfg, hint_channels)
    own, shared = controlnet.state_dict(), unet.state_dict()
    copied = {k: shared[k] for k in own if k in shared}
    new = own.keys() - copied.keys()
    assert all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in new), new
    controlnet.load_state_dict(own | copied, strict=True)
    return controlnet


def start_from(path: str, model: LatentDiffusion) -> ControlNet:
    """A ControlNet file to train on from (TrainError in one line where it is not one for this model's U-Net)."""
    try:
        controlnet = load_controlnet(path, base=model)
        check_controlnet_fits(controlnet, model.cfg)
    except (OSError, ValueError) as e:  # (CheckpointError is a ValueError)
        raise TrainError(f"--controlnet {path}: {first_line(e).replace(f'{path}: ', '')}") from None
    if (channels := controlnet.input_hint_block[0].in_channels) != 3:
        raise TrainError(f"--controlnet {path}: its control images have {channels} channels; the data's have 3")
    for p in controlnet.parameters():  # (a Control-LoRA's unchanged weights are the frozen base's own tensors)
        p.data = p.data.clone()
    return controlnet.train().requires_grad_(True)


class ControlledParts(nn.Module):
    """The trained ControlNet and the frozen U-Net behind its conditioning wrapper, as one module for
    DistributedDataParallel (which synchronises only the parameters that take gradients). Runs under the run's
    autocast."""

    def __init__(self, controlnet: ControlNet, wrapper: nn.Module, autocast: dict):
        super().__init__()
        self.controlnet = controlnet
        self.wrapper = wrapper
        self.autocast = autocast

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """cond: the wrapper's conditioning plus "hint", the control images (b, 3, 8h, 8w) in [0, 1]."""
        cond = dict(cond)
        hint = cond.pop("hint")
        with torch.autocast(**self.autocast):
            control = self.controlnet(x_t, hint, t, cond.get("crossattn"), cond.get("vector"))
            return self.wrapper(x_t, t, cond | {"control": control})


def controlnet_metadata(controlnet: ControlNet) -> dict[str, str]:
    return {"format": "pt", CONFIG_METADATA_KEY: json.dumps({"unet": dataclasses.asdict(controlnet.cfg)})}


def load_base(path) -> LatentDiffusion:
    """The frozen base model; TrainError where its control images would not fit its latents."""
    model = load_model(path).requires_grad_(False)
    if (f := model.cfg.autoencoder.downsampling_factor) != HINT_DOWNSAMPLING:
        raise TrainError(f"{path}: its autoencoder makes latents {f}× smaller, the ControlNet's hint block 8×")
    if model.cfg.unet.in_channels != model.cfg.unet.out_channels:
        raise TrainError(f"{path}: an inpainting model; ControlNet training takes a model of latents alone")
    return model


def square_hints(hints: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Control images of several buckets, resized to the samples' size × size (as the unit's "resize" mode would
    resize them) so that they stack into one batch; those of that size stay as they are."""
    return [
        h if h.shape[-2:] == (size, size) else F.interpolate(h[None], (size, size), mode="bilinear")[0] for h in hints
    ]


def controlnet_trainee(cfg: ControlNetTrainConfig, dataset, autocast: dict) -> Trainee:
    """The Trainee of `diffusion.train`: a new ControlNet beside the frozen base model, written alone."""
    model = load_base(cfg.ckpt or BUILTIN_MODEL)
    model.unet.checkpointing = cfg.gradient_checkpointing
    controlnet = controlnet_from_unet(model.unet) if cfg.controlnet is None else start_from(cfg.controlnet, model)
    metadata = controlnet_metadata(controlnet)

    def load(saved: dict, ema: nn.Module | None) -> None:
        controlnet.load_state_dict({k: saved[k] for k in controlnet.state_dict()})

    def samples(path: Path) -> None:
        """The sample prompts, prompt i with the control image of data item i (cycling)."""
        from ..pipeline.control import unload_control_models
        from ..pipeline.request import ControlUnit

        hints = [dataset.hint(i % len(dataset)) for i in range(len(cfg.sample_prompts))]
        if any(h is None for h in hints):  # a sample must never end a long run
            tqdm.write(f"ldm: warning: no sample images at {path.stem}: a control image cannot be read")
            return
        with tempfile.TemporaryDirectory() as folder:  # generation reads control models from files
            file = Path(folder) / "controlnet.safetensors"
            save_tensors(controlnet.state_dict(), file, metadata, "training")
            unit = ControlUnit(file.stem, torch.stack(square_hints(hints, cfg.image_size)), resize_mode="resize")
            write_samples(model, cfg, path, controls=[unit], controlnets={file.stem: file})
            unload_control_models()  # this file's ControlNet, which no later step asks for again

    return Trainee(
        model=model,
        module=controlnet,
        net=ControlledParts(controlnet, model.model, autocast),
        file_name="controlnet.safetensors",
        tensors=lambda ema: dict(controlnet.state_dict()),
        metadata=lambda tensors: metadata,
        load=load,
        samples=samples,
    )
