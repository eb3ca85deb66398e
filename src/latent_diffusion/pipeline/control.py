"""Control units resolved against a pipeline: each `ControlUnit` of a request (request.py) becomes the model it names,
loaded once and kept, and its control map, made by its preprocessor at the size of each pass (`ResolvedControl`).
`control_hook.py` applies them while sampling.

Control model files are listed as the web UI's ControlNet extension lists them, "name [hash]" with the web UI's old
8-digit model hash, and a request may name one by that, by the name alone, or by its file's name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import legacy_model_hash
from ..models.controlnet import ControlNet
from ..models.ip_adapter import IPAdapter, attention_blocks
from ..models.ldm import LatentDiffusion
from ..models.lllite import ControlLLLite, check_lllite_fits, is_lllite_state_dict, lllite_from_state_dict
from ..models.style_adapter import StyleAdapter
from ..weights.controlnet import check_controlnet_fits, is_controlnet_state_dict, load_controlnet
from ..weights.ip_adapter import is_ip_adapter_state_dict, load_ip_adapter
from ..weights.reader import CheckpointError, first_line, read_state_dict, safetensors_index
from ..weights.t2i_adapter import is_t2i_adapter_state_dict, t2i_adapter_from_state_dict
from .control_images import control_map, pixel_perfect_resolution, prepare_control
from .control_modules import COLOR_FIX, INPAINT_ONLY, MODEL_FREE, PreprocessorError, Slider, find_module
from .face_analysis import identity
from .image_prompts import (
    REVISION_MODULES,
    STYLE_MODULE,
    TOWERS,
    ImagePromptError,
    check_ip_adapter_fits,
    check_revision_fits,
    check_style_adapter_fits,
    check_tower_fits,
    face_module,
    find_tower,
    identity_tokens,
    image_tokens,
    load_tower,
    revision_embedding,
    style_tokens,
    tower_name,
)
from .preprocessors import numpy_seed, resolve_sliders
from .reference import style_fidelity
from .request import CONTROL_MODES, RESIZE_MODES, UNION_TYPES, ControlUnit, RequestError, fail

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
SOFT_IN_HIRES = ("canny", "mlsd")  # the extension's preprocessors whose maps are soft-injected in the hires pass


@dataclass(frozen=True)
class ResolvedControl:
    """A unit of a plan: its settings, its model, and its control map at the pass's size."""

    unit: ControlUnit
    name: str  # as listed: "name [hash]"
    # a ControlNet, a T2I-Adapter, a ControlNet-LLLite, an IP-Adapter or a style adapter; None: a reference unit
    # (`reference.py`), or a revision unit (which has `image_tokens`)
    model: nn.Module | None
    hint: torch.Tensor  # (1 or n, 3, H, W) float32 in [0, 1] at the pass's pixel size (an inpaint module's: 4, RGBA)
    detected: tuple[np.ndarray, ...]  # the maps as shown (uint8, H×W×3 or ×4), for the API's answer
    maps: tuple  # (module, resize mode, map) as the preprocessor gave each, for a hires pass to fit again
    soft: bool  # the soft weights (the extension's soft injection): a control mode other than balanced, or forced
    conditional_only: bool  # the unconditional half of guidance gets no control ("ControlNet is more important")
    pooled: bool = False  # each residual its mean over the feature map, the conditional rows' alone (`pools`)
    acts: bool = True  # whether it acts in this pass (its hr_option, in a txt2img with the hires fix)
    hires: bool = False  # this pass is a txt2img's hires pass
    fidelity: float = 0.0  # a reference unit's style fidelity in this pass (`reference.style_fidelity`)
    seed: int = 0  # the request's first seed: a reference, colour fix or inpaint_only unit's draws (`HintLatents`)
    # What a unit that has an image tower gives (`image_prompts.py`), (for the prompt's rows, the unconditional rows),
    # one for all images or one per image as the maps: an IP-Adapter's and a style adapter's tokens (1 or n, T, C),
    # revision's embedding (1 or n, E)
    image_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    ignores_prompt: bool = False  # revision: the prompt's context zeroed while it acts
    context_unit: int | None = None  # InstantID's ControlNet: the unit whose IP-Adapter tokens are its context

    @property
    def revision(self) -> bool:
        """A revision unit: no model, a tower's embedding; it acts in both hires passes whatever its hr_option says,
        as in the extension."""
        return self.model is None and self.image_tokens is not None

    @property
    def ignores_hr_option(self) -> bool:
        """Acts whatever its hr_option says, as in the extension: a revision unit (in both passes), an LLLite (in the
        first pass only: no LLLite acts in a hires pass)."""
        return self.revision or isinstance(self.model, ControlLLLite)

    def rows(self, start: int, stop: int) -> ResolvedControl:
        """Images start..stop's maps or tokens (one for all stays one)."""
        rows = slice(start, stop)
        if self.image_tokens is not None and len(self.image_tokens[0]) > 1:
            return dataclasses.replace(self, image_tokens=tuple(t[rows] for t in self.image_tokens))
        if len(self.hint) == 1:
            return self
        return dataclasses.replace(self, hint=self.hint[rows], detected=self.detected[rows], maps=self.maps[rows])

    def key(self) -> tuple:
        """What two plans' units must share to run in one U-Net batch: everything but the images."""
        u = self.unit
        settings = (u.weight, u.guidance_start, u.guidance_end, u.control_mode, u.resize_mode, u.module)
        settings += (u.hr_option, u.advanced_weighting, self.soft, self.conditional_only, self.pooled, self.acts)
        module = find_module(u.module).name
        if module in COLOR_FIX:  # (a colour fix's radius and sharpness act while sampling, `control_fixes.py`)
            settings += (u.threshold_a, u.threshold_b)
        if u.region is not None:  # (one request's: a batch holds one)
            settings += (id(u.region),)
        settings += (u.union_type,)
        reference = self.model is None and not self.revision
        draws = reference or module in COLOR_FIX + INPAINT_ONLY  # (from the seed: `control_fixes.HintLatents`)
        settings += (self.seed if draws else None, self.fidelity if reference else None)  # (its style fidelity)
        tokens = None if self.image_tokens is None else tuple(t.shape[1:] for t in self.image_tokens)
        return (self.name, *settings, self.hint.shape[1:], tokens, self.ignores_prompt)


