"""The units whose image goes through a CLIP image tower, as the web UI's ControlNet extension runs them (1.1.455:
`annotator/clipvision`, `scripts/ipadapter/`, `scripts/hook.py`): an IP-Adapter's tokens, which every cross-attention
of the U-Net attends to at the unit's weight (`models/ip_adapter.py`); the T2I style adapter's tokens, appended to the
prompt's context (`models/style_adapter.py`); SDXL's revision, the image embedding in the pooled text's place.

- The tower: `clip_h` (OpenCLIP ViT-H/14) for the modules `ip-adapter_clip_sd15` (label `ip-adapter_clip_h`) and
  `ip-adapter_clip_sdxl_plus_vith`, `clip_g` (ViT-bigG/14) for `ip-adapter_clip_sdxl` (`ip-adapter_clip_g`);
  `ip-adapter-auto` takes the one the extension's presets give the model's name (`clip_g` for ip-adapter_sdxl and
  ip-adapter_sd15_vit-G). Its file is `clip_h` or `clip_g` (.pth, .safetensors or .bin) in the folder the
  pipeline names (`Pipeline.clip_vision`; the extension keeps them in `annotator/downloads/clip_vision`).
- The image: stretched to 224×224 (OpenCV's INTER_AREA, the aspect ratio not kept), then (x/255 − mean)/std with
  CLIP's statistics (`CLIPImageProcessor`, whose own resize and crop change nothing at 224). A unit's mask is the
  image's alpha there: stretched with it, it zeroes the normalised pixels where it is painted.
- Tokens: the base adapters project the image embedding, the plus and full-face ones the penultimate hidden
  states; the FaceID and InstantID ones a face's identity (`face_analysis.py`), FaceID plus with clip_h's states.
  Several images of a unit: the mean of their tokens. The unconditional rows of guidance get the tokens of "no
  image": the base adapters' of a zero embedding, the others' of the states of a zero (normalised) image, as
  IP-Adapter's own code makes them (the extension stores that tensor for SD 1.5; for SDXL plus it stores one
  already projected, which is not reproduced here); the identity adapters' of a zero identity.
- Each row of the U-Net's batch takes cond · m + uncond · (1 − m), m its guidance mark; the unit acts in its
  window of steps at its weight (and in the passes its hr_option names). The control mode and soft injection do
  not apply, as in the extension.
- The style adapter (module `clip_vision`, label `t2ia_style_clipvision`): the tower `clip_vitl` (OpenAI's ViT-L/14),
  its last hidden state (all 257 tokens, before the final norm) through the adapter; the unconditional rows get zeros.
- Revision (`revision_clipvision`, `revision_ignore_prompt`; no model, SDXL only): `clip_g`'s projected embedding,
  noise-augmented by threshold_a ("Noise Augmentation", `revision_embedding`); see `control_hook` for where it goes.
  The extension draws that noise from the global generator, unseeded; here it comes from the request's first seed,
  so an image is drawn again the same.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ..models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionModelWithProjection, VisionOutput
from ..models.ip_adapter import IPAdapter, cross_attentions
from ..models.style_adapter import StyleAdapter
from ..weights.ip_adapter import load_clip_vision
from ..weights.reader import CheckpointError, first_line

TOWER_OF_MODULE = {
    "ip-adapter_clip_sd15": "clip_h",
    "ip-adapter_clip_h": "clip_h",
    "ip-adapter_clip_sdxl_plus_vith": "clip_h",
    "ip-adapter_clip_sdxl": "clip_g",
    "ip-adapter_clip_g": "clip_g",
}
AUTO = "ip-adapter-auto"
STYLE_MODULE = "clip_vision"  # (label t2ia_style_clipvision): the T2I style adapter's, on OpenAI's ViT-L/14
REVISION_MODULES = ("revision_clipvision", "revision_ignore_prompt")  # SDXL's revision: no model, ViT-bigG/14
TOWERS = {**TOWER_OF_MODULE, STYLE_MODULE: "clip_vitl", **dict.fromkeys(REVISION_MODULES, "clip_g")}
IMAGE_PROMPT_MODULES = (AUTO, *TOWERS)  # the modules whose image goes through a CLIP image tower: no map
CLIP_G_MODELS = ("ip-adapter_sdxl", "ip-adapter_sd15_vit-G")  # the extension's presets; every other model: clip_h
SUFFIXES = (".pth", ".safetensors", ".bin")
SIZE = 224


class ImagePromptError(ValueError):
    """A unit that cannot run: a module or tower that does not fit, a tower file absent. One line."""


def tower_name(module: str, model_name: str) -> str:
    """The tower a module runs (`ip-adapter-auto`: by the model's name, without its hash)."""
    if module == AUTO:
        return "clip_g" if model_name.rsplit(" [", 1)[0] in CLIP_G_MODELS else "clip_h"
    if module not in TOWER_OF_MODULE:
        known = ", ".join(IMAGE_PROMPT_MODULES)
        raise ImagePromptError(f"an IP-Adapter model needs an IP-Adapter module ({known}), not {module!r}")
    return TOWER_OF_MODULE[module]


def find_tower(folder: str | os.PathLike | None, name: str) -> Path:
    for suffix in SUFFIXES:
        if folder is not None and (path := Path(folder) / (name + suffix)).is_file():
            return path
    raise ImagePromptError(
        f"the CLIP image tower {name} ({'/'.join(name + s for s in SUFFIXES)}) is not {_where(folder)}"
    )


def _where(folder: str | os.PathLike | None) -> str:
    return f"in {os.fspath(folder)}" if folder is not None else "here: give a folder with --clip-vision-dir"


def missing_tower(module: str, folder: str | os.PathLike | None) -> str | None:
    """Why a module of a tower (`IMAGE_PROMPT_MODULES`) cannot run here (its tower's file is not in `folder`), in one
    line; None where it can (`ip-adapter-auto`: where either tower is, the model deciding which it needs)."""
    names = ("clip_h", "clip_g") if module == AUTO else (TOWERS[module],)
    for name in names:
        try:
            find_tower(folder, name)
            return None
        except ImagePromptError as e:
            reason = str(e)
    if module != AUTO:
        return reason
    return f"a CLIP image tower, clip_h or clip_g ({'/'.join(SUFFIXES)}), and neither is {_where(folder)}"


@functools.lru_cache(maxsize=2)
def _tower(path: Path, version: tuple, device: torch.device) -> CLIPVisionModelWithProjection:
    return load_clip_vision(path, device)


def load_tower(path: Path, device) -> CLIPVisionModelWithProjection:
    try:
        stat = path.stat()
        return _tower(path, (stat.st_mtime_ns, stat.st_size), torch.device(device))
    except (OSError, CheckpointError) as e:
        raise ImagePromptError(first_line(e).replace(str(path), path.name)) from None


def clip_pixels(image: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, 224, 224) float32, as the extension's ClipVisionDetector prepares it: the unit's
    mask ((H, W) uint8, 255 where painted; none: zeros) rides along as the image's alpha, is stretched with it (so
    the image goes through OpenCV's 4-channel INTER_AREA, which rounds a few pixels otherwise than the 3-channel
    one), and zeroes the normalised pixels where painted: x · (255 − alpha)/255."""
    if mask is None:
        mask = np.zeros(image.shape[:2], np.uint8)
    elif mask.shape != image.shape[:2]:  # (a mask of another size: stretched to the image's first)
        mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_AREA)
    resized = cv2.resize(np.dstack([image, mask]), (SIZE, SIZE), interpolation=cv2.INTER_AREA)  # (224, 224, 4)
    x = torch.from_numpy(resized[..., :3].copy()).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    kept = (255 - torch.from_numpy(resized[..., 3].copy()).float()) / 255
    return (x - mean) / std * kept


def check_tower_fits(adapter: IPAdapter, tower: CLIPVisionModelWithProjection, name: str) -> None:
    """The tower must give the width the adapter projects: its embedding (base) or its hidden states (plus, full)."""
    gives = tower.cfg.embed_dim if adapter.cfg.kind == "base" else tower.cfg.width
    if gives != adapter.cfg.embed_dim:
        raise ImagePromptError(
            f"this IP-Adapter takes CLIP image features {adapter.cfg.embed_dim} wide; the tower {name} gives {gives} "
            "(choose the module of the adapter's tower, or ip-adapter-auto)"
        )


@torch.no_grad()
def image_tokens(adapter: IPAdapter, tower, images: list[np.ndarray], masks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit's images (and their masks, or None) -> (its tokens, the unconditional tokens), each (1, T, C) in the
    adapter's dtype."""
    device = tower.visual_projection.weight.device
    masks = masks or [None] * len(images)
    seen = tower(torch.cat([clip_pixels(image, mask) for image, mask in zip(images, masks)]).to(device))
    if adapter.cfg.kind == "base":
        none = VisionOutput(image_embeds=torch.zeros_like(seen.image_embeds[:1]), penultimate=seen.penultimate[:1])
    else:
        none = tower(torch.zeros(1, 3, SIZE, SIZE, device=device))
    dtype = next(adapter.parameters()).dtype

    def tokens(out: VisionOutput) -> torch.Tensor:
        out = VisionOutput(out.image_embeds.to(dtype), out.penultimate.to(dtype))
        return adapter.tokens(out).mean(dim=0, keepdim=True)

    return tokens(seen), tokens(none)


