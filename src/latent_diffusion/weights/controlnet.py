"""Reading ControlNet files as people have them into `models/controlnet.ControlNet`, through the safe reader
(`weights/reader.py`: no code from a file runs). Three layouts, told apart by their keys (`controlnet_layout`):

- lllyasviel's original (`cldm.ControlNet`): `input_blocks`, `zero_convs`, `input_hint_block`, `middle_block`,
  `middle_block_out`, `time_embed` (SDXL: `label_emb`), with or without the `control_model.` prefix. The 2023
  `control_sd15_*.pth` files carry a whole Stable Diffusion model beside it: everything outside `control_model.` is
  left out. These are our module's own names: nothing is renamed. A "difference" ControlNet (a `difference` key
  marks it) holds its encoder as deltas from the U-Net it was made on: the base model's weights are added, as the
  web UI's ControlNet extension adds the U-Net in use (`_difference_weights`).
- diffusers' `ControlNetModel` (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`, `controlnet_cond_embedding`,
  `controlnet_down_blocks`, `controlnet_mid_block`; SDXL's `add_embedding`): renamed block by block through the
  U-Net's table of `weights/lora.py` (`unet_blocks`), read at the file's levels, res blocks and attending levels.
  Its small and mid SDXL variants have levels without attention and cross-attention blocks of 0 transformer layers:
  a SpatialTransformer without blocks (norm, proj_in, proj_out), which the model builds for a depth of 0.
  xinsir's union ControlNets (ControlNet++, diffusers' `ControlNetUnionModel`) are this layout with their own parts
  beside it (`task_embedding`, `transformer_layes`, `spatial_ch_projs`, `control_add_embedding`), kept as named.
- Stability's Control-LoRA (`control-lora-*-rank128.safetensors`, marked by an empty `lora_controlnet` tensor): the
  ControlNet is the base model's U-Net encoder with, per Linear/Conv weight W of the U-Net that the file changes,
  `<key>.up` (out, r) and `<key>.down` (r, in·k·k) beside it, and whole tensors for the rest (biases, norms, the
  hint block, the zero convolutions). As ComfyUI's `ControlLora` builds it:

      W' = W_base + up · down     (a weight the file neither changes nor holds is W_base)

The architecture is read off the keys (`checkpoint.infer_unet`). Head counts leave no trace in the shapes: SD 1.x's
8 heads, or 64-wide heads where the transformers project linearly (SD 2.x, SDXL), as for checkpoints. Options of
how a ControlNet runs rather than what it holds (the shuffle model's global average pooling, which the extension
reads off the file's name: `pipeline/control.pools`; diffusers' BGR `controlnet_conditioning_channel_order`) are
not in the weights, and not read here.
"""

from __future__ import annotations

import json
import os

import torch

from ..models.config import LatentDiffusionConfig, UNetConfig
from ..models.controlnet import ControlNet, UnionConfig
from ..models.family import SD1, SD2, SDXL, UNET, VAE, Family
from ..models.ldm import LatentDiffusion
from .architecture import infer_unet, key_indices
from .checkpoint import empty_modules, mismatch
from .lora import RESBLOCK, unet_blocks
from .reader import CheckpointError, first_line, read_state_dict

CONTROL = "control_model."  # the ControlNet's prefix in lllyasviel's ControlLDM checkpoints
HINT = "input_hint_block.0.weight"  # (16, hint channels, 3, 3): the original layout's mark
DIFFUSERS_HINT = "controlnet_cond_embedding.conv_in.weight"  # diffusers' ControlNetModel's mark
CONTROL_LORA = "lora_controlnet"  # Stability's Control-LoRA's mark: an empty tensor
DIFFERENCE = "difference"  # a "difference" ControlNet's mark: its encoder's weights are deltas from a U-Net's
CONFIG_METADATA_KEY = "latent_diffusion.controlnet"  # our files' {"unet": config}: the heads, which no shape shows
UNION_PARTS = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")