def find_control_models(folder: str | os.PathLike) -> dict[str, Path]:
    """The control model files in a folder and its subfolders, by the extension's listed name "stem [hash]"; {} for a
    folder that does not exist."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
    return {f"{p.stem} [{legacy_model_hash(p)}]": p for p in files if p.stem != "None"}


def find_model(name: str, models: dict[str, Path]) -> str | None:
    """A unit's model name -> its listed name: the listed name itself, the name without its hash, or the file's name
    (with or without its suffix, in any case); None where none matches."""
    if name in models:
        return name
    wanted = name.lower().rsplit(" [", 1)[0] if name.endswith("]") else name.lower()
    for listed, path in models.items():
        if wanted in (path.stem.lower(), path.name.lower()):
            return listed
    return None


@functools.lru_cache(maxsize=4)
def _load(path: Path, version: tuple, model: LatentDiffusion) -> nn.Module:
    """A control model file on the model's device in its dtype, kept by its path, modification time and size (and
    the model: a Control-LoRA file holds changes to its U-Net's weights)."""
    keys = safetensors_index(path) if path.suffix.lower() == ".safetensors" else read_state_dict(path)[0]
    if is_ip_adapter_state_dict(keys):
        return load_ip_adapter(path, device=model.device, dtype=model.dtype)
    if is_lllite_state_dict(keys):
        return lllite_from_state_dict(read_state_dict(path)[0]).to(model.device, model.dtype)
    if is_t2i_adapter_state_dict(keys) and not is_controlnet_state_dict(keys):  # (a union ControlNet's
        # task_embedding is also a CoAdapter fuser's mark)
        return t2i_adapter_from_state_dict(read_state_dict(path)[0], device=model.device, dtype=model.dtype, name=path)
    return load_controlnet(path, device=model.device, dtype=model.dtype, base=model)


def unload_control_models() -> None:
    """Forget the control models that `_load` keeps (training's sample images load a new file each time)."""
    _load.cache_clear()


def check_adapter_fits(adapter: nn.Module, cfg) -> None:
    """A T2I-Adapter's four features must have the widths of the U-Net's features where they are added: each level's
    (SD 1.x, 2.x), or SDXL's three levels' and its middle block's."""
    widths = [cfg.unet.model_channels * m for m in cfg.unet.channel_mult]
    sdxl = bool(cfg.micro_conditioning)
    expected = (*widths, widths[-1]) if sdxl else tuple(widths)
    if adapter.cfg.sdxl != sdxl or tuple(adapter.cfg.channels) != expected:
        kind = "SDXL's" if adapter.cfg.sdxl else "SD 1.x/2.x's"
        raise ValueError(
            f"a T2I-Adapter of {kind} layout with widths {list(adapter.cfg.channels)} does not fit this "
            f"{cfg.family.title} model's U-Net (widths {list(expected)})"
        )


