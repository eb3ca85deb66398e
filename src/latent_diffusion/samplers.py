"""Samplers: each a short loop over a denoiser, in the σ-space view of Karras et al. (2022).

Notation: x = x0 + σ·ε is a latent at noise level σ; `denoiser(x, σ)` returns the model's estimate of x0;
d = (x − x0)/σ is the derivative of the probability-flow ODE dx/dσ (and equals the ε estimate);
`sigmas` runs from high to low, `sigmas[-1]` is where the sample lands (0, or σ_0 for DDIM/PLMS).
DDIM, DDPM and PLMS are written here too: in this view DDIM(η) is the ancestral Euler step and PLMS a
linear multistep method on ε (with the Euler transfer x + (σ' − σ)·ε). Every sampler takes, besides its own
options (η, s_noise, ...):

    noise(σ, σ_next) -> a standard normal tensor like x, for the stochastic samplers;
    hold(i, x) -> x, after step i: replaces part of x (inpainting with a standard model holds the known region);
    callback(Step) -> None, after step i (and the hold): observes the step (progress, previews of x0).

A new sampler is a function here and one row of SAMPLERS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hold = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """What a callback sees after step i: x at sigmas[i + 1], and the x0 estimate made at σ = sigmas[i]."""

    i: int
    sigma: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[Step], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE: (x − x0)/σ (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step σ → σ_next into a deterministic part to σ_down and fresh noise of size σ_up, with
    σ_down² + σ_up² = σ_next² and σ_up = η·σ_next·√(1 − σ_next²/σ²) (DDIM's η, Song et al. 2021, eq. 16)."""
    if not eta or sigma_next == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def end_step(i: int, sigma, x: torch.Tensor, x0: torch.Tensor, hold: Hold | None, callback: Callback | None):
    """The end of every step: the hold, if any, then the callback."""
    if hold is not None:
        x = hold(i, x)
    if callback is not None:
        callback(Step(i, sigma, x, x0))
    return x


def euler(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i])
        x = end_step(i, sigmas[i], x + to_d(x, sigmas[i], x0) * (sigmas[i + 1] - sigmas[i]), x0, hold, callback)
    return x


def euler_ancestral(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0):
    """Euler step to σ_down, then add σ_up of fresh noise (scaled by s_noise). With the DDIM schedule this is
    DDIM(η)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, x0) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def ddim(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021): x_prev = √ᾱ'·x0 + √(1 − ᾱ' − s²)·ε + s·z in VP terms, which in σ-space is
    x0 + σ_down·ε + σ_up·z: the ancestral Euler step. η = 0 is deterministic; η = 1 is DDPM's ancestral step."""
    return euler_ancestral(denoiser, x, sigmas, noise=noise, hold=hold, callback=callback, eta=eta)


