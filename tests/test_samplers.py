"""Our samplers against diffusers' schedulers: the same model function, the same initial noise and the same
per-step noise, step for step; and each sampler on Gaussian data, where the exact denoiser is known."""

import math

import diffusers
import pytest
import torch
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_sde,
    scheduling_euler_ancestral_discrete,
)

from latent_diffusion import schedule
from latent_diffusion.parameterization import sigma_from_alpha_bar
from latent_diffusion.samplers import SAMPLERS, get_sampler

ALPHA_BAR = schedule.alphas_cumprod(schedule.scaled_linear_betas(0.00085, 0.012, 1000))
SIGMA_TABLE = sigma_from_alpha_bar(ALPHA_BAR)
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                   "timestep_spacing": "leading", "steps_offset": 1}  # fmt: skip


def model_output(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
    """Plays the U-Net: an ε or v prediction from the scaled input and the noise level, nonlinear in both."""
    return 0.9 * torch.tanh(0.8 * x_in + 0.1 * math.log(sigma)) + 0.05 * x_in.roll(1, dims=-1)


def our_denoiser(parameterization: str):
    def denoiser(x, sigma):
        s = float(sigma)
        out = model_output(x / math.sqrt(s**2 + 1), s)
        return x - s * out if parameterization == "eps" else x / (s**2 + 1) - s / math.sqrt(s**2 + 1) * out

    return denoiser


class NoiseTape:
    """The same sequence of standard-normal tensors, handed out in order, to whoever asks."""

    def __init__(self, shape, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.tape = [torch.randn(shape, generator=g) for _ in range(200)]
        self.i = 0

    def __call__(self, *args, **kwargs):
        self.i += 1
        return self.tape[self.i - 1]


# sampler -> (diffusers scheduler class, its config, step kwargs, does diffusers work in VP space)
CASES = {
    "ddim": (diffusers.DDIMScheduler, {"set_alpha_to_one": False, "clip_sample": False}, {}, True),
    "ddim_eta1": (diffusers.DDIMScheduler, {"set_alpha_to_one": False, "clip_sample": False}, {"eta": 1.0}, True),
    "ddpm": (diffusers.DDPMScheduler, {"clip_sample": False, "variance_type": "fixed_small"}, {}, True),
    "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}, {}, True),
    "euler": (diffusers.EulerDiscreteScheduler, {}, {}, False),
    "euler_karras": (diffusers.EulerDiscreteScheduler, {}, {}, False),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}, {}, False),
    "heun": (diffusers.HeunDiscreteScheduler, {}, {}, False),
    "dpm2": (diffusers.KDPM2DiscreteScheduler, {}, {}, False),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}, True),
    "dpmpp_2m_karras": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        {},
        True,
    ),
    "dpmpp_sde": (diffusers.DPMSolverSDEScheduler, {}, {}, False),
    # diffusers' UniPC spaces "leading" by T // (steps + 1); "trailing" is spaced as everywhere else
    "unipc": (diffusers.UniPCMultistepScheduler, {"timestep_spacing": "trailing"}, {}, True),
    "unipc_karras": (diffusers.UniPCMultistepScheduler, {"use_karras_sigmas": True}, {}, True),
}


def diffusers_sigma(scheduler, t) -> float:
    """The σ at which the scheduler wants the model evaluated now."""
    if not hasattr(scheduler, "sigmas"):  # DDIM, DDPM, PNDM: integer timesteps of the table
        return SIGMA_TABLE[int(t)].item()
    if scheduler.step_index is None:  # DPM-Solver and UniPC find their step index only in step()
        scheduler._init_step_index(t)
    first = getattr(scheduler, "state_in_first_order", True)
    if isinstance(scheduler, diffusers.KDPM2DiscreteScheduler) and not first:
        return scheduler.sigmas_interpol[scheduler.step_index].item()
    if isinstance(scheduler, diffusers.DPMSolverSDEScheduler) and not first:
        return scheduler.mid_point_sigma.item()
    return scheduler.sigmas[scheduler.step_index].item()


