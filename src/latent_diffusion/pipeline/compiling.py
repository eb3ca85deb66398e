"""torch.compile for sampling: the U-Net and the VAE decoder compiled in place, once per input shape.

`compile_model` gives the two modules that run per image a compiled forward (`nn.Module.compile`): the module
tree, the parameters and so the state-dict keys stay as they are, and LoRAs merge into the same tensors. The
text encoders run once per prompt and stay eager. Compilation happens on the first call with a new input shape
(batch, latent size) and takes from seconds (tiny models, warm cache) to a minute or more (SD size, cold).

On CUDA the mode is "reduce-overhead": the compiled graphs are replayed as CUDA graphs, which removes the
kernel-launch overhead that dominates a guided step at batch 2. A CUDA graph writes its outputs into the same
memory on every replay; that is safe here because the denoiser turns each U-Net output into a new tensor (the x0
estimate) and the decoder's into the image before the next call. Elsewhere the mode is "default" (inductor's
fused C++/OpenMP kernels on CPU). On a 2-core CPU the compiled SD 1.5 U-Net step was a third slower than eager, in
float32 and in bfloat16 alike (BENCHMARKS.md), so eager is the default and compiling there is for experiments.

Compiled kernels persist across processes in inductor's on-disk caches (FX graph and AOTAutograd caches, on by
default), under `TORCHINDUCTOR_CACHE_DIR` (default: a torchinductor_USER folder in the temp directory): a
second process with the same model and shapes loads them instead of compiling. `cache_dir` sets that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..models.ldm import LatentDiffusion

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_model(
    model: LatentDiffusion, cache_dir: str | Path | None = None, backend: str = "inductor"
) -> LatentDiffusion:
    """Compile `model`'s U-Net and VAE decoder in place (idempotent); returns the model. cache_dir: where the
    compiled kernels are kept across processes (default: inductor's, or $TORCHINDUCTOR_CACHE_DIR). backend:
    torch.compile's ("aot_eager" traces the same graphs without generating kernels: the tests' fast check)."""
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(Path(cache_dir).resolve())  # read by inductor when it first needs the folder
    options = {"mode": compile_mode(model.device)} if backend == "inductor" else {}
    for module in (model.unet, model.first_stage_model.decoder):
        if not is_compiled(module):  # static shapes: one graph per shape, the fastest kernels
            module.compile(backend=backend, dynamic=False, **options)
    return model
