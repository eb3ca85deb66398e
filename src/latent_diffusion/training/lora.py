"""LoRA training (`ldm train --lora RANK`), as kohya-ss's sd-scripts trains one (`networks/lora.py`), written as its
files are, so that the result loads in the web UI, in diffusers' `load_lora_weights` and in `<lora:...>` here.

The base model is frozen; beside each adapted layer W (Linear or Conv2d) an adapter of rank r learns

    h = W x + (α / r) · up(dropout(down(x)))        down: in -> r (the layer's kernel, stride and padding),
                                                     up: r -> out (1×1), zero at the start: the model is unchanged

which is the layer W + (α/r)·up·down that `weights/lora.py` merges. down starts at PyTorch's default initialisation
(Kaiming uniform, a = √5) and up at zero, as kohya's. While training, three dropouts as kohya's: `--lora-dropout`
(its `network_dropout`) drops the r hidden units elementwise; `--lora-rank-dropout` (its `rank_dropout`) drops
whole ranks per sample, the output then scaled by 1/(1 − p) as if the rank were smaller; `--lora-module-dropout`
(its `module_dropout`) leaves out a whole adapter for a step's forward.

Which layers, as kohya chooses them:
- the U-Net's transformer blocks (Transformer2DModel): every Linear and 1×1 convolution in them (proj_in, the
  attention projections, the feed-forward, proj_out), at rank r;
- with `--lora-conv-rank` (LoCon, kohya's `conv_dim`): also the ResBlocks, downsamplers and upsamplers: their
  3×3 convolutions at that rank, their Linear and 1×1 layers (time embedding projection, skip) at rank r;
- with `--train-text-encoder`: the text encoder's attention (q, k, v, out) and MLP (fc1, fc2) layers, at rank r and
  `--text-encoder-lr`. OpenCLIP's fused q, k, v (SD 2.x) take one adapter each, in their thirds of `in_proj`, as
  kohya's transformers CLIPTextModel has them apart; SD 2.x's last block, which its context skips, takes none.
  SDXL: both text encoders (`lora_te1_`, `lora_te2_`), trained through the context and the pooled text.

Names are kohya's: `lora_unet_<diffusers path>` (SD 1.x, 2.x) or `lora_unet_<generative-models path>` (SDXL, as
kohya's SDXL U-Net names its modules), `lora_te_<transformers path>` (SDXL `lora_te1_`, `lora_te2_`), `.` written
`_`, then `.lora_down.weight`, `.lora_up.weight` and `.alpha`. The adapters sit in a module whose state dict is
that file; they reach the frozen layers through forward hooks, so the model's module tree and keys do not change.
The run is `ldm train`'s (`diffusion.train`: data, resume, DDP under torchrun), with a `Trainee` that trains the
adapters alone and writes them with kohya's `ss_*` metadata and the `sshs_*` hashes the web UI reads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ldm import LatentDiffusion
from ..models.spatial_transformer import SpatialTransformer
from ..models.text_encoder import MultiheadSelfAttention
from ..weights.checkpoint import BUILTIN_MODEL, load_model
from ..weights.lora import RESBLOCK, unet_blocks
from .checkpoints import Trainee
from .common import TrainError
from .config import TrainConfig
from .diffusion import TrainedParts, text_part, train, write_samples


class Adapter(nn.Module):
    """One layer's LoRA: (α/r)·up(dropout(down(x))), added to the frozen layer's output (module docstring)."""

    def __init__(self, layer: nn.Module, out_features: int, rank: int, alpha: float, dropouts: Dropouts):
        super().__init__()
        if isinstance(layer, nn.Conv2d):  # down: the layer's own kernel, stride, padding; up: 1×1
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            self.lora_down = nn.Conv2d(layer.in_channels, rank, k, s, p, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # kohya keeps α in the file, beside the pair
        self.scale = alpha / rank
        self.dropouts = dropouts

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """(α/r)·up(down(x)), or None where module dropout leaves the adapter out of this forward."""
        d = self.dropouts
        if self.training and d.module and torch.rand(1) < d.module:
            return None
        h = F.dropout(self.lora_down(x), d.hidden, self.training)  # (b, ..., r) or (b, r, h, w)
        scale = self.scale
        if self.training and d.rank:  # a mask per sample and rank (kohya draws (b, r)), placed on the rank axis
            keep = torch.rand(h.shape[0], h.shape[-1 if h.ndim == 3 else 1], device=h.device) > d.rank
            h = h * (keep[:, None] if h.ndim == 3 else keep[..., None, None] if h.ndim == 4 else keep)
            scale = scale / (1 - d.rank)
        return self.lora_up(h) * scale


@dataclasses.dataclass(frozen=True)
class Dropouts:
    """kohya's three LoRA dropouts (module docstring): probabilities, 0 for none."""

    hidden: float = 0.0  # network_dropout
    rank: float = 0.0  # rank_dropout
    module: float = 0.0  # module_dropout


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # kohya's: "lora_unet_down_blocks_0_attentions_0_proj_in"
    module: str  # the adapted layer's path in the model
    rank: int
    alpha: float
    text: bool = False  # a text encoder's (its own learning rate)
    third: int | None = None  # q, k or v (0, 1, 2) of OpenCLIP's fused in_proj


