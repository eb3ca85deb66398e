"""What the web UI's ControlNet extension does beside the control model for some preprocessors (1.1.455: the end of
`hook.py`'s U-Net forward, its `HackedImageRNG`, and the post-processors of `controlnet.py`).

During sampling, after every U-Net evaluation, on every row, whatever the unit's guidance window and hr_option (the
extension tests neither here), the colour fixes first, then the inpaint units, each in unit order:
- tile_colorfix(+sharp): x0 = x0_pred − B_k(x0_pred) + B_k(z), B_k the box blur of radius k = threshold_a (twice
  that in a hires pass the unit acts in), z the latent of the control image: the prediction's detail over the
  control image's colours. +sharp: on the unconditional rows of guidance x0 becomes d·B_k(x0) + (1 − d)·x0,
  d = threshold_b / 100, so guidance pushes away from a blur.
- inpaint_only(+lama): x0 = x0_pred·m + z·(1 − m), m the mask max-pooled to the latent (10×10 windows, stride 8,
  padding 1: a masked pixel marks the latent pixels around it), z the latent of the control image (for +lama,
  LaMa's fill): outside the mask the prediction is the image.
x0_pred is the U-Net's output read at ᾱ of the rounded timestep, the fixed x0 goes back the same way, and the output
becomes w·fixed + (1 − w)·output, w the unit's weight clamped to [0, 1]. The extension reads every output as ε; a
v-model's output is read here as the v it is (the extension's arithmetic is wrong for v-models). z is a posterior
sample of the control image (the extension's `call_vae_using_process`), drawn from a generator seeded with the
request's first seed, once a pass (`HintLatents`).

An inpainting U-Net (9 input channels) with an inpaint unit sees the unit's mask and masked image, not the request's
(`inpaint_concat`).

+lama's first noise: ε ← √ᾱ_T·z + √(1 − ᾱ_T)·ε, the q_sample of the fill's latent at the last timestep T (999), so the
first pass starts leaning toward the fill (the extension's `HackedImageRNG`; the last +lama unit's, as there).

After decoding, on the last pass's images, before an inpainting's paste (the extension's `postprocess_batch`):
- inpaint_only(+lama): y = m·x + (1 − m)·c, m the mask dilated by a 7×7 square then box-blurred 7×7 (cv2; the
  extension's default "control_net_inpaint_blur_sigma"), c the control image: outside the mask, the input's pixels;
- recolor_luminance / recolor_intensity: the image's L of CIELAB / V of HSV replaced by the map (8-bit, cv2).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..models.ldm import LatentDiffusion
from ..sampling.parameterization import noised, prediction_from_vp, x0_from_vp
from .control import ResolvedControl
from .control_modules import COLOR_FIX, INPAINT_ONLY, find_module
from .preprocessors import resolve_sliders

LAMA = "inpaint_only+lama"
RECOLOR = {"recolor_luminance": (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB, 0), "recolor_intensity": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2)}  # fmt: skip
INPAINT_BLUR = 7  # the extension's "control_net_inpaint_blur_sigma" (a box size, not a σ)


def module_name(c: ResolvedControl) -> str:
    return find_module(c.unit.module).name


def fixes_prediction(c: ResolvedControl) -> bool:
    """Whether a unit changes the U-Net's output (its thresholds then matter while sampling)."""
    return module_name(c) in COLOR_FIX + INPAINT_ONLY


