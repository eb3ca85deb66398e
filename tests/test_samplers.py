"""Our samplers against diffusers' schedulers: the same model function, the same initial noise and the same
per-step noise, step for step; and each sampler on Gaussian data, where the exact denoiser is known."""

import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_sde,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)

from latent_diffusion.sampling import noise_schedule as schedule
from latent_diffusion.sampling import sigma_schedules as schedulers
from latent_diffusion.sampling.denoiser import Denoiser
from latent_diffusion.sampling.noise import BrownianNoise
from latent_diffusion.sampling.parameterization import sigma_from_alpha_bar
from latent_diffusion.sampling.samplers import SAMPLERS, get_sampler, lms_coefficients

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
    if "karras" in case:
        sigmas = schedulers.karras(steps, SIGMA_TABLE)
    else:
        sigmas = schedule.sampling_sigmas(ALPHA_BAR, steps, spacing=spacing, final=final)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * math.sqrt(sigmas[0].item() ** 2 + 1)

    scheduler, theirs = run_diffusers(case, parameterization, steps, x_T, sigmas, NoiseTape(x_T.shape), monkeypatch)
    if hasattr(scheduler, "sigmas"):  # the σ schedule itself is diffusers' (before any stepping)
        torch.testing.assert_close(torch.unique_consecutive(scheduler.sigmas).double(), sigmas, atol=2e-5, rtol=1e-5)

    kwargs = {"eta": 1.0} if case == "ddim_eta1" else {}
    x = sampler(our_denoiser(parameterization), x_T.double(), sigmas, noise=NoiseTape(x_T.shape), **kwargs)
    ours = x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # back to the VP latent (a no-op when σ_last = 0)
    torch.testing.assert_close(ours.float(), theirs, atol=1e-4, rtol=0)
    assert theirs.abs().mean() > 0.1


# Allowed |relative error| of the variance at 50 steps on each sampler's automatic schedule, by kind of method
# (measured at s = 1: PLMS +1.0 %, Heun +1.2 %, DPM2 +1.2 %, LMS +1.1 %, DPM++ 2M +1.4 %, UniPC +3.7 %; DDIM −4.2 %,
# Euler −4.5 %; DPM++ 2S a −1.9 %, DPM++ SDE −10 %, Euler a and DDPM −11 %; DPM2 a −0.2 %, DPM++ 2M SDE −0.4 %,
# its Heun form +0.2 %, DPM++ 3M SDE −0.7 %). Plugging the posterior mean E[x0|x] into a finite step loses the
# posterior variance of x0 (Bao et al. 2022, Analytic-DPM), most of all in the ancestral samplers; the errors
# shrink with more steps (Euler a: −1.8 % at 500 steps). The Monte-Carlo error of the variance is 0.7 %.
VARIANCE_TOLERANCE = {
    "plms": 0.05, "heun": 0.05, "dpm2": 0.05, "lms": 0.05, "dpmpp_2m": 0.05, "unipc": 0.05,
    "ddim": 0.07, "euler": 0.07,
    "ddpm": 0.15, "euler_ancestral": 0.15, "dpmpp_2s_ancestral": 0.15, "dpmpp_sde": 0.15,
    "dpm2_ancestral": 0.05, "dpmpp_2m_sde": 0.05, "dpmpp_2m_sde_heun": 0.05, "dpmpp_3m_sde": 0.05,
}  # fmt: skip