FACE_MODULE_OF_KIND = {
    "faceid": "ip-adapter_face_id",
    "faceid_plus": "ip-adapter_face_id_plus",
    "instantid": "instant_id_face_embedding",
}


def face_module(adapter: IPAdapter, module: str) -> str:
    """The module that gives an identity adapter its faces' identities: the one of its kind (`ip-adapter-auto`: that
    one), ImagePromptError for another."""
    wanted = FACE_MODULE_OF_KIND[adapter.cfg.kind]
    if module not in (wanted, AUTO):
        raise ImagePromptError(f"an IP-Adapter of the {adapter.cfg.kind} kind takes a face's identity: module {wanted}")
    return wanted


@torch.no_grad()
def identity_tokens(adapter: IPAdapter, identities: list[np.ndarray], tower=None, images=(), masks=None):
    """A unit's faces' identities (512,) each -> (their tokens, the unconditional tokens), each (1, T, C) in the
    adapter's dtype: the mean of the faces' tokens, and the tokens of a zero identity (as the extension's
    `_get_image_embeds_faceid(_plus)` and `_get_image_embeds_instantid` make them). FaceID plus also reads the tower's
    penultimate states of the unit's whole images (the extension's `face_id_plus`), and of a zero image for the
    unconditional rows."""
    parameter = next(adapter.parameters())
    seen = torch.from_numpy(np.stack(identities)).to(parameter.device, parameter.dtype)  # (n, 512)
    states = none = None
    if tower is not None:
        device, masks = tower.visual_projection.weight.device, masks or [None] * len(images)
        pixels = torch.cat([clip_pixels(image, mask) for image, mask in zip(images, masks)]).to(device)
        states = tower(pixels).penultimate.to(parameter.dtype)  # (n, 257, E)
        none = tower(torch.zeros(1, 3, SIZE, SIZE, device=device)).penultimate.to(parameter.dtype)
    tokens = adapter.identity_tokens(seen, states).mean(dim=0, keepdim=True)
    return tokens, adapter.identity_tokens(torch.zeros_like(seen[:1]), none)


