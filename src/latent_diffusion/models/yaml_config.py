"""The original inference YAMLs' `model:` mapping <-> `LatentDiffusionConfig`: CompVis's (`ldm.models.diffusion.ddpm.
LatentDiffusion`, SD 1.x and 2.x) and generative-models' (`sgm.models.diffusion.DiffusionEngine`, SDXL), with the
same parameter names and meanings, so that `--config v1-inference.yaml` and `sd_xl_base.yaml` work as they are.
"""

from __future__ import annotations

import dataclasses

from .config import (
    CLIP_VIT_L_14,
    OPENCLIP_VIT_BIGG_14,
    OPENCLIP_VIT_H_14,
    AutoencoderConfig,
    LatentDiffusionConfig,
    TextEncoderConfig,
    UNetConfig,
)

# Our extension of the text encoders' params: their widths, so that small CLIP-architecture encoders can be configured
# too (CompVis ignores them).
WIDTHS = tuple(
    f.name for f in dataclasses.fields(TextEncoderConfig) if f.name not in ("kind", "layer", "final_norm", "pooled")
)


def _text_config_from_ldm(cond: dict) -> TextEncoderConfig:
    """A text encoder's config from its CompVis `cond_stage_config` or generative-models `emb_models` entry."""
    target = cond.get("target", "")
    params = dict(cond.get("params") or {})
    arch = params.get("arch")
    if target.endswith(("FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")):
        stock = {"ViT-H-14": OPENCLIP_VIT_H_14, "ViT-bigG-14": OPENCLIP_VIT_BIGG_14}
        if arch is not None and arch not in stock:
            raise ValueError(f"OpenCLIP arch {arch!r} is not supported; only ViT-H-14 and ViT-bigG-14")
        second = target.endswith("2")  # generative-models' FrozenOpenCLIPEmbedder2: SDXL's, pooled, legacy or not
        text = dataclasses.replace(stock[arch or ("ViT-bigG-14" if second else "ViT-H-14")])
        text.layer = params.get("layer", "last")
        text.final_norm = not second or params.get("legacy", True)  # legacy: the final norm on the layer taken
        text.pooled = second and params.get("always_return_pooled", False)
    elif target.endswith("FrozenCLIPEmbedder"):
        text = dataclasses.replace(CLIP_VIT_L_14)
        text.layer = params.get("layer", "last")
        if text.layer == "hidden":  # generative-models: hidden_states[layer_idx], without the final norm
            layers = params.get("layers", CLIP_VIT_L_14.layers)  # (our extension below may set another depth)
            if params.get("layer_idx") != layers - 1:
                raise ValueError(
                    f"FrozenCLIPEmbedder: only layer_idx {layers - 1} (the penultimate layer) is "
                    f"supported, not {params.get('layer_idx')!r}"
                )
            text.layer, text.final_norm = "penultimate", False
    else:
        raise ValueError(f"unsupported text encoder target {target!r}")
    for k in params.keys() & set(WIDTHS):
        setattr(text, k, params[k])
    text.__post_init__()
    return text


def _text_params(t: TextEncoderConfig, stock: TextEncoderConfig, **params) -> dict:
    """`params` plus the widths where `t` differs from the stock encoder (`WIDTHS`)."""
    return params | {k: getattr(t, k) for k in WIDTHS if getattr(t, k) != getattr(stock, k)}


# generative-models' micro-conditioning input keys <-> our names
MICRO_KEYS = {
    "original_size_as_tuple": "original_size",
    "crop_coords_top_left": "crop_coords",
    "target_size_as_tuple": "target_size",
    "aesthetic_score": "aesthetic_score",
}


