"""What the U-Net predicts (ε or v), and every conversion between x0, ε, v, σ and ᾱ: sampling and training
both use these, so the two can never disagree.

Two views of one forward process (Karras et al. 2022, appendix C.3):
    variance preserving (training):  x_t = √ᾱ·x0 + √(1−ᾱ)·ε
    σ-space (samplers):              x = x0 + σ·ε,  σ = √((1−ᾱ)/ᾱ),  so x_t = x/√(1+σ²) = c_in·x
v (Salimans & Ho 2022): v = √ᾱ·ε − √(1−ᾱ)·x0. The denoiser D(x, σ) = c_skip·x + c_out·F(c_in·x, t(σ)) ≈ x0:
    ε-model: c_skip = 1,          c_out = −σ
    v-model: c_skip = 1/(1+σ²),   c_out = −σ/√(1+σ²)
"""

from __future__ import annotations

import torch

PARAMETERIZATIONS = ("eps", "v")


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1−ᾱ)/ᾱ)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def c_in(sigma: float) -> float:
    """The U-Net's input scale in σ-space: x_t = x/√(1+σ²)."""
    return 1 / (sigma**2 + 1) ** 0.5


def x0_from_prediction(x: torch.Tensor, prediction: torch.Tensor, sigma: float, parameterization: str) -> torch.Tensor:
    """D(x, σ) = c_skip·x + c_out·F: the x0 estimate of the latent x = x0 + σ·ε from the U-Net's ε or v."""
    if parameterization == "v":
        return x / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5 * prediction
    return x - sigma * prediction


def _vp_coefficients(alpha_bar: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """√ᾱ and √(1−ᾱ), one per sample, shaped to broadcast against x (b, ...)."""
    a = alpha_bar.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return a.sqrt(), (1 - a).sqrt()


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε, the U-Net's input in training (ᾱ per sample)."""
    s, n = _vp_coefficients(alpha_bar, x0)
    return s * x0 + n * noise


def target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What the U-Net should predict at x_t: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    if parameterization == "eps":
        return noise
    s, n = _vp_coefficients(alpha_bar, x0)
    return s * noise - n * x0


def x0_from_vp(x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str):
    """The x0 that the U-Net's ε or v at the variance-preserving x_t says (ᾱ per sample): x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ,
    or x0 = √ᾱ·x_t − √(1−ᾱ)·v."""
    s, n = _vp_coefficients(alpha_bar, x_t)
    return s * x_t - n * prediction if parameterization == "v" else (x_t - n * prediction) / s


def prediction_from_vp(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str):
    """The ε or v that would say x0 at x_t: ε = (x_t − √ᾱ·x0)/√(1−ᾱ), v from x0 and that ε (`x0_from_vp`'s inverse)."""
    s, n = _vp_coefficients(alpha_bar, x_t)
    return target(x0, (x_t - s * x0) / n, alpha_bar, parameterization)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, parameterization: str, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023), SNR = ᾱ/(1−ᾱ): the x0 loss weighted min(SNR, γ). The ε loss is the
    x0 loss times SNR and the v loss the x0 loss times SNR + 1, so the weight is min(SNR, γ)/SNR on ε and
    min(SNR, γ)/(SNR + 1) on v. With a floor the x0 weight is clamp(SNR, floor, γ): the highest noise levels, where
    the layout is decided and min-SNR leaves the x0 error a weight ≈ SNR ≈ 0, keep the weight `floor`."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(min=floor, max=gamma) / (snr if parameterization == "eps" else snr + 1)
