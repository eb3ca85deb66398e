"""Control units applied while sampling, as the web UI's ControlNet extension applies them (its `hook.py`): at every
U-Net evaluation each unit whose guidance window holds the current step runs on the same input, timestep, text and
vector conditioning as the U-Net, and what the units give is summed into the `ControlResiduals` the U-Net adds.

Per unit, with w its weight:
- A ControlNet's outputs (one per input block, then the middle block's) are scaled by w ("Balanced"), or by the soft
  weights w·0.825^(12−i), i = 0..12, cut to the outputs there are (SDXL's 10 take the first 10), when the control
  mode is not balanced (and in a hires pass for canny and mlsd maps). An inpainting U-Net's extra input channels
  are not the ControlNet's: it sees the first 4.
- A T2I-Adapter's features are scaled by w, or softly by w·(0.25, 0.62, 0.825, 1).
- "ControlNet is more important" gives the unconditional rows of guidance no control (the extension's cond_mark;
  lllyasviel's guess mode). The rows' marks and maps are conditioning fields, batched as the text is (denoiser.py).
- Advanced weighting (a list of scales, one per residual in order) replaces w and the soft weights; the residuals
  past the list's end get none.
- A region mask (the extension's effective_region_mask) multiplies each residual (an IP-Adapter's attention output)
  by the mask resized to it, bilinear: the unit acts only where the mask is white.
- A union ControlNet (xinsir's ControlNet++) is told the unit's kind of control image (`union_type`), or none.
- The shuffle ControlNet's global average pooling (`control.pools`): its residuals, the conditional rows' alone,
  scaled, then each its mean over the feature map, which the U-Net adds at every place.
- hr_option: in a txt2img with the hires fix a unit acts in the first pass, the second, or both (`acts`); a
  revision unit in both whatever it says, as in the extension.
- An IP-Adapter's image tokens, cond · m + uncond · (1 − m) per row (m: the row's mark), are attended to by every
  cross-attention at w (`image_prompts.py`), or at its block's weight where the unit has advanced weighting (one per
  block with cross-attention, `ip_adapter.attention_blocks`); the control mode does not apply to it.
- A style adapter's tokens, times w · m, are appended to the context; a revision unit's embedding, Σ w · e · m over
  the revision units acting, replaces SDXL's pooled text in the vector, and revision_ignore_prompt zeroes the context
  (`_image_conditioning`). Both happen first: the ControlNets see the result, as in the extension.
- A ControlNet-LLLite unit adds w times its modules' terms to the inputs of the attention projections they name
  (`models/lllite.py`); in no hires pass, as the extension.
- A reference unit (no model) runs its reference image through the U-Net before each evaluation it acts in, and the
  U-Net's attention and norms read what that left (`reference.py`).
- An inpaint module's map is RGBA: a control model sees -1 in the masked pixels (`inpaint_protocol`).
- The tile colour fixes and inpaint_only(+lama) change the U-Net's output after it (`control_fixes.py`).
- The window: the unit acts while start ≤ s/N ≤ end, where N is the pass's steps and s is the web UI's
  `state.sampling_step` as the extension reads it: the index of the step whose callback ran last, 0 before any.
  k-diffusion's samplers call back after a step's first evaluation (`SamplingClock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..models.controlnet import ControlNet
from ..models.ip_adapter import IPAdapter, image_prompted
from ..models.ldm import LatentDiffusion
from ..models.lllite import ControlLLLite, lllite_applied
from ..models.t2i_adapter import t2i_residuals
from ..models.unet import ControlResiduals
from .control import ResolvedControl
from .control_fixes import HintLatents, PredictionFixes
from .control_images import inpaint_protocol
from .reference import MODULES as REFERENCE_MODULES
from .reference import Banks, hooked, reference_pass
from .request import UNION_TYPES

MARK = "control_mark"  # conditioning field: (rows,) 1 for the rows of a prompt, 0 for the unconditional rows
T2I_SOFT = (0.25, 0.62, 0.825, 1.0)


def hint_field(k: int) -> str:
    """The conditioning field of unit k's control map, one row per U-Net row."""
    return f"control_hint_{k}"