def from_ldm_config(cfg: dict) -> LatentDiffusionConfig:
    """Config from the `model:` mapping of a CompVis inference YAML or a generative-models one (SDXL's
    `sd_xl_base.yaml`, `sd_xl_refiner.yaml`), or the whole parsed YAML."""
    try:
        return _from_ldm_config(cfg)
    except KeyError as e:
        raise ValueError(f"not a CompVis or generative-models config: missing {e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"not a CompVis or generative-models config: a value of the wrong type ({e})") from None


def _unet_config_from_ldm(u: dict) -> UNetConfig:
    num_heads = u.get("num_heads", -1)
    num_head_channels = u.get("num_head_channels", -1)
    if num_head_channels not in (-1, None):
        num_heads = None  # CompVis: num_head_channels, when given, overrides num_heads
    context_dim = u["context_dim"]
    if isinstance(context_dim, list):  # generative-models: one per level, all the same in every SD model
        if len(set(context_dim)) != 1:
            raise ValueError(f"network_config: a context_dim per level {context_dim} is not supported")
        context_dim = context_dim[0]
    depth = u.get("transformer_depth", 1)
    if u.get("transformer_depth_middle") not in (None, depth if isinstance(depth, int) else depth[-1]):
        raise ValueError("network_config: a transformer_depth_middle other than the last level's is not supported")
    return UNetConfig(
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        model_channels=u["model_channels"],
        attention_resolutions=tuple(u["attention_resolutions"]),
        num_res_blocks=u["num_res_blocks"],
        channel_mult=tuple(u["channel_mult"]),
        num_heads=None if num_heads in (-1, None) else num_heads,
        num_head_channels=None if num_head_channels in (-1, None) else num_head_channels,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=u.get("use_linear_in_transformer", False),
        adm_in_channels=u.get("adm_in_channels") if u.get("num_classes") == "sequential" else None,
    )


def _from_ldm_config(cfg: dict) -> LatentDiffusionConfig:
    if "model" in cfg and "params" not in cfg:
        cfg = cfg["model"]
    p = cfg["params"]
    fs = p["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("first_stage_config: attention outside the autoencoder's middle block is not supported")
    autoencoder = AutoencoderConfig(
        embed_dim=fs["embed_dim"],
        z_channels=dd["z_channels"],
        double_z=dd.get("double_z", True),
        in_channels=dd["in_channels"],
        out_ch=dd["out_ch"],
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
    )
    if "network_config" not in p:  # CompVis's LatentDiffusion
        return LatentDiffusionConfig(
            unet=_unet_config_from_ldm(p["unet_config"]["params"]),
            autoencoder=autoencoder,
            text=_text_config_from_ldm(p.get("cond_stage_config") or {}),
            scale_factor=p.get("scale_factor", 1.0),
            linear_start=p.get("linear_start", 1e-4),  # CompVis's defaults; every SD YAML sets both
            linear_end=p.get("linear_end", 2e-2),
            timesteps=p.get("timesteps", 1000),
            parameterization=p.get("parameterization", "eps"),
        )
    # generative-models' DiffusionEngine: the conditioner's embedders in order, the schedule in the denoiser
    texts, micro, width = [], [], 256
    for e in p["conditioner_config"]["params"]["emb_models"]:
        if e["target"].endswith("ConcatTimestepEmbedderND"):
            if e["input_key"] not in MICRO_KEYS:
                raise ValueError(f"conditioner_config: unknown micro-conditioning input {e['input_key']!r}")
            micro.append(MICRO_KEYS[e["input_key"]])
            width = (e.get("params") or {}).get("outdim", width)
        else:
            texts.append(_text_config_from_ldm(e))
    if not 1 <= len(texts) <= 2 or texts[-1].pooled != bool(micro) or any(t.pooled for t in texts[:-1]):
        raise ValueError(
            "conditioner_config: only SDXL's conditioners are supported (one or two text encoders, "
            "the last pooled, then micro-conditioning)"
        )
    denoiser = p.get("denoiser_config", {}).get("params", {})
    discretization = denoiser.get("discretization_config", {}).get("params", {})
    scaling = denoiser.get("scaling_config", {}).get("target", "EpsScaling")
    return LatentDiffusionConfig(
        unet=_unet_config_from_ldm(p["network_config"]["params"]),
        autoencoder=autoencoder,
        text=texts[0],
        text2=texts[1] if len(texts) == 2 else None,
        micro_conditioning=tuple(micro),
        micro_conditioning_width=width,
        scale_factor=p.get("scale_factor", 1.0),
        linear_start=discretization.get("linear_start", 0.00085),  # LegacyDDPMDiscretization's defaults
        linear_end=discretization.get("linear_end", 0.012),
        timesteps=denoiser.get("num_idx", 1000),
        parameterization="v" if scaling.endswith("VScaling") else "eps",
    )


def to_ldm_config(cfg: LatentDiffusionConfig) -> dict:
    """The `model:` mapping of the original inference YAML for this config (the inverse of from_ldm_config):
    CompVis's for SD 1.x/2.x, generative-models' for SDXL.

    Text-encoder widths that differ from the stock encoders are written as extra text-encoder params, which
    the originals would not read; the standard presets produce the stock YAMLs.
    """
    return _sgm_yaml(cfg) if cfg.micro_conditioning else _compvis_yaml(cfg)


def _unet_yaml(u: UNetConfig) -> dict:
    depth = u.transformer_depth[0] if len(set(u.transformer_depth)) == 1 else list(u.transformer_depth)
    return {
        **({"num_classes": "sequential", "adm_in_channels": u.adm_in_channels} if u.adm_in_channels else {}),
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        **({"num_heads": u.num_heads} if u.num_heads is not None else {}),
        **({"num_head_channels": u.num_head_channels} if u.num_head_channels is not None else {}),
        "use_spatial_transformer": True,
        "transformer_depth": depth,
        "context_dim": u.context_dim,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "legacy": False,
    }


def _autoencoder_yaml(a: AutoencoderConfig) -> dict:
    return {
        "embed_dim": a.embed_dim,
        "ddconfig": {
            "double_z": a.double_z,
            "z_channels": a.z_channels,
            "resolution": 256,
            "in_channels": a.in_channels,
            "out_ch": a.out_ch,
            "ch": a.ch,
            "ch_mult": list(a.ch_mult),
            "num_res_blocks": a.num_res_blocks,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def _compvis_yaml(cfg: LatentDiffusionConfig) -> dict:
    """CompVis's `ldm.models.diffusion.ddpm.LatentDiffusion` (SD 1.x, 2.x)."""
    t, unet, first_stage = cfg.text, _unet_yaml(cfg.unet), _autoencoder_yaml(cfg.autoencoder)
    stock = CLIP_VIT_L_14 if t.kind == "clip" else OPENCLIP_VIT_H_14
    params = {
        "linear_start": cfg.linear_start,
        "linear_end": cfg.linear_end,
        "timesteps": cfg.timesteps,
        "scale_factor": cfg.scale_factor,
        "parameterization": cfg.parameterization,
        "conditioning_key": "hybrid" if cfg.concat_channels else "crossattn",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": first_stage},
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules."
            + ("FrozenCLIPEmbedder" if t.kind == "clip" else "FrozenOpenCLIPEmbedder"),
            "params": _text_params(t, stock, layer=t.layer),
        },
    }
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def _embedder_yaml(t: TextEncoderConfig) -> dict:
    """One of generative-models' text embedders (SDXL's FrozenCLIPEmbedder and FrozenOpenCLIPEmbedder2)."""
    if t.kind == "clip":
        layer = {"layer": "hidden", "layer_idx": t.layers - 1} if not t.final_norm else {"layer": t.layer}
        target, params = "FrozenCLIPEmbedder", _text_params(t, CLIP_VIT_L_14, **layer)
    else:
        target = "FrozenOpenCLIPEmbedder2"
        params = _text_params(
            t,
            OPENCLIP_VIT_BIGG_14,
            arch="ViT-bigG-14",
            version="laion2b_s39b_b160k",
            freeze=True,
            layer=t.layer,
            always_return_pooled=t.pooled,
            legacy=t.final_norm,
        )
    return {
        "is_trainable": False,
        "input_key": "txt",
        "params": params,
        "target": f"sgm.modules.encoders.modules.{target}",
    }


def _sgm_yaml(cfg: LatentDiffusionConfig) -> dict:
    """generative-models' `sgm.models.diffusion.DiffusionEngine` (SDXL)."""
    unet, first_stage = _unet_yaml(cfg.unet), _autoencoder_yaml(cfg.autoencoder)
    keys = {name: key for key, name in MICRO_KEYS.items()}
    micro = [
        {
            "is_trainable": False,
            "input_key": keys[m],
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": cfg.micro_conditioning_width},
        }
        for m in cfg.micro_conditioning
    ]
    scaling = "VScaling" if cfg.parameterization == "v" else "EpsScaling"
    params = {
        "scale_factor": cfg.scale_factor,
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": cfg.timesteps,
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                    "params": {"linear_start": cfg.linear_start, "linear_end": cfg.linear_end},
                },
            },
        },
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {
            "target": "sgm.modules.GeneralConditioner",
            "params": {"emb_models": [_embedder_yaml(t) for t in cfg.texts] + micro},
        },
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": first_stage},
    }
    return {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}
