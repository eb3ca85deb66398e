"""Stage 2's configuration: one field per `ldm train` flag, the fields a resumed run may change, and every check that
needs nothing but the config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling.parameterization import PARAMETERIZATIONS
from .common import RunConfig, TrainError, check_common


@dataclass
class TrainConfig(RunConfig):
    ckpt: str | None = None  # fine-tune this checkpoint (or train `preset` from scratch)
    parameterization: str | None = None  # from scratch: "eps" or "v" (default: the preset's)
    autoencoder: str | None = None  # first_stage_model.* weights for a from-scratch model (stage 1's output)
    train_text_encoder: bool = False  # needed when the text encoder is new too
    gradient_checkpointing: bool = False  # recompute the U-Net's blocks in the backward pass: less memory, ~30 % slower
    compile: bool = False  # torch.compile the trained modules' forward and backward (COMPILE_BACKEND)
    # batch_size is global: samples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999  # 0: no EMA
    prompt_dropout: float = 0.1
    min_snr_gamma: float | None = None
    min_snr_floor: float = 0.0  # x0-loss weight clamp(SNR, floor, gamma) (parameterization.min_snr_weight)
    offset_noise: float = 0.0
    cache_latents: bool = True  # encode images and captions once; off for random flips
    save_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a small red circle on a blue background"])
    log_every: int = 10
    resume: bool = False
    # LoRA training (`lora.py`): the rank of the adapters; None: a full fine-tune
    lora: int | None = None
    lora_alpha: float | None = None  # α; None: the rank (a scale α/r of 1)
    lora_conv_rank: int | None = None  # LoCon: the ResBlocks' and samplers' 3×3 convolutions too, at this rank
    lora_conv_alpha: float | None = None  # None: lora_conv_rank
    lora_dropout: float = 0.0  # of the adapters' r hidden units (kohya's network_dropout)
    text_encoder_lr: float | None = None  # with --train-text-encoder; None: lr


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


def check_config(cfg: TrainConfig) -> None:
    """Every check that needs nothing but the config: TrainError naming the problem."""
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    check_common(cfg, precisions=("fp32", "bf16", "fp16", "auto"))
    if cfg.max_grad_norm <= 0:  # a negative clipping norm trains backwards, a zero one not at all
        raise TrainError(f"max-grad-norm must be above 0, not {cfg.max_grad_norm:g}")
    if cfg.weight_decay < 0:
        raise TrainError(f"weight-decay must be at least 0, not {cfg.weight_decay:g}")
    if not 0 <= cfg.prompt_dropout <= 1:
        raise TrainError(f"prompt-dropout is a probability, in [0, 1], not {cfg.prompt_dropout:g}")
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
    lora_options = ("lora_alpha", "lora_conv_rank", "lora_conv_alpha", "text_encoder_lr")
    given = [n for n in lora_options if getattr(cfg, n) is not None] + (["lora_dropout"] if cfg.lora_dropout else [])
    if cfg.lora is None and given:
        raise TrainError(f"--{given[0].replace('_', '-')} needs --lora RANK")
    if cfg.flip and cfg.cache_latents:
        raise TrainError("--flip needs --no-cache-latents (cached latents cannot be flipped)")


# Each field's `ldm train` flag help (`common.add_config_arguments` makes a flag of every field)
TRAIN_HELP = {
    "outdir": "folder for checkpoints, log.csv, samples and the final model.safetensors",
    "data": "image folder: NAME.jpg + NAME.txt captions, or a metadata.jsonl (default: the built-in shapes set)",
    "shapes_count": "images in the built-in shapes set",
    "shapes": "the shapes the built-in set draws, comma-separated, each as often (name one twice to draw it twice "
    "as often); star is one the built-in model never saw",
    "image_size": "training resolution in pixels (images are resized and center-cropped)",
    "ckpt": "fine-tune this checkpoint",
    "preset": "train this architecture from scratch (when no --ckpt)",
    "parameterization": "from scratch: what the U-Net predicts, eps or v (default: the preset's)",
    "autoencoder": "first_stage_model weights (from `ldm train-autoencoder`) for a from-scratch model",
    "train_text_encoder": "train the text encoder too (frozen by default; not for SDXL); with --lora: adapters in it",
    "gradient_checkpointing": "recompute the U-Net's activations in the backward pass: less memory, slower steps",
    "compile": "torch.compile the training step's forward and backward (the first step waits for the compilation)",
    "steps": "optimizer steps in all",
    "batch_size": "global batch: samples per optimizer step over all processes and accumulation steps",
    "grad_accum": "gradient accumulation steps",
    "lr": "AdamW learning rate",
    "warmup": "linear learning-rate warm-up steps",
    "lr_schedule": "learning rate after the warm-up: constant, or cosine decay to 0 at the last step",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "precision": "fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler), or auto: bf16 where the device "
    "has native bfloat16 (CUDA since Ampere, CPUs with AVX-512 BF16 or AMX), else fp32",
    "ema_decay": "EMA decay of the U-Net weights, saved as model_ema.* (0: off; a LoRA keeps none)",
    "prompt_dropout": "probability of training on the empty prompt (for classifier-free guidance)",
    "min_snr_gamma": "min-SNR-gamma loss weighting (e.g. 5; default off)",
    "min_snr_floor": "with --min-snr-gamma: the x0 loss's weight is clamp(SNR, floor, gamma), not min(SNR, gamma); "
    "lifts the highest noise levels, where the layout is decided (default 0)",
    "offset_noise": "offset-noise strength (e.g. 0.05; default off)",
    "cache_latents": "encode images and captions once and train from the cache (--no-cache-latents for --flip)",
    "flip": "random horizontal flips (needs --no-cache-latents)",
    "caption_default": "caption for images without one (default: such images are an error)",
    "seed": "seed of the data order, noise and initial weights",
    "save_every": "checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "sample_every": "write sample images every N steps (0: never)",
    "sample_prompts": "prompts of the sample images (repeat the flag for more)",
    "log_every": "log loss and learning rate every N steps",
    "resume": "continue from the last checkpoint in --outdir",
    "lora": "train a LoRA of this rank (kohya's network_dim) on the frozen --ckpt (default: the built-in model) and "
    "write lora.safetensors in kohya's format (default: fine-tune the whole U-Net)",
    "lora_alpha": "LoRA alpha: the adapters' output is scaled by alpha / rank (default: the rank, a scale of 1)",
    "lora_conv_rank": "LoCon: also adapt the ResBlocks' and samplers' 3x3 convolutions, at this rank (default: not)",
    "lora_conv_alpha": "alpha of the 3x3 convolutions' adapters (default: --lora-conv-rank)",
    "lora_dropout": "dropout of the adapters' hidden units while training (kohya's --network_dropout)",
    "text_encoder_lr": "with --lora and --train-text-encoder: the text encoder adapters' learning rate (default: --lr)",
    "device": "auto, cpu, cuda",
    "quiet": "no progress bar",
}