def lora_targets(model: LatentDiffusion, cfg: TrainConfig) -> list[Target]:
    """The layers kohya's networks/lora.py adapts, with its names (module docstring)."""
    rank, alpha = cfg.lora, cfg.lora_alpha or cfg.lora
    conv_rank, conv_alpha = cfg.lora_conv_rank, cfg.lora_conv_alpha or cfg.lora_conv_rank
    unet = model.model.diffusion_model
    sgm_names = bool(model.cfg.micro_conditioning)  # kohya's SDXL U-Net keeps generative-models' module names
    targets = []
    for theirs, ours in unet_blocks(model.cfg.unet).items():
        block = unet.get_submodule(ours)
        resnet_or_sampler = ".resnets." in theirs or "samplers." in theirs
        if not (isinstance(block, SpatialTransformer) or (conv_rank and resnet_or_sampler)):
            continue
        for inner, layer in block.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{ours}.{inner}" if inner else ours
            name = path if sgm_names else f"{theirs}.{RESBLOCK.get(inner, inner)}" if inner else theirs
            small = isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)
            r, a = (rank, alpha) if small else (conv_rank, conv_alpha)
            targets.append(Target("lora_unet_" + name.replace(".", "_"), f"model.diffusion_model.{path}", r, a))
    if cfg.train_text_encoder:
        where = {id(module): name for name, module in model.named_modules()}
        encoders = model.text_encoders
        for i, encoder in enumerate(encoders):
            prefix = f"lora_te{i + 1}_" if len(encoders) > 1 else "lora_te_"
            targets += text_targets(encoder, where[id(encoder)], prefix, rank, alpha)
    return targets


def text_targets(encoder, at: str, prefix: str, rank: int, alpha: float) -> list[Target]:
    """A text encoder's attention and MLP layers by transformers' CLIPTextModel names (kohya's CLIPAttention and
    CLIPMLP modules), in the blocks of the encoder as kohya builds it: SD 2.x's without its last block, which the
    context skips (kohya's converter drops it); SDXL's whole (ViT-L's last block is unread, as in kohya's file)."""
    text, kohya = encoder.cfg, []
    # SD 2.x: 23 of OpenCLIP ViT-H's 24 (a file converted from diffusers has the 23 alone, read to the last)
    used = text.layers - (text.kind == "openclip" and not text.pooled and text.layer == "penultimate")
    for i in range(used):
        theirs = f"{prefix}text_model_encoder_layers_{i}_"
        if text.kind == "clip":
            ours = f"{at}.transformer.text_model.encoder.layers.{i}"
            names = {
                "self_attn_q_proj": "self_attn.q_proj",
                "self_attn_k_proj": "self_attn.k_proj",
                "self_attn_v_proj": "self_attn.v_proj",
                "self_attn_out_proj": "self_attn.out_proj",
                "mlp_fc1": "mlp.fc1",
                "mlp_fc2": "mlp.fc2",
            }
            kohya += [Target(theirs + k, f"{ours}.{v}", rank, alpha, text=True) for k, v in names.items()]
        else:
            ours = f"{at}.model.transformer.resblocks.{i}"
            kohya += [
                Target(f"{theirs}self_attn_{x}_proj", f"{ours}.attn", rank, alpha, True, j) for j, x in enumerate("qkv")
            ]
            names = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}
            kohya += [Target(theirs + k, f"{ours}.{v}", rank, alpha, text=True) for k, v in names.items()]
    return kohya


