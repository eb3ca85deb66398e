"""The web UI's SD upscale script: its tile grid and 8-bit seams (against a transcription of its `split_grid` and
`combine_grid`), and each tile redrawn as img2img of that crop with the web UI's seeds."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import from_pil, to_pil
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import GenerationRequest, RequestError
from latent_diffusion.pipeline.sd_upscale import combine, sd_upscale, tile_origins


def web_ui_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Image.Image:
    """The web UI's images.split_grid then images.combine_grid, written from its code, with each tile inverted (so
    that the seams show): the reference for `tile_origins` and `combine`."""
    w, h = image.size
    cols, rows = math.ceil((w - overlap) / (tile_w - overlap)), math.ceil((h - overlap) / (tile_h - overlap))
    dx, dy = (w - tile_w) / (cols - 1) if cols > 1 else 0, (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = int(row * dy)
        y = h - tile_h if y + tile_h >= h else y
        cells = []
        for col in range(cols):
            x = int(col * dx)
            x = w - tile_w if x + tile_w >= w else x
            cells.append((x, Image.eval(image.crop((x, y, x + tile_w, y + tile_h)), lambda v: 255 - v)))
        grid.append((y, cells))
    mask_w = Image.fromarray((np.arange(overlap, dtype=np.float32).reshape(1, overlap).repeat(tile_h, 0) * 255
                              / overlap).astype(np.uint8), "L")  # fmt: skip
    mask_h = Image.fromarray((np.arange(overlap, dtype=np.float32).reshape(overlap, 1).repeat(w, 1) * 255
                              / overlap).astype(np.uint8), "L")  # fmt: skip
    combined = Image.new("RGB", (w, h))
    for y, cells in grid:
        row_image = Image.new("RGB", (w, tile_h))
        for x, tile in cells:
            if x == 0:
                row_image.paste(tile, (0, 0))
                continue
            row_image.paste(tile.crop((0, 0, overlap, tile_h)), (x, 0), mask=mask_w)
            row_image.paste(tile.crop((overlap, 0, tile_w, tile_h)), (x + overlap, 0))
        if y == 0:
            combined.paste(row_image, (0, 0))
            continue
        combined.paste(row_image.crop((0, 0, w, overlap)), (0, y), mask=mask_h)
        combined.paste(row_image.crop((0, overlap, w, tile_h)), (0, y + overlap))
    return combined


@pytest.mark.parametrize(("size", "tile", "overlap"), [((100, 70), (32, 24), 8), ((64, 64), (64, 32), 16),
                                                       ((90, 50), (40, 40), 5), ((300, 200), (128, 96), 64)])  # fmt: skip
def test_tiles_and_seams_are_the_web_uis(size, tile, overlap):
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    xs, ys = tile_origins(size[0], tile[0], overlap), tile_origins(size[1], tile[1], overlap)
    tiles = [[Image.eval(image.crop((x, y, x + tile[0], y + tile[1])), lambda v: 255 - v) for x in xs] for y in ys]
    ours = combine(tiles, xs, ys, size, overlap)
    assert np.array_equal(np.asarray(ours), np.asarray(web_ui_grid(image, *tile, overlap)))


def test_each_tile_is_img2img_of_its_crop_with_the_web_uis_seeds(tiny_models):
    """No overlap, tiles that partition the picture: each region of the result is img2img of that crop alone. The
    web UI moves its seed on by one per batch: with batches of 2, tiles (0, 1) get seeds (5, 6), tiles (2, 3) (6, 7)."""
    pipe = Pipeline(tiny_models["sd1"])
    picture = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    settings = dict(steps=3, sampler="euler", strength=0.5, width=32, height=16)
    request = GenerationRequest(["a red circle"], [5], init_image=picture, batch_size=2, **settings)
    result = sd_upscale(pipe, request, upscaler="None", overlap=0)
    assert result.images.shape == (1, 3, 32, 64)
    assert "SD upscale overlap: 0, SD upscale upscaler: None" in result.infotexts[0]
    for k, (y, x, seed) in enumerate([(0, 0, 5), (0, 32, 6), (16, 0, 6), (16, 32, 7)]):
        crop = picture[..., y : y + 16, x : x + 32]
        alone = generate(pipe, GenerationRequest(["a red circle"], [seed], init_image=crop, **settings)).images
        region = result.images[..., y : y + 16, x : x + 32]
        assert (region - from_pil(to_pil(alone[0]))).abs().max() <= 1 / 255 + 1e-6, k  # (batched matmuls round
        # differently from one image's: a pixel may land on the next 8-bit level)
        other = generate(pipe, GenerationRequest(["a red circle"], [seed + 10], init_image=crop, **settings)).images
        assert (region - other).abs().max() > 0.05  # the seed is what makes it that tile


def test_the_picture_is_enlarged_first_and_bad_settings_are_refused(tiny_models):
    pipe = Pipeline(tiny_models["sd1"])
    picture = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    settings = dict(steps=3, sampler="euler", strength=0.4, width=32, height=32)
    request = GenerationRequest(["x"], [1], init_image=picture, **settings)
    result = sd_upscale(pipe, request, upscaler="Lanczos", scale=2, overlap=8)
    assert result.images.shape == (1, 3, 48, 64)  # 2 x 2 tiles of 32 over 64 x 48
    for kwargs, message in (
        (dict(overlap=32), "the overlap must be at least 0 and below the tile's sides"),
        (dict(upscaler="None"), "the enlarged image is 32x24, smaller than a 32x32 tile"),
        (dict(upscaler="ESRGAN"), "no upscaler named 'ESRGAN'"),
    ):
        with pytest.raises(RequestError, match=message):
            sd_upscale(pipe, request, **{"upscaler": "Lanczos", "overlap": 8, **kwargs})


def test_the_command_line_sd_upscale(tmp_path, ckpt, capsys):
    from latent_diffusion.cli import main

    Image.new("RGB", (48, 32), (200, 30, 40)).save(tmp_path / "in.png")
    args = ["img2img", "--ckpt", ckpt, "--init-image", tmp_path / "in.png", "--prompt", "a red circle", "--seed", 4,
            "--steps", 3, "--strength", 0.5, "--width", 32, "--height", 32, "--sd-upscale", 2, "--quiet"]  # fmt: skip
    assert main([str(a) for a in [*args, "--sd-upscale-overlap", 8, "--n-iter", 2, "--outdir", tmp_path / "a"]]) == 0
    written = sorted((tmp_path / "a").iterdir())
    assert [p.name[6:] for p in written] == ["4.png", "5.png"]
    with Image.open(written[0]) as im:
        assert im.size == (96, 64) and "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in im.text["parameters"]
    assert main([str(a) for a in [*args, "--sd-upscale-overlap", 40, "--outdir", tmp_path / "b"]]) == 2
    err = capsys.readouterr().err
    assert "--sd-upscale-overlap must be at least 0 and below the tile's sides, not 40" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_sd_upscale_through_the_api_with_an_existing_client(ckpt, serve):
    """webuiapi's img2img with script_name "SD upscale" and the script's arguments: the library's image, nothing in
    `ignored`; bad script arguments are 422s."""
    import webuiapi

    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.serving.server import create_app
    from test_server import call

    served = load_pipeline(ckpt)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    with serve(create_app(served)) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler", steps=3)
        result = api.img2img(images=[picture], prompt="a red circle", seed=8, width=32, height=32, cfg_scale=4,
                             denoising_strength=0.5, script_name="SD upscale", script_args=[None, 8, "Lanczos", 2])  # fmt: skip
        assert result.image.size == (64, 48) and result.info["ignored"] == []
        assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in result.info["infotexts"][0]
        request = GenerationRequest(["a red circle"], [8], width=32, height=32, steps=3, sampler="euler",
                                    cfg_scale=4.0, strength=0.5, init_image=from_pil(picture))  # fmt: skip
        library = sd_upscale(served, request, upscaler="Lanczos", scale=2, overlap=8).images[0]
        assert np.array_equal(np.asarray(result.image), np.asarray(to_pil(library)))

        body = {"init_images": [webuiapi.raw_b64_img(picture)], "width": 32, "height": 32, "steps": 2,
                "script_name": "SD upscale"}  # fmt: skip
        for args, message in (
            ([None, 8, "ESRGAN", 2], "script_args: no upscaler 'ESRGAN' here; these are: None, Lanczos, Nearest"),
            ([None, -1, 1, 2], "script_args: the overlap must be a whole number"),
            ([None, 8, 1, 0], "script_args: the scale must be above 0"),
            ([None, 8, 1, 100], "script_args: the scale must be above 0 and at most 8"),
            ([None, 40, 1, 2], "the overlap must be at least 0 and below the tile's sides"),
        ):
            status, answer = call(base, "/sdapi/v1/img2img", {**body, "script_args": args})
            assert status == 422 and message in answer["detail"], (args, answer)
