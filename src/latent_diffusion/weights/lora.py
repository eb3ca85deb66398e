"""LoRA (Hu et al. 2021): low-rank weight deltas, merged into the model's weights and taken out again bit for bit.
LyCORIS's other types (LoHa, LoKr, OFT/BOFT, (IA)³) are read from the same files and merged the same way; their
maths is in `weights/lycoris.py`.

A LoRA layer of rank r changes a weight W (out, in) by ΔW = (α / r) · up · down, with down (r, in), up (out, r) and
α the file's alpha (r where the file has none: a scale of 1). For a convolution (LoCon) down is a k×k convolution
(r, in, k, k) and up a 1×1 one (out, r, 1, 1); their composition is again a k×k convolution,
ΔW = (up (out, r) @ down (r, in·k·k)) reshaped to (out, in, k, k). LyCORIS's CP-decomposed LoCon has a 1×1 down
(r, in, 1, 1), a k×k `lora_mid` (r, r, k, k) and a 1×1 up: the mid folds into the down as
down'[n, j, k, l] = Σ_m mid[n, m, k, l] · down[m, j], which is again a LoCon pair. Merging with a strength w:

    W' = W + w · (α / r) · up · down        (in float32, then cast to W's dtype)
DoRA (Liu et al. 2024; LyCORIS's `.dora_scale`, as the web UI merges it): the LoRA's sum is rescaled so that each
input channel's column (over the outputs and the kernel) has the file's magnitude m, and the strength scales the
change from W:
    V = W + (α / r) · up · down,   W' = W + w · (m · V / ‖V‖_column − W)

Files, each naming modules by diffusers' (U-Net) and transformers' (CLIP text encoder) module paths:
- kohya-ss: `lora_unet_<path>` and `lora_te_<path>` with `.` written `_`, then `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`. kohya trains SD 2.x's OpenCLIP text encoder as a transformers CLIPTextModel, so
  its q/k/v land in thirds of our fused `in_proj_weight`. SDXL: `lora_te1_` (CLIP ViT-L, diffusers'
  `text_encoder`) and `lora_te2_` (OpenCLIP ViT-bigG, `text_encoder_2`), the U-Net in generative-models' names.
- PEFT / diffusers: `unet.<path>.lora_A.weight` (down) and `.lora_B.weight` (up), `text_encoder.<path>...`, also
  without those prefixes or under `base_model.model.`. α from `.alpha` keys or from diffusers'
  `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`), else the scale is 1. diffusers' older
  `.lora.down.weight`, `.lora_linear_layer.down.weight` and `attn1.processor.to_q_lora.down.weight` as well.

Names are resolved through one table built from the model itself (`module_table`): diffusers' block names map onto
CompVis's by the U-Net's block arithmetic (levels, res blocks per level, which levels attend), names inside a
block are the same in both layouts except a ResBlock's. kohya's `_` names cannot be split back into a path
unambiguously, so the table is keyed by both spellings of every name; the U-Net's CompVis names
(`input_blocks.1.1.proj_in`, which some tools write) are keys too.

A weight may be a read-only memory map of the checkpoint file, so merging never writes into a weight's storage:
each touched parameter gets a new tensor, and `remove_lora` puts the original tensor back.

A weight stored in float8 (or float16 under float32: `weights/storage.py`) gets a merged copy in the compute dtype,
float32(W) + ΔW, which its layer uses as it is while the LoRA is on; its stored tensor comes back bit for bit. Rounding the sum back to float8,
as the web UI does, would move each number to the nearest of steps an eighth of its size apart (e4m3fn): a LoRA's
change, usually smaller than that, would be lost or snapped whole to a step. Forge's result is this one (it adds
the LoRA to the cast weight in the compute dtype as each layer runs); the cost is the merged layers' memory in the
compute dtype while the LoRA is on.

A weight held in GGML blocks (a GGUF file's, `weights/ggml_quants.py`) is merged the same way: its merged copy is
the dequantized W + ΔW in the compute dtype, which the layer uses in place of its blocks while the LoRA is on; the
blocks come back as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import UNetConfig
from ..models.family import FAMILIES, UNET
from ..models.ldm import LatentDiffusion
from . import ggml_quants, lycoris
from .reader import CheckpointError, read_state_dict


class LoRAError(ValueError):
    """A LoRA file that cannot be read or does not fit the model; one line that names the problem."""


# Reading ------------------------------------------------------------------------------------------------------------

# (key suffix, role): what stands before the suffix names the module.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),  # kohya-ss, LyCORIS
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # diffusers before PEFT ...
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # ... and its attention processors' `to_q_lora`
    (".alpha", "alpha"), (".dora_scale", "dora_scale"),
    *((f".{key}", key) for key in lycoris.KEYS),  # LoHa, LoKr, OFT, (IA)³ (`weights/lycoris.py`)
)  # fmt: skip
# diffusers' attention-processor LoRA named the projections its own way (`to_out_lora`, text `to_q_lora`).
OLD_NAMES = {
    "unet": {"to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
OLD_NAMES["text_encoder_2"] = OLD_NAMES["text_encoder"]
# kohya's prefixes -> diffusers' part names
KOHYA_PARTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "oft_unet_": "unet",  # kohya-ss's OFT
}
BUNDLED = "bundle_emb."  # textual-inversion embeddings bundled in the file (`embeddings.bundled_embeddings`)
FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT LoraConfig per part, JSON: {"unet.lora_alpha": 8, ...}


@dataclass
class LoRALayer:
    down: torch.Tensor  # (r, in), or (r, in, k, k) for a convolution
    up: torch.Tensor  # (out, r), or (out, r, 1, 1)
    scale: float  # α / r; 1 where the file gives no alpha
    dora_scale: torch.Tensor | None = None  # DoRA's magnitudes: (1, in[, 1, 1]) per input channel

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape that up·down has."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoRA:
    # By module: "unet.<diffusers path>" or "text_encoder.<transformers path>", kohya's written with `_`.
    layers: dict[str, LoRALayer | lycoris.Network]
    skipped: list[str] = field(default_factory=list)  # keys not merged: lone halves, kinds not known here
    source: str = ""  # the file, for messages


def read_lora(path: str | os.PathLike) -> LoRA:
    """A kohya-ss or PEFT/diffusers LoRA file (.safetensors, or a pickle through the checkpoint reader's safe
    loader) -> its layers. LoRAError if it cannot be read or holds no LoRA weights."""
    try:
        sd, metadata = read_state_dict(path)
    except CheckpointError as e:
        raise LoRAError(str(e)) from None
    return parse_lora(sd, metadata, source=str(path))


def parse_lora(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, source: str = "LoRA") -> LoRA:
    """A LoRA state dict (and its safetensors metadata) -> its layers, by module name: LoRA pairs (with LoCon's
    CP mid and DoRA's magnitudes), and LyCORIS's LoHa, LoKr, OFT and (IA)³ (`weights/lycoris.py`). Bundled
    embeddings (`bundle_emb.*`) are not layers: `embeddings.bundled_embeddings` reads them."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, t in sd.items():
        suffix, role = next(((s, r) for s, r in SUFFIXES if key.endswith(s)), (None, None))
        if key.startswith(BUNDLED):
            continue
        if suffix is None:
            skipped.append(key)
        else:
            parts.setdefault(module_name(key[: -len(suffix)]), {})[role] = t
    try:
        config = json.loads((metadata or {}).get(METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        raise LoRAError(f"{source}: its {METADATA_KEY} metadata is not JSON") from None

    layers = {}
    for name, h in parts.items():
        try:
            layer = _lora_layer(h, config, name) if "down" in h and "up" in h else lycoris.lycoris_layer(h)
        except ValueError as e:
            raise LoRAError(f"{source}: {name}: {e}") from None
        if layer is None:
            skipped += [f"{name} ({role} only)" for role in h if role != "alpha"]
            continue
        if not all(torch.isfinite(t).all() for t in h.values()):  # else a NaN image, blamed on the model
            raise LoRAError(f"{source}: {name}: its weights are not all finite numbers")
        layers[name] = layer
    if not layers and not any(key.startswith(BUNDLED) for key in sd):
        first = ", ".join(list(sd)[:3]) or "no tensors"
        raise LoRAError(f"{source}: not a LoRA: no LoRA, LoHa, LoKr, OFT or IA3 weights (first keys: {first})")
    return LoRA(layers, skipped, source)


def _lora_layer(h: dict[str, torch.Tensor], config: dict, name: str) -> LoRALayer:
    """A module's LoRA pair (and CP mid, α, DoRA magnitudes) -> its layer; ValueError where they do not fit."""
    down, up, rank = h["down"], h["up"], h["down"].shape[0]
    if "mid" in h:  # CP decomposition: (r, r, k, k) between a 1×1 down and up
        mid = h["mid"]
        if not (mid.ndim == 4 and down.ndim == 4 and down.shape[2:].numel() == 1 and mid.shape[1] == rank):
            raise ValueError(f"mid {tuple(mid.shape)} and down {tuple(down.shape)} are no CP pair")
        down = torch.einsum("nmkl,mj->njkl", mid.float(), down.flatten(1).float()).to(down.dtype)
    if not (
        down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0] > 0 and up.shape[2:].numel() == 1
    ):
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} are no LoRA pair")
    alpha = float(h["alpha"]) if "alpha" in h else _metadata_alpha(config, name)
    dora = h.get("dora_scale")
    per_input = dora is not None and dora.numel() == down.shape[1] and (dora.ndim == 1 or dora.shape[0] == 1)
    if dora is not None and not per_input and dora.numel() != up.shape[0]:
        raise ValueError(
            f"dora_scale {tuple(dora.shape)} has neither its {down.shape[1]} inputs nor its {up.shape[0]} outputs"
        )
    return LoRALayer(down, up, alpha / rank if alpha else 1.0, dora)  # kohya reads α = 0 as α = r too


def module_name(raw: str) -> str:
    """A file's module name -> "unet.<path>", "text_encoder.<path>" or "text_encoder_2.<path>" (kohya's path keeps
    its `_`)."""
    for prefix, part in KOHYA_PARTS.items():
        if raw.startswith(prefix):
            return f"{part}.{raw[len(prefix) :]}"
    if "." not in raw:
        return raw  # another kohya part: matches nothing here, reported as it is
    name = raw.removeprefix("base_model.model.").replace(".processor.", ".")
    part, _, path = name.partition(".")
    if part not in ("unet", "text_encoder", "text_encoder_2"):
        part, path = ("text_encoder" if name.startswith(("text_model.", "encoder.layers.")) else "unet"), name
    if part.startswith("text_encoder") and not path.startswith("text_model."):
        path = "text_model." + path  # transformers >= 5.6 saves CLIPTextModel without its text_model level
    head, dot, last = path.rpartition(".")
    last = last.removesuffix("_lora")  # `to_q_lora.alpha` beside `to_q_lora.down.weight`
    return f"{part}.{head}{dot}{OLD_NAMES[part].get(last, last)}"


def _metadata_alpha(config: dict, name: str) -> float | None:
    """α from diffusers' adapter metadata: the part's `alpha_pattern` entry that ends the path, else `lora_alpha`."""
    part, _, path = name.partition(".")
    alpha = config.get(f"{part}.lora_alpha")
    for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            alpha = value
    return None if alpha is None else float(alpha)


# The model's modules by every name a LoRA file uses -------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    param: str  # the weight's key in model.state_dict()
    rows: tuple[int, int] | None = None  # [start, end) rows of a fused weight (q, k or v of OpenCLIP's in_proj)


# A ResBlock's layers: CompVis's name -> diffusers'. Elsewhere the names inside a block are the same in both.
# (The norms carry no LoRA; they are here for the ControlNet files in diffusers' layout, `weights/controlnet.py`.)
RESBLOCK = {
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_blocks(cfg: UNetConfig) -> dict[str, str]:
    """diffusers' U-Net blocks -> ours, by the block arithmetic of `unet.UNetModel`: per level, num_res_blocks input
    blocks (ResBlock, SpatialTransformer where 2**level is in attention_resolutions), then a Downsample block;
    output levels run deepest first (diffusers' up_blocks.0), num_res_blocks + 1 blocks each, the last of a level
    ending in an Upsample."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    blocks = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "conv_out": "out.2",
    }
    if cfg.adm_in_channels:  # the vector conditioning's MLP: SDXL's `add_embedding` in diffusers
        blocks |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for level in range(levels):
        attends = 2**level in cfg.attention_resolutions
        for i in range(n):
            ours = f"input_blocks.{1 + level * (n + 1) + i}"
            blocks[f"down_blocks.{level}.resnets.{i}"] = ours + ".0"
            if attends:
                blocks[f"down_blocks.{level}.attentions.{i}"] = ours + ".1"
        if level < levels - 1:
            blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * (n + 1)}.0.op"
        up = levels - 1 - level
        for i in range(n + 1):
            ours = f"output_blocks.{up * (n + 1) + i}"
            blocks[f"up_blocks.{up}.resnets.{i}"] = ours + ".0"
            if attends:
                blocks[f"up_blocks.{up}.attentions.{i}"] = ours + ".1"
        if level > 0:
            blocks[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{up * (n + 1) + n}.{1 + attends}.conv"
    return blocks


def module_table(model: LatentDiffusion) -> dict[str, Target]:
    """Every Linear and Conv2d weight a LoRA can change, by each name a file may give it: "unet.<diffusers path>",
    "unet.<CompVis path>", "text_encoder.<transformers CLIP path>", and each of these with `_` for `.` (kohya)."""
    table: dict[str, Target] = {}

    def add(name: str, target: Target):
        part, _, path = name.partition(".")
        for key in (name, f"{part}.{path.replace('.', '_')}"):
            assert table.setdefault(key, target) == target, f"two modules are both named {key}"

    unet = model.model.diffusion_model
    for theirs, ours in unet_blocks(model.cfg.unet).items():
        for inner, module in unet.get_submodule(ours).named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                path = f"{ours}.{inner}" if inner else ours
                target = Target(f"{UNET}{path}.weight")
                add(f"unet.{theirs}.{RESBLOCK.get(inner, inner)}" if inner else f"unet.{theirs}", target)
                add(f"unet.{path}", target)

    where = {id(module): name for name, module in model.named_modules()}
    for encoder in model.text_encoders:  # diffusers' names: SDXL's pooled ViT-bigG is `text_encoder_2`
        add_text_encoder(add, encoder, where[id(encoder)], "text_encoder_2" if encoder.cfg.pooled else "text_encoder")
    return table


def add_text_encoder(add, encoder, prefix: str, part: str) -> None:
    """The Linear weights of a text encoder at `prefix` in the model, by transformers' CLIPTextModel names."""
    text = encoder.cfg
    if text.kind == "clip":  # our CLIP encoder is transformers' layout already
        for path, module in encoder.transformer.named_modules():
            if isinstance(module, nn.Linear):
                add(f"{part}.{path}", Target(f"{prefix}.transformer.{path}.weight"))
    else:  # OpenCLIP: q, k, v stacked in in_proj_weight (3·width, width); the MLP named c_fc, c_proj
        d = text.width
        for i in range(text.layers):
            theirs, ours = f"{part}.text_model.encoder.layers.{i}", f"{prefix}.model.transformer.resblocks.{i}"
            for j, x in enumerate("qkv"):
                add(f"{theirs}.self_attn.{x}_proj", Target(f"{ours}.attn.in_proj_weight", (j * d, (j + 1) * d)))
            add(f"{theirs}.self_attn.out_proj", Target(f"{ours}.attn.out_proj.weight"))
            add(f"{theirs}.mlp.fc1", Target(f"{ours}.mlp.c_fc.weight"))
            add(f"{theirs}.mlp.fc2", Target(f"{ours}.mlp.c_proj.weight"))


# Merging ------------------------------------------------------------------------------------------------------------


@dataclass
class AppliedLoRA:
    """What `apply_lora` changed: per parameter name, (the original tensor, the merged tensor that replaced it)."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layers: int  # LoRA layers merged
    warnings: list[str]  # for people: layers that matched nothing, keys of kinds not merged


def apply_lora(
    model: LatentDiffusion, lora: LoRA, weight: float = 1.0, *, te_weight: float | None = None
) -> AppliedLoRA:
    """Merge `lora` into the model: W' = W + w·(α/r)·up·down, with w = `weight` on the U-Net and `te_weight`
    (default: `weight`) on the text encoder. -> the handle that `remove_lora` takes, with warnings for layers of
    the LoRA that match nothing here. LoRAError, with nothing changed, when no layer matches or one has a shape
    that shows the LoRA was made for another model."""
    params = dict(model.named_parameters())
    matched, warnings = _match(model, lora, ggml_quants.parameter_shapes(model))
    te = weight if te_weight is None else te_weight
    strength = {"unet": weight, "text_encoder": te, "text_encoder_2": te}
    by_param: dict[str, list[tuple[tuple[int, int] | None, LoRALayer | lycoris.Network, float]]] = {}
    for name, target, layer in matched:
        if w := strength[name.partition(".")[0]]:
            by_param.setdefault(target.param, []).append((target.rows, layer, w))
    replaced = {}
    with torch.no_grad():
        for name, parts in by_param.items():
            original = params[name].data
            layer = model.get_submodule(name.rpartition(".")[0])
            full = ggml_quants.weight(layer, model.dtype) if ggml_quants.is_quantized(layer) else original
            dtype = model.dtype  # the merged copy's, the compute dtype (module docstring)
            if len(parts) == 1 and parts[0][0] is None:
                merged = _merged(full, *parts[0][1:], dtype)
            else:  # a fused weight (or a module named twice): a copy, then each part into its rows
                merged = full.to(dtype, copy=True)
                for rows, layer, w in parts:
                    span = slice(*rows) if rows else slice(None)
                    merged[span] = _merged(merged[span], layer, w, dtype)
            params[name].data = merged
            replaced[name] = (original, merged)
    return AppliedLoRA(replaced, len(matched), warnings)


def _match(model: LatentDiffusion, lora: LoRA, shapes: dict) -> tuple[list[tuple[str, Target, object]], list[str]]:
    """-> ([(LoRA layer name, its target, the layer)], warnings), or LoRAError when nothing matches or a shape does
    not fit. An inpainting model's input convolution takes a LoRA of the base model's (4 latent channels in) with
    zeros for its mask and masked-image channels, as the web UI widens it."""
    table = module_table(model)
    matched, unmatched, misfits = [], [], []
    first_conv = next(k for k in shapes if k.endswith("input_blocks.0.0.weight"))
    for name, layer in lora.layers.items():
        target = table.get(name)
        if target is None:
            unmatched.append(name)
            continue
        w = shapes[target.param]
        shape = (w[0] if target.rows is None else target.rows[1] - target.rows[0], *w[1:])
        widens = target.param == first_conv and isinstance(layer, LoRALayer) and layer.down.ndim == 4
        extra = w[1] - layer.down.shape[1] if widens else 0
        if extra > 0 and layer.down.shape[1] == model.cfg.unet.in_channels - model.cfg.concat_channels:
            if layer.dora_scale is not None:  # its magnitudes are for the 4 channels (the web UI fails here too)
                raise LoRAError(
                    f"{lora.source}: {name}: DoRA on an inpainting model's input convolution is not supported"
                )
            layer = dataclasses.replace(layer, down=F.pad(layer.down, (0, 0, 0, 0, 0, extra)))  # (r, in + extra, k, k)
        if not (_fits(layer, shape) if isinstance(layer, LoRALayer) else layer.fits(shape)):
            misfits.append(f"{name}: LoRA {_shape(layer.shape)}, model {_shape(shape)}")
        matched.append((name, target, layer))
    family = model.cfg.family.title
    if misfits:
        keys = ("attn2.to_k", "attn2_to_k", "q_proj")
        width = next((v.shape[1] for k, v in lora.layers.items() if k.endswith(keys) and len(v.shape) > 1), None)
        made_for = next((f.title for f in FAMILIES if f.context_dim == width), family)
        made_for = "another model" if made_for == family else made_for
        raise LoRAError(
            f"{lora.source}: made for {made_for}, not this {family} model: "
            f"{len(misfits)} of its layers do not fit (first: {misfits[0]})"
        )
    if not matched:
        raise LoRAError(
            f"{lora.source}: no layer of this LoRA matches the {family} model (first: {', '.join(unmatched[:3])})"
        )
    warnings = []
    if unmatched:
        warnings.append(
            f"{lora.source}: {len(unmatched)} LoRA layers match nothing in the {family} model and were left out "
            f"(first: {', '.join(unmatched[:3])})"
        )
    if lora.skipped:
        warnings.append(
            f"{lora.source}: {len(lora.skipped)} keys of kinds not merged here (lone halves, other kinds) "
            f"were left out (first: {', '.join(lora.skipped[:3])})"
        )
    return matched, warnings


def remove_lora(model: LatentDiffusion, applied: AppliedLoRA) -> None:
    """Put back the tensors `apply_lora` replaced: the weights are the same objects as before, bit for bit.
    LoRAs applied on top of each other come off in the reverse order (LoRAError otherwise)."""
    params = dict(model.named_parameters())
    for name, (_, merged) in applied.weights.items():
        if name not in params or params[name].data_ptr() != merged.data_ptr():
            raise LoRAError(
                f"{name} changed after this LoRA was applied (another LoRA applied later, or the model moved): "
                "remove LoRAs in the reverse order of applying them"
            )
    for name, (original, _) in applied.weights.items():
        params[name].data = original
    applied.weights.clear()


def _merged(w: torch.Tensor, layer: LoRALayer | lycoris.Network, strength: float, dtype: torch.dtype) -> torch.Tensor:
    """w + strength·scale·(up @ down) as a new tensor of `dtype` and w's shape; the product in float32. With DoRA
    magnitudes, W + strength·(m·V/‖V‖ − W) for V = W + scale·(up @ down) (the module docstring). LyCORIS's
    types: `lycoris.merged`."""
    if not isinstance(layer, LoRALayer):
        return lycoris.merged(w, layer, strength, dtype)
    f32 = {"device": w.device, "dtype": torch.float32}
    up, down = layer.up.flatten(1).to(**f32), layer.down.flatten(1).to(**f32)  # (out, r), (r, in·k·k)
    original = w.reshape(w.shape[0], -1).float()  # (out, in·k·k)
    if layer.dora_scale is None:
        merged = torch.addmm(original, up, down, alpha=strength * layer.scale)
        return merged.to(dtype).reshape(w.shape)
    summed = torch.addmm(original, up, down, alpha=layer.scale)  # (out, in·k·k)
    change = lycoris.dora(w, summed, layer.dora_scale) - original
    return (original + strength * change).to(dtype).reshape(w.shape)


def _fits(layer: LoRALayer, shape: tuple[int, ...]) -> bool:
    """up·down has this weight shape; a 1×1 convolution and a Linear layer are the same map."""

    def squeeze(s):
        return tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)

    return squeeze((layer.up.shape[0], *layer.down.shape[1:])) == squeeze(shape)


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def find_loras(folder: str | os.PathLike) -> dict[str, Path]:
    """The LoRA files in a folder and its subfolders, by name (the file's stem), as `<lora:name:weight>` names them."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
    return {p.stem: p for p in files}
