"""The noise levels a σ-space sampler visits: the web UI's "Schedule type"s.

Each is a function (n, table) -> σs, (n + 1,) float64 from high to low, where `table` is the model's σ at each
training timestep (T,), low to high, σ_t = √((1 − ᾱ_t)/ᾱ_t). As in the web UI (its `sd_schedulers.py` and
k-diffusion), σ_min and σ_max are the ends of that table, and the timestep of a σ is read from the table by
piecewise-linear interpolation of log σ. All of them end at σ = 0 except KL Optimal, which ends at σ_min.
"Automatic" is the sampler's own choice (`Sampler.scheduler`); the discrete samplers (DDIM, PLMS, DDPM) keep
their timesteps (`noise_schedule.sampling_sigmas`) and take none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .noise_schedule import sampling_sigmas, sigma_to_t
from .parameterization import sigma_from_alpha_bar

# NVIDIA's Align Your Steps σs for SD 1.5 at 10 steps (Sabour et al. 2024), other step counts interpolated
ALIGN_YOUR_STEPS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # the web UI's defaults for the Beta schedule (Lee et al. 2024)


def t_to_sigma(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps t: log σ interpolated linearly between the neighbouring entries (k-diffusion)."""
    low, w = t.floor().long(), t - t.floor()
    high = t.ceil().long()
    return ((1 - w) * table[low].log() + w * table[high].log()).exp()


def with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)])


def uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly from the last (T − 1) to 0, σ by log-interpolation (k-diffusion's `get_sigmas`)."""
    return with_zero(t_to_sigma(torch.linspace(len(table) - 1, 0, n, dtype=torch.float64), table))


def karras(n: int, table: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    low, high = table[0].item() ** (1 / rho), table[-1].item() ** (1 / rho)
    return with_zero((high + torch.linspace(0, 1, n, dtype=torch.float64) * (low - high)) ** rho)


def exponential(n: int, table: torch.Tensor) -> torch.Tensor:
    """Evenly spaced in log σ."""
    return with_zero(torch.linspace(table[-1].log().item(), table[0].log().item(), n, dtype=torch.float64).exp())


def polyexponential(n: int, table: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    """log σ = log σ_min + ramp^ρ·(log σ_max − log σ_min), ramp from 1 to 0; ρ = 1 is the exponential schedule."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    low, high = table[0].log().item(), table[-1].log().item()
    return with_zero((ramp * (high - low) + low).exp())


def _t_range(table: torch.Tensor) -> tuple[float, float]:
    """The timesteps of σ_max and σ_min, read back from the table as the web UI's schedules read them."""
    return sigma_to_t(table[-1], table.log()).item(), sigma_to_t(table[0], table.log()).item()


def sgm_uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    """n + 1 timesteps evenly from the top to 0, the last dropped (as Stability's generative-models)."""
    return with_zero(t_to_sigma(torch.linspace(*_t_range(table), n + 1, dtype=torch.float64)[:-1], table))


def normal(n: int, table: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly from the timestep of σ_max to that of σ_min (for a table model: `uniform`)."""
    return with_zero(t_to_sigma(torch.linspace(*_t_range(table), n, dtype=torch.float64), table))


def simple(n: int, table: torch.Tensor) -> torch.Tensor:
    """Every (T/n)-th σ of the table, from the top."""
    step = len(table) / n
    return with_zero(table[[len(table) - 1 - int(k * step) for k in range(n)]])


def ddim(n: int, table: torch.Tensor) -> torch.Tensor:
    """Timesteps 1, 1 + T//n, 1 + 2·(T//n), ... below T, from the top, as the web UI's DDIM schedule; like it, this
    gives one level more than n where T//n leaves room for it (8 for n = 7), and so runs one step more."""
    return with_zero(table[1 :: max(len(table) // n, 1)].flip(0))


def kl_optimal(n: int, table: torch.Tensor) -> torch.Tensor:
    """σ_i = tan((1 − i/n)·atan σ_max + (i/n)·atan σ_min), i = 0..n (Sabour et al. 2024); ends at σ_min."""
    frac = torch.arange(n + 1, dtype=torch.float64) / n
    return torch.tan(frac * math.atan(table[0].item()) + (1 - frac) * math.atan(table[-1].item()))


def align_your_steps(n: int, table: torch.Tensor) -> torch.Tensor:
    """The SD 1.5 table, resampled to n levels linearly in log σ (NVIDIA's `loglinear_interp`)."""
    log_sigmas = np.log(ALIGN_YOUR_STEPS_SD15[::-1])
    resampled = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(log_sigmas)), log_sigmas)
    return with_zero(torch.from_numpy(np.exp(resampled)[::-1].copy()))


def beta(n: int, table: torch.Tensor) -> torch.Tensor:
    """σ = σ_min + q·(σ_max − σ_min), q the Beta(0.6, 0.6) quantiles of 1 − linspace(0, 1, n) (Lee et al. 2024)."""
    from scipy.special import betaincinv  # scipy comes with torchsde; only this schedule needs it

    q = torch.from_numpy(betaincinv(BETA_ALPHA, BETA_BETA, 1 - np.linspace(0, 1, n)))
    return with_zero(table[0].item() + q * (table[-1].item() - table[0].item()))


@dataclass(frozen=True)
class Scheduler:
    name: str  # the id commands and requests use
    label: str  # as the web UI writes it ("Schedule type" in infotexts)
    fn: Callable[[int, torch.Tensor], torch.Tensor] | None  # None: automatic


SCHEDULERS = {
    s.name: s
    for s in (
        Scheduler("automatic", "Automatic", None),
        Scheduler("uniform", "Uniform", uniform),
        Scheduler("karras", "Karras", karras),
        Scheduler("exponential", "Exponential", exponential),
        Scheduler("polyexponential", "Polyexponential", polyexponential),
        Scheduler("sgm_uniform", "SGM Uniform", sgm_uniform),
        Scheduler("kl_optimal", "KL Optimal", kl_optimal),
        Scheduler("align_your_steps", "Align Your Steps", align_your_steps),
        Scheduler("simple", "Simple", simple),
        Scheduler("normal", "Normal", normal),
        Scheduler("ddim", "DDIM", ddim),
        Scheduler("beta", "Beta", beta),
    )
}


def find_scheduler(name: str) -> Scheduler:
    """By id or the web UI's label, in any case ("karras", "Karras", "SGM Uniform", "SGMUniform")."""
    key = name.lower().replace(" ", "_")
    for s in SCHEDULERS.values():
        if key in (s.name, s.label.lower().replace(" ", "_"), s.label.lower().replace(" ", "")):
            return s
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def schedule_for(sampler, scheduler: str) -> tuple[Scheduler | None, str | None]:
    """The schedule a sampler (a `samplers.Sampler`) runs on, and the label the web UI's k-diffusion samplers write
    as its "Schedule type" (None: none resolved, where the web UI writes the one asked for). Discrete samplers keep
    their timesteps and take none; "automatic" is the sampler's own (uniform where it has none)."""
    if sampler.discrete:
        return None, None
    chosen = find_scheduler(scheduler)
    if chosen.fn is not None:
        return chosen, chosen.label
    if sampler.scheduler is None:
        return SCHEDULERS["uniform"], None
    return SCHEDULERS[sampler.scheduler], SCHEDULERS[sampler.scheduler].label


def sampling_schedule(sampler, scheduler: str, steps: int, alpha_bar: torch.Tensor, spacing: str = "leading"):
    """The σs a sampler runs on, high to low: its discrete timesteps (`spacing`) or the scheduler's levels. DPM2,
    DPM2 a and DPM++ 3M SDE compute steps + 1 levels and drop the next-to-last, as the web UI does for them."""
    chosen, _ = schedule_for(sampler, scheduler)
    if chosen is None:
        return sampling_sigmas(alpha_bar, steps, spacing=spacing, final=sampler.lands_at)
    sigmas = chosen.fn(steps + 1 if sampler.discard_penultimate else steps, sigma_from_alpha_bar(alpha_bar.double()))
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if sampler.discard_penultimate else sigmas
