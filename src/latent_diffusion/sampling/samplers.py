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

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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


def dpm2_ancestral(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 to σ_down (the derivative at the geometric midpoint), then σ_up of fresh noise, as
    k-diffusion's sample_dpm_2_ancestral."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, x0)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = (sigma.log().lerp(sigma_down.log(), 0.5)).exp()
            x_mid = x + d * (sigma_mid - sigma)
            x = x + to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid)) * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def dpm2(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None):
    """DPM-Solver-2 as in k-diffusion: the derivative at the geometric midpoint σ_mid = √(σ·σ_next), Euler for
    the last step to σ = 0; DPM2 a without noise (η = 0: σ_down = σ_next)."""
    return dpm2_ancestral(denoiser, x, sigmas, noise=noise, hold=hold, callback=callback, eta=0.0)


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """The linear multistep weights of the last `order` derivatives for the step σ_i → σ_(i+1): the integrals of
    their Lagrange basis polynomials over [σ_i, σ_(i+1)], exact (k-diffusion integrates them numerically)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]  # the newest first
    coefficients = []
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis *= np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
        integral = basis.integ()
        coefficients.append(integral(float(sigmas[i + 1])) - integral(float(sigmas[i])))
    return coefficients


def lms(denoiser: Denoiser, x, sigmas, *, noise=None, hold=None, callback=None, order: int = 4):
    """Linear multistep on the ODE dx/dσ = d (Karras et al. 2022), order up to 4, as k-diffusion's sample_lms."""
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i])
        ds = [*ds[-(order - 1) :], to_d(x, sigmas[i], x0)]
        coefficients = lms_coefficients(sigmas, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coefficients, reversed(ds)))
        x = end_step(i, sigmas[i], x, x0, hold, callback)
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


