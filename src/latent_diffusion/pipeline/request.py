"""A generation request, the checks that need no model, and its result: the layer every front end builds on.

The command line parses flags into a `GenerationRequest`, the server builds the same request from JSON; both call
`validate` before any work, `plan.resolve` against the loaded pipeline, and `generate.generate_plan` to run it
(`generate.generate` does both), and get a `GenerationResult` back: the images, each image's infotext (the web UI's
`parameters` text) and the warnings, as data.
Image i of a request is drawn from seed `seeds[i]` alone, whatever the batch size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..prompts.syntax import extract_lora_tags, parse_emphasis, prompt_schedule, split_and
from ..sampling.noise_schedule import SPACINGS
from ..sampling.samplers import SAMPLERS, get_sampler
from ..sampling.sigma_schedules import SCHEDULERS, find_scheduler

MAX_SIDE = 8192  # pixels per side; larger requests are refused before anything is allocated
MAX_STEPS = 10_000  # sampling steps; the σ schedules are allocated before the first step
# Beyond these the latents overflow to inf or NaN (found by feeding extremes to the server); the web UI's sliders
# stop far below them (CFG 30, η 1, emphasis 1.1^k for a few brackets).
MAX_CFG_SCALE = 100.0
MAX_NOISE = 10.0  # η and s_noise
MAX_EMPHASIS = 1000.0  # the magnitude of a token's emphasis weight
# img2img's step counts: the web UI's, int(min(strength, 0.999) × steps) + 1 of a schedule of `steps` (its
# `setup_img2img_steps`); "fixed", its "img2img_fix_steps" option and its hires pass: exactly `steps` of a schedule
# of int(steps / min(strength, 0.999)); diffusers': int(steps × strength) of a schedule of `steps`
STEP_COUNTS = ("web_ui", "fixed", "diffusers")
MAX_HIRES_SCALE = 8.0  # the web UI's slider reaches 4
MAX_LORA_WEIGHT = 100.0  # the magnitude of a <lora:name:weight> (the web UI's slider reaches ±2; people use up to 10)
# A control unit's modes, by our name and the ControlNet extension's label (its `ControlMode` and `ResizeMode`)
CONTROL_MODES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
}
RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
# Which passes of txt2img's hires fix a unit acts in (the extension's `HiResFixOption`; without the fix: every pass)
HR_OPTIONS = {"both": "Both", "low": "Low res only", "high": "High res only"}
# A union ControlNet's kinds of control image, by the extension's labels (`ControlNetUnionControlType`), in index order
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
MAX_UNIT_INPUTS = 16  # an IP-Adapter unit's images of their own sizes, averaged
MAX_ADVANCED_WEIGHTS = 64  # advanced weighting: a ControlNet has 13 residuals, a T2I-Adapter 4; more are ignored
# Inpainting: what the masked part of the image latent starts as, where not the image's own (the web UI's "Masked
# content" latent noise and latent nothing; its "fill" is done on the pixels before, `masking.fill_masked`)
LATENT_FILLS = ("noise", "nothing")
MAX_CONTROL_WEIGHT = 10.0  # the extension's slider reaches 2


class RequestError(ValueError):
    """A request that cannot be run as given; the message names the field and the problem."""


@dataclass(frozen=True)
class HiresFix:
    """The web UI's hires fix (txt2img's `enable_hr`): the first pass's image enlarged, then a second pass of img2img
    over it (`hires.py`). None in a field: the first pass's setting."""

    scale: float = 2.0  # hr_scale, where resize_x and resize_y are both 0
    resize_x: int = 0  # hr_resize_x, hr_resize_y: a target size (one of them 0: the other side keeps the aspect)
    resize_y: int = 0
    upscaler: str | None = None  # a latent mode ("Latent", "Latent (bicubic)", ...) or an image upscaler; None: Latent
    steps: int = 0  # hr_second_pass_steps; 0: the first pass's
    strength: float = 0.7  # denoising_strength of the second pass
    sampler: str | None = None
    scheduler: str | None = None
    prompt: str | None = None  # for every image; None: each image's own prompt
    negative_prompt: str | None = None
    cfg_scale: float | None = None  # hr_cfg (Forge's)


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet or T2I-Adapter unit, as the web UI's ControlNet extension's (`control.py` resolves it): a model
    of the pipeline's, an image that a preprocessor (`module`) turns into the control map, and how strongly and when
    the map steers the U-Net."""

    model: str  # a control model of the pipeline's, by name
    # (1 or b, 3, H, W) in [0, 1]: one for all images, or one per image; an IP-Adapter unit's inputs may also be a tuple
    # of (1, 3, H, W) images of their own sizes (its tokens the mean of theirs, the extension's multiple inputs)
    image: torch.Tensor | tuple[torch.Tensor, ...]
    module: str = "none"  # the preprocessor (`preprocessors.py`); "none": the image is the map
    weight: float = 1.0
    guidance_start: float = 0.0  # the part of the steps in which the unit acts, as fractions
    guidance_end: float = 1.0
    control_mode: str = "balanced"  # CONTROL_MODES
    resize_mode: str = "crop"  # RESIZE_MODES: how the map is brought to the image's size
    # The side the preprocessor works at (pixel perfect: the image's own; None: the module's default)
    processor_res: int | None = 512
    threshold_a: float | None = None  # the preprocessor's sliders (None: its defaults)
    threshold_b: float | None = None
    pixel_perfect: bool = False
    # (1 or b, 1, H, W) in [0, 1], white = repaint: the inpaint preprocessors' (beside a tuple of images, a tuple of as
    # many, None where one has none)
    mask: torch.Tensor | tuple | None = None
    hr_option: str = "both"  # HR_OPTIONS
    # The extension's advanced weighting: the scales of the residuals in order (each input block's, then the middle
    # block's; a T2I-Adapter's four features), in place of weight and soft injection; residuals past the list get none
    advanced_weighting: tuple[float, ...] | None = None
    title: str = ""  # what messages call it ("": "ControlNet unit k", k its place in `controls`)
    # The extension's effective_region_mask: (1, 1, h, w) in [0, 1], where the unit acts (its residuals, an IP-Adapter's
    # attention, times the mask resized to each); any size, one for all images
    region: torch.Tensor | None = None
    union_type: str | None = None  # a union ControlNet's kind of control image (UNION_TYPES); None: not given


@dataclass
class GenerationRequest:
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    negative_prompts: list[str] | None = None  # one per image; None: "" (the unconditional prompt)
    width: int | None = None  # pixels; None: the init image's size, or the model's default
    height: int | None = None
    steps: int = 20
    sampler: str = "dpmpp_2m"
    scheduler: str = "automatic"  # the σ-space samplers' schedule type (`sigma_schedules.py`; automatic: its own)
    spacing: str = "leading"  # DDIM, PLMS, DDPM: timestep spacing, as diffusers' ("leading", "trailing", "linspace")
    eta: float | None = None  # the sampler's η, where it takes one (None: its own, DDIM 0, ancestral 1)
    s_noise: float | None = None  # the ancestral samplers' noise scale (None: 1)
    cfg_scale: float | None = None  # classifier-free guidance (1: none; None: the model's default)
    init_image: torch.Tensor | None = None  # (1 or b, 3, H, W) in [0, 1]: img2img and inpainting
    mask: torch.Tensor | None = None  # (1 or b, 1, H, W) in [0, 1], white = repaint
    # (1 or b, 1, H, W) in [0, 1]: the mask the latent is held by, where it is not `mask` (the web UI's
    # `latent_mask`, which the outpainting scripts draw sharper than the blurred mask that the result is pasted by)
    latent_mask: torch.Tensor | None = None
    latent_fill: str | None = None  # LATENT_FILLS: the masked part of the image latent replaced (None: kept)
    paste: bool = True  # inpainting: lay the result over the init image through the mask (False: the caller does)
    vae_tiling: bool | None = None  # encode and decode in overlapping tiles (None: when untiled would not fit)
    strength: float = 1.0  # img2img / inpainting: how much of the schedule to run (1 = from pure noise)
    batch_size: int = 1  # images per U-Net call
    clip_skip: int | None = None  # the web UI's CLIP skip: text encoder layers from the end (None: the model's)
    prompt_syntax: bool = True  # read emphasis and BREAK in the prompts (False: plain text)
    compile: bool = False  # torch.compile the U-Net and VAE decoder first (`pipeline/compiling.py`); they stay compiled
    # With a refiner model (`Pipeline.refiner`): the part of the timestep range, from the noisiest, that the
    # model denoises before the refiner takes over (diffusers' denoising_end / denoising_start)
    refiner_switch: float = 0.8
    # How img2img counts its steps (`STEP_COUNTS`); txt2img runs all `steps` whatever this says
    step_count: str = "web_ui"
    hires: HiresFix | None = None  # txt2img: a second pass at a larger size
    styles: list[str] = field(default_factory=list)  # prompt styles of the pipeline's, applied in order (`styles.py`)
    edits_after: int = 0  # a hires pass: its first pass's editing steps, which prompt editing counts on from
    old_edit_timelines: bool = False  # the web UI's "Old prompt editing timelines" (its rule before 1.6)
    controls: list[ControlUnit] = field(default_factory=list)  # ControlNet / T2I-Adapter units, in order

    @classmethod
    def repeated(
        cls, prompt: str, negative_prompt: str, *, seed: int | None, batch_size: int, n_iter: int, **settings
    ) -> GenerationRequest:
        """batch_size × n_iter images of one prompt, as the web UI's form and API ask for them: seeds seed,
        seed + 1, ... (None or -1: a random first seed, as the web UI), batch_size images per U-Net call."""
        count = batch_size * n_iter
        seed = random.randrange(2**32) if seed in (None, -1) else seed
        seeds = [seed + i for i in range(count)]
        return cls([prompt] * count, seeds, [negative_prompt] * count, batch_size=batch_size, **settings)

    @property
    def steps_run(self) -> int:
        """Sampling steps each image goes through, the last ones of a schedule of `schedule_steps` (img2img starts
        part-way)."""
        if self.step_count == "fixed" or (self.init_image is None and self.strength == 1):
            return self.steps
        if self.step_count == "web_ui":
            return int(min(self.strength, 0.999) * self.steps) + 1
        return int(self.steps * self.strength)

    @property
    def schedule_steps(self) -> int:
        """The length of the noise schedule whose last `steps_run` steps are run (the web UI caps the strength at
        0.999, so that its image is never wholly noise)."""
        return int(self.steps / min(self.strength, 0.999)) if self.step_count == "fixed" else self.steps

    @property
    def noises_the_image(self) -> bool:
        """Whether an init image's latent, noised to the first σ, is where sampling starts (the web UI's counts: at
        any strength; diffusers': below 1, where 1 starts from noise alone)."""
        return self.strength < 1 or self.step_count != "diffusers"

    @property
    def editing_steps(self) -> int:
        """The steps that prompt editing's `when` counts in, as the web UI: the requested steps (img2img runs fewer),
        doubled for the samplers that evaluate the model twice a step (the schedule follows evaluations)."""
        return self.steps * (2 if get_sampler(self.sampler).second_order else 1)

    def schedule(self, text: str) -> list[tuple[int, str]]:
        """A prompt's editing schedule, [(last step, the prompt up to it)] (`syntax.prompt_schedule`); one entry
        for the whole run where the syntax is off."""
        steps, before = self.editing_steps, -1 if self.old_edit_timelines else self.edits_after
        return prompt_schedule(text, steps, before) if self.prompt_syntax else [(steps, text)]