@torch.no_grad()
def style_tokens(adapter: StyleAdapter, tower, images: list[np.ndarray], masks=None) -> tuple[torch.Tensor, ...]:
    """A style unit's images -> (its tokens, the unconditional rows' zeros), each (1, n·T, C): every image's T tokens
    at 1/n, as the extension's merge mode runs a unit of n images as n units at weight w/n, each appending its own."""
    if tower.cfg.width != adapter.cfg.width:
        raise ImagePromptError(
            f"this style adapter takes CLIP tokens {adapter.cfg.width} wide; the tower clip_vitl gives "
            f"{tower.cfg.width}"
        )
    device = tower.visual_projection.weight.device
    masks = masks or [None] * len(images)
    seen = tower(torch.cat([clip_pixels(image, mask) for image, mask in zip(images, masks)]).to(device))
    tokens = adapter(seen.last).flatten(0, 1)[None] / len(images)  # (1, n·T, C)
    return tokens, torch.zeros_like(tokens)


# The noise revision adds to the image embedding (the extension's `AbstractLowScaleModel`, hook.py): DDPM's linear
# schedule, β from 1e-4 to 2e-2 over 1000 steps (evenly spaced in √β), ᾱ_k = Π (1 − β_i) for i ≤ k
REVISION_ALPHAS = torch.cumprod(1 - torch.linspace(1e-4**0.5, 2e-2**0.5, 1000, dtype=torch.float64) ** 2, dim=0)