def ddpm(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020) over the sampling timesteps: the posterior q(x_t' | x_t, x0)
    with variance (1 − ᾱ')/(1 − ᾱ)·(1 − ᾱ/ᾱ'), which is DDIM with η = 1."""
    return euler_ancestral(denoiser, x, sigmas, noise=noise, hold=hold, callback=callback, eta=1.0)


def heun(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler for the last step to σ = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        d = to_d(x, sigma, x0)
        x_next = x + d * (sigma_next - sigma)
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, denoiser(x_next, sigma_next))
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = end_step(i, sigma, x_next, x0, hold, callback)
    return x


def dpm2(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """DPM-Solver-2 as in k-diffusion: the derivative at the geometric midpoint σ_mid = √(σ·σ_next)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        d = to_d(x, sigma, x0)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = (sigma.log().lerp(sigma_next.log(), 0.5)).exp()
            x_mid = x + d * (sigma_mid - sigma)
            x = x + to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid)) * (sigma_next - sigma)
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def plms(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """PLMS (Liu et al. 2022, pseudo linear multistep): Adams–Bashforth on ε up to order 4, started with a
    pseudo improved-Euler step, as in CompVis's PLMSSampler and diffusers' PNDM (skip_prk_steps)."""
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        eps = to_d(x, sigma, x0)
        if not history:
            x_next = x + eps * (sigma_next - sigma)
            eps_prime = (eps + to_d(x_next, sigma_next, denoiser(x_next, sigma_next))) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = [*history[-2:], eps]
        x = end_step(i, sigma, x + eps_prime * (sigma_next - sigma), x0, hold, callback)
    return x


def dpmpp_2m(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in k-diffusion's form; first order at the first and last
    step. With t = −log σ and h = t' − t: x' = (σ'/σ)·x − (e^(−h) − 1)·D, D an extrapolation of the last two x0."""
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = sigma.log() - sigma_next.log()
            if old_x0 is None:
                d = x0
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_x0 = x0
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def dpmpp_2s_ancestral(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step with ancestral noise, as in k-diffusion (midpoint at r = 1/2 in log σ)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, x0) * (sigma_down - sigma)
        else:
            sigma_mid = (sigma * sigma_down).sqrt()  # t_mid = t + h/2 with t = −log σ
            x_mid = (sigma_mid / sigma) * x - torch.expm1(sigma_mid.log() - sigma.log()) * x0
            x = (sigma_down / sigma) * x - torch.expm1(sigma_down.log() - sigma.log()) * denoiser(x_mid, sigma_mid)
        if sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def dpmpp_sde(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ stochastic (SDE) sampler as in k-diffusion's sample_dpmpp_sde: a noisy step to the midpoint
    s = t + r·h (t = −log σ), then a noisy step to σ_next with x0 mixed from both evaluations."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, x0) * (sigma_next - sigma)
        else:
            h = sigma.log() - sigma_next.log()
            sigma_s = (sigma.log() - r * h).exp()
            sd, su = ancestral_step(sigma, sigma_s, eta)
            x_2 = (sd / sigma) * x - torch.expm1(sd.log() - sigma.log()) * x0
            x_2 = x_2 + noise(sigma, sigma_s) * s_noise * su
            x0_2 = denoiser(x_2, sigma_s)
            sd, su = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            x = (sd / sigma) * x - torch.expm1(sd.log() - sigma.log()) * ((1 - fac) * x0 + fac * x0_2)
            x = x + noise(sigma, sigma_next) * s_noise * su
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def _uni_update(x, sigma_s, sigma_t, x0s, lambdas, order, x0_t=None):
    """One UniPC update from σ_s to σ_t with B(h) = e^(−h) − 1 ("bh2") on data predictions, in σ-space.

    x0s/lambdas: the x0 predictions so far and their λ = −log σ, the last one at σ_s. Without x0_t this is the
    predictor UniP (order − 1 earlier points); with x0_t, the model's x0 at the predicted point, the corrector
    UniC (Zhao et al. 2023, Algorithms 1 and 2; the linear system for the ρ coefficients is their eq. (7))."""
    h = sigma_s.log() - (sigma_t.log() if sigma_t > 0 else torch.full_like(sigma_s, -math.inf))
    m0 = x0s[-1]
    rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)] + [torch.ones_like(h)]
    d1s = [(x0s[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for k in range(1, order + 1):
        rows.append(torch.stack(rks) ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = (sigma_t / sigma_s) * x - h_phi_1 * m0  # the first-order (DPM-Solver++ 1) step
    if x0_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else torch.linalg.solve(torch.stack(rows)[:-1, :-1], torch.stack(b)[:-1]).tolist()
        return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(torch.stack(rows), torch.stack(b)).tolist()
    return x_t - b_h * (sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (x0_t - m0))


def unipc(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None, order: int = 2):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler (bh2, data prediction, lower order at the
    start and the end): each step corrects the last one with the model evaluation it makes anyway (UniC), then
    predicts the next point (UniP). The model is evaluated once per step."""
    x0s, lambdas, x_last, last_order = [], [], None, 0
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if x_last is not None:
            x = _uni_update(x_last, sigmas[i - 1], sigma, x0s, lambdas, last_order, x0_t=x0)
        x0s, lambdas = [*x0s[-(order - 1) :], x0], [*lambdas[-(order - 1) :], -sigma.log()]
        last_order = min(order, n - i, len(x0s))
        x_last = x
        x = end_step(i, sigma, _uni_update(x, sigma, sigma_next, x0s, lambdas, last_order), x0, hold, callback)
    return x


@dataclass(frozen=True)
class Sampler:
    name: str  # the id that commands and requests use
    display_name: str  # as the web UI writes it in infotexts ("Karras" is appended for Karras σs)
    fn: Callable
    discrete: bool = False  # keeps the model's discrete timesteps (no Karras σs): DDPM, DDIM, PLMS
    lands_at: str = "zero"  # where the last step lands: σ = 0, or "sigma_min" (σ at t = 0, as DDIM and PLMS)
    stochastic: bool = False  # draws fresh noise while sampling (DDIM only with η > 0)
    options: tuple[str, ...] = field(default=())  # the keyword options of `fn` that a request may set


SAMPLERS = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPM", ddpm, discrete=True, stochastic=True),
        Sampler("ddim", "DDIM", ddim, discrete=True, lands_at="sigma_min", stochastic=True, options=("eta",)),
        Sampler("plms", "PLMS", plms, discrete=True, lands_at="sigma_min"),
        Sampler("euler", "Euler", euler),
        Sampler("euler_ancestral", "Euler a", euler_ancestral, stochastic=True, options=("eta", "s_noise")),
        Sampler("heun", "Heun", heun),
        Sampler("dpm2", "DPM2", dpm2),
        Sampler("dpmpp_2m", "DPM++ 2M", dpmpp_2m),
        Sampler("dpmpp_2s_ancestral", "DPM++ 2S a", dpmpp_2s_ancestral, stochastic=True, options=("eta", "s_noise")),
        Sampler("dpmpp_sde", "DPM++ SDE", dpmpp_sde, stochastic=True, options=("eta", "s_noise")),
        Sampler("unipc", "UniPC", unipc),
    )
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
