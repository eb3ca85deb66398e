"""Hyperparameters of the three parts of latent diffusion, named presets, and CompVis YAML -> config.

Field names are CompVis's (`model_channels`, `attention_resolutions`, `ch_mult`, ...), so a reader can
hold a CompVis inference YAML beside these dataclasses. Where CompVis uses a sentinel (`num_heads=-1`)
we use `None`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field

from .family import Family, family_of_text_kind
from .parameterization import PARAMETERIZATIONS


def check_ranges(cfg, **ranges: tuple[float, float]) -> None:
    """Each named field (a number, a tuple of numbers, or None) within [low, high], and whole where the bounds are
    whole numbers; ValueError naming the field and the range. Configs come from files: nothing else is trusted."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cfg)}  # "int | None", "tuple[int, ...]", ...
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if value is None and "None" not in types[name]:
            raise ValueError(f"{type(cfg).__name__}.{name} must be set")
        if isinstance(value, (tuple, list)) != ("tuple" in types[name]):
            raise ValueError(
                f"{type(cfg).__name__}.{name} must be {'a list' if 'tuple' in types[name] else 'a number'}"
            )
        values = tuple(value) if isinstance(value, (tuple, list)) else () if value is None else (value,)
        kind = int if isinstance(low, int) and isinstance(high, int) else (int, float)
        if not all(isinstance(v, kind) and not isinstance(v, bool) and low <= v <= high for v in values) or (
            isinstance(value, (tuple, list)) and len(values) > 8
        ):
            what = "whole numbers" if kind is int else "numbers"
            raise ValueError(f"{type(cfg).__name__}.{name} must be {what} in [{low}, {high}], not {value!r}")


@dataclass
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models: noisy latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int | None = 8  # SD 1.x: a fixed head count ...
    num_head_channels: int | None = None  # ... SD 2.x: a fixed head width (64); exactly one of the two is set
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    adm_in_channels: int | None = None  # width of the vector conditioning y (CompVis num_classes="sequential")

    def __post_init__(self):
        check_ranges(self, in_channels=(1, 64), out_channels=(1, 64), model_channels=(1, 4096), num_res_blocks=(1, 16),
                     attention_resolutions=(1, 64), channel_mult=(1, 64), num_heads=(1, 256),
                     num_head_channels=(1, 1024), transformer_depth=(1, 64), context_dim=(1, 16384),
                     adm_in_channels=(1, 65536))  # fmt: skip
        self.attention_resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))  # a set; (4, 2, 1)
        self.channel_mult = tuple(self.channel_mult)
        if (self.num_heads is None) == (self.num_head_channels is None) or not self.channel_mult:
            raise ValueError("UNetConfig: set exactly one of num_heads and num_head_channels, and a channel_mult")
        for width in (self.model_channels * m for m in self.channel_mult):
            if width % 32 or width % (self.num_heads or self.num_head_channels):
                raise ValueError(f"UNetConfig: a level {width} wide does not split into 32 norm groups and its heads")


