"""Tiled VAE encode and decode: the tiles cover the image with the overlap asked for, the blend is exact for any
operation that sees no farther than the overlap (closed form), and generation chooses tiling when the whole image
would not fit in memory."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import latent_diffusion.pipeline.plan as plan
from latent_diffusion.models import vae_tiling
from latent_diffusion.models.vae_tiling import tile_spans, tiled
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import GenerationRequest


@pytest.mark.parametrize("size,tile,overlap", [(64, 64, 16), (65, 64, 16), (128, 64, 16), (200, 64, 16), (37, 8, 3),
                                               (9, 8, 7)])  # fmt: skip
def test_tiles_cover_the_image_with_the_overlap(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and sum(spans[-1]) == size and all(0 < length <= tile for _, length in spans)
    assert all(a + length - b >= overlap for (a, length), (b, _) in itertools.pairwise(spans))
    fewer = len(spans) - 1  # one tile fewer cannot cover the image with that overlap
    assert fewer == 0 or (fewer - 1) * (tile - overlap) + tile < size


def test_blend_is_exact_for_local_operations():
    """An operation whose output pixel depends on inputs within the overlap gives the same values tiled: every
    tile computes each pixel it covers exactly, and the weights of a pixel sum to one."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def decode(z):  # 8x nearest upsampling, then a 3x3 convolution: sees 1 latent pixel around
        return conv(F.interpolate(z, scale_factor=8, mode="nearest"))

    z = torch.randn(2, 4, 21, 30)
    with torch.no_grad():
        assert torch.allclose(tiled(decode, z, 8, tile=8, overlap=3), decode(z), atol=1e-5)

        down = torch.nn.Conv2d(3, 8, 1)

        def encode(image):  # 8x8 average pooling, then a 1x1 convolution: sees only its own block
            return down(F.avg_pool2d(image, 8))

        for h, w in [(160, 96), (296, 264)]:  # 37 and 33 latent pixels: tiles of 8 that do not divide them
            image = torch.randn(1, 3, h, w)
            assert torch.allclose(tiled(encode, image, 1 / 8, tile=8, overlap=3, unit=8), encode(image), atol=1e-5)


def test_one_tile_is_the_untiled_decode_and_many_tiles_cover_any_size(tiny_models, monkeypatch):
    model = tiny_models["sd1"]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.autoencoder_decode(z, tiled=True), model.autoencoder_decode(z).float())
        monkeypatch.setattr(vae_tiling, "TILE", 4)
        monkeypatch.setattr(vae_tiling, "OVERLAP", 2)
        image = torch.rand(1, 3, 72, 104) * 2 - 1  # 9x13 latent pixels: tiles of 4 do not divide them
        latent = model.autoencoder_encode(image, noise=torch.zeros(1, 4, 9, 13), tiled=True)
        assert latent.shape == (1, 4, 9, 13) and torch.isfinite(latent).all()
        assert torch.isfinite(model.autoencoder_decode(latent, tiled=True)).all()


def test_generation_tiles_when_the_image_would_not_fit(tiny_models, monkeypatch):
    """With little memory free, a request that would not fit untiled is tiled (and one that fits untiled is not);
    the tiled image is the requested size and finite."""
    model = tiny_models["sd1"]
    monkeypatch.setattr(vae_tiling, "TILE", 4)  # 32-pixel tiles, 16 pixels shared, so a 64x64 image has 9
    monkeypatch.setattr(vae_tiling, "OVERLAP", 2)
    r = GenerationRequest(["a cat"], [1], width=64, height=64, steps=2, batch_size=1)
    untiled = plan.needed_memory(r, model.cfg, 64, 64, model.dtype, tiled=False)
    monkeypatch.setattr(plan, "available_memory", lambda device: untiled - 1)
    assert plan.resolve(r, Pipeline(model)).request.vae_tiling is True
    small = GenerationRequest(["a cat"], [1], width=32, height=32)
    assert plan.resolve(small, Pipeline(model)).request.vae_tiling is False
    calls = []
    monkeypatch.setattr(vae_tiling, "tiled", lambda *a, **k: calls.append(1) or tiled(*a, **k))
    result = generate(model, r)
    assert calls and result.images.shape == (1, 3, 64, 64) and torch.isfinite(result.images).all()