class ControlNetError(CheckpointError):
    """A file that is not a ControlNet this project reads, or a ControlNet that does not fit the model it is used
    with; one line that names the file or both families."""


def controlnet_layout(keys) -> str | None:
    """The layout of a file's keys, "original", "diffusers" or "control-lora", by the marks above; None otherwise."""
    if CONTROL_LORA in keys:
        return "control-lora"
    if DIFFUSERS_HINT in keys:
        return "diffusers"
    if HINT in keys or CONTROL + HINT in keys:
        return "original"
    return None


def is_controlnet_state_dict(keys) -> bool:
    """Whether a file's keys are a ControlNet's (a T2I-Adapter's, ControlNet-LLLite's or a LoRA's are not)."""
    return controlnet_layout(keys) is not None


def _what_it_is(keys) -> str:
    """For the refusal of a file that is not a ControlNet: what its keys look like instead."""
    keys = list(keys)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("adapter.body.", "body.0.in_conv.") or ("conv_in.weight" in keys and starts("body.")):
        return "a T2I-Adapter (read by its own loader)"
    if starts("lllite_"):
        return "a ControlNet-LLLite (kohya): a control unit's model (`models/lllite.py`), not a ControlNet"
    if any(part in k for k in keys for part in ("lora_", ".lora.", "hada_", "lokr_")):
        return "a LoRA (or LyCORIS) file"
    if starts(UNET):
        return "a Stable Diffusion checkpoint without control_model.* weights"
    if starts(VAE, "encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."):
        return "an autoencoder (VAE)"
    return f"none of a ControlNet's keys (first keys: {', '.join(keys[:3]) or 'no tensors'})"


# diffusers' names -> ours ---------------------------------------------------------------------------------------

# A ResBlock's layers: diffusers' name -> CompVis's (`lora.RESBLOCK` turned around)
DIFFUSERS_RESBLOCK = {theirs: ours for ours, theirs in RESBLOCK.items()}


def diffusers_blocks(keys) -> dict[str, str]:
    """diffusers' ControlNetModel blocks -> ours: the U-Net's encoder half of `lora.unet_blocks`, by the block
    arithmetic the keys show (levels, res blocks per level, which levels attend, whether it takes a vector), and the
    ControlNet's own parts: the hint block's convolutions (every other layer of `input_hint_block`, SiLUs between)
    and the zero convolutions."""
    keys = set(keys)
    levels = len(key_indices(keys, "down_blocks."))
    arithmetic = UNetConfig(  # the widths are placeholders: only the block arithmetic is read
        model_channels=32,
        channel_mult=(1,) * levels,
        num_res_blocks=len(key_indices(keys, "down_blocks.0.resnets.")),
        attention_resolutions=tuple(2**i for i in range(levels) if f"down_blocks.{i}.attentions.0.norm.weight" in keys),
        adm_in_channels=1 if "add_embedding.linear_1.weight" in keys else None,
    )
    blocks = {k: v for k, v in unet_blocks(arithmetic).items() if not v.startswith(("output_blocks.", "out."))}
    hint = key_indices(keys, "controlnet_cond_embedding.blocks.")
    blocks |= {
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        **{f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * i + 2}" for i in hint},
        "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * len(hint) + 2}",
        **{f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in key_indices(keys, "controlnet_down_blocks.")},
        "controlnet_mid_block": "middle_block_out.0",
    }
    return blocks