def token_fields(k: int) -> tuple[str, str]:
    """The conditioning fields of a tower unit k's tokens, for a prompt's rows and for the unconditional ones, one row
    per U-Net row."""
    return f"control_tokens_{k}", f"control_uncond_tokens_{k}"


class SamplingClock:
    """The web UI's `state.sampling_step` at each model evaluation. Its samplers' callback (which sets it to i) comes
    after step i's first evaluation; ours comes at the end of the step. So the first evaluation of step i sees i − 1
    (0 for the first step) and the later ones of a second-order step see i."""

    def __init__(self, total: int):
        self.total = total  # the web UI's `state.sampling_steps`: the steps the pass runs
        self.done = 0  # steps finished
        self.evaluations = 0  # model evaluations in the current step so far
        self.fraction = 0.0  # s/N at the current evaluation, which the extension compares with a unit's window

    def counting(self, denoiser: Callable) -> Callable:
        """The denoiser, each call to it one model evaluation (a guided one may call the U-Net twice)."""

        def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            step = max(self.done - 1, 0) if self.evaluations == 0 else self.done
            self.fraction = step / self.total
            self.evaluations += 1
            return denoiser(x, sigma)

        return counted

    def step_done(self, *_) -> None:
        self.done += 1
        self.evaluations = 0


def control_conditioning(controls: list[ResolvedControl], batch: range, device: torch.device) -> dict:
    """The batch's control maps (a tower unit's tokens) as conditioning fields on the device, one row per image (one
    for all images repeated, no copy): batched as the text is, so that requests with different images share a batch."""
    fields = {}
    for k, c in enumerate(controls):
        named = zip(token_fields(k), c.image_tokens) if c.image_tokens is not None else [(hint_field(k), c.hint)]
        for field, t in named:
            t = t if len(t) == 1 else t[batch.start : batch.stop]
            fields[field] = t.to(device).expand(len(batch), *t.shape[1:])
    return fields


def controlled_unet(
    model: LatentDiffusion, controls: list[ResolvedControl], clock: SamplingClock, tiled: bool = False
) -> Callable[[torch.Tensor, torch.Tensor, Mapping], torch.Tensor]:
    """The model's U-Net with the units' residuals: net(x_in, t, cond) -> ε or v (float32), cond holding the text
    conditioning, the control maps (`hint_field`), the tower units' tokens (`token_fields`) and the rows' marks
    (`MARK`); `tiled`: the control images are encoded in tiles, as the request's images are."""
    adapted: dict[tuple, tuple] = {}  # a T2I-Adapter's features by unit and map, an LLLite's embeddings (`lllite.py`)
    latents = HintLatents(model, tiled)  # a reference unit's z₀ and its draws (`reference.py`), a colour fix's z
    fixes = PredictionFixes(model, controls, latents)

    def net(x_in: torch.Tensor, t: torch.Tensor, cond: Mapping) -> torch.Tensor:
        cond = dict(cond)
        marks = cond.pop(MARK).to(x_in.device, torch.float32)[:, None, None, None]  # (rows, 1, 1, 1)
        hints = [cond.pop(hint_field(k), None) for k in range(len(controls))]
        tokens = [tuple(cond.pop(name, None) for name in token_fields(k)) for k in range(len(controls))]
        fraction = clock.fraction
        x = x_in.to(model.dtype)
        acting = [
            (c.acts or c.ignores_hr_option) and c.unit.guidance_start <= fraction <= c.unit.guidance_end
            for c in controls
        ]
        # the style and revision units acting now: they change the text conditioning first
        changing = [
            on and c.image_tokens is not None and not isinstance(c.model, IPAdapter) for c, on in zip(controls, acting)
        ]
        cond = _image_conditioning(
            [(c, t) for c, t, ch in zip(controls, tokens, changing) if ch], controls, cond, marks
        )
        total, references, prompts, lllites = None, [], [], []
        for k, (c, hint, on) in enumerate(zip(controls, hints, acting)):
            if not on:
                continue
            if c.image_tokens is not None:
                w = c.unit.advanced_weighting or c.unit.weight  # (per block, replacing the weight, as the extension)
                if isinstance(c.model, IPAdapter) and any(w if isinstance(w, tuple) else (w,)):
                    region = None if c.unit.region is None else (c.unit.region.to(x.device), x.shape[-2:])
                    prompts.append((c.model, _row_tokens(*tokens[k], marks), w, region))
                continue
            hint = _cast(adapted, k, hint, x.device, model.dtype)
            if c.model is None:
                references.append((c, latents.latent(k, c, hint), latents.generator(k, c)))
                continue
            if isinstance(c.model, ControlLLLite):  # (none in a hires pass, as the extension)
                lllites += [] if c.hires else [(c.model, hint, c.unit.weight)]
                continue
            if isinstance(c.model, ControlNet):
                residuals = _controlnet(c, x, hint, t, cond, marks, tokens)
            else:
                if (k, id(hint)) not in adapted:  # (the features depend on the map alone; the map is kept alive)
                    adapted[k, id(hint)] = (hint, c.model(inpaint_protocol(hint)))
                residuals = _t2i_adapter(c, adapted[k, id(hint)][1], marks, model)
            total = residuals if total is None else total + residuals
        if total is not None:
            cond["control"] = total
        cond = fixes.inpaint_concat(cond, hints)  # (an inpainting U-Net with an inpaint unit)
        with _shadowing(model.model.diffusion_model, prompts, lllites, x.shape[-2:], adapted):
            out = _with_references(model, references, x, t, cond, marks)
        return fixes(out, x_in, t, hints, marks)

    return net


