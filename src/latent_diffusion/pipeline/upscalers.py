"""Image upscalers as the web UI has them: its resamplers ("None", "Lanczos", "Nearest") and upscaler model files
(ESRGAN, Real-ESRGAN, Compact, SwinIR, HAT, DAT, SPAN and the rest that the spandrel library knows), for hires fix,
the extras tab and SD upscale.

- A model file is read without running code from it (`weights/reader.py`: safetensors, or a pickle through
  `torch.load(weights_only=True)`), and spandrel builds its architecture from the keys (`ModelLoader.
  load_from_state_dict`): spandrel's own classes, none written here. spandrel-extra-arches (non-commercial
  licences) is used only where the user has installed it.
- A model runs in overlapping tiles of at most `TILE` pixels sharing at least `OVERLAP` (the web UI's settings
  ESRGAN_tile = 192 and ESRGAN_tile_overlap = 8), blended as the autoencoder's tiles are (`models/vae_tiling.py`).
  The web UI's `upscale_with_model` pastes its tiles with an 8-bit linear mask and pads an image smaller than a tile
  with black; here the blend is in float and nothing is padded, so a tile's border effects stay out of the result
  as far as the overlap allows. It runs in the dtype asked for where the architecture allows it (spandrel's
  `supports_half`, `supports_bfloat16`), else in float32.
- `upscale(image, upscaler, scale=s)` is the web UI's `Upscaler.upscale(img, s)`: the target is the image's size
  times s rounded down to a multiple of 8; up to 3 passes (a model at its own scale, a resampler by s) until the
  image is at least that large, then Lanczos to the target. `upscale(image, upscaler, size=(w, h))` is its
  `images.resize_image(0, img, w, h, upscaler)` (hires fix): that upscale by max(w/W, h/H) when it enlarges, then
  Lanczos to exactly (w, h); "None" is Lanczos straight to (w, h).
- The resamplers work on 8-bit images as the web UI's do (PIL clips each pass to 0..255), rounded as our PNGs are
  (`images.to_pil`); a model's passes stay in float.

spandrel imports torchvision when it is imported (for two architectures that rotate or normalise with it), so both
are the optional extra `latent_diffusion[upscale]`; they are imported only when a model file is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..models.vae_tiling import tiled
from ..weights.reader import CheckpointError, first_line, load_pickle, read_state_dict
from .images import from_pil, to_pil

TILE = 192  # the web UI's ESRGAN_tile: input pixels per tile side (0: the whole image at once)
OVERLAP = 8  # its ESRGAN_tile_overlap: input pixels shared by neighbouring tiles
FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
# The web UI's folders of upscaler models that spandrel reads (its LDSR and ScuNET are not image-to-image models here)
FOLDERS = ("models/ESRGAN", "models/RealESRGAN", "models/SwinIR", "models/DAT", "models/HAT")
PASSES = 3  # the web UI's Upscaler.upscale runs at most 3 passes


class UpscalerError(ValueError):
    """An upscaler that cannot be used: an unknown name, a file that is not a model, spandrel missing. One line,
    naming the upscaler or file (the command line exits 2 on it, the server answers 422)."""


@dataclass(frozen=True)
class Upscaler:
    """One row of the list of upscalers: a resampler (PIL's filter) or a model file."""

    name: str
    path: Path | None = None  # the model file; None for the resamplers
    resample: Image.Resampling | None = None  # the resampler's filter; None for "None" and for models


RESAMPLERS = {
    "None": Upscaler("None"),
    "Lanczos": Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
    "Nearest": Upscaler("Nearest", resample=Image.Resampling.NEAREST),
}


def find_upscalers(folder: str | os.PathLike) -> dict[str, Path]:
    """The model files in a folder and its subfolders, by name (the file's stem, as the web UI lists them); {} for a
    folder that does not exist."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
    return {p.stem: p for p in files}


def list_upscalers(*folders: str | os.PathLike) -> dict[str, Upscaler]:
    """The resamplers, then the model files of each folder in turn; the first of two with one name is kept."""
    found = dict(RESAMPLERS)
    for folder in folders:
        for name, path in find_upscalers(folder).items():
            found.setdefault(name, Upscaler(name, path=path))
    return found


def get_upscaler(name: str, upscalers: dict[str, Upscaler] | None = None) -> Upscaler:
    """The upscaler of that name (the resamplers when no list is given); UpscalerError listing the names otherwise."""
    upscalers = RESAMPLERS if upscalers is None else upscalers
    if name not in upscalers:
        raise UpscalerError(f"no upscaler named {name!r}; the upscalers are {', '.join(map(repr, upscalers))}")
    return upscalers[name]


@dataclass
class UpscalerModel:
    """A loaded model: spandrel's `ImageModelDescriptor` (its `model` is the nn.Module) and where it came from."""

    name: str
    path: Path
    descriptor: Any  # spandrel.ImageModelDescriptor

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.dtype

    @property
    def device(self) -> torch.device:
        return self.descriptor.device

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name


def import_spandrel():
    """spandrel, with spandrel-extra-arches' architectures where that is installed; UpscalerError if spandrel (or the
    torchvision it imports) is missing or broken."""
    try:
        import spandrel
    except (ImportError, RuntimeError) as e:  # a torchvision built for another torch fails with a RuntimeError
        raise UpscalerError(
            f"upscaler models need spandrel: pip install latent_diffusion[upscale] ({type(e).__name__}: "
            f"{first_line(e)})"
        ) from None
    _install_extra_arches()
    return spandrel


@functools.cache
def _install_extra_arches() -> bool:
    """spandrel-extra-arches' architectures (non-commercial licences) in spandrel's registry, once, where the user
    has installed that package."""
    try:
        import spandrel_extra_arches
    except ImportError:
        return False
    with contextlib.suppress(ValueError):  # DuplicateArchitectureError: another module of this process did it
        spandrel_extra_arches.install()
    return True


def read_upscaler_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model file's tensors, read without running code from it, unwrapped as spandrel does (`params_ema`,
    `params`, `state_dict`, ... and a `module.` prefix) -> a flat state dict."""
    path = Path(path)
    spandrel = import_spandrel()
    try:
        if path.suffix.lower() == ".safetensors" or not path.is_file():
            contents, _ = read_state_dict(path)  # says "no such file" or "is a directory" too
        else:
            contents = load_pickle(path)
    except CheckpointError as e:
        raise UpscalerError(str(e)) from None
    if not isinstance(contents, dict):
        raise UpscalerError(f"{path}: holds a {type(contents).__name__}, not a state dict")
    state_dict = spandrel.canonicalize_state_dict(contents)
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def load_upscaler(
    upscaler: Upscaler | str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> UpscalerModel:
    """A model file (an `Upscaler` row or a path) as spandrel's architecture with its weights, in eval mode on
    `device`, in `dtype` where the architecture supports it and float32 otherwise. UpscalerError, naming the file,
    for a file that is not an image-to-image model spandrel knows. The last two files loaded are kept (a server's
    requests name the same few), and read again once the file changes."""
    if isinstance(upscaler, Upscaler) and upscaler.path is None:
        raise UpscalerError(f"{upscaler.name!r} is a resampler, not a model file")
    path = Path(upscaler.path if isinstance(upscaler, Upscaler) else upscaler)
    try:
        stat = path.stat()
    except OSError:
        stat = None  # (read_upscaler_weights names the problem)
    version = (stat.st_mtime_ns, stat.st_size) if stat else None
    descriptor = _descriptor(path, version, str(torch.device(device)), dtype)
    return UpscalerModel(upscaler.name if isinstance(upscaler, Upscaler) else path.stem, path, descriptor)


@functools.lru_cache(maxsize=2)
def _descriptor(path: Path, version: tuple | None, device: str, dtype: torch.dtype):
    """`load_upscaler`'s work, kept by the file's path, modification time and size, device and dtype."""
    spandrel = import_spandrel()
    state_dict = read_upscaler_weights(path)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(
            f"{path}: not an upscaler model that spandrel knows (no architecture fits its keys)"
        ) from None
    except Exception as e:  # an architecture that fits the keys but not the shapes
        raise UpscalerError(f"{path}: not a model spandrel can build ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
        what = f"a {descriptor.purpose} model" if descriptor.input_channels == 3 else "not an RGB model"
        raise UpscalerError(f"{path}: a {descriptor.architecture.name} model, {what}, not an image upscaler")
    supported = {torch.float16: descriptor.supports_half, torch.bfloat16: descriptor.supports_bfloat16}
    descriptor.to(device=device, dtype=dtype if supported.get(dtype, True) else torch.float32).eval()
    return descriptor


def run_model(model: UpscalerModel, image: torch.Tensor, *, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """One pass of a model at its own scale: (b, 3, h, w) in [0, 1] -> (b, 3, h·s, w·s) float32 in [0, 1], on the
    image's device. In tiles of at most `tile` pixels sharing at least `overlap` (tile 0: the whole image)."""
    out = []
    for one in image.to(model.device).split(1):  # spandrel's call takes one image
        x = one.to(model.dtype)
        if tile <= 0:
            out.append(model.descriptor(x).float())
        else:
            out.append(tiled(model.descriptor, x, model.scale, tile, min(overlap, tile - 1)))
    return torch.cat(out).to(image.device)


