"""Stage 2's configuration: one field per `ldm train` flag, the fields a resumed run may change, and every check that
needs nothing but the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..sampling.parameterization import PARAMETERIZATIONS
from .buckets import BucketSpec
from .common import RunConfig, TrainError, check_common

OPTIMIZERS = ("adamw", "adamw8bit")
SAVE_PRECISIONS = {"float": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # kohya's names -> the file's dtype


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
    # the cached latents in files under outdir/cache/ (`latent_cache.py`), read back by later runs and resumes
    cache_latents_to_disk: bool = False
    # each distinct caption's text embedding in a file under outdir/cache/text/ (`latent_cache.py`)
    cache_text_encoder_outputs_to_disk: bool = False
    # Aspect-ratio buckets (`buckets.py`, kohya's --enable_bucket): each image at its own shape within image_size²
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False  # each image its own bucket, never enlarged
    # Kohya's tag shuffling: the caption's comma-separated tags shuffled each step, the first keep_tokens in place
    shuffle_caption: bool = False
    keep_tokens: int = 0
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
    lora_rank_dropout: float = 0.0  # of whole ranks per sample (kohya's rank_dropout)
    lora_module_dropout: float = 0.0  # of whole adapters per forward (kohya's module_dropout)
    text_encoder_lr: float | None = None  # with --train-text-encoder; None: lr
    optimizer: str = "adamw"  # or "adamw8bit": bitsandbytes' AdamW with 8-bit states (`optimizers.py`)
    fsdp: bool = False  # shard weights, gradients and optimizer states over the processes (`fsdp.py`)
    # the numbers of the file written to outdir (kohya's --save_precision); checkpoints keep float32 to resume exactly
    save_precision: str = "float"


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
    "cache_latents_to_disk",  # the same latents, bit for bit, from files or from memory
    "cache_text_encoder_outputs_to_disk",  # (the same embeddings)
    "save_precision",  # (the checkpoints it resumes from are float32 whatever it is)
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
    dropouts = ("lora_dropout", "lora_rank_dropout", "lora_module_dropout")
    given = [n for n in lora_options if getattr(cfg, n) is not None] + [n for n in dropouts if getattr(cfg, n)]
    if cfg.lora is None and given:
        raise TrainError(f"--{given[0].replace('_', '-')} needs --lora RANK")
    if cfg.flip and cfg.cache_latents:
        raise TrainError("--flip needs --no-cache-latents (cached latents cannot be flipped)")
    check_buckets(cfg)
    if cfg.keep_tokens < 0:
        raise TrainError(f"keep-tokens must be at least 0, not {cfg.keep_tokens}")
    if cfg.keep_tokens and not cfg.shuffle_caption:
        raise TrainError("--keep-tokens needs --shuffle-caption")
    check_memory_options(cfg)


def check_memory_options(cfg: TrainConfig) -> None:
    """The checks of the flags that train past one device's memory (--optimizer, --fsdp, --cache-latents-to-disk,
    and what --fsdp does not combine with) and of --save-precision."""
    if cfg.save_precision not in SAVE_PRECISIONS:
        raise TrainError(f"--save-precision must be one of {', '.join(SAVE_PRECISIONS)}, not {cfg.save_precision!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")
    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        raise TrainError("--cache-latents-to-disk needs --cache-latents (it is off: --no-cache-latents or --flip)")
    if cfg.cache_text_encoder_outputs_to_disk and (
        cfg.train_text_encoder or cfg.shuffle_caption or not cfg.cache_latents
    ):
        raise TrainError(
            "--cache-text-encoder-outputs-to-disk needs the cache (--cache-latents) and captions encoded once: not "
            "with --train-text-encoder or --shuffle-caption"
        )
    if not cfg.fsdp:
        return
    if cfg.lora_module_dropout:  # each process leaves out other adapters; a sharded reduction needs the same grads
        raise TrainError("--lora-module-dropout does not combine with --fsdp (each process would leave out others)")
    if cfg.optimizer == "adamw8bit":  # bitsandbytes keeps its 8-bit states per whole tensor, not per shard
        raise TrainError("--optimizer adamw8bit does not combine with --fsdp (its 8-bit states are not sharded)")
    if cfg.compile:
        raise TrainError("--compile does not combine with --fsdp yet")
    if cfg.sample_every:  # a sample needs every process (each holds a shard), and samples are drawn on one
        raise TrainError("--sample-every does not combine with --fsdp: sample the checkpoints with ldm txt2img")


BUCKET_FIELDS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


def check_buckets(cfg: TrainConfig) -> None:
    """The bucket flags' checks: TrainError naming the problem."""
    if not cfg.enable_bucket:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        if given := [n for n in BUCKET_FIELDS if getattr(cfg, n) != defaults[n]]:
            raise TrainError(f"--{given[0].replace('_', '-')} needs --enable-bucket")
        return
    steps, low, high = cfg.bucket_reso_steps, cfg.min_bucket_reso, cfg.max_bucket_reso
    if steps < 8 or steps % 8:  # the autoencoder makes latents 8× smaller: a bucket must map onto whole latents
        raise TrainError(f"bucket-reso-steps must be a positive multiple of 8, not {steps}")
    if low > high:
        raise TrainError(f"min-bucket-reso {low} is above max-bucket-reso {high}")
    # image-size too: its square is then a bucket, and square images (the shapes') train as without buckets
    for name, value in (("min-bucket-reso", low), ("max-bucket-reso", high), ("image-size", cfg.image_size)):
        if value <= 0 or value % steps:
            raise TrainError(f"{name} must be a positive multiple of bucket-reso-steps {steps}, not {value}")
    if not low <= cfg.image_size <= high:
        raise TrainError(
            f"image-size {cfg.image_size} must lie between min-bucket-reso {low} and max-bucket-reso {high}"
        )