@contextlib.contextmanager
def _shadowing(unet, prompts: list, lllites: list, latent: tuple[int, int], cache: dict):
    """The U-Net's attention with the IP-Adapters' image prompts and the LLLite units' terms while this lasts."""
    with contextlib.ExitStack() as stack:
        if prompts:
            stack.enter_context(image_prompted(unet, prompts))
        if lllites:
            stack.enter_context(lllite_applied(unet, lllites, latent, cache))
        yield


def _cast(cache: dict, k: int, hint: torch.Tensor, device, dtype) -> torch.Tensor:
    """Unit k's map field (the same tensor all the pass) on the device in the model's dtype, cast once a pass, so that
    the caches keyed by the map's identity (a T2I-Adapter's features, an LLLite's embeddings) keep hitting."""
    if ("cast", k, id(hint)) not in cache:
        cache["cast", k, id(hint)] = (hint, hint.to(device, dtype))
    return cache["cast", k, id(hint)][1]


def _with_references(model: LatentDiffusion, references: list, x, t, cond, marks) -> torch.Tensor:
    """The U-Net's output, after each reference unit's write pass where there are any."""
    if not references:
        return model.model(x, t, cond).float()
    banks = Banks(uc_rows=marks.flatten() == 0)
    with hooked(model, banks):
        for c, latent, generator in references:
            attention, adain = REFERENCE_MODULES[c.unit.module]
            unit = (c.unit.weight, c.fidelity, attention, adain)
            reference_pass(model, banks, latent, t, cond, unit, generator)
        return model.model(x, t, cond).float()