def dpmpp_2m_sde(
    denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0, solver="midpoint"
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022) as k-diffusion's sample_dpmpp_2m_sde, in its "midpoint" or "heun"
    form. With t = −log σ, h = t' − t and ηh: x' = (σ'/σ)·e^(−ηh)·x + (1 − e^(−h−ηh))·x0 + a second-order
    correction from the last two x0, plus σ'·√(1 − e^(−2ηh)) of noise."""
    old_x0, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            x = (sigma_next / sigma) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * x0
            if old_x0 is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + (-torch.expm1(-h - eta_h) / (-h - eta_h) + 1) / r * (x0 - old_x0)
                else:
                    x = x - 0.5 * torch.expm1(-h - eta_h) / r * (x0 - old_x0)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_x0, h_last = x0, h
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def dpmpp_2m_sde_heun(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the Heun form of the second-order correction."""
    return dpmpp_2m_sde(
        denoiser, x, sigmas, noise=noise, hold=hold, callback=callback, eta=eta, s_noise=s_noise, solver="heun"
    )


def dpmpp_3m_sde(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE as k-diffusion's sample_dpmpp_3m_sde: the exponential integrator over h·(1 + η) with
    first and second divided differences of the last three x0 (φ_2, φ_3 terms), plus σ'·√(1 − e^(−2ηh)) of noise."""
    x0_1, x0_2, h, h_1, h_2 = None, None, None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * x0
            phi_2 = torch.expm1(-h_eta) / h_eta + 1  # φ_2(h) = (e^(−h) − 1)/h + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        x0_1, x0_2, h_1, h_2 = x0, x0_1, h, h_1
        x = end_step(i, sigma, x, x0, hold, callback)
    return x


def lcm(denoiser: Denoiser, x, sigmas, *, noise, hold=None, callback=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): the model's x0, noised afresh to
    the next level, x' = x0 + σ'·z; for LCM-distilled models and LCM-LoRA, in a few steps without guidance."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i])
        x = x0 + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else x0
        x = end_step(i, sigmas[i], x, x0, hold, callback)
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
    display_name: str  # as the web UI writes it in infotexts
    fn: Callable
    discrete: bool = False  # keeps the model's discrete timesteps (takes no scheduler): DDPM, DDIM, PLMS
    lands_at: str = "zero"  # where the last step lands: σ = 0, or "sigma_min" (σ at t = 0, as DDIM and PLMS)
    stochastic: bool = False  # draws fresh noise while sampling (DDIM only with η > 0)
    options: tuple[str, ...] = field(default=())  # the keyword options of `fn` that a request may set
    scheduler: str | None = None  # the web UI's automatic schedule type for it (None: uniform, not written)
    discard_penultimate: bool = False  # computes σs for steps + 1 and drops the next-to-last, as the web UI
    brownian: bool = False  # its noise comes from a Brownian tree (σ-consistent), as the web UI's SDE samplers
    second_order: bool = False  # two model evaluations a step (the web UI's flag: prompt editing counts them)


ANCESTRAL = ("eta", "s_noise")
# fmt: off
SAMPLERS = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPM", ddpm, discrete=True, stochastic=True),
        Sampler("ddim", "DDIM", ddim, discrete=True, lands_at="sigma_min", stochastic=True, options=("eta",)),
        Sampler("plms", "PLMS", plms, discrete=True, lands_at="sigma_min"),
        Sampler("euler", "Euler", euler),
        Sampler("euler_ancestral", "Euler a", euler_ancestral, stochastic=True, options=ANCESTRAL),
        Sampler("heun", "Heun", heun, second_order=True),
        Sampler("lms", "LMS", lms),
        Sampler("dpm2", "DPM2", dpm2, scheduler="karras", discard_penultimate=True, second_order=True),
        Sampler("dpm2_ancestral", "DPM2 a", dpm2_ancestral, stochastic=True, options=ANCESTRAL, scheduler="karras",
                discard_penultimate=True, second_order=True),
        Sampler("dpmpp_2m", "DPM++ 2M", dpmpp_2m, scheduler="karras"),
        Sampler("dpmpp_2s_ancestral", "DPM++ 2S a", dpmpp_2s_ancestral, stochastic=True, options=ANCESTRAL,
                scheduler="karras", second_order=True),
        Sampler("dpmpp_sde", "DPM++ SDE", dpmpp_sde, stochastic=True, options=ANCESTRAL, scheduler="karras",
                brownian=True, second_order=True),
        Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", dpmpp_2m_sde, stochastic=True, options=ANCESTRAL,
                scheduler="exponential", brownian=True),
        Sampler("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", dpmpp_2m_sde_heun, stochastic=True, options=ANCESTRAL,
                scheduler="exponential", brownian=True),
        Sampler("dpmpp_3m_sde", "DPM++ 3M SDE", dpmpp_3m_sde, stochastic=True, options=ANCESTRAL,
                scheduler="exponential", discard_penultimate=True, brownian=True),
        Sampler("unipc", "UniPC", unipc),
        Sampler("lcm", "LCM", lcm, stochastic=True),
    )
}
# fmt: on


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def find_sampler(name: str) -> tuple[Sampler, str | None]:
    """A sampler by our id, the web UI's name or its k-diffusion alias, in any case ("DPM++ 2M", "dpmpp_2m",
    "k_dpmpp_2m"), or a legacy web UI name with the schedule in it ("DPM++ 2M Karras") -> (sampler, that schedule's
    id or None)."""
    key = name.strip().lower()
    for suffix, schedule in ((" karras", "karras"), (" exponential", "exponential"), ("", None)):
        if not key.endswith(suffix):
            continue
        base = key.removesuffix(suffix) if suffix else key
        for s in SAMPLERS.values():
            k_name = "k_" + s.name.replace("ancestral", "a").replace("dpm2", "dpm_2")  # the web UI's aliases
            aliases = {s.name, s.display_name.lower(), k_name, "k_" + s.name}
            if base in aliases:
                return s, schedule
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(s.display_name for s in SAMPLERS.values())}")
