"""The web UI's extras tab, its upscale: an image enlarged by a scale or to a size by one upscaler, optionally blended
with a second one's result, and the text it writes about it (its `scripts/postprocessing_upscale.py` and
`modules/postprocessing.py`). `ldm upscale` and the server's `/sdapi/v1/extra-single-image` and
`/extra-batch-images` both call `upscale_extras`.

The web UI's arithmetic, kept exactly:
- by a scale s: `Upscaler.upscale(image, s)` (`upscalers.upscale(scale=s)`): W·s and H·s rounded down to multiples
  of 8, in float as it computes them;
- to a size (w, h): the same with s = max(w / W, h / H), so the result covers (w, h) but for that rounding; with crop
  it is pasted centred, at (w // 2 - its width // 2, h // 2 - its height // 2), on a black canvas of exactly (w, h),
  which cuts what overhangs and leaves black the few pixels the rounding left uncovered;
- "None" as the first upscaler does nothing at all (the image comes back as it was, as RGB, and nothing is
  written about it); a second upscaler runs only where it is not "None" and its visibility is above 0, and the
  two 8-bit results are mixed by PIL's `Image.blend` (first · (1 - v) + second · v).
Face restoration (GFPGAN, CodeFormer) is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .images import from_pil, to_pil
from .infotext import fields_text
from .upscalers import OVERLAP, RESAMPLERS, TILE, Upscaler, UpscalerError, UpscalerModel, load_upscaler, upscale


@dataclass(frozen=True)
class ExtrasUpscale:
    """The extras tab's upscale settings, by the web UI's meaning of its API fields (named beside each)."""

    upscaler: str = "None"  # upscaler_1
    scale: float = 2.0  # upscaling_resize (resize_mode 0)
    size: tuple[int, int] | None = None  # (upscaling_resize_w, upscaling_resize_h) with resize_mode 1; None: by scale
    crop: bool = True  # upscaling_crop: with a size, the result is exactly that size
    upscaler_2: str = "None"
    visibility_2: float = 0.0  # extras_upscaler_2_visibility, in [0, 1]

    @property
    def second(self) -> bool:
        """Whether the second upscaler runs."""
        return self.upscaler != "None" and self.upscaler_2 != "None" and self.visibility_2 > 0


def factor(settings: ExtrasUpscale, image_size: tuple[int, int]) -> float:
    """The scale the upscaler is asked for: the setting's, or with a size the one that covers it."""
    if settings.size is None:
        return settings.scale
    (w, h), (width, height) = settings.size, image_size
    return max(w / width, h / height)


