"""Hyperparameters of the three parts of latent diffusion and named presets (`models/yaml_config.py` reads and writes them as
the original inference YAMLs).

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

from ..sampling.parameterization import PARAMETERIZATIONS
from .family import SDXL, SDXL_REFINER, Family, family_of_text_kind


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
    transformer_depth: tuple[int, ...] = 1  # transformer blocks per level (a number: the same for every level);
    # the middle block has the last level's. SDXL base: (1, 2, 10), its first level without attention. 0: a
    # SpatialTransformer without blocks (norm, proj_in, proj_out), as diffusers builds a cross-attention block of
    # `transformer_layers_per_block` 0 (the middle block of its small SDXL ControlNets)
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    adm_in_channels: int | None = None  # width of the vector conditioning y (CompVis num_classes="sequential")

    def __post_init__(self):
        levels = len(self.channel_mult) if isinstance(self.channel_mult, (tuple, list)) else 1
        if isinstance(self.transformer_depth, int) and not isinstance(self.transformer_depth, bool):
            self.transformer_depth = (self.transformer_depth,) * levels
        if isinstance(self.transformer_depth, (tuple, list)) and len(self.transformer_depth) != levels:
            raise ValueError(
                f"UNetConfig: transformer_depth {list(self.transformer_depth)} must have one number per "
                f"level of channel_mult {list(self.channel_mult)}"
            )
        check_ranges(
            self,
            in_channels=(1, 64),
            out_channels=(1, 64),
            model_channels=(1, 4096),
            num_res_blocks=(1, 16),
            attention_resolutions=(1, 64),
            channel_mult=(1, 64),
            num_heads=(1, 256),
            num_head_channels=(1, 1024),
            transformer_depth=(0, 64),
            context_dim=(1, 16384),
            adm_in_channels=(1, 65536),
        )
        self.attention_resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))  # a set; (4, 2, 1)
        self.channel_mult = tuple(self.channel_mult)
        self.transformer_depth = tuple(self.transformer_depth)
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
        check_ranges(
            self,
            embed_dim=(1, 64),
            z_channels=(1, 64),
            in_channels=(1, 16),
            out_ch=(1, 16),
            ch=(1, 1024),
            ch_mult=(1, 64),
            num_res_blocks=(1, 16),
        )
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
    layer: str = "last"  # "last" or "penultimate" hidden state
    final_norm: bool = True  # the final layer norm on that hidden state (SD 1.x, 2.x); SDXL's encoders skip it
    pad_token: int = 49407  # CompVis FrozenCLIPEmbedder pads with <|endoftext|>; open_clip pads with 0
    embed_dim: int = 1024  # width of OpenCLIP's text_projection (unused by SD 2.x; SDXL's pooled text vector)
    pooled: bool = False  # SDXL: this encoder's pooled, projected end token begins the vector conditioning y
    projection: bool = True  # OpenCLIP: holds text_projection and logit_scale (SD 2.x files converted back from
    # diffusers lack both, and the last block, which SD 2.x does not use: they load as `layer="last"` of 23)

    def __post_init__(self):
        check_ranges(
            self,
            vocab_size=(49408, 10**6),
            max_length=(3, 4096),
            width=(1, 16384),
            layers=(1, 256),
            heads=(1, 256),
            mlp_width=(1, 65536),
            pad_token=(0, self.vocab_size - 1),
            embed_dim=(1, 16384),
        )
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig: width {self.width} does not split into {self.heads} heads")
        if self.kind not in ("clip", "openclip"):
            raise ValueError(f"TextEncoderConfig.kind must be 'clip' or 'openclip', not {self.kind!r}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"TextEncoderConfig.layer must be 'last' or 'penultimate', not {self.layer!r}")
        if self.pooled and (self.kind != "openclip" or not self.projection):
            raise ValueError("TextEncoderConfig.pooled needs kind 'openclip' with its projection")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoderConfig.activation must be 'quick_gelu' or 'gelu', not {self.activation!r}")


# SDXL's micro-conditioning (Podell et al. 2023, section 2.2): numbers about the training image that the U-Net
# sees through y, each number as a sinusoidal embedding (generative-models' ConcatTimestepEmbedderND).
# name -> how many numbers: original_size (height, width), crop_coords (top, left), target_size (height, width),
# aesthetic_score (the refiner's).
MICRO_CONDITIONING = {"original_size": 2, "crop_coords": 2, "target_size": 2, "aesthetic_score": 1}
SDXL_MICRO = ("original_size", "crop_coords", "target_size")  # the base's inputs, in generative-models' order
SDXL_REFINER_MICRO = ("original_size", "crop_coords", "aesthetic_score")


@dataclass
class LatentDiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # the text encoder, or SDXL's first
    text2: TextEncoderConfig | None = None  # SDXL base's second text encoder (OpenCLIP ViT-bigG/14)
    # SDXL: the micro-conditioning inputs of y, in order after the pooled text (empty: SD 1.x/2.x). Non-empty
    # means generative-models' layout: the text encoders and these under `conditioner.embedders.N`.
    micro_conditioning: tuple[str, ...] = ()
    micro_conditioning_width: int = 256  # embedding width per number
    scale_factor: float = 0.18215  # latents are multiplied by this so that they have about unit variance
    linear_start: float = 0.00085  # beta_1 of the "scaled linear" schedule
    linear_end: float = 0.012  # beta_T
    timesteps: int = 1000
    parameterization: str = "eps"  # "eps": the U-Net predicts the noise; "v": v = sqrt(ab) eps - sqrt(1-ab) x0
    # Generation defaults of this model where they differ from its family's (None: the family's), e.g. the
    # built-in model's 64 px and CFG 1.75. Saved with the config in the files this project writes.
    image_size: int | None = None
    cfg_scale: float | None = None

    def __post_init__(self):
        if not (
            isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor) and self.scale_factor > 0
        ):
            raise ValueError(f"scale_factor must be a positive finite number, not {self.scale_factor}")
        check_ranges(
            self,
            linear_start=(1e-8, 0.5),
            linear_end=(1e-8, 0.5),
            timesteps=(2, 100_000),
            image_size=(8, 8192),
            cfg_scale=(-1e4, 1e4),
        )
        if self.unet.out_channels != self.autoencoder.embed_dim or self.concat_channels < 0:
            raise ValueError(
                f"the U-Net's {self.unet.in_channels} input and {self.unet.out_channels} output channels "
                f"do not fit the autoencoder's {self.autoencoder.embed_dim} latent channels"
            )
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be 'eps' or 'v', not {self.parameterization!r}")
        check_ranges(self, micro_conditioning_width=(2, 4096))
        self.micro_conditioning = tuple(self.micro_conditioning)
        if unknown := [m for m in self.micro_conditioning if m not in MICRO_CONDITIONING]:
            raise ValueError(f"unknown micro_conditioning {unknown}; known: {', '.join(MICRO_CONDITIONING)}")
        if self.text2 is not None and not self.micro_conditioning:
            raise ValueError("a second text encoder needs SDXL's micro_conditioning (generative-models' layout)")
        widths = [t.width for t in self.texts]
        if self.unet.context_dim != sum(widths):
            raise ValueError(
                f"U-Net context_dim {self.unet.context_dim} must equal the text encoder width "
                f"{' + '.join(map(str, widths))}"
            )
        if self.micro_conditioning and self.unet.adm_in_channels != self.vector_width:
            raise ValueError(
                f"U-Net adm_in_channels {self.unet.adm_in_channels} must equal the width of the vector "
                f"conditioning, {self.vector_width} (pooled text and micro-conditioning)"
            )

    @property
    def texts(self) -> list[TextEncoderConfig]:
        """The text encoders, in the order of their outputs' concatenation into the context."""
        return [self.text] + ([self.text2] if self.text2 is not None else [])

    @property
    def vector_width(self) -> int:
        """Width of y: the pooled text embeddings, then micro_conditioning_width per micro-conditioning number."""
        numbers = sum(MICRO_CONDITIONING[m] for m in self.micro_conditioning)
        return sum(t.embed_dim for t in self.texts if t.pooled) + numbers * self.micro_conditioning_width

    @property
    def family(self) -> Family:
        if self.micro_conditioning:
            return SDXL_REFINER if "aesthetic_score" in self.micro_conditioning else SDXL
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
        text2 = d.pop("text2", None)
        if text2 is not None and not isinstance(text2, dict):
            raise ValueError("a config's text2 section must be a mapping")
        return cls(
            unet=UNetConfig(**d.pop("unet")),
            autoencoder=AutoencoderConfig(**d.pop("autoencoder")),
            text=TextEncoderConfig(**d.pop("text")),
            text2=TextEncoderConfig(**text2) if text2 is not None else None,
            **d,
        )