@dataclass
class GenerationResult:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    infotexts: list[str]  # per image: prompt, negative prompt and settings, as the web UI writes them
    warnings: list[str] = field(default_factory=list)  # each distinct one once
    request: GenerationRequest | None = None  # as run: the defaults filled in
    fields: dict = field(default_factory=dict)  # the infotext's settings, without the seed


def fail(message: str) -> None:
    raise RequestError(message)


def validate(request: GenerationRequest) -> GenerationRequest:
    """The checks of a request that need no model, before any work: RequestError naming the problem. The request as
    it was; `plan.resolve` checks the rest against a pipeline and fills in the defaults."""
    r = request
    _check_types(r)
    _check_counts(r)
    _check_settings(r)
    if r.init_image is not None:
        _check_images(r)
    if r.latent_fill not in (None, *LATENT_FILLS):
        fail(f"unknown latent_fill {r.latent_fill!r}; choose one of {', '.join(LATENT_FILLS)} (or None)")
    if r.mask is None and (r.latent_mask is not None or r.latent_fill is not None):
        fail("a latent mask or a latent fill needs a mask")
    _check_prompts(r)
    if r.hires is not None:
        _check_hires(r.hires)
    for k, unit in enumerate(r.controls):
        _check_control(unit, getattr(unit, "title", "") or f"ControlNet unit {k}", len(r.prompts))
    return request