def gaussian_run(name: str, mu: float, s: float, n: int):
    """Sample data x0 ~ N(μ, s²) with the exact denoiser E[x0 | x] = μ + s²/(s² + σ²)·(x − μ), from the exact noisy
    marginal N(μ, s² + σ_max²), in 50 steps of the sampler's automatic schedule -> (samples, σs)."""
    sampler = get_sampler(name)
    sigmas = schedulers.sampling_schedule(sampler, "automatic", 50, ALPHA_BAR)
    g = torch.Generator().manual_seed(0)

    def denoiser(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def noise(sigma, sigma_next):
        return torch.randn(n, generator=g, dtype=torch.float64)

    x_T = mu + torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(s**2 + sigmas[0].item() ** 2)
    return sampler.fn(denoiser, x_T, sigmas, noise=noise), sigmas


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "lcm"])
def test_sampler_lands_on_gaussian_data(name):
    """50 steps must give mean μ (within 4 Monte-Carlo standard errors, 4·s/√N = 0.02, plus 0.01 for
    discretisation) and variance s² + σ_last² (DDIM and PLMS stop at σ_0 = 0.029) within the tolerance of the
    method's kind above."""
    mu, s, n = 0.7, 1.0, 40_000
    x, sigmas = gaussian_run(name, mu, s, n)
    expected_var = s**2 + sigmas[-1].item() ** 2
    assert abs(x.mean().item() - mu) < 4 * s / math.sqrt(n) + 0.01
    assert abs(x.var().item() / expected_var - 1) < VARIANCE_TOLERANCE[name]


def test_lcm_on_gaussian_data():
    """LCM takes the model's x0 as a sample (a consistency model's is one) and noises it to the next level. With
    the posterior mean as x0 the variance shrinks by the closed-form recursion V' = V/(1 + σ²)² + σ'², from
    V = s² + σ_max² (s = 1); the samples must follow it (Monte-Carlo error 0.7 %)."""
    mu, n = 0.7, 40_000
    x, sigmas = gaussian_run("lcm", mu, 1.0, n)
    variance = 1 + sigmas[0].item() ** 2
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        variance = variance / (1 + sigma**2) ** 2 + sigma_next**2
    assert abs(x.mean().item() - mu) < 4 / math.sqrt(n)
    assert abs(x.var().item() / variance - 1) < 0.03


def test_lcm_matches_diffusers(monkeypatch):
    """LCM against diffusers' LCMScheduler on the same timesteps and noise. Its boundary condition (c_skip, c_out)
    is part of an LCM model's parameterization, not of the sampler; a huge timestep_scaling makes it the identity
    (c_skip = 0, c_out = 1) so that both sides take the model's x0 as it is."""
    timesteps = [999, 759, 499, 259]
    scheduler = diffusers.LCMScheduler(**SD_SCHEDULE, timestep_scaling=1e9, clip_sample=False)
    scheduler.set_timesteps(timesteps=timesteps)
    sigmas = torch.cat([SIGMA_TABLE[timesteps], torch.zeros(1, dtype=torch.float64)])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * math.sqrt(sigmas[0].item() ** 2 + 1)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", NoiseTape(x_T.shape))
    x = x_T / math.sqrt(sigmas[0].item() ** 2 + 1)
    for t in scheduler.timesteps:
        x = scheduler.step(model_output(x, SIGMA_TABLE[int(t)].item()), t, x).prev_sample
    ours = get_sampler("lcm").fn(our_denoiser("eps"), x_T.double(), sigmas, noise=NoiseTape(x_T.shape))
    torch.testing.assert_close(ours.float(), x, atol=1e-4, rtol=0)


def load_k_diffusion_sampling():
    """k-diffusion's `sampling` and `external` modules (and `utils`), loaded without the package's __init__, which
    imports its whole training stack (installed --no-deps, see the Makefile). `utils` imports torchvision for
    two image helpers that sampling never calls; PyPI has torchvision only as a CUDA build, which does not load
    beside the CPU torch, so an empty stand-in takes its place while `utils` loads, and only then (diffusers
    looks for torchvision too)."""
    root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    stand_ins = [n for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
                 if n not in sys.modules]  # fmt: skip
    sys.modules |= {name: types.ModuleType(name) for name in stand_ins}
    try:
        for name in ("utils", "sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return package


K = load_k_diffusion_sampling()
# our sampler -> (k-diffusion's function, its options)
K_CASES = {
    "euler": ("sample_euler", {}),
    "euler_ancestral": ("sample_euler_ancestral", {}),
    "heun": ("sample_heun", {}),
    "lms": ("sample_lms", {}),
    "dpm2": ("sample_dpm_2", {}),
    "dpm2_ancestral": ("sample_dpm_2_ancestral", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}),
}