def check_fits(control: nn.Module, model: LatentDiffusion) -> None:
    """ValueError (one line) where a control model does not fit the model's U-Net."""
    if isinstance(control, ControlNet):
        check_controlnet_fits(control, model.cfg)
    elif isinstance(control, IPAdapter):
        check_ip_adapter_fits(control, model.model.diffusion_model, model.cfg.unet.context_dim)
    elif isinstance(control, ControlLLLite):
        check_lllite_fits(control, model.model.diffusion_model)
    elif isinstance(control, StyleAdapter):
        check_style_adapter_fits(control, model.cfg.unet.context_dim)
    else:
        check_adapter_fits(control, model.cfg)


def load_control_model(path: Path, model: LatentDiffusion) -> nn.Module:
    """The control model in `path`, on the model's device in its dtype, checked to fit the model (RequestError in
    one line, naming the file, otherwise)."""
    try:
        stat = path.stat()
        control = _load(path, (stat.st_mtime_ns, stat.st_size), model)
        check_fits(control, model)
    except (OSError, CheckpointError, ValueError) as e:
        message = first_line(e).replace(f"{path}: ", "").replace(str(path), path.name)  # (no paths in an answer)
        fail(f"control model {path.name}: {message}")
    return control


def resolve_controls(
    units: list[ControlUnit], pipeline, size: tuple[int, int], seeds: list[int], no_prompt: bool = False, final=None
):
    """The request's units for a pass that draws `size` (height, width) pixels -> [ResolvedControl] (RequestError for
    a model the pipeline does not have, or an image its preprocessor cannot use). `no_prompt`: the request's prompts
    and negative prompts are all empty (revision then ignores them, as the extension); `final`: the last pass's size
    (a hires pass's; default `size`), which +lama's outpainting fits to."""
    resolved = []
    for k, unit in enumerate(units):
        title = unit.title or f"ControlNet unit {k}"
        listed, control = _unit_model(unit, title, pipeline)
        _check_unit(unit, title, control)
        if isinstance(control, (IPAdapter, StyleAdapter)) or unit.module in REVISION_MODULES:
            resolved.append(_image_prompt_unit(unit, title, listed, control, pipeline, (seeds[0], size), no_prompt))
            continue
        maps = []
        for i, image in enumerate(unit.image):
            mask = None if unit.mask is None else unit.mask[min(i, len(unit.mask) - 1)]
            try:
                maps.append(
                    control_map(
                        _uint8(image),
                        unit.module,
                        size=size,
                        resize_mode=RESIZE_MODES[unit.resize_mode],
                        processor_res=unit.processor_res,
                        threshold_a=unit.threshold_a,
                        threshold_b=unit.threshold_b,
                        pixel_perfect=unit.pixel_perfect,
                        mask=None if mask is None else _uint8(mask)[..., 0],
                        seed=numpy_seed(seeds[0], -1, seeds[0]),  # (shuffle's; the extension's, once a request)
                        annotator_folder=pipeline.annotators,
                        final_size=final,
                    )
                )
            except PreprocessorError as e:
                fail(f"{title}: {e}")
        unit_control = ResolvedControl(
            unit,
            listed,
            control,
            torch.empty(0),
            (),
            tuple(maps),
            soft=unit.control_mode != "balanced",
            conditional_only=unit.control_mode == "control",
            pooled=control is not None and pools(control, pipeline.controlnets[listed]),
            fidelity=_fidelity(unit, pipeline.model, hires=False),
            seed=seeds[0],
            context_unit=_instant_id_context(resolved, listed, control, title),
        )
        resolved.append(fitted(unit_control, size))
    references = any(c.model is None and not c.revision for c in resolved)
    if references and any(isinstance(c.model, ControlLLLite) for c in resolved):  # (the extension fails inside)
        fail(
            "a reference unit and a ControlNet-LLLite unit cannot run together: the reference pass's attention would "
            "feed the LLLite modules its bank's places"
        )
    return resolved


def _instant_id_context(resolved: list[ResolvedControl], listed: str, control, title: str) -> int | None:
    """InstantID's ControlNet (its file's name says "instant_id", as the extension tells it) reads the InstantID
    IP-Adapter's tokens as its context, not the prompt's: that adapter's unit must come just before it."""
    if not isinstance(control, ControlNet) or "instant_id" not in listed.lower():
        return None
    before = resolved[-1] if resolved else None
    if before is None or not isinstance(before.model, IPAdapter) or before.model.cfg.kind != "instantid":
        fail(f"{title}: an InstantID ControlNet reads the face's tokens of an InstantID IP-Adapter unit just before it")
    return len(resolved) - 1