def output_size(settings: ExtrasUpscale, image_size: tuple[int, int]) -> tuple[int, int]:
    """The size of the result for an image of `image_size` = (W, H), before any work (for the limits)."""
    width, height = image_size
    if settings.upscaler == "None":
        return width, height
    if settings.size is not None and settings.crop:
        return settings.size
    s = factor(settings, image_size)
    return int(width * s // 8 * 8), int(height * s // 8 * 8)  # (upscalers._upscale_by's target)


def upscale_extras(
    image: Image.Image,
    settings: ExtrasUpscale,
    first: Upscaler | UpscalerModel | None,
    second: Upscaler | UpscalerModel | None = None,
    *,
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> tuple[Image.Image, dict[str, object]]:
    """An RGB image -> (the extras tab's result, the fields it writes: "Postprocess upscale by" or "... upscale to",
    "Postprocess crop to", "Postprocess upscaler", "Postprocess upscaler 2"). `first` and `second` are the upscalers
    the settings name (a resampler's row or a loaded model; None where a setting is "None" or unused)."""
    info: dict[str, object] = {}
    image = image.convert("RGB")
    if settings.upscaler == "None" or first is None:
        return image, info
    result = _upscale_one(image, first, settings, info, tile, overlap)
    info["Postprocess upscaler"] = settings.upscaler
    if settings.second and second is not None:
        other = _upscale_one(image, second, settings, info, tile, overlap)
        result = Image.blend(result, other, settings.visibility_2)
        info["Postprocess upscaler 2"] = settings.upscaler_2
    return result, info


def _upscale_one(image, upscaler, settings: ExtrasUpscale, info: dict, tile: int, overlap: int) -> Image.Image:
    """The web UI's `ScriptPostprocessingUpscale.upscale`: one upscaler to the scale, then the crop."""
    if settings.size is None:
        info["Postprocess upscale by"] = settings.scale
    else:
        info["Postprocess upscale to"] = f"{settings.size[0]}x{settings.size[1]}"
    s = factor(settings, image.size)
    result = to_pil(upscale(from_pil(image), upscaler, scale=s, tile=tile, overlap=overlap)[0])
    if settings.size is not None and settings.crop:
        w, h = settings.size
        canvas = Image.new("RGB", (w, h))  # black where the rounded-down result does not reach
        canvas.paste(result, (w // 2 - result.width // 2, h // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{w}x{h}"
    return result


def postprocessing_text(info: dict[str, object]) -> str:
    """The fields as the web UI writes them into the "postprocessing" (and, when it saves, "extras") text chunk."""
    return fields_text({k: v for k, v in info.items() if v is not None})


def text_chunks(image: Image.Image, info: dict[str, object], saved: bool = False) -> dict[str, str]:
    """The text chunks of the result's PNG, as the web UI writes them: the input's own (its string items,
    `parameters` last), then "postprocessing"; a saved file (saved=True, as `ldm upscale` writes) also "extras",
    the same text."""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    if isinstance(image.info.get("parameters"), str):
        items["parameters"] = image.info["parameters"]
    text = postprocessing_text(info)
    items["postprocessing"] = text
    if saved:
        items["extras"] = text
    return items


# What each setting is called where a message is read: its field (the server) or flag (the command line) names it.
NAMES = {"upscaler": "upscaler", "upscaler_2": "upscaler_2", "scale": "scale", "size": "size"}


def check_upscalers(settings: ExtrasUpscale, files: dict[str, Path], names: dict[str, str] = NAMES) -> None:
    """UpscalerError "NAME: ..." unless each upscaler the settings name is "None", a resampler or one of the model
    `files` (by name)."""
    known = [*RESAMPLERS, *files]
    for setting in ("upscaler", "upscaler_2"):
        if (name := getattr(settings, setting)) not in known:
            raise UpscalerError(f"{names[setting]}: no upscaler {name!r} here; these are: {', '.join(known)}")


def check_output_size(
    settings: ExtrasUpscale, image_size: tuple[int, int], max_side: int, image: str, names: dict[str, str] = NAMES
) -> None:
    """UpscalerError naming the setting unless the result for an image of `image_size` (called `image`) is
    between 1 and `max_side` pixels per side: known from the image's header, before any work. With "None" first
    the image comes back as it is, whatever its size."""
    w, h = output_size(settings, image_size)
    if settings.upscaler != "None" and (min(w, h) < 1 or max(w, h) > max_side):
        asked = names["scale" if settings.size is None else "size"]
        raise UpscalerError(
            f"{asked}: {image} ({image_size[0]}x{image_size[1]}) would be {w}x{h}; each side must be between 1 "
            f"and {max_side} (the web UI rounds the sides down to multiples of 8)"
        )


def load_upscalers(
    settings: ExtrasUpscale,
    files: dict[str, Path],
    names: dict[str, str] = NAMES,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Upscaler | UpscalerModel | None, Upscaler | UpscalerModel | None]:
    """The two upscalers `upscale_extras` takes: a resampler's row, or a model file of `files` loaded on `device` in
    `dtype` (in float32 where its architecture needs it); None where a setting is "None" or unused. UpscalerError
    "NAME UPSCALER: why" for a file that is not a model, without the file's path (a server's folders are its own)."""
    check_upscalers(settings, files, names)
    found = []
    for setting, used in (("upscaler", settings.upscaler != "None"), ("upscaler_2", settings.second)):
        name = getattr(settings, setting)
        if not used:
            found.append(None)
        elif name in RESAMPLERS:
            found.append(RESAMPLERS[name])
        else:
            try:
                found.append(load_upscaler(Upscaler(name, files[name]), device=device, dtype=dtype))
            except UpscalerError as e:
                message = str(e).replace(str(files[name]), "").removeprefix(": ")
                raise UpscalerError(f"{names[setting]} {name}: {message}") from None
    return found[0], found[1]
