"""What is loaded for generation, and where each part came from: the model, a refiner, a separate VAE file, the
textual-inversion embeddings and the LoRA files that prompts may name. The `nn.Module`s hold weights and maths only;
the infotext's model name and hashes, and the names a prompt may use, come from here.

`load_pipeline` builds one for the command line, the server (once per checkpoint it switches to), evaluation and
training samples alike. The next parts (ControlNets, T2I-Adapters, upscalers) are more fields here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.ldm import LatentDiffusion
from ..prompts.styles import Style
from ..weights.checkpoint import load_model, load_vae
from ..weights.embeddings import Embedding, load_embeddings
from .compiling import compile_model


@dataclass
class Pipeline:
    model: LatentDiffusion
    checkpoint: Path | None = None  # the file the model was read from (the infotext names and hashes it)
    vae_file: Path | None = None  # a separate autoencoder file loaded over the checkpoint's (the web UI's VAE)
    unet_file: Path | None = None  # a GGUF U-Net loaded in place of the checkpoint's (`weights/gguf_files.py`)
    refiner: LatentDiffusion | None = None  # SDXL's refiner: denoises the low-noise end of the schedule
    refiner_checkpoint: Path | None = None
    embeddings: dict[str, Embedding] = field(default_factory=dict)  # textual inversion, by the name prompts use
    loras: dict[str, Path] = field(default_factory=dict)  # LoRA files that prompts may name (<lora:name:w>)
    upscalers: dict[str, Path] = field(default_factory=dict)  # image upscaler model files, by name (`upscalers.py`)
    controlnets: dict[str, Path] = field(default_factory=dict)  # ControlNet, T2I- and IP-Adapter files, "name [hash]"
    clip_vision: Path | None = None  # the folder of the CLIP image towers some units need (`image_prompts.py`)
    annotators: Path | None = None  # the folder of the annotator weights some preprocessors need (`annotators.py`)
    hires_pipeline: Pipeline | None = None  # the hires pass's own checkpoint (the web UI's hr_checkpoint_name)
    styles: dict[str, Style] = field(default_factory=dict)  # prompt styles that requests may name (a styles.csv)
    notices: list[str] = field(default_factory=list)  # what loading skipped (embeddings of another width)


def as_pipeline(model: LatentDiffusion | Pipeline) -> Pipeline:
    """A bare model is a pipeline with nothing beside it (its infotexts name no file)."""
    return model if isinstance(model, Pipeline) else Pipeline(model)


def load_pipeline(
    checkpoint: str | os.PathLike,
    config=None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ema: bool | None = None,
    vae: str | os.PathLike | None = None,
    unet_gguf: str | os.PathLike | None = None,
    refiner: str | os.PathLike | None = None,
    embeddings_dir: str | os.PathLike | None = None,
    loras: dict[str, str | os.PathLike] | None = None,
    upscalers: dict[str, str | os.PathLike] | None = None,
    controlnets: dict[str, str | os.PathLike] | None = None,
    clip_vision: str | os.PathLike | None = None,
    annotators: str | os.PathLike | None = None,
    hires_checkpoint: str | os.PathLike | None = None,
    styles: dict[str, Style] | None = None,
    compile: bool = False,
    unet_weights_dtype: torch.dtype | str | None = None,
    text_weights_dtype: torch.dtype | str | None = None,
) -> Pipeline:
    """Load a checkpoint (`checkpoint.load_model`, with a GGUF U-Net in place of its own where `unet_gguf` names
    one; its autoencoder's encoder read when an image is first encoded) and what goes beside it: a VAE file over its
    autoencoder, a refiner on the same device in the same dtype, the embeddings in `embeddings_dir` made for its text
    encoders' width, the LoRA, upscaler and control model files by name (`lora.find_loras`,
    `upscalers.find_upscalers`, `control.find_control_models`), the folders of the CLIP image towers (IP-Adapter,
    style and revision units) and of the annotator weights some preprocessors need, and a checkpoint for the hires
    pass with the same files beside it. compile: the U-Nets and decoders through torch.compile. unet_weights_dtype, text_weights_dtype: the storage of the U-Nets' and the text
    encoders' layer weights (float8, float16, bfloat16 or "Q8_0"), for every checkpoint loaded here (`weights/storage.py`)."""
    at = dict(device=device, dtype=dtype, unet_weights_dtype=unet_weights_dtype, text_weights_dtype=text_weights_dtype)
    model = load_model(checkpoint, config, ema=ema, unet_gguf=unet_gguf, for_generation=True, **at)
    if vae is not None:
        load_vae(model, vae)
    second = load_model(refiner, **at) if refiner is not None else None
    found, notices = load_embeddings(embeddings_dir, model.cfg.unet.context_dim) if embeddings_dir else ({}, [])
    if compile:
        for m in filter(None, (model, second)):
            compile_model(m)
    files = dict(embeddings_dir=embeddings_dir, loras=loras, upscalers=upscalers, controlnets=controlnets)
    files |= dict(clip_vision=clip_vision, annotators=annotators, compile=compile)
    hires = load_pipeline(hires_checkpoint, **at, **files) if hires_checkpoint else None
    return Pipeline(
        model,
        checkpoint=Path(checkpoint),
        vae_file=Path(vae) if vae is not None else None,
        unet_file=Path(unet_gguf) if unet_gguf is not None else None,
        refiner=second,
        refiner_checkpoint=Path(refiner) if refiner is not None else None,
        embeddings=found,
        loras=_paths(loras),
        upscalers=_paths(upscalers),
        controlnets=_paths(controlnets),
        clip_vision=Path(clip_vision) if clip_vision is not None else None,
        annotators=Path(annotators) if annotators is not None else None,
        hires_pipeline=hires,
        styles=dict(styles or {}),
        notices=notices + (hires.notices if hires else []),
    )


def _paths(files: dict[str, str | os.PathLike] | None) -> dict[str, Path]:
    return {name: Path(path) for name, path in (files or {}).items()}