def _check_types(r: GenerationRequest) -> None:
    """Each number a number (a whole one where it counts something); None where the field has a default."""
    numbers = ("steps", "batch_size", "width", "height", "strength", "cfg_scale", "eta", "s_noise", "clip_skip")
    for name in (*numbers, "refiner_switch"):
        value, whole = getattr(r, name), name in ("steps", "batch_size", "width", "height", "clip_skip")
        if value is None and name not in ("steps", "batch_size", "strength", "refiner_switch"):
            continue  # None: the default
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            fail(f"{name} must be a {'whole number' if whole else 'number'}, not {value!r}")


def _check_counts(r: GenerationRequest) -> None:
    """One prompt, seed and negative prompt per image; sizes, batch and steps in range."""
    n = len(r.prompts)
    if n < 1:
        fail("a request needs at least one prompt")
    if len(r.seeds) != n or (r.negative_prompts is not None and len(r.negative_prompts) != n):
        fail(
            f"{n} prompts need as many seeds and negative prompts, not {len(r.seeds)} and "
            f"{len(r.negative_prompts or [])}"
        )
    for text in (*r.prompts, *(r.negative_prompts or [])):
        if not isinstance(text, str) or not _is_utf8(text):
            fail(f"prompts must be UTF-8 text, not {text!r:.60}")
    if bad := [s for s in r.seeds if not (isinstance(s, int) and 0 <= s < 2**64)]:
        fail(f"seeds must be whole numbers in [0, 2^64), not {bad[0]!r}")
    if bad := [side for side in (r.width, r.height) if side is not None and not 0 < side <= MAX_SIDE]:
        fail(f"width and height must be positive multiples of 8 up to {MAX_SIDE}, not {bad[0]}")
    if r.batch_size < 1:
        fail(f"batch_size must be at least 1, not {r.batch_size}")
    if not 1 <= r.steps <= MAX_STEPS:
        fail(f"steps must be between 1 and {MAX_STEPS}, not {r.steps}")