class LoRANetwork(nn.Module):
    """The adapters by kohya name: `state_dict()` is the kohya file. `attach` hooks them into the model's layers,
    `detach` takes them out again."""

    def __init__(self, model: LatentDiffusion, targets: list[Target], dropouts: Dropouts = Dropouts()):
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.adapters = nn.ModuleDict()
        for t in targets:
            layer = model.get_submodule(t.module)
            if t.third is not None:  # one third of OpenCLIP's fused q, k, v projection
                width = layer.in_proj_weight.shape[1]
                self.adapters[t.name] = Adapter(
                    nn.Linear(width, width, bias=False, device="meta"), width, t.rank, t.alpha, dropouts
                )
            else:
                out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
                self.adapters[t.name] = Adapter(layer, out, t.rank, t.alpha, dropouts)
        self.hooks: list = []
        self.fused: list[MultiheadSelfAttention] = []

    def state_dict(self, *args, **kwargs):
        """kohya's keys: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`."""
        return {k.removeprefix("adapters."): v for k, v in super().state_dict(*args, **kwargs).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict({f"adapters.{k}": v for k, v in state_dict.items()}, strict, assign)

    def attach(self, model: LatentDiffusion) -> None:
        thirds: dict[str, list[Adapter]] = {}
        for name, adapter in self.adapters.items():
            t = self.targets[name]
            if t.third is not None:
                thirds.setdefault(t.module, [None] * 3)[t.third] = adapter
            else:
                self.hooks.append(model.get_submodule(t.module).register_forward_hook(_adds(adapter)))
        for path, (q, k, v) in thirds.items():
            attention = model.get_submodule(path)
            fused = type(attention).in_proj.__get__(attention)  # the class's own, before this instance's is set
            attention.in_proj = functools.partial(_adds_thirds, fused, (q, k, v))
            self.fused.append(attention)

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for attention in self.fused:
            del attention.in_proj
        self.hooks, self.fused = [], []


def _adds(adapter: Adapter):
    def hook(layer, args, out):
        delta = adapter(args[0])
        return out if delta is None else out + delta.to(out.dtype)

    return hook


def _adds_thirds(fused, thirds: tuple[Adapter, Adapter, Adapter], x: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's fused q, k, v projection of x (..., width) -> (..., 3·width), each third with its adapter's output
    (none where module dropout leaves it out)."""
    out = fused(x)
    deltas = [adapter(x) for adapter in thirds]
    if all(d is None for d in deltas):
        return out
    zeros = out.new_zeros(*out.shape[:-1], out.shape[-1] // 3)
    return out + torch.cat([zeros if d is None else d.to(out.dtype) for d in deltas], -1)


def check_lora_config(cfg: TrainConfig) -> None:
    """The checks only LoRA training has (TrainError naming the problem); `ldm train`'s follow."""
    for name in ("lora", "lora_conv_rank"):
        if (rank := getattr(cfg, name)) is not None and rank < 1:
            raise TrainError(f"--{name.replace('_', '-')} is a rank, at least 1, not {rank}")
    for name in ("lora_alpha", "lora_conv_alpha", "text_encoder_lr"):
        if (value := getattr(cfg, name)) is not None and not (math.isfinite(value) and value > 0):
            raise TrainError(f"--{name.replace('_', '-')} must be above 0, not {value:g}")
    for name in ("lora_dropout", "lora_rank_dropout", "lora_module_dropout"):
        if not 0 <= (p := getattr(cfg, name)) < 1:
            raise TrainError(f"--{name.replace('_', '-')} is a probability, in [0, 1), not {p:g}")
    if cfg.parameterization or cfg.autoencoder:
        raise TrainError("LoRA training adapts a trained model (--ckpt), not the parts of a new one")


def check_ranks(model: LatentDiffusion, targets: list[Target]) -> None:
    """A rank no larger than the smallest layer it adapts (a LoRA of full rank is a fine-tune, and costs more)."""
    for t in targets:
        layer = model.get_submodule(t.module)
        width = layer.in_proj_weight.shape[1] if t.third is not None else min(layer.weight.shape[:2])
        if t.rank > width:
            flag = "--lora-conv-rank" if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else "--lora"
            raise TrainError(f"{flag} {t.rank} is above the width {width} of {t.name}: at most {width}")


def train_lora(cfg: TrainConfig) -> Path:
    """Train a LoRA for the frozen `cfg.ckpt` (default: the built-in model); returns outdir/lora.safetensors.
    A LoRA keeps no EMA (kohya's keeps none): `ema_decay` is 0."""
    if cfg.lora is None:
        raise TrainError("LoRA training needs --lora RANK")
    check_lora_config(cfg)
    return train(dataclasses.replace(cfg, ema_decay=0.0), lora_trainee)


def lora_trainee(cfg: TrainConfig, dataset, autocast: dict) -> Trainee:
    """The Trainee of `diffusion.train`: adapters beside the frozen model, written alone in kohya's format."""
    model = load_model(cfg.ckpt or BUILTIN_MODEL).requires_grad_(False)
    if any(p.dtype == torch.uint8 for p in model.parameters()):
        raise TrainError(f"{cfg.ckpt}: a GGUF model holds quantized weights; LoRA training needs a float checkpoint")
    model.unet.checkpointing = cfg.gradient_checkpointing
    targets = lora_targets(model, cfg)
    check_ranks(model, targets)
    network = LoRANetwork(model, targets, Dropouts(cfg.lora_dropout, cfg.lora_rank_dropout, cfg.lora_module_dropout))
    network.attach(model)
    text = [p for name, p in network.adapters.named_parameters() if network.targets[name.split(".")[0]].text]
    unet = [p for name, p in network.adapters.named_parameters() if not network.targets[name.split(".")[0]].text]
    scale = (cfg.text_encoder_lr or cfg.lr) / cfg.lr
    started = time.time()

    def load(saved: dict, ema) -> None:
        network.load_state_dict({k: saved[k] for k in network.state_dict()})

    def samples(path: Path) -> None:
        network.eval()  # no dropout: the samples show the LoRA at weight 1 (training mode comes back after them)
        write_samples(model, cfg, path)  # (the adapters are hooked in)

    return Trainee(
        model=model,
        module=network,
        net=TrainedParts(model.model, text_part(model) if cfg.train_text_encoder else None, autocast, network),
        file_name="lora.safetensors",
        tensors=lambda ema: network.state_dict(),
        metadata=lambda tensors: kohya_metadata(cfg, model, dataset, tensors, started),
        load=load,
        samples=samples,
        param_groups=[{"params": unet}] + ([{"params": text, "lr_scale": scale}] if text else []),
    )


# The file's metadata, as kohya's train_network.py writes it -------------------------------------------------------


def base_model_version(model: LatentDiffusion) -> str:
    """kohya's `ss_base_model_version`: sd_v1, sd_v2 (sd_v2_v for v-prediction), sdxl_base_v1-0."""
    if model.cfg.micro_conditioning:  # (kohya trains no refiner LoRA: it has no version string of its own)
        return "sdxl_base_v1-0"
    version = "sd_v2" if model.cfg.family.name == "sd2" else "sd_v1"
    return version + ("_v" if model.parameterization == "v" else "")


def tag_frequency(dataset, folder: str) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per image folder, how many captions hold each comma-separated tag."""
    captions = [c for _, c, _ in dataset.items] if hasattr(dataset, "items") else dataset.captions
    counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return {folder: dict(counts)}


# kohya's modelspec architecture per family (its sai_model_spec constants)
MODELSPEC_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}


def network_args(cfg: TrainConfig) -> dict[str, str]:
    """kohya's `--network_args` that the run used, as `ss_network_args` holds them: LoCon's conv_dim and conv_alpha,
    rank_dropout and module_dropout."""
    args = {"conv_dim": cfg.lora_conv_rank, "conv_alpha": cfg.lora_conv_alpha or cfg.lora_conv_rank}
    args = args if cfg.lora_conv_rank else {}
    args |= {"rank_dropout": cfg.lora_rank_dropout, "module_dropout": cfg.lora_module_dropout}
    return {name: str(value) for name, value in args.items() if value}


def kohya_metadata(cfg: TrainConfig, model: LatentDiffusion, dataset, tensors: dict, started: float) -> dict:
    """kohya's `ss_*` training metadata, the modelspec fields it writes, and the `sshs_*` hashes of these tensors:
    the web UI's "addnet" hash (SHA-256 of the safetensors data after the header, written with the `ss_*` fields
    alone, which the web UI shows and matches) and the legacy one (64 KiB at 1 MiB)."""
    sdxl = bool(model.cfg.micro_conditioning)
    args = network_args(cfg)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora),
        "ss_network_alpha": str(float(cfg.lora_alpha or cfg.lora)),
        "ss_network_args": json.dumps(args) if args else "null",
        "ss_network_dropout": str(cfg.lora_dropout) if cfg.lora_dropout else "None",
        "ss_base_model_version": base_model_version(model),
        "ss_v2": str(model.cfg.family.name == "sd2"),
        "ss_sd_model_name": Path(cfg.ckpt or BUILTIN_MODEL).name,
        "ss_resolution": str((cfg.image_size, cfg.image_size)),
        "ss_num_train_images": str(len(dataset)),
        "ss_tag_frequency": json.dumps(tag_frequency(dataset, Path(cfg.data).name if cfg.data else "shapes")),
        "ss_learning_rate": str(cfg.lr),
        "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.lr) if cfg.train_text_encoder else "None",
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_max_train_steps": str(cfg.steps),
        "ss_lr_warmup_steps": str(cfg.warmup),
        "ss_lr_scheduler": cfg.lr_schedule,
        "ss_total_batch_size": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(cfg.precision, "no"),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.offset_noise or None),
        "ss_seed": str(cfg.seed),
        "ss_caption_dropout_rate": str(cfg.prompt_dropout),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_min_bucket_reso": str(cfg.min_bucket_reso) if cfg.enable_bucket else "None",
        "ss_max_bucket_reso": str(cfg.max_bucket_reso) if cfg.enable_bucket else "None",
        "ss_bucket_no_upscale": str(cfg.bucket_no_upscale),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": Path(cfg.outdir).name,
        "ss_training_comment": "trained by latent_diffusion (ldm train --lora)",
    }
    serialized = serialized_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    header = 8 + int.from_bytes(serialized[:8], "little")
    return {
        **metadata,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES[model.cfg.family.name] + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": Path(cfg.outdir).name,
        "modelspec.resolution": f"{cfg.image_size}x{cfg.image_size}",
        "modelspec.prediction_type": "v" if model.parameterization == "v" else "epsilon",
        "sshs_model_hash": hashlib.sha256(serialized[header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8],
    }


def serialized_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """These tensors as a .safetensors file with this metadata, in memory."""
    from safetensors.torch import save

    return save(tensors, metadata)
