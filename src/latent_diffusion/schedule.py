"""The noise schedule of Stable Diffusion and the conversions between what a U-Net may predict.

"Scaled linear" (Rombach et al. 2022): β_t = (linspace(√β_1, √β_T, T))², α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s.
Forward process: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. v-parameterisation (Salimans & Ho 2022): v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.
k-diffusion's view: σ_t = √((1−ᾱ_t)/ᾱ_t), x = x0 + σ·ε, fed to the model as x/√(1+σ²).
"""

import torch


def scaled_linear_betas(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """(T,) float64, as CompVis `make_beta_schedule("linear", ...)` (which is "scaled linear" in diffusers)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alpha_bar: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def _coefficients(alpha_bar_t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """√ᾱ_t and √(1−ᾱ_t), shaped to broadcast against x."""
    a = alpha_bar_t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return a.sqrt(), (1 - a).sqrt()


def q_sample(x0: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    s, n = _coefficients(alpha_bar_t, x0)
    return s * x0 + n * eps


def v_target(x0: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
    s, n = _coefficients(alpha_bar_t, x0)
    return s * eps - n * x0


def eps_and_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x0) from the model's prediction at x_t: from ε, x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ; from v,
    x0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v."""
    s, n = _coefficients(alpha_bar_t, x_t)
    if parameterization == "eps":
        return model_output, (x_t - n * model_output) / s
    return n * x_t + s * model_output, s * x_t - n * model_output
