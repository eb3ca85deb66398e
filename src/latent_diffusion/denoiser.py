"""The U-Net seen as a denoiser D(x, σ) ≈ x0, with classifier-free guidance: what every sampler calls.

A discrete-time model predicts ε (or v) from the variance-preserving latent x_VP = x/√(1+σ²) at timestep t(σ).
Then x0 = x − σ·ε, or, for v = √ᾱ·ε − √(1−ᾱ)·x0 with ᾱ = 1/(1+σ²): x0 = x/(1+σ²) − σ/√(1+σ²)·v.
Guidance (Ho & Salimans 2022): out = out_u + s·(out_c − out_u), both halves in one batched U-Net call; the
map from the prediction to x0 is affine, so guiding ε, v or x0 gives the same result.
"""

import torch

from .schedule import sigma_to_t, sigmas_from_alphas_cumprod


class Denoiser:
    def __init__(
        self,
        unet,
        alphas_cumprod: torch.Tensor,
        parameterization: str,
        context: torch.Tensor,
        uncond_context: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        concat: torch.Tensor | None = None,
    ):
        """unet(x, t, context) -> ε or v. context: (b, 77, d) for the prompts, uncond_context the same for the
        negative prompts (needed when cfg_scale != 1). concat: (b, c, h, w) extra input channels (the mask and
        masked-image latent of inpainting models), appended to the noisy latent."""
        self.unet = unet
        self.parameterization = parameterization
        self.log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double()).log().cpu()
        self.cfg_scale = cfg_scale
        self.guided = cfg_scale != 1.0
        if self.guided and uncond_context is None:
            raise ValueError("classifier-free guidance needs the unconditional (negative prompt) context")
        # Batch layout of one guided call: [unconditional; conditional], as diffusers.
        self.context = torch.cat([uncond_context, context]) if self.guided else context
        self.concat = concat

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: (b, 4, h, w) at noise level σ (a scalar tensor) -> x0 estimate (b, 4, h, w)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = sigma_to_t(sigma.cpu(), self.log_sigmas).to(x.device).float()
        c_in = (1 / (sigma**2 + 1) ** 0.5).item()
        x_in = x * c_in
        if self.concat is not None:
            x_in = torch.cat([x_in, self.concat], dim=1)  # (b, 4 + c, h, w)
        if self.guided:
            x_in = torch.cat([x_in, x_in])  # the unconditional and conditional halves see the same input
        out = self.unet(x_in, t.expand(len(x_in)), self.context)
        if self.guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.cfg_scale * (out_cond - out_uncond)
        s = sigma.item()
        if self.parameterization == "v":
            return x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out
        return x - s * out
