"""The ControlNet extension's reference units (reference_only, reference_adain, reference_adain+attn), as its
`scripts/hook.py` (1.1.455) runs them: no control model; at each U-Net evaluation the reference image's latent z₀,
noised to the evaluation's timestep with fresh noise,

    ref_xₜ = √ᾱₜ · z₀ + √(1 − ᾱₜ) · ε,          t rounded for the table, ε fresh at every evaluation

runs through the U-Net first ("write", its output discarded), and the main pass reads what it left:

- attention (reference_only, reference_adain+attn): each BasicTransformerBlock the unit's weight reaches keeps the
  reference pass's norm1(x); in the main pass its self-attention attends to its own tokens and those, side by side,
  and the unconditional rows of guidance are mixed with plain self-attention by the style fidelity sf:
      uc = attn1(n, [n; bank])      c = uc, with attn1(n, n) on the unconditional rows      out = sf·c + (1 − sf)·uc
  The blocks are ranked widest first (stable), the i-th of m at weight i/m; a unit writes where its weight exceeds
  that. The unit's weight does nothing else.
- AdaIN (reference_adain, reference_adain+attn): the outputs of the middle block, of the input blocks of the levels
  after the first (no downsampler) and of the first two thirds of the output blocks keep their per-sample,
  per-channel mean and variance; the main pass's outputs there are renormalised to them,
      y = (x − μ) / σ · σ_ref + μ_ref      (σ = √max(var, 1e−6); the unconditional rows mixed with x by sf as above)
  at weights 0 (middle), 2(1 − k/n) for the k-th of n input blocks, 2k/n for the k-th of n output blocks. (SD 1.x:
  input blocks 4, 5, 7, 8, 10, 11, output blocks 0–7; SDXL: 4, 5, 7, 8 and 0–5, as the extension lists them.)
- sf: the unit's threshold_a (default 0.5), cubed for SDXL; 1 for "ControlNet is more important", 0 for "My prompt
  is more important" and in a hires pass. Several units: their banks side by side (attention) or averaged (AdaIN),
  sf their mean.

z₀ is the reference image encoded at the pass's size (a posterior sample × the scale factor), once per pass. An
inpainting U-Net's reference pass sees a zero mask and z₀ as the masked image. The extension draws the sample and ε
from torch's global generator, which the web UI has just seeded with the image's seed; here they come from a
generator of the pass seeded with the request's first seed (`ResolvedControl.seed`), so that a request draws the
same image every time, without touching the global generator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.ldm import LatentDiffusion
from ..models.shadowing import shadowed
from ..models.spatial_transformer import BasicTransformerBlock

MODULES = {"reference_only": (True, False), "reference_adain": (False, True), "reference_adain+attn": (True, True)}
EPS = 1e-6


@dataclass
class Banks:
    """What the reference passes of one evaluation left, by block: attention inputs and AdaIN statistics, each with
    the style fidelity of the unit that wrote it."""

    writing: tuple[bool, bool] | None = None  # (attention, AdaIN) while a unit's reference pass runs
    weight: float = 0.0  # that unit's weight
    fidelity: float = 0.0  # and its style fidelity
    uc_rows: torch.Tensor | None = None  # (rows,) bool: the unconditional rows of guidance
    attention: dict[int, list] = field(default_factory=dict)  # block id -> [(norm1(x), sf)]
    adain: dict[int, list] = field(default_factory=dict)  # block id -> [(mean, var, sf)]


def style_fidelity(threshold_a: float | None, control_mode: str, sdxl: bool, hires: bool) -> float:
    """The extension's `current_style_fidelity` (module docstring)."""
    sf = min(max(0.5 if threshold_a is None else threshold_a, 0.0), 1.0)
    sf = sf**3.0 if sdxl else sf
    if control_mode == "control":
        return 1.0
    return 0.0 if control_mode == "prompt" or hires else sf


