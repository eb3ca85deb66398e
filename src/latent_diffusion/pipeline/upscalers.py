"""PLACEHOLDER until the upscalers branch lands."""

from __future__ import annotations

import torch
from PIL import Image

from .images import from_pil, to_pil

IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")


def resize_image(images: torch.Tensor, width: int, height: int, name: str | None, files: dict) -> torch.Tensor:
    out = []
    for image in images:
        im = to_pil(image)
        if name in ("Lanczos", "Nearest") and max(width / im.width, height / im.height) > 1:
            scale = max(width / im.width, height / im.height)
            resample = Image.NEAREST if name == "Nearest" else Image.LANCZOS
            dest = (int(im.width * scale // 8 * 8), int(im.height * scale // 8 * 8))
            im = im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
            if im.size != dest:
                im = im.resize(dest, resample=Image.LANCZOS)
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.LANCZOS)
        out.append(from_pil(im))
    return torch.cat(out)
