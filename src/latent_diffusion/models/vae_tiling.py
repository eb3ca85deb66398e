"""Tiled VAE encode and decode: large images in the memory of one tile.

The decoder's activations at full resolution dominate a generation's peak memory (about 8 tensors of 128 channels
per pixel for SD: 1 GiB for one 512×512 image in float32, 16 GiB at 2048×2048). Tiling runs the autoencoder on
overlapping tiles of the latent (or image) and blends them: each tile's weight is 0 on the outer quarter of an
overlap (where its border changes the result) and rises linearly across the middle half, and every pixel is the
weighted mean of the tiles that cover it, so no seam is visible.

Each tile normalises (GroupNorm) and attends (the middle block) over itself alone, not the whole image, so the
result is close to the untiled one but not equal; BENCHMARKS.md has the measured difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TILE = 64  # latent pixels per tile side (512 image pixels for SD)
OVERLAP = 16  # latent pixels shared by neighbouring tiles (a quarter of a tile, as diffusers')


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the fewest tiles of at most `tile` that cover 0..size with at least `overlap` shared
    between neighbours: equal lengths, no longer than needed (less work than full tiles and a short last one),
    spread evenly from 0 to size."""
    assert 0 <= overlap < tile, "tiles must be larger than their overlap"
    if size <= tile:
        return [(0, size)]
    count = -(-(size - overlap) // (tile - overlap))  # ceil((size - overlap) / stride)
    length = -(-(size + (count - 1) * overlap) // count)
    return [(round(i * (size - length) / (count - 1)), length) for i in range(count)]


def ramp(length: int, rise: int, fall: int) -> torch.Tensor:
    """(length,) blending weights of a tile along one axis: where it overlaps a neighbour over `rise` entries at
    its start (`fall` at its end), the outer quarter is left out (weight 0: there the tile's zero padding changes
    the result) and the middle half fades linearly; elsewhere 1."""
    w = torch.ones(length)
    for size, ends in ((rise, slice(0, rise)), (fall, slice(length - fall, length))):
        if size:
            margin = size // 4
            up = torch.zeros(size)
            up[margin : size - margin] = (torch.arange(size - 2 * margin) + 0.5) / (size - 2 * margin)
            up[size - margin :] = 1
            w[ends] = torch.minimum(w[ends], up if ends.start == 0 else up.flip(0))
    return w


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: float, tile: int, overlap: int, unit: int = 1
) -> torch.Tensor:
    """fn over overlapping tiles of x (b, c, h, w), blended. fn maps a (b, c, th, tw) tile to (b, c', th·scale,
    tw·scale): scale is 8 for a decoder, 1/8 for an encoder. tile and overlap count units of `unit` pixels of x
    (an encoder's tiles are laid out in latent pixels, unit 8, so that each starts on a whole latent pixel)."""
    b, _, h, w = x.shape
    out = weight = None
    rows = [(y * unit, th * unit) for y, th in tile_spans(h // unit, tile, overlap)]
    columns = [(x0 * unit, tw * unit) for x0, tw in tile_spans(w // unit, tile, overlap)]
    for y, th in rows:
        for x0, tw in columns:
            part = fn(x[:, :, y : y + th, x0 : x0 + tw]).float()  # (b, c', th·scale, tw·scale)
            if out is None:
                out = torch.zeros(b, part.shape[1], round(h * scale), round(w * scale), device=part.device)
                weight = torch.zeros(round(h * scale), round(w * scale), device=part.device)
            ph, pw = part.shape[-2:]
            shared = round(overlap * unit * scale)
            wy = ramp(ph, shared if y > 0 else 0, shared if y + th < h else 0)
            wx = ramp(pw, shared if x0 > 0 else 0, shared if x0 + tw < w else 0)
            wt = (wy[:, None] * wx[None, :]).to(part.device)  # (ph, pw)
            top, left = round(y * scale), round(x0 * scale)
            out[:, :, top : top + ph, left : left + pw] += part * wt
            weight[top : top + ph, left : left + pw] += wt
    return out / weight
