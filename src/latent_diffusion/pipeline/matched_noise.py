"""The colour noise that the web UI's "Outpainting mk2" paints into the new border before it is redrawn (its
`get_matched_noise`, from parlance-zz's g-diffuser-bot): noise shaped in frequency like the picture, its values then
matched to the picture's histogram, so that the sampler starts from the picture's colours and grain rather than
from black.

With a picture P (h, w, 3) in [0, 1] and a mask M (h, w), 1 where the noise goes:

1. the picture's spectrum: S = F(P·(1 − M) / max(P·(1 − M)) + mean(P)·M), the hole filled with the mean colour;
2. noise N ~ U[0, 1) (h, w, 3), drawn from numpy's `default_rng(0)` as the web UI's (a fixed seed: the noise is the
   same whatever the request's seed, which moves only the diffusion's noise); each channel blended towards the
   grey mean of the three, N_c ← v·N_c + (1 − v)·mean(N), v the colour variation;
3. its spectrum low-passed by the window W(x, y) = 1 / ((x² + 1)(y² + 1)) over x, y ∈ [−1, 1) (stretched along the
   longer side), back to pixels and forward again: N̂ = F(Re F⁻¹(F(N)·W));
4. the shaping: |N̂|² · |S|^q · S / |S|, the picture's phase with a magnitude that falls off with exponent q, back to
   pixels (real part), and scaled to [0, 1];
5. inside the mask (M > 10⁻⁶) each channel's values are mapped onto the quantiles of that channel's values where
   M < 10⁻³ (scikit-image's `match_histograms`), and the result is P·(1 − M) + noise·M, clipped to [0, 1].

F is numpy's orthonormal 2-D FFT of each channel, with the zero frequency moved to the middle before and after it
(`fftshift`, then `ifftshift`); F⁻¹ likewise. The web UI's g-diffuser code divides by zero for a picture that is
all black, or whose spectrum has an exact zero; here such a term is left at 0 instead of NaN.
"""

from __future__ import annotations

import numpy as np


def centred_fft(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """(h, w, c) -> its orthonormal 2-D (inverse) FFT per channel, shifted before and after as the web UI's `_fft2`."""
    transform = np.fft.ifft2 if inverse else np.fft.fft2
    return np.fft.ifftshift(transform(np.fft.fftshift(x, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def falloff_window(h: int, w: int) -> np.ndarray:
    """(h, w): 1 / ((x² + 1)(y² + 1)), x over the rows and y over the columns, each in [−1, 1) stretched by its
    side over the shorter side (the web UI's `_get_gaussian_window` in its mode 1, which is not a Gaussian)."""
    x = (np.arange(h) / h * 2 - 1) * (h / min(h, w))
    y = (np.arange(w) / w * 2 - 1) * (w / min(h, w))
    return 1 / ((x[:, None] ** 2 + 1) * (y[None, :] ** 2 + 1))


def match_quantiles(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(n,) values -> the same shape, each replaced by the reference's value at its quantile: each distinct value's
    cumulative share of the source, interpolated linearly in the reference's cumulative shares of its own distinct
    values (scikit-image's `_match_cumulative_cdf` for float data)."""
    _, where, counts = np.unique(source, return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(reference, return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    ref_quantiles = np.cumsum(ref_counts) / reference.size
    return np.interp(quantiles, ref_quantiles, ref_values)[where.reshape(-1)].reshape(source.shape)


def _safe_divide(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """a / b, with 0 where b is 0 (where the web UI's code gives NaN)."""
    return np.divide(a, b, out=np.zeros_like(a), where=np.asarray(b) != 0)


def matched_noise(
    picture: np.ndarray, mask: np.ndarray, falloff: float = 1.0, color_variation: float = 0.05
) -> np.ndarray:
    """The web UI's matched noise (module docstring): picture (h, w, 3) float64 in [0, 1], mask (h, w) in [0, 1], 1
    where the noise goes (the web UI passes its RGB mask; its grey mean is this), falloff q and colour variation v
    -> (h, w, 3) float64 in [0, 1], the picture where the mask is 0."""
    h, w, channels = picture.shape
    m = mask[..., None]  # (h, w, 1)
    inside, known = mask > 1e-6, mask < 1e-3
    if not known.any():
        raise ValueError("the mask covers the whole picture: no colours to match the noise to")
    windowed = picture * (1 - m)
    windowed = _safe_divide(windowed, windowed.max()) + picture.mean() * m
    source = centred_fft(windowed)
    magnitude = np.abs(source)
    phase = _safe_divide(source, magnitude)

    noise = np.random.default_rng(0).random((h, w, channels))  # (the web UI's fixed seed)
    noise = color_variation * noise + (1 - color_variation) * noise.mean(axis=2, keepdims=True)
    noise = np.real(centred_fft(centred_fft(noise) * falloff_window(h, w)[..., None], inverse=True))
    spectrum = np.abs(centred_fft(noise)) ** 2 * magnitude**falloff * phase
    shaped = np.real(centred_fft(spectrum, inverse=True))
    shaped -= shaped.min()
    shaped = _safe_divide(shaped, shaped.max())
    for c in range(channels):
        shaped[inside, c] = match_quantiles(shaped[inside, c], picture[known, c])
    return np.clip(picture * (1 - m) + shaped * m, 0.0, 1.0)