def _image_prompt_unit(
    unit: ControlUnit, title: str, listed: str, adapter, pipeline, seed_and_size: tuple, no_prompt: bool
) -> ResolvedControl:
    """A unit whose images go through a CLIP image tower (`image_prompts.py`): an IP-Adapter's or a style adapter's
    tokens, or revision's embedding (adapter None); no map. `seed_and_size`: the request's first seed (revision's
    noise) and the pass's size (pixel perfect, for InstantID's face)."""
    seed, size = seed_and_size
    model, found = pipeline.model, find_module(unit.module)
    module = found.name
    if unit.advanced_weighting is not None:  # (an IP-Adapter's: one weight per block of cross-attention)
        if not isinstance(adapter, IPAdapter):
            fail(f"{title}: advanced_weighting does not apply to style adapter or revision units; give a weight")
        blocks = 1 + max(attention_blocks(model.model.diffusion_model))
        if len(unit.advanced_weighting) != blocks:
            fail(
                f"{title}: an IP-Adapter's advanced_weighting takes one weight per U-Net block with cross-attention: "
                f"{blocks} for this model, not {len(unit.advanced_weighting)}"
            )
    try:
        images = [_uint8(image[0] if isinstance(unit.image, tuple) else image) for image in unit.image]
        masks = None
        if isinstance(unit.mask, tuple):  # (H, W) uint8, 255 where painted, or None
            masks = [None if m is None else _uint8(m[0])[..., 0] for m in unit.mask]
        elif unit.mask is not None:
            masks = [_uint8(unit.mask[min(i, len(unit.mask) - 1)])[..., 0] for i in range(len(unit.image))]
        if isinstance(adapter, IPAdapter) and adapter.takes_identity:  # (InsightFace's identities)
            return _face_unit(unit, listed, adapter, (module, size), pipeline, images, masks)
        name = tower_name(module, listed) if isinstance(adapter, IPAdapter) else _other_tower(module, model, adapter)
        tower = load_tower(find_tower(pipeline.clip_vision, name), model.device)
        if isinstance(adapter, IPAdapter):
            check_tower_fits(adapter, tower, name)
            tokens = image_tokens(adapter, tower, images, masks)
        elif isinstance(adapter, StyleAdapter):
            tokens = style_tokens(adapter, tower, images, masks)
        else:
            noise = resolve_sliders(found, None, unit.threshold_a, None, strict=True)[1]
            embedding = revision_embedding(tower, images, masks, noise, torch.Generator().manual_seed(seed))
            check_revision_fits(embedding, model)
            tokens = (embedding.to(model.dtype), torch.zeros_like(embedding, dtype=model.dtype))
    except (ImagePromptError, PreprocessorError) as e:
        fail(f"{title}: {e}")
    hint = torch.empty(1, 0, 0, 0)  # (no map: nothing to batch or fit)
    ignores = module == "revision_ignore_prompt" or (adapter is None and no_prompt)
    control = ResolvedControl(unit, listed, adapter, hint, (), (), soft=False, conditional_only=False)
    return dataclasses.replace(control, image_tokens=tokens, ignores_prompt=ignores)


def _face_unit(unit, listed: str, adapter: IPAdapter, module_and_size, pipeline, images, masks) -> ResolvedControl:
    """An IP-Adapter unit whose tokens come from its faces' identities (FaceID, InstantID; FaceID plus with clip_h's
    states of its images too); ImagePromptError or PreprocessorError where it cannot run. InstantID finds the face at
    the processor resolution, or pixel perfect's for the pass's size (of the first image, as the extension)."""
    module, (h, w) = module_and_size
    face = find_module(face_module(adapter, module))
    res = resolve_sliders(face, None if unit.pixel_perfect else unit.processor_res, None, None, strict=True)[0]
    if unit.pixel_perfect:
        res = pixel_perfect_resolution(images[0].shape[:2], h, w, RESIZE_MODES[unit.resize_mode])
    identities = [identity(face, pipeline.annotators, image, res) for image in images]
    tower = None
    if adapter.cfg.kind == "faceid_plus":  # (the extension's face_id_plus runs clip_h)
        tower = load_tower(find_tower(pipeline.clip_vision, "clip_h"), pipeline.model.device)
        check_tower_fits(adapter, tower, "clip_h")
    tokens = identity_tokens(adapter, identities, tower, images, masks)
    control = ResolvedControl(unit, listed, adapter, torch.empty(1, 0, 0, 0), (), (), False, False)
    return dataclasses.replace(control, image_tokens=tokens)