CLIP_VIT_L_14 = TextEncoderConfig()  # openai/clip-vit-large-patch14, last hidden state
OPENCLIP_VIT_H_14 = TextEncoderConfig(
    kind="openclip",
    width=1024,
    layers=24,
    heads=16,
    mlp_width=4096,
    activation="gelu",
    layer="penultimate",
    pad_token=0,
    embed_dim=1024,
)
# SDXL's text encoders (generative-models' FrozenCLIPEmbedder layer "hidden" 11 and FrozenOpenCLIPEmbedder2):
# the penultimate hidden state without the final layer norm; ViT-bigG also gives its pooled, projected output.
SDXL_CLIP_VIT_L_14 = dataclasses.replace(CLIP_VIT_L_14, layer="penultimate", final_norm=False)
OPENCLIP_VIT_BIGG_14 = TextEncoderConfig(
    kind="openclip",
    width=1280,
    layers=32,
    heads=20,
    mlp_width=5120,
    activation="gelu",
    layer="penultimate",
    final_norm=False,
    pad_token=0,
    embed_dim=1280,
    pooled=True,
)
SDXL_SCALE_FACTOR = 0.13025  # the SDXL autoencoder's latent scale (it was retrained; same architecture)


def _sd1(**unet) -> LatentDiffusionConfig:
    return LatentDiffusionConfig(unet=UNetConfig(**unet), text=dataclasses.replace(CLIP_VIT_L_14))


