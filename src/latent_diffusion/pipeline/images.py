"""Images in and out: reading init images and masks, writing PNGs with the generation settings in a
`parameters` text chunk (`pipeline/infotext.py` writes and reads that text), and grids."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..files import atomic_write

MAX_PIXELS = 8192 * 8192  # an image's pixel count, read from its header before anything is decoded


def load_image(
    path: str | os.PathLike | BinaryIO,
    mode: str = "RGB",
    size: tuple[int, int] | None = None,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> torch.Tensor:
    """A file (or file object) -> (1, C, H, W) in [0, 1]; resized to size = (width, height) when given. ValueError,
    naming the file (or `name`), if unreadable or over `max_pixels` (read from its header, before decoding).

    Any mode loads as it looks: 16- and 32-bit greyscale scaled from their full range, transparency composited on
    white (as image editors show it), palettes and CMYK converted, the EXIF orientation (phone photos) applied."""
    name = _name(path, name)
    im = as_mode(open_image(path, name, max_pixels), mode, name)
    if size is not None and im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    return from_pil(im)


# Raster formats only: Pillow would hand EPS and PDF to Ghostscript, which runs the file's PostScript.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA")


def open_image(path: str | os.PathLike | BinaryIO, name: str | None = None, max_pixels: int = MAX_PIXELS):
    """A file (or file object) -> the decoded PIL image in its own mode, its EXIF orientation applied. ValueError,
    naming the file (or `name`), if unreadable, not a raster image (`RASTER_FORMATS`) or over `max_pixels` (read
    from its header, before decoding)."""
    name = _name(path, name)
    try:
        with Image.open(path, formats=RASTER_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{name}: the image is {im.width}x{im.height}, over the limit of {max_pixels} pixels")
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:  # (Pillow's message holds the repr of a file object: "<_io.BytesIO ...>")
        raise ValueError(f"{name}: cannot read the image (not one of {', '.join(RASTER_FORMATS)})") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot read the image ({e.__class__.__name__}: {e})") from None


def _name(path: str | os.PathLike | BinaryIO, name: str | None) -> str:
    """What messages call an image: `name`, else its path."""
    return name or (str(path) if isinstance(path, (str, os.PathLike)) else "image")


def as_mode(im: Image.Image, mode: str, name: str = "image") -> Image.Image:
    """Any image as an 8-bit image of `mode` ("RGB", "L") that looks the same (see `load_image`). ValueError naming
    the image (`name`) for a mode Pillow cannot convert (LAB to L)."""
    try:
        return _eight_bit(im).convert(mode)
    except ValueError:  # Pillow's own names no file (and, converting LAB to L, says "LAB to RGB")
        raise ValueError(f"{name}: a {im.mode} image, which cannot be read as {mode}; save it as RGB") from None


def from_pil(im: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image -> (1, C, H, W) float32 in [0, 1]."""
    tensor = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return (tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1))[None]


def _eight_bit(im: Image.Image) -> Image.Image:
    """An 8-bit L, RGB or (composited) RGB image with the same look."""
    if im.mode.startswith("I"):  # I;16 (16-bit PNG), I: integers of up to 16 bits in practice
        high = 65535 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255
        return Image.fromarray((np.asarray(im, dtype=np.float64).clip(0, high) / high * 255).round().astype(np.uint8))
    if im.mode == "F":
        return Image.fromarray((np.asarray(im).clip(0, 1) * 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA")).convert("RGB")
    return im


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an 8-bit RGB image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def save_png(image: Image.Image, path: Path, parameters: str | dict[str, str]) -> None:
    """Write with the `parameters` text chunk (or these text chunks, by key), atomically: a failed write leaves no
    partial file."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_text(parameters))


def png_text(chunks: str | dict[str, str]) -> PngImagePlugin.PngInfo:
    """PNG text chunks: a `parameters` text, or chunks by key (iTXt where a text is not Latin-1, as Pillow writes
    it)."""
    info = PngImagePlugin.PngInfo()
    for key, text in ({"parameters": chunks} if isinstance(chunks, str) else chunks).items():
        info.add_text(key, text)
    return info