def bucket_spec(cfg: TrainConfig) -> BucketSpec | None:
    """The run's buckets, or None when bucketing is off."""
    if not cfg.enable_bucket:
        return None
    return BucketSpec(
        image_size=cfg.image_size,
        min_reso=cfg.min_bucket_reso,
        max_reso=cfg.max_bucket_reso,
        steps=cfg.bucket_reso_steps,
        no_upscale=cfg.bucket_no_upscale,
    )


# Each field's `ldm train` flag help (`common.add_config_arguments` makes a flag of every field)
TRAIN_HELP = {
    "outdir": "folder for checkpoints, log.csv, samples and the final model.safetensors",
    "data": "image folder: NAME.jpg + NAME.txt (or NAME.caption) captions, or a metadata.jsonl (default: the built-in "
    "shapes set)",
    "shapes_count": "images in the built-in shapes set",
    "positions": "where the built-in set draws its shapes, comma-separated, each as often (name one twice to draw "
    "there twice as often): left, right, top, bottom, center, and the corners the built-in model never saw, top "
    "left, top right, bottom left, bottom right",
    "image_size": "training resolution in pixels (images are resized and center-cropped; with --enable-bucket, "
    "the pixel budget image-size²)",
    "ckpt": "fine-tune this checkpoint",
    "preset": "train this architecture from scratch (when no --ckpt)",
    "parameterization": "from scratch: what the U-Net predicts, eps or v (default: the preset's)",
    "autoencoder": "first_stage_model weights (from `ldm train-autoencoder`) for a from-scratch model",
    "train_text_encoder": "train the text encoder too (SDXL: both; frozen by default); with --lora: adapters in it",
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
    "cache_latents_to_disk": "keep the cached latents in files under OUTDIR/cache/, one per image (kohya's flag): "
    "each image is encoded once, by the first run, and read from there by later runs and resumes, not held in "
    "memory; a changed image or autoencoder is encoded again",
    "cache_text_encoder_outputs_to_disk": "keep each caption's text embedding in a file under OUTDIR/cache/text/ "
    "(kohya's flag), read a batch at a time, not held in memory (SDXL: 0.6 MB a caption); a text encoder changed is "
    "encoded again",
    "flip": "random horizontal flips (needs --no-cache-latents)",
    "enable_bucket": "aspect-ratio buckets (kohya's --enable_bucket): each image resized to cover the bucket of "
    "its nearest aspect ratio within image-size² pixels and center-cropped to it, not to a square",
    "min_bucket_reso": "with --enable-bucket: the smallest bucket side in pixels",
    "max_bucket_reso": "with --enable-bucket: the largest bucket side in pixels",
    "bucket_reso_steps": "with --enable-bucket: bucket sides are multiples of this (a multiple of 8)",
    "bucket_no_upscale": "with --enable-bucket: each image its own bucket, its size scaled down (never up) to "
    "image-size² and rounded down to --bucket-reso-steps",
    "shuffle_caption": "shuffle each caption's comma-separated tags every step (kohya's --shuffle_caption; the "
    "captions are then encoded every step, not cached)",
    "keep_tokens": "with --shuffle-caption: keep the first N tags in place",
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
    "lora_rank_dropout": "dropout of whole ranks per sample while training, the rest scaled up (kohya's rank_dropout)",
    "lora_module_dropout": "probability of leaving a whole adapter out of a step's forward (kohya's module_dropout)",
    "text_encoder_lr": "with --lora and --train-text-encoder: the text encoder adapters' learning rate (default: --lr)",
    "optimizer": "adamw, or adamw8bit: bitsandbytes' AdamW8bit, its moments in 8 bits (about a quarter of AdamW's "
    "state memory; needs the bitsandbytes package and a device it supports)",
    "fsdp": "fully sharded data parallel (FSDP2) under torchrun: each process holds 1/N of the trained weights, "
    "gradients and optimizer states (and EMA); checkpoints are sharded (torch.distributed.checkpoint), the final "
    "file whole",
    "save_precision": "the numbers of the file written to --outdir: float (float32), fp16 or bf16, half the size "
    "(kohya's --save_precision); the checkpoints keep float32, so that --resume is exact",
    "device": "auto, cpu, cuda",
    "quiet": "no progress bar",
}