@pytest.mark.parametrize("scheduler", ["automatic", "karras", "exponential"])
@pytest.mark.parametrize("name", list(K_CASES))
def test_sampler_matches_k_diffusion(name, scheduler):
    """The same denoiser, σs (the web UI's for the sampler, penultimate σ dropped where it drops it) and noise tape
    as k-diffusion's sampler: float64 on both sides, so any difference is a difference of method."""
    sampler = get_sampler(name)
    sigmas = schedulers.sampling_schedule(sampler, scheduler, 12, ALPHA_BAR)
    assert len(sigmas) == 13 and sigmas[-1] == 0
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    denoiser = our_denoiser("eps")
    fn, options = K_CASES[name]
    noise = {"noise_sampler": NoiseTape(x_T.shape)} if sampler.stochastic else {}
    theirs = getattr(K.sampling, fn)(lambda x, s: denoiser(x, s[0]), x_T, sigmas, disable=True, **noise, **options)
    ours = sampler.fn(denoiser, x_T, sigmas, noise=NoiseTape(x_T.shape))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert theirs.abs().mean() > 0.1


def test_lms_coefficients_match_k_diffusion():
    """Our exact integrals of the Lagrange basis against k-diffusion's numerical quadrature."""
    sigmas = schedulers.karras(10, SIGMA_TABLE).numpy()
    for i in range(9):
        order = min(i + 1, 4)
        ours = lms_coefficients(torch.from_numpy(sigmas), i, order)
        theirs = [K.sampling.linear_multistep_coeff(order, sigmas, i, j) for j in range(order)]
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # torchsde, on k-diffusion's side (ours filters it)
def test_brownian_noise_matches_k_diffusion():
    """Per-image Brownian trees seeded as the web UI seeds them: the same increments as k-diffusion's
    BrownianTreeNoiseSampler with a list of seeds, and row i depends only on seed i."""
    sigmas = schedulers.karras(8, SIGMA_TABLE)
    seeds, shape = [7, 123456789], (4, 8, 8)
    ours = BrownianNoise(shape, sigmas, seeds, torch.device("cpu"))
    f32 = sigmas.float()
    theirs = K.sampling.BrownianTreeNoiseSampler(torch.zeros(2, *shape), f32[f32 > 0].min(), f32.max(), seed=seeds)
    alone = BrownianNoise(shape, sigmas, seeds[1:], torch.device("cpu"))
    for a, b in itertools.pairwise(f32):
        if b == 0:
            continue
        step = ours(a, b)
        torch.testing.assert_close(step, theirs(a, b), atol=1e-6, rtol=0)
        torch.testing.assert_close(step[1:], alone(a, b), atol=1e-6, rtol=0)
        assert 0.7 < step.std() < 1.3


SIGMA_TABLE_F32 = SIGMA_TABLE.float()


@pytest.mark.parametrize("n", [1, 7, 20])
def test_schedulers_match_references(n):
    """The web UI's schedule types against k-diffusion (its get_sigmas_* and its discrete model's σ ↔ t) and
    diffusers (Beta), on SD's σ table."""
    low, high = SIGMA_TABLE[0].item(), SIGMA_TABLE[-1].item()
    discrete = K.external.DiscreteEpsDDPMDenoiser(None, ALPHA_BAR, quantize=False)
    expected = {
        "karras": K.sampling.get_sigmas_karras(n, low, high),
        "exponential": K.sampling.get_sigmas_exponential(n, low, high),
        "polyexponential": K.sampling.get_sigmas_polyexponential(n, low, high),
        "uniform": discrete.get_sigmas(n),
        "normal": discrete.get_sigmas(n),
        "sgm_uniform": K.sampling.append_zero(discrete.t_to_sigma(torch.linspace(999, 0, n + 1)[:-1])),
        "beta": K.sampling.append_zero(
            torch.as_tensor(diffusers.EulerDiscreteScheduler()._convert_to_beta(torch.tensor([high, low]), n))
        ),
    }
    for name, theirs in expected.items():
        ours = schedulers.SCHEDULERS[name].fn(n, SIGMA_TABLE)
        assert len(ours) == n + 1, name
        torch.testing.assert_close(ours, theirs.double(), atol=1e-5, rtol=1e-5, msg=name)