def _sd2(parameterization: str) -> LatentDiffusionConfig:
    unet = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
    text = dataclasses.replace(OPENCLIP_VIT_H_14)
    return LatentDiffusionConfig(unet=unet, text=text, parameterization=parameterization)


def _sdxl_base() -> LatentDiffusionConfig:
    return LatentDiffusionConfig(
        unet=UNetConfig(
            model_channels=320,
            attention_resolutions=(4, 2),
            channel_mult=(1, 2, 4),
            num_heads=None,
            num_head_channels=64,
            transformer_depth=(1, 2, 10),
            context_dim=768 + 1280,
            use_linear_in_transformer=True,
            adm_in_channels=1280 + 6 * 256,
        ),
        text=dataclasses.replace(SDXL_CLIP_VIT_L_14),
        text2=dataclasses.replace(OPENCLIP_VIT_BIGG_14),
        micro_conditioning=SDXL_MICRO,
        scale_factor=SDXL_SCALE_FACTOR,
    )


def _sdxl_refiner() -> LatentDiffusionConfig:
    return LatentDiffusionConfig(
        unet=UNetConfig(
            model_channels=384,
            attention_resolutions=(4, 2),
            channel_mult=(1, 2, 4, 4),
            num_heads=None,
            num_head_channels=64,
            transformer_depth=4,
            context_dim=1280,
            use_linear_in_transformer=True,
            adm_in_channels=1280 + 5 * 256,
        ),
        text=dataclasses.replace(OPENCLIP_VIT_BIGG_14),
        micro_conditioning=SDXL_REFINER_MICRO,
        scale_factor=SDXL_SCALE_FACTOR,
    )


def _tiny() -> LatentDiffusionConfig:
    """The real architecture at tiny widths: for tests and the demo, not for pictures."""
    return LatentDiffusionConfig(
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            attention_resolutions=(1, 2),
            num_res_blocks=1,
            num_heads=2,
            context_dim=32,
        ),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64),
    )


PRESETS = {
    "sd-v1.5": _sd1,
    "sd-v1.5-inpaint": lambda: _sd1(in_channels=9),
    "sd-v2.1": lambda: _sd2("eps"),
    "sd-v2.1-768-v": lambda: _sd2("v"),
    "sdxl-base": _sdxl_base,
    "sdxl-refiner": _sdxl_refiner,
    "tiny": _tiny,
}


def preset(name: str) -> LatentDiffusionConfig:
    """A fresh copy of a named preset (see PRESETS): changing it changes nothing else."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