def from_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A diffusers ControlNetModel state dict in the original layout -> (renamed tensors, keys that map to nothing).
    Each key's longest block prefix in `diffusers_blocks` is replaced; inside a ResBlock the layers are renamed too,
    inside a transformer the names are the same in both layouts."""
    blocks = diffusers_blocks(sd.keys())
    renamed, left = {}, []
    for key, tensor in sd.items():
        parts = key.split(".")
        for j in range(len(parts) - 1, 0, -1):
            theirs = ".".join(parts[:j])
            if theirs in blocks:
                inner = ".".join(parts[j:-1])
                if ".resnets." in theirs:
                    inner = DIFFUSERS_RESBLOCK.get(inner, inner)
                renamed[".".join(p for p in (blocks[theirs], inner, parts[-1]) if p)] = tensor
                break
        else:
            if key.startswith(UNION_PARTS):  # (a union ControlNet's own parts: the same names in both layouts)
                renamed[key] = tensor
            else:
                left.append(key)
    return renamed, left


def union_config(sd: dict[str, torch.Tensor], path) -> UnionConfig | None:
    """A union ControlNet's extra parts' sizes read off its tensors (xinsir's ControlNet++), or None for another."""
    if "task_embedding" not in sd:
        return None
    try:
        types, width = sd["task_embedding"].shape
        layers = 1 + max(key_indices(sd.keys(), "transformer_layes."))
        type_width = sd["control_add_embedding.linear_1.weight"].shape[1] // types
    except (KeyError, ValueError) as e:
        raise ControlNetError(f"{path}: an incomplete union ControlNet ({first_line(e)})") from None
    return UnionConfig(types=types, width=width, type_width=type_width, layers=layers, heads=8 if width % 8 == 0 else 1)


# Families -------------------------------------------------------------------------------------------------------


def controlnet_family(controlnet: ControlNet | UNetConfig) -> Family:
    """SDXL where it takes the vector conditioning y, else SD 2.x where its transformers project linearly, else
    SD 1.x: at full size, context widths 2048, 1024 and 768. Read from the structure, so that tiny test models have
    a family too; whether it fits a model is `check_controlnet_fits`'s question, asked of the widths."""
    cfg = controlnet.cfg if isinstance(controlnet, ControlNet) else controlnet
    if cfg.adm_in_channels:
        return SDXL
    return SD2 if cfg.use_linear_in_transformer else SD1


def attends_to_text(cfg: UNetConfig) -> bool:
    """Whether any transformer block reads the context (diffusers' small SDXL ControlNets have none)."""
    levels = [d for i, d in enumerate(cfg.transformer_depth) if 2**i in cfg.attention_resolutions]
    return any(levels) or cfg.transformer_depth[-1] > 0


def skip_widths(cfg: UNetConfig) -> list[int]:
    """The width of each input block's output: what a ControlNet adds to each skip connection of the U-Net."""
    widths = [cfg.model_channels]
    for level, mult in enumerate(cfg.channel_mult):
        downsample = level < len(cfg.channel_mult) - 1
        widths += [mult * cfg.model_channels] * (cfg.num_res_blocks + downsample)
    return widths


def check_controlnet_fits(controlnet: ControlNet | UNetConfig, model_cfg: LatentDiffusionConfig) -> None:
    """ControlNetError, in one line naming both families, where the ControlNet's context width, vector width, latent
    channels or residual widths differ from the model's."""
    cn = controlnet.cfg if isinstance(controlnet, ControlNet) else controlnet
    unet = model_cfg.unet
    problems = []
    if attends_to_text(cn) and cn.context_dim != unet.context_dim:
        problems.append(f"context width {cn.context_dim}, the model's {unet.context_dim}")
    if cn.adm_in_channels != unet.adm_in_channels:
        problems.append(f"vector conditioning width {cn.adm_in_channels or 0}, the model's {unet.adm_in_channels or 0}")
    if cn.in_channels != unet.out_channels:  # the latent; an inpainting U-Net's extra input channels are not its
        problems.append(f"{cn.in_channels} latent channels, the model's {unet.out_channels}")
    if not problems and skip_widths(cn) != skip_widths(unet):
        problems.append(f"residual widths {skip_widths(cn)}, the model's {skip_widths(unet)}")
    if problems:
        raise ControlNetError(
            f"a ControlNet for {controlnet_family(cn).title} does not fit this {model_cfg.family.title} model: "
            + "; ".join(problems)
        )


# Loading --------------------------------------------------------------------------------------------------------


def load_controlnet(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    base: LatentDiffusion | None = None,
) -> ControlNet:
    """A ControlNet from a `.safetensors`, `.pth`, `.ckpt` or `.bin` file in any of the three layouts, its weights in
    `dtype` on `device`, in eval mode. base: the model a Control-LoRA or a difference file changes (its U-Net's weights are read;
    the model itself is left as it is), and whose attention heads a ControlNet of its U-Net's widths has. ControlNetError (a CheckpointError) with one line
    for a file that is not a ControlNet or whose weights describe no ControlNet this project builds."""
    sd, metadata = read_state_dict(path)
    layout = controlnet_layout(sd.keys())
    if layout is None:
        raise ControlNetError(f"{path}: not a ControlNet: {_what_it_is(sd.keys())}")
    if layout == "control-lora":
        if base is None:
            raise ControlNetError(f"{path}: a Control-LoRA changes a base model's weights: pass base=the model")
        cfg = base.cfg.unet
        hint_channels = _hint_channels(sd, path)
    else:
        if layout == "diffusers":
            try:
                sd, left = from_diffusers(sd)
            except ValueError as e:  # no levels or no res blocks to count
                raise ControlNetError(f"{path}: an incomplete diffusers ControlNetModel ({e})") from None
            if left:
                raise ControlNetError(
                    f"{path}: not a plain diffusers ControlNetModel: {len(left)} keys it does not have "
                    f"(first: {', '.join(left[:3])})"
                )
        elif any(k.startswith(CONTROL) for k in sd):
            marked = DIFFERENCE in sd
            sd = {k.removeprefix(CONTROL): v for k, v in sd.items() if k.startswith(CONTROL)}
            sd |= {DIFFERENCE: torch.empty(0)} if marked else {}
        if DIFFERENCE in sd:
            sd = _difference_weights(sd, base, path)
        cfg, hint_channels = _infer(sd, path, base, _saved_heads(metadata, path))
    union = union_config(sd, path) if layout != "control-lora" else None
    try:
        with empty_modules():
            controlnet = ControlNet(cfg, hint_channels, union)
    except (ValueError, ZeroDivisionError, RuntimeError) as e:
        raise ControlNetError(
            f"{path}: its weights describe no ControlNet this project builds ({first_line(e)})"
        ) from None
    expected = controlnet.state_dict()  # meta tensors: names and shapes only
    if layout == "control-lora":
        sd = _control_lora_weights(sd, base, expected, path)
    if problem := mismatch(expected, sd, lambda *_: False, ignorable=None):
        raise ControlNetError(f"{path}: does not load as the ControlNet its keys describe: {problem}")
    weights = {k: sd[k].to(device, dtype if sd[k].is_floating_point() else sd[k].dtype) for k in expected}
    controlnet.load_state_dict(weights, strict=True, assign=True)
    return controlnet.eval()


def _saved_heads(metadata: dict[str, str], path) -> tuple[int | None, int | None] | None:
    """The attention heads (num_heads, num_head_channels) our training wrote into the file's metadata
    (`training/controlnet.py`), or None where it has none."""
    if CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        saved = json.loads(metadata[CONFIG_METADATA_KEY])["unet"]
        channels = saved["num_head_channels"]
        return (
            None if saved["num_heads"] is None else int(saved["num_heads"]),
            None if channels is None else int(channels),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ControlNetError(f"{path}: its {CONFIG_METADATA_KEY} metadata is no valid config ({e})") from None


def _hint_channels(sd: dict[str, torch.Tensor], path) -> int:
    if HINT not in sd:
        raise ControlNetError(f"{path}: an incomplete ControlNet: it has no {HINT}")
    return sd[HINT].shape[1]


def _infer(sd: dict[str, torch.Tensor], path, base: LatentDiffusion | None, saved=None) -> tuple[UNetConfig, int]:
    """(the encoder's config, the hint's channels) read off the keys of the original layout. The attention heads,
    which the shapes do not show: those `saved` in our files' metadata, else the base model's for a ControlNet of its
    width (a copy of its encoder), else SD's rule."""
    if "middle_block.1.proj_in.weight" not in sd and "middle_block.0.in_layers.0.weight" in sd:
        raise ControlNetError(
            f"{path}: its middle block has no transformer (diffusers' mid_block_type UNetMidBlock2D), which the "
            "ControlNet this project builds always has"
        )
    try:
        unet = base.cfg.unet if base is not None else None
        same = unet is not None and sd["input_blocks.0.0.weight"].shape[0] == unet.model_channels
        heads = saved or ((unet.num_heads, unet.num_head_channels) if same else None)
        return infer_unet(sd, prefix="", encoder_only=True, heads=heads), _hint_channels(sd, path)
    except KeyError as e:
        raise ControlNetError(f"{path}: an incomplete ControlNet: it has no {e.args[0]}") from None
    except ValueError as e:
        raise ControlNetError(f"{path}: its weights describe no ControlNet this project builds ({e})") from None


def _difference_weights(sd: dict, base: LatentDiffusion | None, path) -> dict[str, torch.Tensor]:
    """A difference ControlNet's weights, as the extension builds them (`build_model_by_guess`): each delta plus the
    weight of the same name in the U-Net in use, so that its encoder is a copy of this model's; the keys the U-Net
    has not (zero convolutions, the hint block) as filed."""
    if base is None:
        raise ControlNetError(f"{path}: a difference ControlNet adds to a base model's U-Net: pass base=the model")
    unet = base.model.diffusion_model.state_dict()
    if any(v.dtype == torch.uint8 for v in unet.values()):
        raise ControlNetError(f"{path}: a difference ControlNet adds to a U-Net's weights, not to GGML blocks")
    weights = {}
    for key, value in sd.items():
        if key in unet and key != DIFFERENCE:
            if unet[key].shape != value.shape:
                raise ControlNetError(
                    f"{path}: a difference ControlNet that does not fit the model: its {key} is "
                    f"{tuple(value.shape)}, the U-Net's {tuple(unet[key].shape)}"
                )
            value = value.float() + unet[key].to(value.device, torch.float32)  # (the model's may be on a GPU)
        weights[key] = value
    del weights[DIFFERENCE]
    return weights


def _control_lora_weights(sd: dict, base: LatentDiffusion, expected: dict, path) -> dict[str, torch.Tensor]:
    """The ControlNet's weights from a Control-LoRA file over the base U-Net's: the file's whole tensors, W + up·down
    where it has a pair (in float32), else the base's. Keys the file has and the ControlNet lacks are kept, so that
    the caller's check names them."""
    base_sd = base.model.diffusion_model.state_dict()
    weights = {k: v for k, v in sd.items() if k != CONTROL_LORA and not k.endswith((".up", ".down"))}
    for up_key in [k for k in sd if k.endswith(".up")]:
        name = up_key.removesuffix(".up")
        key, down = name + ".weight", sd.get(name + ".down")
        if down is None or key not in base_sd:
            lacks = f"{name}.down" if down is None else f"the base model's {UNET}{key}"
            raise ControlNetError(f"{path}: a Control-LoRA that does not fit the base model: it has no {lacks}")
        w, up = base_sd[key], sd[up_key]
        try:  # up (out, r) · down (r, in·k·k), reshaped to the weight's (out, in, k, k), where the weight is
            delta = up.flatten(1).to(w.device, torch.float32) @ down.flatten(1).to(w.device, torch.float32)
            delta = delta.reshape(w.shape)
        except RuntimeError:
            raise ControlNetError(
                f"{path}: a Control-LoRA that does not fit the base model: {name} up·down is "
                f"{tuple(up.shape)}·{tuple(down.shape)}, its weight {tuple(w.shape)}"
            ) from None
        weights[key] = w.float() + delta
    for k in expected:
        if k not in weights and k in base_sd:
            weights[k] = base_sd[k]
    return weights