def _row_tokens(tokens: torch.Tensor, uncond: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """A tower unit's tokens for each row (rows, T, C) (revision's embedding: (rows, E)) from its fields: its images'
    on a prompt's rows, "no image"'s on the unconditional rows of guidance (zeros but for an IP-Adapter's)."""
    m = marks.view(-1, *[1] * (tokens.dim() - 1)).to(tokens.dtype)  # (rows, 1, 1) or (rows, 1)
    return tokens * m + uncond * (1 - m)


def _image_conditioning(units: list[tuple], controls: list[ResolvedControl], cond: dict, marks) -> dict:
    """The text conditioning as the style adapters and revision units acting now change it, before any ControlNet
    sees it, as the extension's hook does:
    - revision: the pooled text's place in SDXL's vector (its first E numbers) replaced by Σ w · embedding on a
      prompt's rows and by 0 on the unconditional rows; the whole context zeroed where any revision unit of the
      request ignores the prompt (revision_ignore_prompt; every revision unit when prompt and negative are empty);
    - a style adapter: w · its tokens appended after the context (zeros on the unconditional rows), in unit order."""
    revisions = [(c, t) for c, t in units if c.revision]  # (unit, its token fields)
    if revisions:
        y = sum(c.unit.weight * _row_tokens(*t, marks) for c, t in revisions)  # (rows, E)
        vector = cond["vector"].clone()
        vector[:, : y.shape[1]] = y.to(vector.dtype)
        cond["vector"] = vector
        if any(c.ignores_prompt for c in controls):
            cond["crossattn"] = torch.zeros_like(cond["crossattn"])
    styles = [c.unit.weight * _row_tokens(*t, marks) for c, t in units if not c.revision]
    if styles:
        context = cond["crossattn"]
        cond["crossattn"] = torch.cat([context, *(s.to(context.dtype) for s in styles)], dim=1)
    return cond


def _controlnet(c: ResolvedControl, x, hint, t, cond, marks, tokens: list) -> ControlResiduals:
    """One ControlNet's residuals for these rows, scaled as the extension scales them. Its context is the prompt's,
    or InstantID's face tokens for its ControlNet (`context_unit`: that unit's tokens, on the unconditional rows the
    tokens of no face, as the extension's `control_context_override`)."""
    cn: ControlNet = c.model
    kind = None if c.unit.union_type is None else UNION_TYPES.index(c.unit.union_type)  # (a union ControlNet's)
    context = cond.get("crossattn")
    if c.context_unit is not None:
        context = _row_tokens(*tokens[c.context_unit], marks).to(x.dtype)  # (rows, T, C)
    out = cn(x[:, : cn.cfg.in_channels], inpaint_protocol(hint), t, context, cond.get("vector"), kind)
    outputs = [*out.skips, out.middle]
    w = c.unit.weight
    n = len(outputs)
    scales = [w * 0.825 ** float(12 - i) for i in range(max(n, 13))][:n] if c.soft else [w] * n
    outputs = [o * s * (marks if c.conditional_only or c.pooled else 1) for o, s in zip(outputs, _weighted(c, scales))]
    region = None if c.unit.region is None else c.unit.region.to(x.device, x.dtype)
    outputs = [_in_region(o, region) for o in outputs]
    if c.pooled:  # (b, C, 1, 1): `unet.add_residual` adds it at every place
        outputs = [o.mean(dim=(2, 3), keepdim=True) for o in outputs]
    return ControlResiduals(skips=outputs[:-1], middle=outputs[-1])


def _weighted(c: ResolvedControl, scales: list[float]) -> list[float]:
    """The residuals' scales: the unit's advanced weighting in their place where it has one (0 past its end)."""
    weights = c.unit.advanced_weighting
    return scales if weights is None else [*weights, *[0.0] * len(scales)][: len(scales)]


def _t2i_adapter(c: ResolvedControl, features: list[torch.Tensor], marks, model: LatentDiffusion) -> ControlResiduals:
    """One T2I-Adapter's features, scaled, placed where the extension adds them."""
    w = c.unit.weight
    scales = _weighted(c, [w * s for s in T2I_SOFT] if c.soft else [w] * len(features))
    region = None if c.unit.region is None else c.unit.region.to(features[0].device, features[0].dtype)
    scaled = [_in_region(f * (marks if c.conditional_only else 1), region) for f in features]
    sdxl, blocks = bool(model.cfg.micro_conditioning), model.cfg.unet.num_res_blocks
    return t2i_residuals(scaled, scales, sdxl=sdxl, num_res_blocks=blocks)


def _in_region(x: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """A residual (b, C, h, w) times the unit's region mask (1, 1, H, W) resized to it, bilinear (the extension's
    `apply_effective_region_mask`); as it is without one."""
    if region is None:
        return x
    return x * F.interpolate(region, size=x.shape[-2:], mode="bilinear")