def test_closed_form_schedulers():
    """The schedule types defined by table positions or a formula, checked from their definitions."""
    table = SIGMA_TABLE
    zero = torch.zeros(1, dtype=torch.float64)
    # simple: every (T/n)-th σ from the top; ddim: timesteps 1 + k·(T//n), from the top (7 steps: 8 levels)
    torch.testing.assert_close(schedulers.simple(10, table), torch.cat([table[range(999, 0, -100)], zero]))
    torch.testing.assert_close(schedulers.ddim(10, table), torch.cat([table[range(901, 0, -100)], zero]))
    assert len(schedulers.ddim(7, table)) == 9
    # KL optimal: evenly spaced in atan σ, from σ_max to σ_min
    kl = schedulers.kl_optimal(9, table)
    steps = kl.atan().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))
    assert kl[0].item() == pytest.approx(table[-1].item()) and kl[-1].item() == pytest.approx(table[0].item())
    # Align Your Steps: NVIDIA's 10-step SD 1.5 σs (11 levels) verbatim, then 0
    ays = torch.tensor([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0])
    torch.testing.assert_close(schedulers.align_your_steps(11, table), ays.double())
    assert schedulers.find_scheduler("SGM Uniform").name == schedulers.find_scheduler("SGMUniform").name


def test_discarding_the_penultimate_sigma():
    """DPM2 and DPM++ 3M SDE run on the levels of steps + 1 without the next-to-last, as the web UI runs them."""
    full = schedulers.karras(11, SIGMA_TABLE)
    dropped = schedulers.sampling_schedule(get_sampler("dpm2"), "automatic", 10, ALPHA_BAR)
    torch.testing.assert_close(dropped, torch.cat([full[:-2], full[-1:]]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_sampler_reads_the_latents_back_to_the_host(name):
    """On a GPU a read of a device tensor (`.item()`, `if tensor:`) waits for every queued kernel, so the GPU
    idles while the host queues the next step. Every sampler and the guided `Denoiser` run here on the meta
    device, which has no values: any such read raises. (Blocking copies to the device, the other way to drain
    the queue, pass unseen on meta; `Denoiser` and `generate` make theirs non-blocking.)"""
    sampler = get_sampler(name)
    meta = torch.device("meta")
    net = lambda x_in, t, cond: torch.tanh(x_in) * t[:, None, None, None] / 1000 + cond["crossattn"].mean()  # noqa: E731
    cond = {"crossattn": torch.zeros(1, 2, 3, device=meta)}
    denoiser = Denoiser(net, ALPHA_BAR, "eps", cond, {"crossattn": torch.ones(1, 2, 3, device=meta)}, cfg_scale=5.0)
    sigmas = schedulers.sampling_schedule(sampler, "automatic", 4, ALPHA_BAR)
    shape = (1, 4, 8, 8)
    noise = (
        BrownianNoise(shape[1:], sigmas, [0], meta)
        if sampler.brownian
        else lambda s, s_next: torch.randn(shape, device=meta)
    )
    steps = []
    x = sampler.fn(denoiser, torch.randn(shape, device=meta), sigmas, noise=noise, callback=steps.append)
    assert x.device == meta and x.shape == shape and len(steps) == len(sigmas) - 1
