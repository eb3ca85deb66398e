"""The noise schedule of Stable Diffusion, and the noise levels a sampler visits.

"Scaled linear" (Rombach et al. 2022): β_t = (linspace(√β_1, √β_T, T))², α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s,
σ_t = √((1−ᾱ_t)/ᾱ_t). `sampling_sigmas` gives the σs at the sampling timesteps (DDIM, PLMS, DDPM, and diffusers'
schedulers); the schedule types of the σ-space samplers are in `sampling/sigma_schedules.py`.
The conversions between x0, ε, v and σ live in `sampling/parameterization.py`.
"""

import numpy as np
import torch

from .parameterization import sigma_from_alpha_bar


def scaled_linear_betas(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """(T,) float64, as CompVis `make_beta_schedule("linear", ...)` (which is "scaled linear" in diffusers); on the
    CPU, also while a model is built on the meta device (its schedule is a constant of the config)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


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


def sampling_sigmas(
    alpha_bar: torch.Tensor, steps: int, *, spacing: str = "leading", final: str = "zero"
) -> torch.Tensor:
    """(steps + 1,) σ values, high to low, float64.

    σ at each sampling timestep, linearly interpolated in the table for fractional timesteps (as diffusers);
    final: "zero" ends at σ = 0 (a clean sample); "sigma_min" ends at σ_0 = σ at timestep 0, where DDIM and
    PLMS land (CompVis, and diffusers with set_alpha_to_one=False).
    """
    table = sigma_from_alpha_bar(alpha_bar.double())
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