def attention_weights(unet: nn.Module) -> dict[int, tuple[BasicTransformerBlock, float]]:
    """id -> (block, weight): every transformer block, ranked widest first, the i-th of m at i/m."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    ranked = sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])
    return {id(b): (b, i / len(ranked)) for i, b in enumerate(ranked)}


def adain_weights(unet: nn.Module, cfg) -> list[tuple[nn.Module, float]]:
    """(block, weight) of the blocks whose outputs AdaIN renormalises (module docstring)."""
    levels = len(cfg.channel_mult)
    inputs, index = [], 1
    for level in range(levels):
        for _ in range(cfg.num_res_blocks):
            if level >= 1:
                inputs.append(index)
            index += 1
        index += level < levels - 1  # the downsampler
    outputs = list(range(len(unet.output_blocks) * 2 // 3))
    weighted = [(unet.middle_block, 0.0)]
    weighted += [(unet.input_blocks[i], 2 * (1.0 - k / len(inputs))) for k, i in enumerate(inputs)]
    weighted += [(unet.output_blocks[i], 2 * k / len(outputs)) for k, i in enumerate(outputs)]
    return weighted


def _mixed(banks: Banks, plain, referenced: torch.Tensor, fidelities: list[float]) -> torch.Tensor:
    """sf·c + (1 − sf)·uc, c being `referenced` with `plain()` on the unconditional rows."""
    sf = sum(fidelities) / len(fidelities)
    c = referenced
    if banks.uc_rows is not None and banks.uc_rows.any() and sf > 1e-5:
        c = referenced.clone()
        c[banks.uc_rows] = plain(banks.uc_rows)
    return sf * c + (1.0 - sf) * referenced


def _transformer_block(banks: Banks, weight: float, block: BasicTransformerBlock, x, context):
    n = block.norm1(x)
    key = id(block)
    if banks.writing is not None:
        if banks.writing[0] and banks.weight > weight:
            banks.attention.setdefault(key, []).append((n.detach().clone(), banks.fidelity))
        attended = block.attn1(n)
    elif stored := banks.attention.pop(key, None):
        referenced = block.attn1(n, torch.cat([n, *(bank for bank, _ in stored)], dim=1))
        attended = _mixed(banks, lambda rows: block.attn1(n[rows]), referenced, [sf for _, sf in stored])
    else:
        attended = block.attn1(n)
    x = x + attended
    x = x + block.attn2(block.norm2(x), context)
    return x + block.ff(block.norm3(x))


def _adain_block(banks: Banks, weight: float, forward, block: nn.Module, *args, **kwargs):
    x = forward(*args, **kwargs)
    key = id(block)
    if banks.writing is not None:
        if banks.writing[1] and banks.weight > weight:
            var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
            banks.adain.setdefault(key, []).append((mean, var, banks.fidelity))
        return x
    if not (stored := banks.adain.pop(key, None)):
        return x
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    mean_ref = sum(m for m, _, _ in stored) / len(stored)
    var_ref = sum(v for _, v, _ in stored) / len(stored)
    std, std_ref = var.clamp(min=EPS).sqrt(), var_ref.clamp(min=EPS).sqrt()
    renormed = (x - mean) / std * std_ref + mean_ref
    return _mixed(banks, lambda rows: x[rows], renormed, [sf for _, _, sf in stored])


def hooked(model: LatentDiffusion, banks: Banks):
    """The U-Net's transformer blocks and AdaIN blocks reading and writing `banks` while this lasts (`shadowed`: their
    module tree unchanged, a compiled U-Net eager meanwhile)."""
    unet = model.model.diffusion_model
    forwards = {}
    for block, weight in attention_weights(unet).values():
        forwards[block] = functools.partial(_transformer_block, banks, weight, block)
    for block, weight in adain_weights(unet, model.cfg.unet):
        forwards[block] = functools.partial(_adain_block, banks, weight, type(block).forward.__get__(block), block)
    return shadowed(forwards)


def noise_like(latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ε for ref_xₜ: a standard normal draw of the latent's shape."""
    return torch.randn(latent.shape, generator=generator, device=latent.device, dtype=latent.dtype)


def reference_pass(model, banks: Banks, latent: torch.Tensor, t: torch.Tensor, cond: dict, unit, generator):
    """One unit's write pass: its reference latent z₀ (rows, c, h, w) noised to t, through the U-Net, whose output
    is dropped; `unit`: (weight, sf, attention, AdaIN)."""
    weight, sf, attention, adain = unit
    alphas = model.alphas_cumprod.to(latent.device)[t.float().round().long()][:, None, None, None].to(latent.dtype)
    ref_xt = alphas.sqrt() * latent + (1 - alphas).sqrt() * noise_like(latent, generator)
    cond = {k: v for k, v in cond.items() if k != "control"}
    if "concat" in cond:  # an inpainting U-Net: a zero mask, z₀ the masked image
        cond["concat"] = torch.cat([torch.zeros_like(latent[:, :1]), latent], dim=1)
    banks.writing, banks.weight, banks.fidelity = (attention, adain), weight, sf
    try:
        model.model(ref_xt, t, cond)
    finally:
        banks.writing = None