def _check_settings(r: GenerationRequest) -> None:
    """The sampler, its schedule and options, the strength and the guidance."""
    if r.sampler not in SAMPLERS:
        fail(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    try:
        find_scheduler(r.scheduler)
    except (ValueError, AttributeError, TypeError):  # (the last two: not a string)
        fail(f"unknown scheduler {r.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if r.step_count not in STEP_COUNTS:
        fail(f"unknown step count {r.step_count!r}; choose one of {', '.join(STEP_COUNTS)}")
    if r.spacing not in SPACINGS:
        fail(f"unknown timestep spacing {r.spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 0 < r.strength <= 1:
        fail(f"strength must be in (0, 1], not {r.strength}")
    if r.steps_run < 1:
        fail(f"strength {r.strength} of {r.steps} steps runs no step; raise either")
    if not 0 <= r.refiner_switch <= 1:
        fail(f"refiner_switch must be in [0, 1], not {r.refiner_switch}")
    for name in ("eta", "s_noise"):
        value = getattr(r, name)
        if value is not None and not 0 <= value <= MAX_NOISE:
            fail(f"{name} must be between 0 and {MAX_NOISE:g}, not {value}")
    if r.cfg_scale is not None and not -MAX_CFG_SCALE <= r.cfg_scale <= MAX_CFG_SCALE:
        fail(f"cfg_scale must be between -{MAX_CFG_SCALE:g} and {MAX_CFG_SCALE:g}, not {r.cfg_scale}")


def _check_prompts(r: GenerationRequest) -> None:
    """LoRA tags that can be read, at weights that keep the latents finite; emphasis weights in range."""
    for text in r.prompts:
        try:
            tags = extract_lora_tags(text)[1]
        except ValueError as e:
            fail(str(e))
        for tag in tags:
            if abs(weight := max(tag.te_weight, tag.unet_weight, key=abs)) > MAX_LORA_WEIGHT:  # (the latents go NaN)
                fail(f"prompt: <lora:{tag.name}> at a weight of {weight:g} is beyond ±{MAX_LORA_WEIGHT:g}")
        parts = split_and(extract_lora_tags(text)[0]) if r.prompt_syntax else []
        if bad := [weight for _, weight in parts if abs(weight) > MAX_CFG_SCALE]:  # (it multiplies the guidance)
            fail(f"prompt: an AND part's weight of {bad[0]:g} is beyond ±{MAX_CFG_SCALE:g}")
    for text in {*r.prompts, *(r.negative_prompts or [])} if r.prompt_syntax else ():
        if (weight := max((abs(w) for _, w in parse_emphasis(text)), default=1.0)) > MAX_EMPHASIS:
            fail(f"prompt: an emphasis weight of {weight:.3g} is beyond ±{MAX_EMPHASIS:g} (brackets nested too deep?)")


def _is_utf8(text: str) -> bool:
    """False for text with lone surrogates: bytes that were not UTF-8 (Python's surrogateescape of argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_images(r: GenerationRequest) -> None:
    height, width = r.init_image.shape[-2:]
    if any(len(t) not in (1, len(r.prompts)) for t in (r.init_image, r.mask, r.latent_mask) if t is not None):
        fail(f"init images and masks must be one for all images or one per image ({len(r.prompts)})")
    for name, mask in (("mask", r.mask), ("latent mask", r.latent_mask)):
        if mask is not None and mask.shape[-2:] != r.init_image.shape[-2:]:
            fail(
                f"the {name} is {mask.shape[-1]}x{mask.shape[-2]} but the image is {width}x{height}; "
                "they must be the same size"
            )
    if (r.width or width, r.height or height) != (width, height):
        fail(f"the image is {width}x{height}, not the requested {r.width}x{r.height}; resize it first")


def _check_control(unit: ControlUnit, name: str, n: int) -> None:
    """A control unit's own settings and images (its model and preprocessor are checked against the pipeline)."""
    if not isinstance(unit, ControlUnit):
        fail(f"{name}: not a control unit: {unit!r:.60}")
    for field_name in ("weight", "guidance_start", "guidance_end"):
        value = getattr(unit, field_name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{name}: {field_name} must be a number, not {value!r}")
    if not 0 <= unit.weight <= MAX_CONTROL_WEIGHT:
        fail(f"{name}: weight must be between 0 and {MAX_CONTROL_WEIGHT:g}, not {unit.weight}")
    if not 0 <= unit.guidance_start <= unit.guidance_end <= 1:
        window = f"{unit.guidance_start} and {unit.guidance_end}"
        fail(f"{name}: guidance_start and guidance_end must be in [0, 1], start not after end, not {window}")
    if unit.control_mode not in CONTROL_MODES:
        fail(f"{name}: unknown control_mode {unit.control_mode!r}; choose one of {', '.join(CONTROL_MODES)}")
    if unit.resize_mode not in RESIZE_MODES:
        fail(f"{name}: unknown resize_mode {unit.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if unit.hr_option not in HR_OPTIONS:
        fail(f"{name}: unknown hr_option {unit.hr_option!r}; choose one of {', '.join(HR_OPTIONS)}")
    if unit.union_type is not None and unit.union_type not in UNION_TYPES:
        fail(f"{name}: unknown union_type {unit.union_type!r}; choose one of {', '.join(UNION_TYPES)} (or None)")
    scales = unit.advanced_weighting
    if scales is not None and not (
        isinstance(scales, tuple)
        and 0 < len(scales) <= MAX_ADVANCED_WEIGHTS
        and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= MAX_CONTROL_WEIGHT for w in scales
        )
    ):  # (NaN fails the range)
        fail(
            f"{name}: advanced_weighting must be a tuple of 1 to {MAX_ADVANCED_WEIGHTS} numbers in [0, "
            f"{MAX_CONTROL_WEIGHT:g}]"
        )
    if isinstance(unit.image, tuple):  # several inputs of their own sizes, an IP-Adapter unit's
        if not 1 <= len(unit.image) <= MAX_UNIT_INPUTS:
            fail(f"{name}: 1 to {MAX_UNIT_INPUTS} images, not {len(unit.image)}")
        if unit.mask is not None and (not isinstance(unit.mask, tuple) or len(unit.mask) != len(unit.image)):
            fail(f"{name}: {len(unit.image)} images take a tuple of as many masks (None for none)")
        pairs = zip(unit.image, unit.mask or [None] * len(unit.image))
        for image, mask in pairs:
            _check_unit_image(name, image, "image", 1)
            _check_unit_image(name, mask, "mask", 1)
    else:
        _check_unit_image(name, unit.image, "image", n)
        _check_unit_image(name, unit.mask, "mask", n)
    _check_unit_image(name, unit.region, "region", 1)


def _check_unit_image(name: str, image, kind: str, n: int) -> None:
    """A unit's image, mask or region: (1 or n, channels, H, W), at most MAX_SIDE per side (a mask or region: or None)."""
    if image is None and kind != "image":
        return
    channels, count = (3 if kind == "image" else 1), ("1" if kind == "region" else f"1 or {n}")
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != channels:
        fail(f"{name}: the {kind} must be a ({count}, {channels}, H, W) tensor")
    if kind == "region" and len(image) != 1:
        fail(f"{name}: one region mask for all images, not {len(image)}")
    if len(image) not in (1, n):
        fail(f"{name}: {len(image)} {kind}s for {n} images; give one for all or one per image")
    if max(image.shape[-2:]) > MAX_SIDE:
        fail(f"{name}: the {kind} is {image.shape[-1]}x{image.shape[-2]}: at most {MAX_SIDE} pixels per side")


def _check_hires(h: HiresFix) -> None:
    """The second pass's own settings (its upscaler and size are checked against the pipeline in `plan.resolve`)."""
    if not isinstance(h.scale, (int, float)) or not 0 < h.scale <= MAX_HIRES_SCALE:  # (NaN fails too)
        fail(f"hr_scale must be above 0 and at most {MAX_HIRES_SCALE:g}, not {h.scale}")
    wholes = {"hr_resize_x": (h.resize_x, MAX_SIDE), "hr_resize_y": (h.resize_y, MAX_SIDE)}
    for name, (value, most) in {**wholes, "hr_second_pass_steps": (h.steps, MAX_STEPS)}.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
            fail(f"{name} must be a whole number in [0, {most}], not {value!r}")
    second = GenerationRequest(
        [h.prompt or ""],
        [0],
        [h.negative_prompt or ""],
        steps=h.steps or 1,
        strength=h.strength,
        sampler=h.sampler or "euler",
        scheduler=h.scheduler or "automatic",
        cfg_scale=h.cfg_scale,
        step_count="fixed",
    )
    try:
        _check_types(second)
        _check_settings(second)
        _check_prompts(second)
    except RequestError as e:
        raise RequestError(f"hires pass: {e}") from None