def run_diffusers(case, parameterization, steps, x_sigma_space, sigmas, tape, monkeypatch):
    cls, config, step_kwargs, vp = CASES[case]
    # diffusers' PNDM mixes raw v predictions of different timesteps before converting them to ε; CompVis's PLMS
    # (the original, which we follow) converts each prediction at its own timestep. So for v, PNDM is given the
    # ε that the v-model implies at each evaluation.
    v_as_eps = case == "plms" and parameterization == "v"
    prediction_type = "epsilon" if parameterization == "eps" or v_as_eps else "v_prediction"
    scheduler = cls(**{**SD_SCHEDULE, **config}, prediction_type=prediction_type)
    if case == "euler_karras":  # diffusers' Euler takes its Karras range from the spaced timesteps; give it ours
        scheduler.set_timesteps(sigmas=sigmas.float().numpy())
    elif case == "dpmpp_2m":  # diffusers' DPM-Solver spaces "leading" by T // (steps + 1); give it the usual spacing
        scheduler.set_timesteps(timesteps=schedule.sampling_timesteps(steps, "leading").long().tolist())
    else:
        scheduler.set_timesteps(steps)
    for module in (scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", tape)
    monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", lambda *a, **k: tape)
    x = x_sigma_space / math.sqrt(sigmas[0].item() ** 2 + 1) if vp else x_sigma_space.clone()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        sigma = diffusers_sigma(scheduler, t)
        out = model_output(x_in, sigma)
        if v_as_eps:  # ε = √ᾱ·v + √(1−ᾱ)·x_VP, ᾱ = 1/(1+σ²)
            out = (out + sigma * x_in) / math.sqrt(1 + sigma**2)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return scheduler, x


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_diffusers(case, parameterization, monkeypatch):
    name = case.removesuffix("_karras").removesuffix("_eta1")
    sampler, final = get_sampler(name).fn, get_sampler(name).lands_at
    steps = 20  # diffusers' DPM-Solver drops to first order for the last two steps below 15 steps
    spacing = CASES[case][1].get("timestep_spacing", "leading")
    sigmas = schedule.sampling_sigmas(ALPHA_BAR, steps, spacing=spacing, karras="karras" in case, final=final)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * math.sqrt(sigmas[0].item() ** 2 + 1)

    scheduler, theirs = run_diffusers(case, parameterization, steps, x_T, sigmas, NoiseTape(x_T.shape), monkeypatch)
    if hasattr(scheduler, "sigmas"):  # the σ schedule itself is diffusers' (before any stepping)
        torch.testing.assert_close(torch.unique_consecutive(scheduler.sigmas).double(), sigmas, atol=2e-5, rtol=1e-5)

    kwargs = {"eta": 1.0} if case == "ddim_eta1" else {}
    x = sampler(our_denoiser(parameterization), x_T.double(), sigmas, noise=NoiseTape(x_T.shape), **kwargs)
    ours = x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # back to the VP latent (a no-op when σ_last = 0)
    torch.testing.assert_close(ours.float(), theirs, atol=1e-4, rtol=0)
    assert theirs.abs().mean() > 0.1


# Allowed |relative error| of the variance at 50 steps, by kind of method (measured at s = 1, leading spacing:
# PLMS +1.0 %, Heun +1.1 %, DPM2 +1.4 %, DPM++ 2M +3.0 %; DDIM −4.2 %, Euler −4.3 %; DPM++ 2S a −2.0 %,
# DPM++ SDE −8.8 %, Euler a and DDPM −11 %). Plugging the posterior mean E[x0|x] into a finite step loses the
# posterior variance of x0 (Bao et al. 2022, Analytic-DPM), most of all in the ancestral samplers; the errors
# shrink with more steps (Euler a: −1.8 % at 500 steps). The Monte-Carlo error of the variance is 0.7 %.
VARIANCE_TOLERANCE = {
    "plms": 0.05, "heun": 0.05, "dpm2": 0.05, "dpmpp_2m": 0.05, "unipc": 0.05,
    "ddim": 0.07, "euler": 0.07,
    "ddpm": 0.15, "euler_ancestral": 0.15, "dpmpp_2s_ancestral": 0.15, "dpmpp_sde": 0.15,
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_lands_on_gaussian_data(name):
    """Data x0 ~ N(μ, 1): the exact denoiser is E[x0 | x] = μ + s²/(s² + σ²)·(x − μ) with s = 1. From the exact
    noisy marginal N(μ, s² + σ_max²), 50 steps must give mean μ (within 4 Monte-Carlo standard errors,
    4·s/√N = 0.02, plus 0.01 for discretisation) and variance s² + σ_last² (DDIM and PLMS stop at σ_0 = 0.029)
    within the tolerance of the method's kind above."""
    mu, s, n = 0.7, 1.0, 40_000
    sampler, final = get_sampler(name).fn, get_sampler(name).lands_at
    sigmas = schedule.sampling_sigmas(ALPHA_BAR, 50, spacing="leading", final=final)
    g = torch.Generator().manual_seed(0)

    def denoiser(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def noise(sigma, sigma_next):
        return torch.randn(n, generator=g, dtype=torch.float64)

    x_T = mu + torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(s**2 + sigmas[0].item() ** 2)
    x = sampler(denoiser, x_T, sigmas, noise=noise)
    expected_var = s**2 + sigmas[-1].item() ** 2
    assert abs(x.mean().item() - mu) < 4 * s / math.sqrt(n) + 0.01
    assert abs(x.var().item() / expected_var - 1) < VARIANCE_TOLERANCE[name]
