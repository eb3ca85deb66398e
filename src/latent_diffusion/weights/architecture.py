"""The architecture of a checkpoint in the original layout, read off its keys and shapes (the U-Net's widths,
depths, attention and conditioning; the autoencoder's; each text encoder's), from the config our files carry in
their metadata, or from a CompVis YAML config."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from ..models.config import (
    MICRO_CONDITIONING,
    AutoencoderConfig,
    LatentDiffusionConfig,
    TextEncoderConfig,
    UNetConfig,
    preset,
)
from ..models.family import UNET, VAE, Family, family_of_keys
from ..models.yaml_config import from_ldm_config
from .reader import CheckpointError, first_line

CONFIG_METADATA_KEY = "latent_diffusion.config"


def key_indices(keys, prefix: str) -> list[int]:
    """Distinct integers N in keys that start with `prefix` + "N."."""
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return sorted(found)


def infer_unet(
    sd: dict[str, torch.Tensor], prefix: str = UNET, *, encoder_only: bool = False, heads: tuple | None = None
) -> UNetConfig:
    """The U-Net's config, read off its weights at `prefix`.

    heads: (num_heads, num_head_channels) where the caller knows them (a ControlNet copies its base's).
    encoder_only: the weights are a copy of the U-Net's first half (a ControlNet's, `models/controlnet.py`): there
    is no `out.*`, so out_channels is taken to be in_channels, and the middle block's transformer may hold no blocks
    (diffusers' small SDXL ControlNets), so the context width is read off any cross-attention, and is 1 where
    nothing attends to text (as ComfyUI reads those files).
    """
    keys = sd.keys()
    mc, in_channels = sd[prefix + "input_blocks.0.0.weight"].shape[:2]
    blocks = key_indices(keys, prefix + "input_blocks.")
    downs = [i for i in blocks if prefix + f"input_blocks.{i}.0.op.weight" in sd]
    num_res_blocks = (downs[0] if downs else len(blocks)) - 1
    channel_mult, attention_resolutions, depths = [], [], {}
    for level in range(len(downs) + 1):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(sd[prefix + f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
        if prefix + f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention_resolutions.append(2**level)
            depths[level] = len(key_indices(keys, prefix + f"input_blocks.{first}.1.transformer_blocks."))
    # A level without attention leaves no depth in the keys: the one depth of all levels if they share one
    # (the refiner's 4), else 1 (SDXL base's [1, 2, 10]), as the original YAMLs write them. The middle block
    # has the last level's depth.
    middle = len(key_indices(keys, prefix + "middle_block.1.transformer_blocks."))
    fill = depths[min(depths)] if len(set(depths.values())) == 1 else 1
    transformer_depth = [depths.get(level, fill) for level in range(len(channel_mult))]
    last = len(channel_mult) - 1
    if last not in depths:
        transformer_depth[last] = middle
    elif depths[last] != middle:
        raise ValueError(f"a middle block of depth {middle} beside a last level of depth {depths[last]}")
    proj_in = sd[prefix + "middle_block.1.proj_in.weight"]
    linear = proj_in.ndim == 2
    if encoder_only:
        out_channels = in_channels
        attn2 = [k for k in keys if k.startswith(prefix) and k.endswith(".attn2.to_k.weight")]
        context_dim = sd[attn2[0]].shape[1] if attn2 else 1
    else:
        out_channels = sd[prefix + "out.2.weight"].shape[0]
        context_dim = sd[prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        attention_resolutions=tuple(attention_resolutions),
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(channel_mult),
        # Head counts leave no trace in the shapes: these are SD 1.x's and SD 2.x's (or the `heads` given).
        num_heads=heads[0] if heads else None if linear else 8,
        num_head_channels=heads[1] if heads else 64 if linear else None,
        transformer_depth=tuple(transformer_depth),
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        adm_in_channels=sd[prefix + "label_emb.0.0.weight"].shape[1] if prefix + "label_emb.0.0.weight" in sd else None,
    )


def _infer_autoencoder(sd: dict[str, torch.Tensor]) -> AutoencoderConfig:
    keys = sd.keys()
    ch, in_channels = sd[VAE + "encoder.conv_in.weight"].shape[:2]
    levels = key_indices(keys, VAE + "encoder.down.")
    z_channels = sd[VAE + "decoder.conv_in.weight"].shape[1]
    return AutoencoderConfig(
        embed_dim=sd[VAE + "post_quant_conv.weight"].shape[1],
        z_channels=z_channels,
        double_z=sd[VAE + "encoder.conv_out.weight"].shape[0] == 2 * z_channels,
        in_channels=in_channels,
        out_ch=sd[VAE + "decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(sd[VAE + f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len(key_indices(keys, VAE + "encoder.down.0.block.")),
    )


def _infer_text(sd: dict[str, torch.Tensor], prefix: str, stock: TextEncoderConfig) -> TextEncoderConfig:
    """The text encoder whose weights start with `prefix` (`...transformer.text_model.` for CLIP's layout,
    `...model.` for OpenCLIP's): `stock`'s options with the widths and depth of the weights."""
    keys = sd.keys()
    text = dataclasses.replace(stock)
    if stock.kind == "clip":
        text.vocab_size, text.width = sd[prefix + "embeddings.token_embedding.weight"].shape
        text.max_length = sd[prefix + "embeddings.position_embedding.weight"].shape[0]
        text.layers = len(key_indices(keys, prefix + "encoder.layers."))
        text.mlp_width = sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:
        text.vocab_size, text.width = sd[prefix + "token_embedding.weight"].shape
        text.max_length = sd[prefix + "positional_embedding"].shape[0]
        text.layers = len(key_indices(keys, prefix + "transformer.resblocks."))
        text.mlp_width = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text.projection = prefix + "text_projection" in sd
        if text.projection:
            text.embed_dim = sd[prefix + "text_projection"].shape[1]
        elif not text.pooled:  # converted back from diffusers: the last block is the one SD 2.x's penultimate is
            text.layer = "last"
    text.heads = max(1, text.width // 64)  # CLIP's and OpenCLIP's head width is 64
    text.__post_init__()
    return text


def _infer_conditioner(sd: dict[str, torch.Tensor], family: Family) -> dict:
    """The config fields of the family's conditioner: its preset's, with each text encoder's widths and depth read
    off the weights at the family's prefixes, and the micro-conditioning's width off the U-Net's vector input."""
    stock = preset(family.preset)
    texts = [_infer_text(sd, prefix, t) for prefix, t in zip(family.text_prefixes, stock.texts, strict=True)]
    fields = {"text": texts[0], "text2": texts[1] if len(texts) > 1 else None, "scale_factor": stock.scale_factor}
    if micro := stock.micro_conditioning:
        adm = sd[UNET + "label_emb.0.0.weight"].shape[1]
        numbers = sum(MICRO_CONDITIONING[m] for m in micro)
        fields |= {"micro_conditioning": micro, "micro_conditioning_width": (adm - texts[-1].embed_dim) // numbers}
    return fields


def check_checkpoint_keys(sd: dict[str, torch.Tensor], path) -> None:
    keys = list(sd)
    needed = [UNET + "input_blocks.0.0.weight", VAE + "encoder.conv_in.weight"]
    has_text = family_of_keys(sd.keys()) is not None
    if all(k in sd for k in needed) and has_text:
        return
    sample = ", ".join(keys[:3]) or "no tensors"
    if any(
        k.startswith(("down_blocks.", "conv_in.", "time_embedding.", "unet.", "encoder.down_blocks.")) for k in keys
    ):
        hint = "it looks like a diffusers-format component, not a single-file Stable Diffusion checkpoint"
    elif any(k.startswith(UNET) for k in keys):
        missing = [] if VAE + "encoder.conv_in.weight" in sd else ["first_stage_model.*"]
        missing += [] if has_text else ["cond_stage_model.* (or SDXL's conditioner.*)"]
        hint = f"it has a U-Net but no {' and no '.join(missing)} weights"
    else:
        hint = "no model.diffusion_model.* / first_stage_model.* / cond_stage_model.* (or conditioner.*) keys"
    raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: {hint} (first keys: {sample})")


def infer_config(
    sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, path=None
) -> LatentDiffusionConfig:
    """The model's config: from our metadata when present, else read off the keys and shapes.

    v-prediction leaves no trace in the weights. Without metadata it is taken from the file name, as the family's
    `v_name` says: a `-v` part (`768-v-ema.ckpt`), or for SD 2.x also a 768 (`v2-1_768-ema-pruned.safetensors`).
    """
    if metadata and CONFIG_METADATA_KEY in metadata:
        try:
            return LatentDiffusionConfig.from_json(metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: its {CONFIG_METADATA_KEY} metadata is not a valid config ({e})") from None
    check_checkpoint_keys(sd, path)
    try:
        family = family_of_keys(sd.keys())
        conditioner = _infer_conditioner(sd, family)
        is_v = re.search(family.v_name, Path(path).name.lower() if path else "") is not None
        return LatentDiffusionConfig(
            unet=infer_unet(sd),
            autoencoder=_infer_autoencoder(sd),
            parameterization="v" if is_v else "eps",
            **conditioner,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: an incomplete Stable Diffusion checkpoint: it has no {e.args[0]}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: its weights describe no model this project builds ({e})") from None


def config_from_argument(config) -> LatentDiffusionConfig:
    """A CompVis YAML path, its parsed mapping or a LatentDiffusionConfig -> the config; CheckpointError otherwise."""
    if isinstance(config, LatentDiffusionConfig):
        return config
    path = config if isinstance(config, (str, os.PathLike)) else None
    if path is not None:
        import yaml

        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CheckpointError(f"{path}: cannot read the config ({first_line(e)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a CompVis YAML config (it holds a {type(config).__name__})")
    if not isinstance(config, dict):
        raise CheckpointError(f"config must be a CompVis YAML path or its parsed mapping, not {type(config).__name__}")
    try:
        return from_ldm_config(config)
    except ValueError as e:
        raise CheckpointError(f"{path if path is not None else 'config'}: {e}") from None
