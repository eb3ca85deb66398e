"""The U-Net seen as a denoiser D(x, σ) ≈ x0, with classifier-free guidance: what every sampler calls.

A discrete-time model predicts ε (or v) from the variance-preserving latent x_VP = x/√(1+σ²) at timestep t(σ);
`parameterization.x0_from_prediction` turns that into x0. Guidance (Ho & Salimans 2022):
out = out_u + s·(out_c − out_u), both halves in one batched U-Net call, every conditioning field batched
the same way; the map from the prediction to x0 is affine, so guiding ε, v or x0 gives the same result.
"""

from collections.abc import Callable, Mapping

import torch

from .devices import to_device
from .parameterization import c_in, sigma_from_alpha_bar, x0_from_prediction
from .schedule import sigma_to_t

Cond = Mapping[str, torch.Tensor]


class Denoiser:
    def __init__(
        self,
        net: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
        alphas_cumprod: torch.Tensor,
        parameterization: str,
        cond: Cond,
        uncond: Cond | None = None,
        cfg_scale: float = 1.0,
    ):
        """net(x, t, cond) -> ε or v (`DiffusionWrapper`). cond: the conditioning of the prompts (see
        `DiffusionWrapper`); uncond: the same fields for the negative prompts (needed when cfg_scale != 1)."""
        self.net = net
        self.parameterization = parameterization
        self.log_sigmas = sigma_from_alpha_bar(alphas_cumprod.double()).log().cpu()
        self.cfg_scale = cfg_scale
        self.guided = cfg_scale != 1.0
        if self.guided and (uncond is None or uncond.keys() != cond.keys()):
            raise ValueError("classifier-free guidance needs the unconditional conditioning, with the same fields")
        # Batch layout of one guided call: [unconditional; conditional], as diffusers.
        self.cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if self.guided else cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: (b, c, h, w) at noise level σ (a scalar tensor) -> x0 estimate (b, c, h, w)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = to_device(sigma_to_t(sigma.cpu(), self.log_sigmas).float(), x.device)
        s = sigma.item()
        x_in = x * c_in(s)
        if self.guided:
            x_in = torch.cat([x_in, x_in])  # the unconditional and conditional halves see the same input
        out = self.net(x_in, t.expand(len(x_in)), self.cond)
        if self.guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.cfg_scale * (out_cond - out_uncond)
        return x0_from_prediction(x, out, s, self.parameterization)