@dataclass
class AutoencoderConfig:
    embed_dim: int = 4  # latent channels
    z_channels: int = 4
    double_z: bool = True  # the encoder outputs mean and log-variance
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len - 1 downsamplings: 4 levels = 8x smaller per side
    num_res_blocks: int = 2

    def __post_init__(self):
        check_ranges(self, embed_dim=(1, 64), z_channels=(1, 64), in_channels=(1, 16), out_ch=(1, 16), ch=(1, 1024),
                     ch_mult=(1, 64), num_res_blocks=(1, 16))  # fmt: skip
        self.ch_mult = tuple(self.ch_mult)
        if not self.ch_mult or any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"AutoencoderConfig: ch {self.ch} x ch_mult {self.ch_mult} must be multiples of 32")

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel, per side: 2 ** (levels − 1), 8 for SD."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextEncoderConfig:
    kind: str = "clip"  # "clip": transformers-layout CLIP (SD 1.x); "openclip": OpenCLIP layout (SD 2.x)
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # CLIP ViT-L/14: quick_gelu; OpenCLIP ViT-H/14: gelu
    layer: str = "last"  # "last" or "penultimate" hidden state (final layer norm applied to either)
    pad_token: int = 49407  # CompVis FrozenCLIPEmbedder pads with <|endoftext|>; open_clip pads with 0
    embed_dim: int = 1024  # width of OpenCLIP's text_projection (stored in checkpoints, unused for conditioning)

    def __post_init__(self):
        check_ranges(self, vocab_size=(49408, 10**6), max_length=(3, 4096), width=(1, 16384), layers=(1, 256),
                     heads=(1, 256), mlp_width=(1, 65536), pad_token=(0, self.vocab_size - 1), embed_dim=(1, 16384))  # fmt: skip
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig: width {self.width} does not split into {self.heads} heads")
        if self.kind not in ("clip", "openclip"):
            raise ValueError(f"TextEncoderConfig.kind must be 'clip' or 'openclip', not {self.kind!r}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"TextEncoderConfig.layer must be 'last' or 'penultimate', not {self.layer!r}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoderConfig.activation must be 'quick_gelu' or 'gelu', not {self.activation!r}")


@dataclass
class LatentDiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scale_factor: float = 0.18215  # latents are multiplied by this so that they have about unit variance
    linear_start: float = 0.00085  # beta_1 of the "scaled linear" schedule
    linear_end: float = 0.012  # beta_T
    timesteps: int = 1000
    parameterization: str = "eps"  # "eps": the U-Net predicts the noise; "v": v = sqrt(ab) eps - sqrt(1-ab) x0
    # Generation defaults of this model where they differ from its family's (None: the family's), e.g. the
    # built-in model's 64 px and CFG 2. Saved with the config in the files this project writes.
    image_size: int | None = None
    cfg_scale: float | None = None

    def __post_init__(self):
        if not (
            isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor) and self.scale_factor > 0
        ):
            raise ValueError(f"scale_factor must be a positive finite number, not {self.scale_factor}")
        check_ranges(self, linear_start=(1e-8, 0.5), linear_end=(1e-8, 0.5), timesteps=(2, 100_000),
                     image_size=(8, 8192), cfg_scale=(-1e4, 1e4))  # fmt: skip
        if self.unet.out_channels != self.autoencoder.embed_dim or self.concat_channels < 0:
            raise ValueError(f"the U-Net's {self.unet.in_channels} input and {self.unet.out_channels} output channels "
                             f"do not fit the autoencoder's {self.autoencoder.embed_dim} latent channels")  # fmt: skip
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be 'eps' or 'v', not {self.parameterization!r}")
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"U-Net context_dim {self.unet.context_dim} must equal the text encoder width {self.text.width}"
            )

    @property
    def family(self) -> Family:
        return family_of_text_kind(self.text.kind)

    @property
    def concat_channels(self) -> int:
        """Channels appended to the noisy latent at the U-Net's input (the "concat" conditioning)."""
        return self.unet.in_channels - self.autoencoder.embed_dim

    @property
    def inpainting(self) -> bool:
        """An inpainting model: the U-Net also sees the mask and the masked image's latent (4 + 1 + 4 channels)."""
        return self.concat_channels == self.autoencoder.embed_dim + 1

    @property
    def default_size(self) -> int:
        return self.image_size or self.family.default_size

    @property
    def default_cfg_scale(self) -> float:
        return self.cfg_scale if self.cfg_scale is not None else self.family.default_cfg_scale

    @property
    def variant(self) -> str:
        """A short human name: sd1 / sd2, with -inpaint and -v suffixes."""
        name = self.family.name
        if self.inpainting:
            name += "-inpaint"
        if self.parameterization == "v":
            name += "-v"
        return name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatentDiffusionConfig:
        d = json.loads(text)
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in ("unet", "autoencoder", "text")):
            raise ValueError("a config needs unet, autoencoder and text sections")
        return cls(
            unet=UNetConfig(**d.pop("unet")),
            autoencoder=AutoencoderConfig(**d.pop("autoencoder")),
            text=TextEncoderConfig(**d.pop("text")),
            **d,
        )


CLIP_VIT_L_14 = TextEncoderConfig()  # openai/clip-vit-large-patch14, last hidden state
OPENCLIP_VIT_H_14 = TextEncoderConfig(
    kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
    layer="penultimate", pad_token=0, embed_dim=1024,
)  # fmt: skip
SD2_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)


def _sd1(**unet) -> LatentDiffusionConfig:
    return LatentDiffusionConfig(unet=UNetConfig(**unet), text=dataclasses.replace(CLIP_VIT_L_14))


def _sd2(parameterization: str) -> LatentDiffusionConfig:
    return LatentDiffusionConfig(
        unet=dataclasses.replace(SD2_UNET),
        text=dataclasses.replace(OPENCLIP_VIT_H_14),
        parameterization=parameterization,
    )


def _tiny() -> LatentDiffusionConfig:
    """The real architecture at tiny widths: for tests and the demo, not for pictures."""
    return LatentDiffusionConfig(
        unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
            num_heads=2, context_dim=32,
        ),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64),
    )  # fmt: skip


PRESETS = {
    "sd-v1.5": _sd1,
    "sd-v1.5-inpaint": lambda: _sd1(in_channels=9),
    "sd-v2.1": lambda: _sd2("eps"),
    "sd-v2.1-768-v": lambda: _sd2("v"),
    "tiny": _tiny,
}