def check_fits_hires(c: ResolvedControl, model: LatentDiffusion, k: int) -> None:
    """Unit k, where it acts in the hires pass, must fit that pass's model, a checkpoint of its own (RequestError
    naming the unit)."""
    title = c.unit.title or f"ControlNet unit {k}"
    if not (c.acts or c.revision) or (c.model is None and not c.revision) or isinstance(c.model, ControlLLLite):
        return  # (no LLLite acts in a hires pass)
    try:
        if c.revision:
            if not model.cfg.micro_conditioning:
                raise ValueError(f"revision only supports SDXL, not the hires checkpoint's {model.cfg.family.title}")
            check_revision_fits(c.image_tokens[0], model)
        else:
            check_fits(c.model, model)
    except ValueError as e:  # (ImagePromptError is one)
        way_out = "" if c.revision else ' (hr_option "low" keeps the unit out of it)'
        fail(f"{title}: in the hires pass: {first_line(e)}{way_out}")


def _check_unit(unit: ControlUnit, title: str, control: nn.Module | None) -> None:
    """What a unit's model decides of its settings: which take a region mask, several images, an RGBA map, a kind."""
    if unit.region is not None and (control is None or isinstance(control, (StyleAdapter, ControlLLLite))):
        fail(f"{title}: a region mask applies to ControlNet, T2I-Adapter and IP-Adapter units only")
    if isinstance(control, ControlLLLite) and find_module(unit.module).is_inpaint:
        fail(f"{title}: a ControlNet-LLLite takes an RGB map, not the inpaint modules' RGBA")
    if isinstance(unit.image, tuple) and not isinstance(control, IPAdapter):
        fail(f"{title}: several images of their own sizes are an IP-Adapter unit's inputs; give one image")
    _check_union_type(unit, title, control)


def _check_union_type(unit: ControlUnit, title: str, control) -> None:
    """A union ControlNet's kind must be one its file has (the first six, OpenPose .. Segmentation, in xinsir's first
    model; all eight in ProMax); other control models ignore the kind, as the extension does."""
    union = control.union if isinstance(control, ControlNet) else None
    if union is not None and unit.union_type is not None and UNION_TYPES.index(unit.union_type) >= union.types:
        kinds = ", ".join(UNION_TYPES[: union.types])
        fail(
            f"{title}: this union ControlNet knows {union.types} kinds of control image ({kinds}), not {unit.union_type}"
        )


def _other_tower(module: str, model: LatentDiffusion, adapter) -> str:
    """The tower of a style adapter's unit or a revision unit (ImagePromptError for a module of another kind)."""
    wanted = (STYLE_MODULE,) if isinstance(adapter, StyleAdapter) else REVISION_MODULES
    if module not in wanted:
        kind = "a T2I style adapter" if adapter is not None else "revision"
        raise ImagePromptError(f"{kind} needs the module {' or '.join(wanted)}, not {module!r}")
    if adapter is None and not model.cfg.micro_conditioning:
        raise ImagePromptError(f"revision only supports SDXL, not this {model.cfg.family.title} model")
    return TOWERS[module]


def _unit_model(unit: ControlUnit, title: str, pipeline) -> tuple[str, nn.Module | None]:
    """(its listed name, the control model loaded) of a unit; ("None", None) for a reference or revision unit, which
    needs none."""
    if unit.module in MODEL_FREE:
        return "None", None
    listed = find_model(unit.model, pipeline.controlnets)
    if listed is None:
        known = ", ".join(pipeline.controlnets) or "none: give a folder with --controlnet-dir"
        fail(f"{title}: no control model {unit.model!r} here; these are: {known}")
    try:
        return listed, load_control_model(pipeline.controlnets[listed], pipeline.model)
    except RequestError as e:
        fail(f"{title}: {e}")


def _fidelity(unit: ControlUnit, model: LatentDiffusion, hires: bool) -> float:
    return style_fidelity(unit.threshold_a, unit.control_mode, bool(model.cfg.micro_conditioning), hires)


