"""The noise schedule of Stable Diffusion and the conversions between what a U-Net may predict.

"Scaled linear" (Rombach et al. 2022): β_t = (linspace(√β_1, √β_T, T))², α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s.
Forward process: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. v-parameterisation (Salimans & Ho 2022): v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.
k-diffusion's view: σ_t = √((1−ᾱ_t)/ᾱ_t), x = x0 + σ·ε, fed to the model as x/√(1+σ²).
"""

import numpy as np
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


# Sampling schedules ------------------------------------------------------------------------------------------

SPACINGS = ("leading", "trailing", "linspace")


def sampling_timesteps(steps: int, spacing: str = "leading", timesteps: int = 1000) -> torch.Tensor:
    """The `steps` timesteps a sampler visits, high to low, float64; as diffusers' `timestep_spacing`:
    leading:  0, r, 2r, ... (r = T // steps) plus 1 (SD's `steps_offset`), e.g. 901, 801, ..., 1 for 10 steps;
    trailing: T, T - T/steps, ... rounded, minus 1, e.g. 999, 899, ..., 99;
    linspace: linspace(0, T - 1, steps), not rounded."""
    if spacing == "leading":
        t = torch.arange(steps, dtype=torch.float64) * (timesteps // steps) + 1
    elif spacing == "trailing":
        t = torch.round(torch.arange(timesteps, 0, -timesteps / steps, dtype=torch.float64))[:steps] - 1
        t = t.flip(0)
    elif spacing == "linspace":
        t = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return t.flip(0)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sampling_sigmas(
    alpha_bar: torch.Tensor, steps: int, *, spacing: str = "leading", karras: bool = False, final: str = "zero"
) -> torch.Tensor:
    """(steps + 1,) σ values, high to low, float64.

    σ at each sampling timestep, linearly interpolated in the table for fractional timesteps (as diffusers);
    with karras, Karras's ramp between the table's σ_min and σ_max (as k-diffusion and diffusers' DPM-Solver).
    final: "zero" ends at σ = 0 (a clean sample); "sigma_min" ends at σ_0 = σ at timestep 0, where DDIM and
    PLMS land (CompVis, and diffusers with set_alpha_to_one=False).
    """
    table = sigmas_from_alphas_cumprod(alpha_bar.double())
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
    else:
        t = sampling_timesteps(steps, spacing, len(table))
        sigmas = torch.from_numpy(np.interp(t.numpy(), np.arange(len(table)), table.numpy()))
    last = table[:1] if final == "sigma_min" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([sigmas, last])


def sigma_to_t(sigma: torch.Tensor, log_sigma_table: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep of σ: piecewise-linear interpolation of log σ over the table (as k-diffusion
    and diffusers). σ values of the table map back to their integer timesteps exactly."""
    log_sigma = sigma.double().clamp(min=1e-10).log()
    high = torch.searchsorted(log_sigma_table, log_sigma.reshape(-1)).clamp(1, len(log_sigma_table) - 1)
    low = high - 1
    w = ((log_sigma.reshape(-1) - log_sigma_table[low]) / (log_sigma_table[high] - log_sigma_table[low])).clamp(0, 1)
    return (low + w).reshape(sigma.shape)
