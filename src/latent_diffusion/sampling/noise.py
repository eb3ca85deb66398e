"""Where the random numbers of a generation come from: one generator per image, seeded with its seed, so that
image i of a batch is the image its seed gives alone.

`per_image_randn` draws standard normals (initial noise, posterior samples, the per-step noise of the ancestral
samplers). `BrownianNoise` is the noise of the SDE samplers, as the web UI and k-diffusion draw it: increments
of a Brownian motion W(σ) per image (torchsde's Brownian tree, seeded with the image's seed), so that the noise
of a step depends on the σ interval it spans, not on how many draws came before.
"""

from __future__ import annotations

import warnings

import torch

from ..devices import to_device


def per_image_randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(b, *shape) standard normals, row i from generators[i] (on the CPU)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


class BrownianNoise:
    """noise(σ, σ_next) = (W(σ_next) − W(σ))/√|σ_next − σ|, a standard normal per image, from one Brownian tree
    per seed on [σ_min, σ_max] (the smallest non-zero and the largest σ of the schedule). Queries are float32
    as in the web UI, whose σs are float32, so that the same seeds give the same noise."""

    def __init__(self, shape: tuple[int, ...], sigmas: torch.Tensor, seeds: list[int], device: torch.device):
        import torchsde  # only the SDE samplers need it

        sigmas = sigmas.float()
        low, high = sigmas[sigmas > 0].min(), sigmas.max()
        w0 = torch.zeros(shape)
        self.trees = [torchsde.BrownianTree(low, w0, high, entropy=seed) for seed in seeds]
        self.device = device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma).float(), torch.as_tensor(sigma_next).float()
        low, high = (a, b) if a < b else (b, a)
        with warnings.catch_warnings():  # torchsde rounds the tree's ends and notes that σ_min or σ_max lies past
            warnings.filterwarnings("ignore", "Should have t")  # them; it clamps the query to the end, as it should
            w = torch.stack([tree(low, high) for tree in self.trees]) * (1 if a < b else -1)  # W(b) − W(a), (b, ...)
        return to_device(w / (b - a).abs().sqrt(), self.device)
