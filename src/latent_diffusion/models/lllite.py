"""ControlNet-LLLite (kohya-ss's "lite" ControlNet, mostly for SDXL): small networks beside the U-Net's attention
projections, each adding to a projection's input a term made from the control image and that input. The module tree
is that of kohya's files (`lllite_unet_<input|output>_blocks_<i>_1_transformer_blocks_<j>_<attn1|attn2>_to_<q|k|v>`,
`lllite_unet_middle_block_1_...`, each with `conditioning1`, `down`, `mid`, `up`), so they load without key mapping.
As the web UI's ControlNet extension runs them (`scripts/controlnet_lllite.py`, after kohya's ComfyUI node), per
module, with c the control image in [-1, 1] and x the projection's input (b, n, C):

    e = conditioning1(c)        a 4×4 convolution of stride 4, then (depth 1) a 2×2 of stride 2, (depth 2) a 4×4 of
                                stride 4, or (depth 3) both, ReLU between: the image at 1/8, 1/16 or 1/32
    e = e resized (nearest-exact) to the layer's grid (h, w), as (b, h·w, E)
    y = up(mid([e, down(x)]))   down: Linear(C → m) + ReLU; mid: Linear(E + m → m) + ReLU; up: Linear(m → C)

and the projection sees x + Σ w·y over the units acting on it (w a unit's weight). The extension runs no LLLite unit in
a hires pass.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from .shadowing import shadowed
from .unet import layer_grid

PREFIX = "lllite_unet_"
TARGET = re.compile(
    r"lllite_unet_(input|output|middle)_blocks?_(\d+_)?1_transformer_blocks_(\d+)_(attn[12])_to_([qkv])"
)


class LLLiteModule(nn.Module):
    def __init__(self, in_dim: int, embed_dim: int, mlp_dim: int, depth: int):
        super().__init__()
        half = embed_dim // 2
        layers: list[nn.Module] = [nn.Conv2d(3, half, 4, stride=4)]
        if depth == 1:
            layers += [nn.ReLU(), nn.Conv2d(half, embed_dim, 2, stride=2)]
        elif depth == 2:
            layers += [nn.ReLU(), nn.Conv2d(half, embed_dim, 4, stride=4)]
        else:
            layers += [
                nn.ReLU(),
                nn.Conv2d(half, half, 4, stride=4),
                nn.ReLU(),
                nn.Conv2d(half, embed_dim, 2, stride=2),
            ]
        self.conditioning1 = nn.Sequential(*layers)  # keys conditioning1.0, .2 (, .4)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + embed_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))

    def embed(self, hint: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The control image (b, 3, H, W) in [0, 1] -> e (b, h·w, E) at the layer's grid (h, w)."""
        e = self.conditioning1((hint * 2 - 1).to(self.up[0].weight.dtype))
        e = F.interpolate(e, size=grid, mode="nearest-exact")  # (b, E, h, w)
        return e.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """x (b, n, C), e (b, n, E) -> the term y (b, n, C) added to x."""
        return self.up(self.mid(torch.cat([embedded.to(x.dtype), self.down(x)], dim=2)))


class ControlLLLite(nn.Module):
    """A file's modules, by their names (`TARGET`: the projection each adds to)."""

    def __init__(self, specs: dict[str, tuple[int, int, int, int]]):
        super().__init__()
        for name, spec in specs.items():  # (in_dim, embed_dim, mlp_dim, depth)
            self.add_module(name, LLLiteModule(*spec))


def is_lllite_state_dict(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def lllite_from_state_dict(sd: dict[str, torch.Tensor]) -> ControlLLLite:
    """A ControlLLLite with a file's sizes and weights (ValueError in one line for one that is not kohya's layout)."""
    names = sorted({k.split(".", 1)[0] for k in sd})
    specs = {}
    for name in names:
        target = TARGET.fullmatch(name)
        if not target:
            raise ValueError(f"{name} names no attention projection of the U-Net's transformer blocks")
        if target.group(4) == "attn2" and target.group(5) != "q":  # (their input is the text, not the image's grid)
            raise ValueError(f"{name}: a cross-attention's key or value projection, which reads the text")
        try:
            first, down = sd[f"{name}.conditioning1.0.weight"], sd[f"{name}.down.0.weight"]
            deep = f"{name}.conditioning1.4.weight" in sd
            depth = 3 if deep else 2 if sd[f"{name}.conditioning1.2.weight"].shape[-1] == 4 else 1
        except KeyError as e:
            raise ValueError(f"an incomplete ControlNet-LLLite module: no {e.args[0]}") from None
        if down.dim() != 2:
            raise ValueError(f"{name}: a convolution's LLLite module, which the extension does not run either")
        specs[name] = (down.shape[1], first.shape[0] * 2, down.shape[0], depth)
    model = ControlLLLite(specs)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise ValueError(f"does not load as the ControlNet-LLLite its keys describe: {detail}") from None
    return model.eval()


def target_of(unet: nn.Module, name: str) -> nn.Linear:
    """The projection a module adds to (KeyError where the U-Net has none of that name)."""
    root, block, number, attention, projection = TARGET.fullmatch(name).groups()
    blocks = {"input": unet.input_blocks, "output": unet.output_blocks, "middle": [unet.middle_block]}[root]
    try:
        transformer = blocks[int((block or "0_")[:-1])][1]
        return getattr(getattr(transformer.transformer_blocks[int(number)], attention), f"to_{projection}")
    except (IndexError, AttributeError, TypeError) as e:
        raise KeyError(name) from e


def check_lllite_fits(lllite: ControlLLLite, unet: nn.Module) -> None:
    """ValueError (one line) where a module names a projection the U-Net lacks, or one of another width."""
    for name, module in lllite.named_children():
        try:
            linear = target_of(unet, name)
        except KeyError:
            raise ValueError(f"a ControlNet-LLLite for another U-Net: this one has no {name}") from None
        if linear.in_features != module.up[0].out_features:
            raise ValueError(
                f"a ControlNet-LLLite for another U-Net: {name} is {module.up[0].out_features} wide, the U-Net's "
                f"{linear.in_features}"
            )


def lllite_applied(unet: nn.Module, units: list[tuple], latent: tuple[int, int], cache: dict):
    """The U-Net's projections with the units' terms while this lasts; units: (ControlLLLite, its hint rows (b, 3, H,
    W) in [0, 1], weight w); latent: the U-Net input's (h, w); cache: the embeddings of a pass, by module and hint."""
    terms: dict[nn.Linear, list] = {}
    for lllite, hint, w in units:
        for name, module in lllite.named_children():
            terms.setdefault(target_of(unet, name), []).append((module, hint, w))
    return shadowed(
        {linear: functools.partial(_projected, linear, items, latent, cache) for linear, items in terms.items()}
    )


def _projected(linear: nn.Linear, items: list, latent: tuple[int, int], cache: dict, x: torch.Tensor) -> torch.Tensor:
    """The projection of x + Σ w·y: x (b, n, C)."""
    added = 0
    for module, hint, w in items:
        key = (id(module), id(hint), x.shape[1])
        if key not in cache:  # (the hint kept with its embedding: its id stays its own)
            cache[key] = (hint, module.embed(hint, layer_grid(latent, x.shape[1])))
        added = added + w * module(x, cache[key][1])
    return type(linear).forward(linear, x + added)