def pools(control: nn.Module, path: Path) -> bool:
    """Whether a ControlNet's residuals are pooled, as the extension decides it (`controlnet_model_guess.py`): an SD 1.x
    or 2.x ControlNet whose file name says "shuffle" (control_v11e_sd15_shuffle, trained with global average pooling;
    its yaml's `global_average_pooling`). SDXL ControlNets and T2I-Adapters never are."""
    return isinstance(control, ControlNet) and not control.cfg.adm_in_channels and "shuffle" in path.stem.lower()


def fitted(
    control: ResolvedControl, size: tuple[int, int], hires_model: LatentDiffusion | None = None
) -> ResolvedControl:
    """The unit with its maps fitted to a pass of `size` (height, width) pixels; in a hires pass (`hires_model`: the
    model of that pass) canny's and mlsd's are soft-injected, and a reference unit's style fidelity is 0, as the
    extension does."""
    hires = hires_model is not None
    if control.image_tokens is not None:
        return control
    hints, shown = zip(*(prepare_control(found, module, mode, *size) for module, mode, found in control.maps))
    soft = control.soft or (hires and any(name in control.unit.module for name in SOFT_IN_HIRES))
    fidelity = _fidelity(control.unit, hires_model, hires=True) if hires else control.fidelity
    return dataclasses.replace(
        control, hint=torch.cat(hints), detected=shown, soft=soft, fidelity=fidelity, hires=hires
    )


def _uint8(image: torch.Tensor) -> np.ndarray:
    """(c, H, W) in [0, 1] -> (H, W, c) uint8, rounded as PIL's conversions round."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def merged_controls(parts: list[list[ResolvedControl]], counts: list[int]) -> list[ResolvedControl]:
    """The units of plans run as one batch (their keys equal): each unit's maps (or tokens), one per image, in order."""
    merged = []
    for units in zip(*parts):
        if units[0].image_tokens is not None:  # (tokens for all: n times)
            rows = [(u.image_tokens, n if len(u.image_tokens[0]) == 1 else 1) for u, n in zip(units, counts)]
            tokens = tuple(torch.cat([t[i].expand(n * len(t[i]), *t[i].shape[1:]) for t, n in rows]) for i in (0, 1))
            merged.append(dataclasses.replace(units[0], image_tokens=tokens))
            continue
        rows = [(u, n if len(u.hint) == 1 else 1) for u, n in zip(units, counts)]  # (a map for all: n times)
        merged.append(
            dataclasses.replace(
                units[0],
                hint=torch.cat([u.hint.expand(n * len(u.hint), -1, -1, -1) for u, n in rows]),
                detected=tuple(d for u, n in rows for d in u.detected * n),
                maps=tuple(m for u, n in rows for m in u.maps * n),
            )
        )
    return merged


def control_fields(controls: list[ResolvedControl]) -> dict:
    """The extension's infotext fields, `ControlNet k: "Module: ..., Model: ..., Weight: 1.0, ..."` per unit, as its
    `ControlNetUnit.serialize` writes them (`internal_controlnet/args.py`, 1.1.455): the fields of its
    `infotext_fields()` in that order, each `str()` of the value its pydantic model holds, enums by label. So the
    floats are floats ("Weight: 1.0"), the resolution a whole number, and a slider's value is the request's where it
    is within the module's range, else the slider's default as the extension declares it ("Threshold A: 100" for
    canny; an out-of-range value is replaced silently, `bound_check_params`). The model is its listed name."""
    fields = {}
    for k, c in enumerate(controls):
        u = c.unit
        module = find_module(u.module)
        values = {
            "Module": u.module,
            "Model": c.name,
            "Weight": float(u.weight),
            "Resize Mode": RESIZE_MODES[u.resize_mode],
            "Processor Res": _slider_shown(module.resolution, u.processor_res, int),
            "Threshold A": _slider_shown(module.threshold_a, u.threshold_a, float),
            "Threshold B": _slider_shown(module.threshold_b, u.threshold_b, float),
            "Guidance Start": float(u.guidance_start),
            "Guidance End": float(u.guidance_end),
            "Pixel Perfect": u.pixel_perfect,
            "Control Mode": CONTROL_MODES[u.control_mode],
        }
        fields[f"ControlNet {k}"] = ", ".join(f"{name}: {value}" for name, value in values.items())
    return fields


def _slider_shown(slider: Slider, value: float | None, kind: type):
    """A slider's value as the extension's unit holds it after its bound check: the request's (as its field's type)
    where given and in range, else the slider's declared default."""
    if value is None or value == -1 or not slider.minimum <= value <= slider.maximum:
        return slider.value
    return kind(value)