def resample(image: torch.Tensor, size: tuple[int, int], filter: Image.Resampling) -> torch.Tensor:
    """(b, 3, h, w) in [0, 1] -> (b, 3, size[1], size[0]) through PIL's `filter` on each image, in 8 bits as the web
    UI's resamplers are."""
    w, h = size
    if w < 1 or h < 1:
        raise UpscalerError(f"cannot resize a {image.shape[-1]}×{image.shape[-2]} image to {w}×{h}")
    out = [from_pil(to_pil(one).resize((w, h), resample=filter)) for one in image]
    return torch.cat(out).to(image.device)


def upscale(
    image: torch.Tensor,
    upscaler: Upscaler | UpscalerModel | str,
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    upscalers: dict[str, Upscaler] | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(b, 3, h, w) in [0, 1] -> the upscaled images, float32 in [0, 1], on the image's device.

    Exactly one of `scale` (the web UI's `Upscaler.upscale`: to (w·scale, h·scale) rounded down to multiples of 8) and
    `size` = (width, height) (its `resize_image`, hires fix: to exactly that size). `upscaler` is a name (looked up
    in `upscalers`, by default the resamplers), a row of `list_upscalers`, or a loaded model; a model file named or
    given by its row is loaded on `device` (default: the image's) in `dtype` (`load_upscaler`) for this call alone:
    load it once with `load_upscaler` to upscale many images."""
    if (scale is None) == (size is None):
        raise UpscalerError("give a scale or a size, one of the two")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UpscalerError(f"the scale must be a positive number, not {scale}")
    if size is not None and not (len(size) == 2 and all(isinstance(n, int) and n >= 1 for n in size)):
        raise UpscalerError(f"the size must be (width, height) in whole pixels of at least 1, not {size}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise UpscalerError(f"expected images of shape (b, 3, h, w), got {tuple(image.shape)}")
    if isinstance(upscaler, str):
        upscaler = get_upscaler(upscaler, upscalers)
    if isinstance(upscaler, Upscaler) and upscaler.path is not None:
        upscaler = load_upscaler(upscaler, device=image.device if device is None else device, dtype=dtype)
    step = _pass(upscaler, tile, overlap)

    with torch.inference_mode():
        image = image.float()
        if scale is not None:
            return _upscale_by(image, step, scale)
        if upscaler == RESAMPLERS["None"]:  # resize_image: "None" is Lanczos alone
            return resample(image, size, Image.Resampling.LANCZOS)
        factor = max(size[0] / image.shape[-1], size[1] / image.shape[-2])
        if factor > 1.0:
            image = _upscale_by(image, step, factor)
        if image.shape[-2:] != (size[1], size[0]):
            image = resample(image, size, Image.Resampling.LANCZOS)
        return image


def _pass(upscaler: Upscaler | UpscalerModel, tile: int, overlap: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The web UI's `do_upscale`: (images, scale) -> images. A model runs at its own scale, a resampler resizes by
    the scale, "None" returns the images unchanged."""
    if isinstance(upscaler, UpscalerModel):
        return lambda x, s: run_model(upscaler, x, tile=tile, overlap=overlap)
    if upscaler.resample is not None:
        return lambda x, s: resample(x, (int(x.shape[-1] * s), int(x.shape[-2] * s)), upscaler.resample)
    return lambda x, s: x


def _upscale_by(image: torch.Tensor, step: Callable[[torch.Tensor, float], torch.Tensor], scale: float) -> torch.Tensor:
    """The web UI's `Upscaler.upscale` loop: passes until the image reaches the target (at least one unless the
    scale is 1), stopping at a pass that changes nothing, then Lanczos to the target."""
    h, w = image.shape[-2:]
    target_w, target_h = int(w * scale // 8 * 8), int(h * scale // 8 * 8)  # the web UI's float arithmetic
    if target_w < 1 or target_h < 1:
        raise UpscalerError(f"a {w}×{h} image at scale {scale} is {target_w}×{target_h} (the web UI rounds down to 8s)")
    for i in range(PASSES):
        if image.shape[-1] >= target_w and image.shape[-2] >= target_h and (i > 0 or scale != 1):
            break
        before = image.shape[-2:]
        image = step(image, scale)
        if image.shape[-2:] == before:
            break
    if image.shape[-2:] != (target_h, target_w):
        image = resample(image, (target_w, target_h), Image.Resampling.LANCZOS)
    return image