def box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, h, w) -> the mean over the (2k+1)² square around each pixel, the border repeated (hook.py's `blur`)."""
    return F.avg_pool2d(F.pad(x, (k, k, k, k), mode="replicate"), 2 * k + 1, stride=1)


class HintLatents:
    """The latent of each unit's control image (a reference unit's z₀, a colour fix's or inpaint unit's z), by unit
    and row count, once a pass: a posterior sample × the scale factor of each distinct image, in the order the rows
    first show them (the rows of one image share it, as the extension repeats its latent over the batch), its noise
    drawn from the unit's generator, seeded with the unit's seed (the request's first; a reference unit goes on
    drawing from it); encoded in tiles where the request's decode is (`tiled`)."""

    def __init__(self, model: LatentDiffusion, tiled: bool = False):
        self.model, self.tiled = model, tiled
        self.latents: dict[tuple[int, int, bool], torch.Tensor] = {}  # (unit, rows, masked)
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, k: int, c: ResolvedControl) -> torch.Generator:
        if k not in self.generators:
            self.generators[k] = torch.Generator(self.model.device).manual_seed(c.seed)
        return self.generators[k]

    def latent(self, k: int, c: ResolvedControl, hint: torch.Tensor, masked: bool = False) -> torch.Tensor:
        """Unit k's image rows (rows, 3 or 4, H, W) in [0, 1] -> their latents (rows, c, H/8, W/8); `masked`: of the
        image with an inpaint map's masked pixels (alpha > 0.5) at 0 in [-1, 1], mid-grey."""
        if (k, len(hint), masked) not in self.latents:
            images = hint[:, :3].to(self.model.device, self.model.dtype)
            if masked:
                holes = (hint[:, 3:4] > 0.5).to(images)
                images = images * (1 - holes) + 0.5 * holes
            distinct, rows = [], []
            for image in images:
                found = next((j for j, seen in enumerate(distinct) if torch.equal(seen, image)), len(distinct))
                distinct += [image] if found == len(distinct) else []
                rows.append(found)
            f, channels = self.model.cfg.autoencoder.downsampling_factor, self.model.cfg.autoencoder.embed_dim
            shape = (len(distinct), channels, images.shape[-2] // f, images.shape[-1] // f)
            noise = torch.randn(shape, generator=self.generator(k, c), device=images.device, dtype=images.dtype)
            z = self.model.autoencoder_encode(torch.stack(distinct) * 2 - 1, noise=noise, tiled=self.tiled)
            self.latents[k, len(hint), masked] = z[torch.tensor(rows, device=z.device)]
        return self.latents[k, len(hint), masked]


class PredictionFixes:
    """The colour fixes' and inpaint units' change of the U-Net's output: fixes(out, x_in, t, hints, marks) -> out,
    hints being every unit's map rows (None where it has none) and marks the rows' (rows, 1, 1, 1) 1 for a prompt."""

    def __init__(self, model: LatentDiffusion, controls: list[ResolvedControl], latents: HintLatents):
        self.model, self.latents = model, latents
        fixing = [(k, c, module_name(c)) for k, c in enumerate(controls) if fixes_prediction(c)]
        fixing.sort(key=lambda unit: unit[2] in INPAINT_ONLY)  # (stable: the colour fixes first, as the extension)
        self.units = [(k, c, name, self._settings(c, name)) for k, c, name in fixing]
        inpainting = [(k, c) for k, c in enumerate(controls) if c.hint.shape[1] == 4] if model.cfg.inpainting else []
        self.inpaint_input = inpainting[-1] if inpainting else None  # (the last inpaint unit's, as the extension)

    def inpaint_concat(self, cond: dict, hints: list) -> dict:
        """An inpainting U-Net's mask and masked image from the last inpaint unit's map in place of the request's:
        max_pool₈(alpha > 0.5) and the latent of the image with those pixels grey (hook.py's "Replace x_t to support
        inpaint models"), in every evaluation whatever the unit's window."""
        if self.inpaint_input is None:
            return cond
        k, c = self.inpaint_input
        hint = hints[k].to(self.model.device, torch.float32)
        f = self.model.cfg.autoencoder.downsampling_factor
        mask = F.max_pool2d((hint[:, 3:4] > 0.5).float(), f)  # (rows, 1, h, w)
        concat = torch.cat([mask, self.latents.latent(k, c, hint, masked=True).float()], dim=1)
        return cond | {"concat": concat.to(self.model.dtype)}

    def __call__(self, out: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, hints: list, marks: torch.Tensor):
        if not self.units:
            return out
        alpha_bar = self.model.alphas_cumprod.to(x_in.device)[t.float().round().long()].float()  # (rows,)
        kind = self.model.parameterization
        for k, c, name, (radius, detail) in self.units:
            hint = hints[k].to(out)
            x0, z = x0_from_vp(x_in, out, alpha_bar, kind), self.latents.latent(k, c, hint).to(out)
            if name in INPAINT_ONLY:
                mask = F.max_pool2d(hint[:, 3:4], 10, stride=8, padding=1)  # (rows, 1, H, W) -> (rows, 1, h, w)
                x0 = x0 * mask + z * (1 - mask)
            else:
                x0 = x0 - box_blur(x0, radius) + box_blur(z, radius)
                if name == "tile_colorfix+sharp":
                    x0 = marks * x0 + (1 - marks) * (detail * box_blur(x0, radius) + (1 - detail) * x0)
            w = min(max(float(c.unit.weight), 0.0), 1.0)
            out = w * prediction_from_vp(x_in, x0, alpha_bar, kind) + (1 - w) * out
        return out

    @staticmethod
    def _settings(c: ResolvedControl, name: str) -> tuple[int, float]:
        """A colour fix's blur radius (threshold_a, twice that in a hires pass it acts in) and its sharpening weight
        (threshold_b / 100); (0, 0) for an inpaint unit."""
        if name not in COLOR_FIX:
            return 0, 0.0
        a, b = resolve_sliders(find_module(name), None, c.unit.threshold_a, c.unit.threshold_b)[1:]
        return int(a) * (2 if c.hires and c.acts else 1), b * 0.01


def first_noise(noise: torch.Tensor, controls: list[ResolvedControl], batch: range, model, tiled: bool = False):
    """The first pass's starting noise (b, c, h, w) with the last +lama unit's fill leaned into it (or as it is). The
    extension leans only the first batch of a batch count (its `noise_modifier` is spent there); every batch here."""
    lama = [c for c in controls if module_name(c) == LAMA]
    if not lama:
        return noise
    c = lama[-1]
    hint = c.hint if len(c.hint) == 1 else c.hint[batch.start : batch.stop]
    z = HintLatents(model, tiled).latent(0, c, hint).to(noise).expand_as(noise)
    return noised(z, noise, model.alphas_cumprod[-1].to(noise).expand(len(noise)))


def after_decode(images: torch.Tensor, controls: list[ResolvedControl], batch: range) -> torch.Tensor:
    """The last pass's decoded images (b, 3, H, W) in [0, 1] with the inpaint_only units' outside put back and the
    recolor units' lightness set, in unit order."""
    for c in controls:
        name = module_name(c)
        if name not in INPAINT_ONLY and name not in RECOLOR:
            continue
        hint = (c.hint if len(c.hint) == 1 else c.hint[batch.start : batch.stop]).float().cpu().numpy()
        fix = _outside_mask if name in INPAINT_ONLY else _recolored
        done = [fix(x, hint[min(i, len(hint) - 1)], name) for i, x in enumerate(images.float().cpu().numpy())]
        images = torch.from_numpy(np.stack(done)).to(images)
    return images


def _outside_mask(x: np.ndarray, rgba: np.ndarray, name: str) -> np.ndarray:
    """(3, H, W) image, (4, H, W) hint -> the image inside the softened mask, the control image outside."""
    square = np.ones((INPAINT_BLUR, INPAINT_BLUR), np.uint8)
    m = cv2.blur(cv2.dilate(rgba[3], square), (INPAINT_BLUR, INPAINT_BLUR))[None]
    return (m * x.clip(0, 1) + (1 - m) * rgba[:3]).clip(0, 1)


def _recolored(x: np.ndarray, hint: np.ndarray, name: str) -> np.ndarray:
    """(3, H, W) image, (3, H, W) map -> the image with its L (CIELAB) or V (HSV) the map's, through 8 bits."""
    to, back, channel = RECOLOR[name]
    feed = (hint[0] * 255).clip(0, 255).astype(np.uint8)
    y = cv2.cvtColor((x.transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8), to)
    y[:, :, channel] = feed
    return (cv2.cvtColor(y, back).astype(np.float32) / 255.0).transpose(2, 0, 1).clip(0, 1)
