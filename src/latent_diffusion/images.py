"""Images in and out: reading init images and masks, writing PNGs with the generation settings in a
`parameters` text chunk in the form of the most used Stable Diffusion web UI, and grids.

    a photograph of an astronaut riding a horse
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .files import atomic_write

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


def model_hash(path: str | os.PathLike) -> str:
    """The web UI's model hash ("AutoV2"): the first 10 hex digits of the file's SHA-256."""
    return sha256_of(path)[:10]


def lora_hash(path: str | os.PathLike) -> str:
    """The web UI's "Lora hashes" value: 12 hex digits of SHA-256, for a .safetensors file over its tensor data
    only (the header skipped: kohya's "addnet" hash, which metadata edits leave unchanged)."""
    return sha256_of(path, skip_header=Path(path).suffix.lower() == ".safetensors")[:12]


def sha256_of(path: str | os.PathLike, skip_header: bool = False) -> str:
    """The file's SHA-256 in hex (computed once per version of the file: a 2 GB checkpoint takes seconds);
    skip_header: of what follows a .safetensors header."""
    stat = os.stat(path)
    return _file_hash(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, skip_header)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int, skip_header: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            header = int.from_bytes(f.read(8), "little")
            # a header longer than the file: not a .safetensors file (its reader says so); hash the whole file
            f.seek(8 + header if 8 + header <= size else 0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _quote(value) -> str:
    """A field's value as the web UI writes it: as a JSON string where it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # quoted but not JSON (as this project wrote before it escaped): the inside
        return value[1:-1]


def parameters_text(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The `parameters` chunk: prompt line, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """The inverse of parameters_text, read as the web UI reads it: {"prompt", "negative_prompt", and each field as
    a string}. The last line holds the fields if it has at least three `Key: value` pairs."""
    *head, last = text.strip().split("\n")
    if len(FIELD.findall(last)) < 3:  # no settings line: the whole text is the prompt
        head, last = [*head, last], ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in FIELD.findall(last):
        result[key.strip()] = _unquote(value.strip())
    return result


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write with the `parameters` text chunk, atomically: a failed write leaves no partial file."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
