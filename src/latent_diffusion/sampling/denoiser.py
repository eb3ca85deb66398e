"""The U-Net seen as a denoiser D(x, σ) ≈ x0, with classifier-free guidance: what every sampler calls.

A discrete-time model predicts ε (or v) from the variance-preserving latent x_VP = x/√(1+σ²) at timestep t(σ);
`parameterization.x0_from_prediction` turns that into x0. Guidance (Ho & Salimans 2022):
out = out_u + s·(out_c − out_u), both halves in one batched U-Net call, every conditioning field batched
the same way; the map from the prediction to x0 is affine, so guiding ε, v or x0 gives the same result. A prompt
and a negative prompt of different lengths (77-token chunks) run as two calls, as the web UI runs them by default
("Pad conds" off): padding the shorter with empty chunks would change what cross-attention sees, so the image.
"""

from collections.abc import Callable, Mapping

import torch

from ..devices import to_device
from .noise_schedule import sigma_to_t
from .parameterization import c_in, sigma_from_alpha_bar, x0_from_prediction

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
        weights: list[list[float]] | None = None,
    ):
        """net(x, t, cond) -> ε or v (`DiffusionWrapper`). cond: the conditioning of the prompts (see
        `DiffusionWrapper`); uncond: the same fields for the negative prompts (needed when cfg_scale != 1).
        weights: composable prompts (AND), image i's parts' weights, its rows of `cond` one per part and in order:
        out = out_u + s·Σ_k w_k·(out_k − out_u) (Liu et al. 2022; the web UI's `combine_denoised`); None: a row each,
        at weight 1."""
        self.net = net
        self.parameterization = parameterization
        self.log_sigmas = sigma_from_alpha_bar(alphas_cumprod.double()).log().cpu()
        self.cfg_scale = cfg_scale
        self.composed = weights is not None
        if self.composed:  # each cond row's image, and its weight
            self.image_of_row = torch.tensor([i for i, parts in enumerate(weights) for _ in parts])
            self.row_weights = torch.tensor([w for parts in weights for w in parts], dtype=torch.float32)
        self.guided = cfg_scale != 1.0 or self.composed
        if self.guided and (uncond is None or uncond.keys() != cond.keys()):
            raise ValueError("classifier-free guidance needs the unconditional conditioning, with the same fields")
        # Batch layout of one guided call: [unconditional; conditional], as diffusers.
        self.batched = self.guided and all(uncond[k].shape[1:] == cond[k].shape[1:] for k in cond)
        self.cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if self.batched else cond
        self.uncond = uncond if self.guided and not self.batched else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: (b, c, h, w) at noise level σ (a scalar tensor) -> x0 estimate (b, c, h, w)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = to_device(sigma_to_t(sigma.cpu(), self.log_sigmas).float(), x.device)
        s = sigma.item()
        x_in = x * c_in(s)
        if not self.guided:
            return x0_from_prediction(x, self.net(x_in, t.expand(len(x)), self.cond), s, self.parameterization)
        if self.composed:
            return x0_from_prediction(x, self.composed_prediction(x_in, t), s, self.parameterization)
        if self.batched:  # the unconditional and conditional halves see the same input
            out_uncond, out_cond = self.net(torch.cat([x_in, x_in]), t.expand(2 * len(x)), self.cond).chunk(2)
        else:
            out_uncond, out_cond = (self.net(x_in, t.expand(len(x)), c) for c in (self.uncond, self.cond))
        out = out_uncond + self.cfg_scale * (out_cond - out_uncond)
        return x0_from_prediction(x, out, s, self.parameterization)

    def composed_prediction(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided prediction of composable prompts: each image's input once per part (its cond rows), the
        parts' pulls away from the unconditional output weighted and summed per image."""
        rows = self.image_of_row.to(x_in.device)
        x_parts = x_in[rows]  # (parts, c, h, w)
        if self.batched:
            out = self.net(torch.cat([x_in, x_parts]), t.expand(len(x_in) + len(rows)), self.cond)
            out_uncond, out_parts = out[: len(x_in)], out[len(x_in) :]
        else:
            out_uncond = self.net(x_in, t.expand(len(x_in)), self.uncond)
            out_parts = self.net(x_parts, t.expand(len(rows)), self.cond)
        weights = self.row_weights.to(out_parts)[:, None, None, None]
        pulls = torch.zeros_like(out_uncond).index_add_(0, rows, (out_parts - out_uncond[rows]) * weights)
        return out_uncond + self.cfg_scale * pulls