@torch.no_grad()
def revision_embedding(tower, images: list[np.ndarray], masks, noise: float, generator: torch.Generator):
    """A revision unit's images -> its embedding (1, E): each image's projected embedding, noise-augmented as
    q_sample at k = int(1000 · noise), clipped to 0..999: √ᾱ_k · e + √(1 − ᾱ_k) · ε, so 0 still adds noise of std
    0.01; then their mean (the extension's merge mode: n units at weight w/n, summed)."""
    device = tower.visual_projection.weight.device
    masks = masks or [None] * len(images)
    seen = tower(torch.cat([clip_pixels(image, mask) for image, mask in zip(images, masks)]).to(device)).image_embeds
    a = REVISION_ALPHAS[min(max(int(noise * 1000), 0), 999)].item()
    epsilon = torch.randn(seen.shape, generator=generator, dtype=torch.float64).to(
        seen.device, torch.float32
    )  # (the extension draws unseeded; here, the seed's)
    return (a**0.5 * seen.float() + (1 - a) ** 0.5 * epsilon).mean(dim=0, keepdim=True)


def check_ip_adapter_fits(adapter: IPAdapter, unet: torch.nn.Module, context_dim: int) -> None:
    """An IP-Adapter's layers must be the U-Net's cross-attentions, its tokens of the U-Net's context width."""
    widths = tuple(a.to_k.out_features for a in cross_attentions(unet))
    if adapter.cfg.context_dim != context_dim or adapter.cfg.widths != widths:
        raise ValueError(
            f"an IP-Adapter for a U-Net of {len(adapter.cfg.widths)} cross-attentions and context width "
            f"{adapter.cfg.context_dim} does not fit this one ({len(widths)}, {context_dim})"
        )


def check_style_adapter_fits(adapter: StyleAdapter, context_dim: int) -> None:
    """A style adapter's tokens join the prompt's: they must be as wide (768: SD 1.x's; none exists for others)."""
    if adapter.cfg.context_dim != context_dim:
        raise ValueError(
            f"a T2I style adapter of tokens {adapter.cfg.context_dim} wide does not fit this model's context "
            f"({context_dim} wide)"
        )


def check_revision_fits(embedding: torch.Tensor, model) -> None:
    """Revision puts the image embedding in the pooled text's place of SDXL's vector: they must be as wide."""
    cfg = model.cfg
    pooled = (cfg.text2 or cfg.text).embed_dim
    if embedding.shape[-1] != pooled:
        raise ImagePromptError(
            f"revision: the tower clip_g gives embeddings {embedding.shape[-1]} wide; this model's pooled text is "
            f"{pooled} wide"
        )
