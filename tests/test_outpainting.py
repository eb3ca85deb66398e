"""The web UI's outpainting scripts against its own arithmetic, written out here from `scripts/poor_mans_outpainting.py`
and `scripts/outpainting_mk_2.py` (their `Script.run`, mk2's `get_matched_noise`), `modules/images.py` (`split_grid`,
`combine_grid`) and `modules/processing.py` (what `StableDiffusionProcessingImg2Img.init` does with a script's
`image_mask` and `latent_mask`, and `apply_overlay`): the canvas, the masks, the tiles and passes with their seeds,
and mk2's matched noise. The sampling in those runs is a stand-in (`stand_in`) on both sides; with the real tiny
model each script is img2img inpainting of the prepared images, through the existing path. Then the command line,
the API through webuiapi, and bad input."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from latent_diffusion.pipeline import outpainting
from latent_diffusion.pipeline.generate import generate, prepare
from latent_diffusion.pipeline.images import from_pil, to_pil
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.masking import blur_mask, fill_masked
from latent_diffusion.pipeline.matched_noise import matched_noise
from latent_diffusion.pipeline.outpainting import outpainting_mk2, poor_mans_outpainting
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import GenerationRequest, GenerationResult, RequestError
from latent_diffusion.sampling.noise import per_image_randn

ALL = ["left", "right", "up", "down"]
LATENT_FILLS = {0: None, 1: None, 2: "noise", 3: "nothing"}  # the web UI's inpainting_fill, as our latent_fill


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours with some grain: a picture whose spectrum and histogram are not trivial."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(3 * x + 1), np.cos(2 * y), np.sin(2 * x + 3 * y)], -1) * 80 + 128
    return Image.fromarray(np.clip(base + g.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


# The web UI's arithmetic --------------------------------------------------------------------------------------------


def web_ui_margins(w: int, h: int, pixels: int, direction: list[str]) -> tuple[int, ...]:
    """Both scripts' `run`: target size and the pixels on each side."""
    left, right = (pixels if "left" in direction else 0), (pixels if "right" in direction else 0)
    up, down = (pixels if "up" in direction else 0), (pixels if "down" in direction else 0)
    target_w, target_h = math.ceil((w + left + right) / 64) * 64, math.ceil((h + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - w) // (left + right)
    if right > 0:
        right = target_w - w - left
    if up > 0:
        up = up * (target_h - h) // (up + down)
    if down > 0:
        down = target_h - h - up
    return target_w, target_h, left, right, up, down


def rectangle(size, box, mode="L") -> Image.Image:
    """A white image with a black rectangle, drawn as the scripts draw it."""
    image = Image.new(mode, size, "white")
    ImageDraw.Draw(image).rectangle(box, fill="black")
    return image


def stand_in(image: np.ndarray, seed: int) -> np.ndarray:
    """The sampling, replaced on both sides by an 8-bit function of the prepared image and the seed."""
    return ((255 - image.astype(np.int64)) * 3 // 4 + seed % 60).astype(np.uint8)


def web_ui_process(images, image_mask, latent_mask, blur_x, blur_y, fill, seeds, calls) -> list[Image.Image]:
    """`process_images` of a script's p (inpaint_full_res off, images already p.width x p.height): the mask made
    binary (`create_binary_mask` of a mask without alpha: its L), blurred (its cv2.GaussianBlur calls; test_masking
    checks `blur_mask` against OpenCV), doubled for the overlay; each image masked for the overlay, filled from
    around the latent mask unless inpainting_fill is 1 (`masking.fill`; `fill_masked`, checked there too),
    "sampled", and the overlay composited over it (`apply_overlay`)."""
    image_mask = blur_mask(image_mask.convert("L"), blur_x, blur_y)
    np_mask = np.clip(np.asarray(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
    mask_for_overlay = Image.fromarray(np_mask)
    out, prepared = [], []
    for image, seed in zip(images, seeds):
        image = image.convert("RGB")
        image_masked = Image.new("RGBa", image.size)
        image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
        if fill != 1:
            image = fill_masked(image, latent_mask)
        prepared.append(np.asarray(image))
        result = Image.fromarray(stand_in(np.asarray(image), seed)).convert("RGBA")
        result.alpha_composite(image_masked.convert("RGBA"))
        out.append(result.convert("RGB"))
    latent = np.asarray(latent_mask.convert("L"))
    calls.append((list(seeds), np.stack(prepared), np.asarray(image_mask), latent, LATENT_FILLS[fill], images[0].size))
    return out


def split_grid(image, tile_w, tile_h, overlap):
    """images.split_grid -> [[y, h, [[x, w, tile], ...]], ...]."""
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
            cells.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.append([y, tile_h, cells])
    return grid


def combine_grid(grid, image_w, image_h, overlap):
    """images.combine_grid."""
    tile_h = grid[0][1]
    ramp = np.arange(overlap, dtype=np.float32)
    mask_w = Image.fromarray((ramp.reshape(1, overlap).repeat(tile_h, 0) * 255 / overlap).astype(np.uint8), "L")
    mask_h = Image.fromarray((ramp.reshape(overlap, 1).repeat(image_w, 1) * 255 / overlap).astype(np.uint8), "L")
    combined = Image.new("RGB", (image_w, image_h))
    for y, h, row in grid:
        combined_row = Image.new("RGB", (image_w, h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(combined_row, (0, 0))
            continue
        combined.paste(combined_row.crop((0, 0, image_w, overlap)), (0, y), mask=mask_h)
        combined.paste(combined_row.crop((0, overlap, image_w, h)), (0, y + overlap))
    return combined


def web_ui_poor_mans(init_img, tile, pixels, mask_blur, inpainting_fill, direction, seed, calls) -> Image.Image:
    """Poor man's outpainting's `run`, its `process_images(p)` replaced by `web_ui_process`."""
    target_w, target_h, left, right, up, down = web_ui_margins(*init_img.size, pixels, direction)
    img = Image.new("RGB", (target_w, target_h))
    img.paste(init_img, (left, up))
    b2, b_2 = mask_blur * 2, mask_blur // 2
    mask = rectangle(
        img.size,
        (
            left + (b2 if left > 0 else 0),
            up + (b2 if up > 0 else 0),
            target_w - right - (b2 if right > 0 else 0),
            target_h - down - (b2 if down > 0 else 0),
        ),
    )
    latent_mask = rectangle(
        img.size,
        (
            left + (b_2 if left > 0 else 0),
            up + (b_2 if up > 0 else 0),
            target_w - right - (b_2 if right > 0 else 0),
            target_h - down - (b_2 if down > 0 else 0),
        ),
    )
    grids = [split_grid(im, *tile, overlap=pixels) for im in (img, mask, latent_mask)]
    work = []
    for (y, h, row), (_, _, row_mask), (_, _, row_latent) in zip(*grids):
        for cell, cell_mask, cell_latent in zip(row, row_mask, row_latent):
            x, w = cell[0:2]
            if x >= left and x + w <= img.width - right and y >= up and y + h <= img.height - down:
                continue
            work.append((cell, cell_mask[2], cell_latent[2]))
    for cell, cell_mask, cell_latent in work:
        cell[2] = web_ui_process([cell[2]], cell_mask, cell_latent, b2, b2, inpainting_fill, [seed], calls)[0]
        seed += 1  # p.seed = processed.seed + 1
    return combine_grid(grids[0], target_w, target_h, pixels)


def web_ui_matched_noise(_np_src_image, np_mask_rgb, noise_q=1, color_variation=0.05):
    """mk2's get_matched_noise, as written there (per-channel FFTs, the window built column by column), with
    scikit-image's match_histograms written out (`_match_cumulative_cdf` per channel)."""

    def _fft2(data, inverse=False):
        out = np.zeros(data.shape, dtype=np.complex128)
        for c in range(data.shape[2]):
            transform = np.fft.ifft2 if inverse else np.fft.fft2
            out[:, :, c] = np.fft.ifftshift(transform(np.fft.fftshift(data[:, :, c]), norm="ortho"))
        return out

    def _get_gaussian_window(width, height, std=3.14):  # mode 1
        window_scale_x, window_scale_y = float(width / min(width, height)), float(height / min(width, height))
        window = np.zeros((width, height))
        x = (np.arange(width) / width * 2.0 - 1.0) * window_scale_x
        for y in range(height):
            fy = (y / height * 2.0 - 1.0) * window_scale_y
            window[:, y] = (1 / ((x**2 + 1.0) * (fy**2 + 1.0))) ** (std / 3.14)
        return window

    def _match_cumulative_cdf(source, template):
        _, src_lookup, src_counts = np.unique(source.reshape(-1), return_inverse=True, return_counts=True)
        tmpl_values, tmpl_counts = np.unique(template.reshape(-1), return_counts=True)
        src_quantiles, tmpl_quantiles = np.cumsum(src_counts) / source.size, np.cumsum(tmpl_counts) / template.size
        return np.interp(src_quantiles, tmpl_quantiles, tmpl_values)[src_lookup].reshape(source.shape)

    width, height, num_channels = _np_src_image.shape
    np_mask_grey = np.sum(np_mask_rgb, axis=2) / 3.0
    img_mask, ref_mask = np_mask_grey > 1e-6, np_mask_grey < 1e-3
    windowed_image = _np_src_image * (1.0 - np.stack([np_mask_grey] * 3, -1))
    windowed_image /= np.max(windowed_image)
    windowed_image += np.average(_np_src_image) * np_mask_rgb
    src_fft = _fft2(windowed_image)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist
    rng = np.random.default_rng(0)
    noise_window = _get_gaussian_window(width, height)
    noise_rgb = rng.random((width, height, num_channels))
    noise_grey = np.sum(noise_rgb, axis=2) / 3.0
    noise_rgb *= color_variation
    for c in range(num_channels):
        noise_rgb[:, :, c] += (1.0 - color_variation) * noise_grey
    noise_fft = _fft2(noise_rgb)
    for c in range(num_channels):
        noise_fft[:, :, c] *= noise_window
    noise_rgb = np.real(_fft2(noise_fft, inverse=True))
    shaped_noise_fft = _fft2(noise_rgb)
    shaped_noise_fft[:, :, :] = np.absolute(shaped_noise_fft[:, :, :]) ** 2 * (src_dist**noise_q) * src_phase
    shaped_noise = np.real(_fft2(shaped_noise_fft, inverse=True))
    shaped_noise -= np.min(shaped_noise)
    shaped_noise /= np.max(shaped_noise)
    source, reference = shaped_noise[img_mask, :], _np_src_image[ref_mask, :]
    shaped_noise[img_mask, :] = np.stack([_match_cumulative_cdf(source[:, c], reference[:, c]) for c in range(3)], 1)
    shaped_noise = _np_src_image[:] * (1.0 - np_mask_rgb) + shaped_noise * np_mask_rgb
    return np.clip(shaped_noise, 0.0, 1.0)


def web_ui_mk2(
    init_img, process, pixels, mask_blur, direction, noise_q, color_variation, batch_size, n_iter, seed, calls
) -> list[Image.Image]:
    """Outpainting mk2's `run` and its `expand`, `process_images(p)` replaced by `web_ui_process`. Its iterations
    all take the seeds seed, seed + 1, ...; ours take seed + i·batch_size + j (the module's docstring), so the
    reference is given that."""
    process_width, process_height = process
    w, h = init_img.size
    blur_x = mask_blur if "left" in direction or "right" in direction else 0
    blur_y = mask_blur if "up" in direction or "down" in direction else 0
    _, _, left, right, up, down = web_ui_margins(w, h, pixels, direction)

    def expand(init, count, expand_pixels, seeds, is_left=False, is_right=False, is_top=False, is_bottom=False):
        is_horiz, is_vert = is_left or is_right, is_top or is_bottom
        pixels_horiz, pixels_vert = (expand_pixels if is_horiz else 0), (expand_pixels if is_vert else 0)
        images_to_process, output_images = [], []
        for n in range(count):
            res_w, res_h = init[n].width + pixels_horiz, init[n].height + pixels_vert
            process_res_w, process_res_h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
            img = Image.new("RGB", (process_res_w, process_res_h))
            img.paste(init[n], (pixels_horiz if is_left else 0, pixels_vert if is_top else 0))
            mask = rectangle(
                (process_res_w, process_res_h),
                (
                    expand_pixels + blur_x if is_left else 0,
                    expand_pixels + blur_y if is_top else 0,
                    process_res_w - expand_pixels - blur_x if is_right else res_w,
                    process_res_h - expand_pixels - blur_y if is_bottom else res_h,
                ),
                "RGB",
            )
            np_image, np_mask = (np.asarray(img) / 255.0).astype(np.float64), (np.asarray(mask) / 255.0).astype(float)
            noised = web_ui_matched_noise(np_image, np_mask, noise_q, color_variation)
            output_images.append(Image.fromarray(np.clip(noised * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB"))
            target_width = min(process_width, init[n].width + pixels_horiz) if is_horiz else img.width
            target_height = min(process_height, init[n].height + pixels_vert) if is_vert else img.height
            p_width, p_height = target_width, target_height
            crop_region = (
                0 if is_left else output_images[n].width - target_width,
                0 if is_top else output_images[n].height - target_height,
                target_width if is_left else output_images[n].width,
                target_height if is_top else output_images[n].height,
            )
            mask = mask.crop(crop_region)
            images_to_process.append(output_images[n].crop(crop_region))
        latent_mask = rectangle(
            (p_width, p_height),
            (
                expand_pixels + blur_x * 2 if is_left else 0,
                expand_pixels + blur_y * 2 if is_top else 0,
                mask.width - expand_pixels - blur_x * 2 if is_right else res_w,
                mask.height - expand_pixels - blur_y * 2 if is_bottom else res_h,
            ),
            "RGB",
        )
        done = web_ui_process(images_to_process, mask, latent_mask, blur_x * 4, blur_y * 4, 1, seeds, calls)
        for n in range(count):
            output_images[n].paste(
                done[n],
                (
                    0 if is_left else output_images[n].width - done[n].width,
                    0 if is_top else output_images[n].height - done[n].height,
                ),
            )
            output_images[n] = output_images[n].crop((0, 0, res_w, res_h))
        return output_images

    all_processed_images = []
    for i in range(n_iter):
        imgs, seeds = [init_img] * batch_size, [seed + i * batch_size + j for j in range(batch_size)]
        for amount, side in ((left, "is_left"), (right, "is_right"), (up, "is_top"), (down, "is_bottom")):
            if amount > 0:
                imgs = expand(imgs, batch_size, amount, seeds, **{side: True})
        all_processed_images += imgs
    return all_processed_images


# Against the web UI, the sampling stood in for --------------------------------------------------------------------


@pytest.fixture
def stood_in(monkeypatch):
    """The scripts' sampling replaced by `stand_in` (on the prepared image, per seed) -> the calls made, as
    `web_ui_process` records them."""
    calls = []

    def generate_plan(plan, progress=None):
        r = plan.request
        images = (r.init_image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = np.broadcast_to(images, (len(r.seeds), *images.shape[1:]))
        out = np.stack([stand_in(image, seed) for image, seed in zip(images, r.seeds)])
        mask, latent = ((m[0, 0] * 255).round().to(torch.uint8).numpy() for m in (r.mask, r.latent_mask))
        calls.append((list(r.seeds), np.array(images), mask, latent, r.latent_fill, (r.width, r.height)))
        tensor = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255
        return GenerationResult(tensor, [f"seed {s}" for s in r.seeds], [], r, {})

    monkeypatch.setattr(outpainting, "generate_plan", generate_plan)
    return calls


def assert_same_calls(ours, theirs):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a[0] == b[0] and a[4] == b[4] and a[5] == b[5], k  # seeds, latent fill, size
        for x, y in zip(a[1:4], b[1:4]):
            assert np.array_equal(x, y), k  # the prepared images, the blurred mask, the latent mask


@pytest.mark.parametrize(
    ("size", "tile", "pixels", "mask_blur", "fill", "direction"),
    [
        ((48, 40), (64, 64), 16, 4, 0, ALL),
        ((100, 70), (64, 48), 24, 3, 1, ["left", "down"]),
        ((64, 64), (64, 64), 32, 0, 2, ["right"]),
        ((90, 33), (48, 56), 8, 5, 3, ["up", "down"]),
    ],
)
def test_poor_mans_canvas_masks_tiles_and_seeds_are_the_web_uis(
    tiny_models, stood_in, size, tile, pixels, mask_blur, fill, direction
):
    image = picture(*size)
    request = GenerationRequest(["x"], [7], init_image=from_pil(image), width=tile[0], height=tile[1], steps=2)
    fills = outpainting.FILLS
    ours = poor_mans_outpainting(Pipeline(tiny_models["sd1"]), request, pixels, mask_blur, fills[fill], direction)
    calls = []
    theirs = web_ui_poor_mans(image, tile, pixels, mask_blur, fill, direction, 7, calls)
    assert_same_calls(stood_in, calls)
    assert np.array_equal(np.asarray(to_pil(ours.images[0])), np.asarray(theirs))
    assert ours.infotexts == ["seed 7"] and ours.request.seeds == [7]  # the first tile's, as the web UI's info


@pytest.mark.parametrize(
    ("size", "process", "pixels", "mask_blur", "direction", "noise_q", "variation", "batch"),
    [
        ((48, 32), (64, 64), 16, 2, ALL, 1.0, 0.05, (2, 2)),
        ((72, 40), (64, 64), 24, 3, ["right"], 0.5, 0.5, (1, 1)),
        ((48, 56), (32, 64), 8, 0, ["left", "up"], 2.0, 0.0, (1, 2)),
        ((64, 32), (64, 48), 32, 8, ["down"], 1.0, 1.0, (2, 1)),
    ],
)
def test_mk2_passes_noise_masks_and_seeds_are_the_web_uis(
    tiny_models, stood_in, size, process, pixels, mask_blur, direction, noise_q, variation, batch
):
    image, (batch_size, n_iter) = picture(*size, seed=1), batch
    seeds = [11 + i for i in range(batch_size * n_iter)]
    request = GenerationRequest(
        ["x"] * len(seeds),
        seeds,
        init_image=from_pil(image),
        width=process[0],
        height=process[1],
        batch_size=batch_size,
        steps=2,
    )
    pipe = Pipeline(tiny_models["sd1"])
    ours = outpainting_mk2(pipe, request, pixels, mask_blur, direction, noise_q, variation)
    calls = []
    theirs = web_ui_mk2(image, process, pixels, mask_blur, direction, noise_q, variation, batch_size, n_iter, 11, calls)
    assert_same_calls(stood_in, calls)
    assert len(ours.images) == len(theirs) == len(seeds)
    for a, b in zip(ours.images, theirs):
        assert np.array_equal(np.asarray(to_pil(a)), np.asarray(b))
    passes = sum(side in direction for side in ALL)
    assert ours.infotexts == [f"seed {s}" for s in seeds] and len(stood_in) == passes * n_iter


@pytest.mark.parametrize(
    ("size", "noise_q", "variation"), [((24, 40), 1.0, 0.05), ((64, 48), 0.3, 1.0), ((33, 17), 4.0, 0.0)]
)
def test_matched_noise_is_the_web_uis(size, noise_q, variation):
    """Non-square (the web UI calls its first axis width: it is the rows), odd sides, and a soft mask edge."""
    w, h = size
    image = np.asarray(picture(w, h, seed=2)) / 255.0
    mask = np.zeros((h, w))
    mask[:, : w // 3] = 1.0
    mask[:, w // 3] = 0.5
    ours = matched_noise(image, mask, noise_q, variation)
    theirs = web_ui_matched_noise(image.copy(), np.repeat(mask[..., None], 3, 2), noise_q, variation)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert np.array_equal(ours[:, w // 3 + 1 :], image[:, w // 3 + 1 :])  # the picture kept where the mask is 0


# With the model: the existing inpainting path --------------------------------------------------------------------


def web_ui_overlay(result: Image.Image, original: Image.Image, blurred: Image.Image) -> Image.Image:
    """`apply_overlay` of the original through the blurred mask doubled (`mask_for_overlay`)."""
    overlay = Image.fromarray(np.clip(np.asarray(blurred).astype(np.float32) * 2, 0, 255).astype(np.uint8))
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay))
    result = result.convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


SETTINGS = dict(steps=3, sampler="euler", strength=0.75, cfg_scale=5.0)


@pytest.mark.parametrize("fill", [0, 2])
def test_poor_mans_is_inpainting_of_its_canvas(tiny_models, fill):
    """One tile that is the whole canvas: the script's result is `generate`'s inpainting of the web UI's canvas
    (filled unless "original"), blurred mask and latent mask, laid over the canvas."""
    pipe, image = Pipeline(tiny_models["sd1"]), picture(48, 40)
    request = GenerationRequest(["a red circle"], [3], init_image=from_pil(image), width=64, height=64, **SETTINGS)
    ours = poor_mans_outpainting(pipe, request, pixels=8, mask_blur=2, fill=outpainting.FILLS[fill])
    target_w, target_h, left, right, up, down = web_ui_margins(48, 40, 8, ALL)
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(image, (left, up))
    mask = rectangle(canvas.size, (left + 4, up + 4, target_w - right - 4, target_h - down - 4))
    latent_mask = rectangle(canvas.size, (left + 1, up + 1, target_w - right - 1, target_h - down - 1))
    blurred = blur_mask(mask, 4, 4)
    start = fill_masked(canvas, latent_mask)
    inpainted = generate(
        pipe,
        GenerationRequest(
            ["a red circle"],
            [3],
            init_image=from_pil(start),
            mask=from_pil(blurred),
            latent_mask=from_pil(latent_mask),
            latent_fill=LATENT_FILLS[fill],
            paste=False,
            **SETTINGS,
        ),
    )
    expected = web_ui_overlay(to_pil(inpainted.images[0]), canvas, blurred)
    assert np.array_equal(np.asarray(to_pil(ours.images[0])), np.asarray(expected))
    assert ours.images.shape == (1, 3, 64, 64) and "Seed: 3, Size: 64x64" in ours.infotexts[0]


def test_mk2_is_inpainting_of_its_noised_canvas(tiny_models):
    """One side: the canvas painted with the matched noise, its crop inpainted as "original" with the blurred mask
    and the latent mask, laid over the crop, pasted back, cut to the new size."""
    pipe, image = Pipeline(tiny_models["sd1"]), picture(40, 32, seed=4)
    request = GenerationRequest(["a red circle"], [5], init_image=from_pil(image), width=64, height=64, **SETTINGS)
    ours = outpainting_mk2(pipe, request, pixels=16, mask_blur=2, sides=["left"])
    canvas = Image.new("RGB", (64, 64))  # 40 + 24 (the 16 asked for, rounded up to 64 across)
    canvas.paste(image, (24, 0))
    mask = rectangle((64, 64), (26, 0, 64, 32))
    noised = web_ui_matched_noise(np.asarray(canvas) / 255.0, np.repeat(np.asarray(mask)[..., None] / 255.0, 3, 2))
    noised = Image.fromarray(np.clip(noised * 255.0, 0, 255).astype(np.uint8))
    latent_mask, blurred = rectangle((64, 64), (28, 0, 64, 32)), blur_mask(mask, 8, 0)
    inpainted = generate(
        pipe,
        GenerationRequest(
            ["a red circle"],
            [5],
            init_image=from_pil(noised),
            mask=from_pil(blurred),
            latent_mask=from_pil(latent_mask),
            paste=False,
            **SETTINGS,
        ),
    )
    expected = web_ui_overlay(to_pil(inpainted.images[0]), noised, blurred).crop((0, 0, 64, 32))
    assert ours.images.shape == (1, 3, 32, 64)
    assert np.array_equal(np.asarray(to_pil(ours.images[0])), np.asarray(expected))


def test_latent_fills_start_from_the_seeds_own_noise(tiny_models):
    """The web UI's latent noise is its seed's first draw, which is also its initial noise: in the latent mask the
    start is (1 + σ)·n; latent nothing: σ·n; original: the image latent + σ·n; outside it all three agree."""
    pipe = Pipeline(tiny_models["sd1"])
    image = from_pil(picture(32, 32, seed=5))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, :16] = 1
    starts = {}
    for fill in (None, "noise", "nothing"):
        request = GenerationRequest(["x"], [9], init_image=image, mask=mask, latent_fill=fill, **SETTINGS)
        stage = prepare(resolve(request, pipe), range(1))[0]
        starts[fill], sigma = stage.x, stage.sigmas[0].item()
    generator = torch.Generator().manual_seed(9)
    per_image_randn((4, 4, 4), [generator])  # the image latent's posterior sample comes first
    noise = per_image_randn((4, 4, 4), [generator])
    held = F.interpolate(mask, size=(4, 4), mode="bicubic", antialias=True).round().bool().expand(1, 4, 4, 4)
    torch.testing.assert_close(starts["noise"][held], ((1 + sigma) * noise)[held])
    torch.testing.assert_close(starts["nothing"][held], (sigma * noise)[held])
    assert (starts[None][held] - starts["nothing"][held]).abs().max() > 0.1  # the image's latent
    for fill in ("noise", "nothing"):
        assert torch.equal(starts[fill][~held], starts[None][~held])


def test_bad_settings_are_refused_before_any_work(tiny_models, stood_in):
    pipe = Pipeline(tiny_models["sd1"])
    request = GenerationRequest(["x"], [1], init_image=from_pil(picture(40, 40)), width=64, height=64, steps=2)
    for run, kwargs, message in (
        (poor_mans_outpainting, dict(pixels=0), "the pixels to expand must be a whole number from 1"),
        (poor_mans_outpainting, dict(pixels=64), "the tiles overlap by the pixels to expand"),
        (poor_mans_outpainting, dict(sides=[]), "the sides must be one or more of left, right, up, down"),
        (poor_mans_outpainting, dict(sides=["diagonal"]), "not ['diagonal']"),
        (poor_mans_outpainting, dict(fill="blur"), "the masked content must be one of fill, original"),
        (poor_mans_outpainting, dict(mask_blur=-1), "the mask blur must be a whole number from 0 to 256"),
        (poor_mans_outpainting, dict(mask_blur=40), "the mask blur leaves nothing of the picture to keep"),
        (outpainting_mk2, dict(falloff=5), "the falloff must be a number from 0 to 4"),
        (outpainting_mk2, dict(color_variation=-0.1), "the color variation must be a number from 0 to 1"),
        (outpainting_mk2, dict(sides=["left", "right"]), "its left pass would redraw 52x64; sides must"),
        (outpainting_mk2, dict(pixels=8, mask_blur=50), "the mask blur leaves nothing of the picture to keep"),
    ):
        with pytest.raises(RequestError, match=re.escape(message)):
            run(pipe, request, **{"pixels": 8, **kwargs})
    wide = dataclasses.replace(request, width=128)
    with pytest.raises(RequestError, match="the canvas is 64x64, smaller than a 128x64 tile"):
        poor_mans_outpainting(pipe, wide, pixels=8)
    with pytest.raises(RequestError, match="extends one init image, without a mask"):
        outpainting_mk2(pipe, dataclasses.replace(request, mask=torch.ones(1, 1, 40, 40)), pixels=8)
    assert stood_in == []  # nothing was sampled


# The command line and the API --------------------------------------------------------------------------------------


def test_the_command_line_outpaints(tmp_path, ckpt, capsys):
    from latent_diffusion.cli import main
    from latent_diffusion.pipeline.loading import load_pipeline

    picture(40, 32, seed=6).save(tmp_path / "in.png")
    args = [
        "img2img",
        "--ckpt",
        ckpt,
        "--init-image",
        tmp_path / "in.png",
        "--prompt",
        "a red circle",
        "--seed",
        4,
        "--steps",
        3,
        "--sampler",
        "euler",
        "--strength",
        0.75,
        "--width",
        64,
        "--height",
        64,
        "--quiet",
    ]
    mk2 = ["--outpaint", 16, "--outpaint-sides", "left,up", "--outpaint-mask-blur", 2, "--outpaint-falloff", 0.5]
    assert main([str(a) for a in [*args, *mk2, "--batch-size", 2, "--outdir", tmp_path / "a"]]) == 0
    written = sorted((tmp_path / "a").iterdir())
    assert [p.name[6:] for p in written] == ["4.png", "5.png"]
    request = GenerationRequest(
        ["a red circle"] * 2,
        [4, 5],
        init_image=from_pil(Image.open(tmp_path / "in.png")),
        width=64,
        height=64,
        batch_size=2,
        steps=3,
        sampler="euler",
        strength=0.75,
    )
    library = outpainting_mk2(load_pipeline(ckpt), request, 16, 2, ["left", "up"], falloff=0.5)
    for path, tensor, info in zip(written, library.images, library.infotexts):
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im), np.asarray(to_pil(tensor))) and im.text["parameters"] == info
    poor = ["--outpaint", 8, "--outpaint-method", "poor-man", "--outpaint-fill", "latent-nothing"]
    assert main([str(a) for a in [*args, *poor, "--outdir", tmp_path / "b"]]) == 0
    with Image.open(next((tmp_path / "b").iterdir())) as im:
        assert im.size == (64, 64)
    capsys.readouterr()
    for flags, message in (
        (["--outpaint", 0], "--outpaint must be a whole number from 1 to 8192, not 0"),
        (["--outpaint", 8, "--outpaint-sides", "left,diagonal"], "--outpaint-sides must be one or more of left"),
        (["--outpaint", 8, "--outpaint-falloff", 9], "--outpaint-falloff must be a number from 0 to 4, not 9.0"),
        (["--outpaint", 8, "--outpaint-fill", "original"], "--outpaint-fill is for --outpaint-method poor-man"),
        (["--outpaint-mask-blur", 4], "--outpaint-mask-blur needs --outpaint PIXELS"),
        ([*poor, "--n-iter", 2], "--outpaint-method poor-man makes one image, as the web UI's"),
        (["--outpaint", 8, "--outpaint-sides", "left,right"], "--outpaint: its left pass would redraw 52x64"),
        (["--outpaint", 8, "--resize"], "--outpaint takes the init image as it is"),
    ):
        assert main([str(a) for a in [*args, *flags, "--outdir", tmp_path / "c"]]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in [*args, "--outpaint", 8, "--outpaint-method", "mk3", "--outdir", tmp_path / "c"]])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_outpainting_through_the_api_with_an_existing_client(ckpt, serve):
    """webuiapi's img2img with script_name "Outpainting mk2" and "Poor man's outpainting" and the scripts' arguments
    in the web UI's order: the library's images, nothing in `ignored`; the scripts listed; bad arguments are 422s."""
    import webuiapi

    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.serving.server import ServerLimits, create_app
    from test_server import call

    served, image = load_pipeline(ckpt), picture(40, 32, seed=7)
    with serve(create_app(served, limits=ServerLimits(max_side=256))) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler", steps=3)
        settings = dict(prompt="a red circle", seed=8, width=64, height=64, cfg_scale=4, denoising_strength=0.75)
        result = api.img2img(
            images=[image],
            **settings,
            batch_size=2,
            script_name="Outpainting mk2",
            script_args=[None, 16, 2, ["left", "up"], 1.0, 0.05],
        )
        assert len(result.images) == 2 and result.info["ignored"] == [] and result.info["all_seeds"] == [8, 9]
        request = GenerationRequest(
            ["a red circle"] * 2,
            [8, 9],
            width=64,
            height=64,
            steps=3,
            sampler="euler",
            cfg_scale=4.0,
            strength=0.75,
            batch_size=2,
            init_image=from_pil(image),
        )
        library = outpainting_mk2(served, request, 16, 2, ["left", "up"])
        for got, tensor in zip(result.images, library.images):
            assert np.array_equal(np.asarray(got), np.asarray(to_pil(tensor)))
        result = api.img2img(
            images=[image],
            **settings,
            n_iter=3,
            script_name="Poor man's outpainting",
            script_args=[8, 2, "latent noise", ["right"]],
        )
        assert len(result.images) == 1 and result.image.size == (64, 64) and result.info["ignored"] == []
        one = dataclasses.replace(request, prompts=["a red circle"], seeds=[8], batch_size=1)
        library = poor_mans_outpainting(served, one, 8, 2, "latent noise", ["right"])
        assert np.array_equal(np.asarray(result.image), np.asarray(to_pil(library.images[0])))

        scripts = call(base, "/sdapi/v1/scripts")[1]["img2img"]
        assert "outpainting mk2" in scripts and "poor man's outpainting" in scripts
        info = {s["name"]: s for s in call(base, "/sdapi/v1/script-info")[1] if s["is_img2img"]}
        assert [a["label"] for a in info["outpainting mk2"]["args"]][1:4] == [
            "Pixels to expand",
            "Mask blur",
            "Outpainting direction",
        ]
        assert info["poor man's outpainting"]["args"][2]["choices"] == list(outpainting.FILLS)

        body = {"init_images": [webuiapi.raw_b64_img(image)], "width": 64, "height": 64, "steps": 2}
        for script, args, message in (
            ("Outpainting mk2", [None, 0], "script_args: Outpainting mk2: the pixels to expand must be"),
            ("Outpainting mk2", [None, 16, 2, "left"], "the sides must be one or more of left, right, up, down"),
            ("Outpainting mk2", [None, 16, 2, ["left"], "high"], "the falloff must be a number from 0 to 4"),
            ("Outpainting mk2", [None, 8, 2, ["left", "right"]], "its left pass would redraw 52x64"),
            ("Outpainting mk2", [None, 256, 2, ["left"]], "a canvas of 320 pixels a side, over this server's 256"),
            ("Poor man's outpainting", [8, 2, 7], "the masked content must be one of fill, original"),
            ("Poor man's outpainting", [64], "the tiles overlap by the pixels to expand (64)"),
            ("Poor man's outpainting", "8", "script_args: a list of Poor man's outpainting's arguments"),
        ):
            status, answer = call(base, "/sdapi/v1/img2img", {**body, "script_name": script, "script_args": args})
            assert status == 422 and message in answer["detail"], (script, args, answer)
        status, answer = call(
            base, "/sdapi/v1/img2img", {**body, "mask": body["init_images"][0], "script_name": "Outpainting mk2"}
        )
        assert status == 422 and "takes one image (base64) and no mask" in answer["detail"]