@dataclass
class ControlNetTrainConfig(TrainConfig):
    ckpt: str | None = None  # the frozen base model (default: the built-in model)
    controlnet: str | None = None  # a ControlNet of the base model's U-Net to start from (default: a new one)
    prompt_dropout: float = 0.5  # the paper's 50 %: the ControlNet learns to read the control image without a prompt
    ema_decay: float = 0.0  # cldm keeps no EMA (use_ema: False), and the original layout has no place for one
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: ["a red circle on a blue background"])


# `ldm train`'s fields that make no sense with a frozen base model: not flags of `ldm train-controlnet`
NOT_FLAGS = (
    "preset",
    "parameterization",
    "autoencoder",
    "train_text_encoder",
    "lora",
    "lora_alpha",
    "lora_conv_rank",
    "lora_conv_alpha",
    "lora_dropout",
    "lora_rank_dropout",
    "lora_module_dropout",
    "text_encoder_lr",
)

CONTROLNET_HELP = {
    **TRAIN_HELP,
    "outdir": "folder for checkpoints, log.csv, samples and the final controlnet.safetensors",
    "data": "image folder with a metadata.jsonl of file_name, conditioning_image and text per line "
    "(default: the built-in shapes set, each shape's mask its control image)",
    "ckpt": "the base model, frozen (default: the built-in model)",
    "controlnet": "a ControlNet file of the base model's U-Net to go on training (fine-tuning; any layout generation "
    "loads; default: a new one, the U-Net's encoder copied, its zero convolutions at zero)",
    "prompt_dropout": "probability of training on the empty prompt (the paper's 0.5)",
    "ema_decay": "EMA of the ControlNet's weights: not kept (0), as lllyasviel's cldm",
    "sample_prompts": "prompts of the sample images, each with the control image of one of the first data items",
}