def preset(name: str) -> LatentDiffusionConfig:
    """A fresh copy of a named preset (see PRESETS): changing it changes nothing else."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())


def _text_config_from_ldm(cond: dict) -> TextEncoderConfig:
    target = cond.get("target", "")
    params = dict(cond.get("params") or {})
    if target.endswith("FrozenOpenCLIPEmbedder"):
        text = dataclasses.replace(OPENCLIP_VIT_H_14)
        if params.get("arch", "ViT-H-14") != "ViT-H-14":
            raise ValueError(f"cond_stage_config: only OpenCLIP arch ViT-H-14 is supported, not {params['arch']!r}")
        text.layer = params.get("layer", "last")
    elif target.endswith("FrozenCLIPEmbedder"):
        text = dataclasses.replace(CLIP_VIT_L_14)
        text.layer = params.get("layer", "last")
    else:
        raise ValueError(f"cond_stage_config: unsupported text encoder target {target!r}")
    # Our extension: explicit widths, so that small CLIP-architecture text encoders can be configured too.
    known = {f.name for f in dataclasses.fields(TextEncoderConfig)} - {"kind"}
    for k in known & params.keys():
        setattr(text, k, params[k])
    text.__post_init__()
    return text


def from_ldm_config(cfg: dict) -> LatentDiffusionConfig:
    """Config from the `model:` mapping of a CompVis inference YAML (or the whole parsed YAML)."""
    try:
        return _from_ldm_config(cfg)
    except KeyError as e:
        raise ValueError(f"not a CompVis LatentDiffusion config: missing {e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"not a CompVis LatentDiffusion config: a value of the wrong type ({e})") from None


def _from_ldm_config(cfg: dict) -> LatentDiffusionConfig:
    if "model" in cfg and "params" not in cfg:
        cfg = cfg["model"]
    p = cfg["params"]
    u = p["unet_config"]["params"]
    fs = p["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("first_stage_config: attention outside the autoencoder's middle block is not supported")
    num_heads = u.get("num_heads", -1)
    num_head_channels = u.get("num_head_channels", -1)
    if num_head_channels not in (-1, None):
        num_heads = None  # CompVis: num_head_channels, when given, overrides num_heads
    unet = UNetConfig(
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        model_channels=u["model_channels"],
        attention_resolutions=tuple(u["attention_resolutions"]),
        num_res_blocks=u["num_res_blocks"],
        channel_mult=tuple(u["channel_mult"]),
        num_heads=None if num_heads in (-1, None) else num_heads,
        num_head_channels=None if num_head_channels in (-1, None) else num_head_channels,
        transformer_depth=u.get("transformer_depth", 1),
        context_dim=u["context_dim"],
        use_linear_in_transformer=u.get("use_linear_in_transformer", False),
        adm_in_channels=u.get("adm_in_channels") if u.get("num_classes") == "sequential" else None,
    )
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
    return LatentDiffusionConfig(
        unet=unet,
        autoencoder=autoencoder,
        text=_text_config_from_ldm(p.get("cond_stage_config") or {}),
        scale_factor=p.get("scale_factor", 1.0),
        linear_start=p.get("linear_start", 1e-4),  # CompVis's defaults; every SD YAML sets both
        linear_end=p.get("linear_end", 2e-2),
        timesteps=p.get("timesteps", 1000),
        parameterization=p.get("parameterization", "eps"),
    )


def to_ldm_config(cfg: LatentDiffusionConfig) -> dict:
    """The `model:` mapping of a CompVis inference YAML for this config (the inverse of from_ldm_config).

    Text-encoder widths that differ from ViT-L/14 or ViT-H/14 are written as extra `cond_stage_config`
    params, which CompVis would not read; the standard presets produce the stock YAMLs.
    """
    u, a, t = cfg.unet, cfg.autoencoder, cfg.text
    stock = CLIP_VIT_L_14 if t.kind == "clip" else OPENCLIP_VIT_H_14
    text_params = {"layer": t.layer}
    for f in dataclasses.fields(TextEncoderConfig):
        if f.name not in ("kind", "layer") and getattr(t, f.name) != getattr(stock, f.name):
            text_params[f.name] = getattr(t, f.name)
    params = {
        "linear_start": cfg.linear_start,
        "linear_end": cfg.linear_end,
        "timesteps": cfg.timesteps,
        "scale_factor": cfg.scale_factor,
        "parameterization": cfg.parameterization,
        "conditioning_key": "hybrid" if cfg.concat_channels else "crossattn",
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "in_channels": u.in_channels,
                "out_channels": u.out_channels,
                "model_channels": u.model_channels,
                "attention_resolutions": list(u.attention_resolutions),
                "num_res_blocks": u.num_res_blocks,
                "channel_mult": list(u.channel_mult),
                **({"num_heads": u.num_heads} if u.num_heads is not None else {}),
                **({"num_head_channels": u.num_head_channels} if u.num_head_channels is not None else {}),
                "use_spatial_transformer": True,
                "transformer_depth": u.transformer_depth,
                "context_dim": u.context_dim,
                "use_linear_in_transformer": u.use_linear_in_transformer,
                **({"num_classes": "sequential", "adm_in_channels": u.adm_in_channels} if u.adm_in_channels else {}),
                "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
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
            },
        },
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules."
            + ("FrozenCLIPEmbedder" if t.kind == "clip" else "FrozenOpenCLIPEmbedder"),
            "params": text_params,
        },
    }
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}
