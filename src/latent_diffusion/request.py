"""A generation request, its one validation, and its result: the layer every front end builds on.

The command line parses flags into a `GenerationRequest`, a server would build the same request from JSON;
both call `validate` before any work and `generate.generate` to run it, and get a `GenerationResult` back:
the images, each image's infotext (the web UI's `parameters` text) and the warnings, as data.
Image i of a request is drawn from seed `seeds[i]` alone, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import vae_tiling
from .images import lora_hash, model_hash, parameters_text
from .latent_diffusion import LatentDiffusion
from .pipeline import Pipeline, as_pipeline
from .prompts import LoraTag, chunk_prompt, extract_lora_tags, parse_emphasis, prompt_schedule
from .samplers import SAMPLERS, get_sampler
from .schedule import SPACINGS, sampling_timesteps
from .schedulers import SCHEDULERS, find_scheduler, schedule_for
from .tokenizer import clip_tokenizer

MAX_SIDE = 8192  # pixels per side; larger requests are refused before anything is allocated
MAX_STEPS = 10_000  # sampling steps; the σ schedules are allocated before the first step
# Beyond these the latents overflow to inf or NaN (found by feeding extremes to the server); the web UI's sliders
# stop far below them (CFG 30, η 1, emphasis 1.1^k for a few brackets).
MAX_CFG_SCALE = 100.0
MAX_NOISE = 10.0  # η and s_noise
MAX_EMPHASIS = 1000.0  # the magnitude of a token's emphasis weight
MAX_LORA_WEIGHT = 100.0  # the magnitude of a <lora:name:weight> (the web UI's slider reaches ±2; people use up to 10)


class RequestError(ValueError):
    """A request that cannot be run as given; the message names the field and the problem."""


@dataclass
class GenerationRequest:
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    negative_prompts: list[str] | None = None  # one per image; None: "" (the unconditional prompt)
    width: int | None = None  # pixels; None: the init image's size, or the model's default
    height: int | None = None
    steps: int = 20
    sampler: str = "dpmpp_2m"
    scheduler: str = "automatic"  # the σ-space samplers' schedule type (`schedulers.py`; automatic: the sampler's)
    spacing: str = "leading"  # DDIM, PLMS, DDPM: timestep spacing, as diffusers' ("leading", "trailing", "linspace")
    eta: float | None = None  # the sampler's η, where it takes one (None: its own, DDIM 0, ancestral 1)
    s_noise: float | None = None  # the ancestral samplers' noise scale (None: 1)
    cfg_scale: float | None = None  # classifier-free guidance (1: none; None: the model's default)
    init_image: torch.Tensor | None = None  # (1 or b, 3, H, W) in [0, 1]: img2img and inpainting
    mask: torch.Tensor | None = None  # (1 or b, 1, H, W) in [0, 1], white = repaint
    paste: bool = True  # inpainting: lay the result over the init image through the mask (False: the caller does)
    vae_tiling: bool | None = None  # encode and decode in overlapping tiles (None: when untiled would not fit)
    strength: float = 1.0  # img2img / inpainting: how much of the schedule to run (1 = from pure noise)
    batch_size: int = 1  # images per U-Net call
    clip_skip: int | None = None  # the web UI's CLIP skip: text encoder layers from the end (None: the model's)
    prompt_syntax: bool = True  # read emphasis and BREAK in the prompts (False: plain text)
    compile: bool = False  # torch.compile the U-Net and VAE decoder first (`compiling.py`); they stay compiled
    # With a refiner model (`Pipeline.refiner`): the part of the timestep range, from the noisiest, that the
    # model denoises before the refiner takes over (diffusers' denoising_end / denoising_start)
    refiner_switch: float = 0.8

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
        """Sampling steps each image goes through (img2img starts part-way)."""
        return int(self.steps * self.strength)

    @property
    def editing_steps(self) -> int:
        """The steps that prompt editing's `when` counts in, as the web UI: the requested steps (img2img runs fewer),
        doubled for the samplers that evaluate the model twice a step (the schedule follows evaluations)."""
        return self.steps * (2 if get_sampler(self.sampler).second_order else 1)

    def schedule(self, text: str) -> list[tuple[int, str]]:
        """A prompt's editing schedule, [(last step, the prompt up to it)] (`prompts.prompt_schedule`); one entry
        for the whole run where the syntax is off."""
        steps = self.editing_steps
        return prompt_schedule(text, steps) if self.prompt_syntax else [(steps, text)]


@dataclass
class GenerationResult:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    infotexts: list[str]  # per image: prompt, negative prompt and settings, as the web UI writes them
    warnings: list[str] = field(default_factory=list)  # each distinct one once
    request: GenerationRequest | None = None  # as run: the defaults filled in


def _fail(message: str) -> None:
    raise RequestError(message)


def validate(request: GenerationRequest, pipeline: Pipeline | LatentDiffusion | None = None) -> GenerationRequest:
    """Every check of a request, before any work: RequestError naming the problem. Without a pipeline, what can be
    checked without one; with it, also what depends on its models and files, and the returned copy has its
    defaults."""
    r = request
    _check_types(r)
    _check_counts(r)
    _check_settings(r)
    if r.init_image is not None:
        _check_images(r)
    _check_prompts(r)
    if pipeline is None:
        return request
    pipeline = as_pipeline(pipeline)
    if pipeline.refiner is not None:
        _check_refiner(pipeline.model, pipeline.refiner)
    return _resolve(r, pipeline)


def _check_types(r: GenerationRequest) -> None:
    """Each number a number (a whole one where it counts something); None where the field has a default."""
    numbers = ("steps", "batch_size", "width", "height", "strength", "cfg_scale", "eta", "s_noise", "clip_skip")
    for name in (*numbers, "refiner_switch"):
        value, whole = getattr(r, name), name in ("steps", "batch_size", "width", "height", "clip_skip")
        if value is None and name not in ("steps", "batch_size", "strength", "refiner_switch"):
            continue  # None: the default
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            _fail(f"{name} must be a {'whole number' if whole else 'number'}, not {value!r}")


def _check_counts(r: GenerationRequest) -> None:
    """One prompt, seed and negative prompt per image; sizes, batch and steps in range."""
    n = len(r.prompts)
    if n < 1:
        _fail("a request needs at least one prompt")
    if len(r.seeds) != n or (r.negative_prompts is not None and len(r.negative_prompts) != n):
        _fail(
            f"{n} prompts need as many seeds and negative prompts, not {len(r.seeds)} and "
            f"{len(r.negative_prompts or [])}"
        )
    for text in (*r.prompts, *(r.negative_prompts or [])):
        if not isinstance(text, str) or not _is_utf8(text):
            _fail(f"prompts must be UTF-8 text, not {text!r:.60}")
    if bad := [s for s in r.seeds if not (isinstance(s, int) and 0 <= s < 2**64)]:
        _fail(f"seeds must be whole numbers in [0, 2^64), not {bad[0]!r}")
    if bad := [side for side in (r.width, r.height) if side is not None and not 0 < side <= MAX_SIDE]:
        _fail(f"width and height must be positive multiples of 8 up to {MAX_SIDE}, not {bad[0]}")
    if r.batch_size < 1:
        _fail(f"batch_size must be at least 1, not {r.batch_size}")
    if not 1 <= r.steps <= MAX_STEPS:
        _fail(f"steps must be between 1 and {MAX_STEPS}, not {r.steps}")


def _check_settings(r: GenerationRequest) -> None:
    """The sampler, its schedule and options, the strength and the guidance."""
    if r.sampler not in SAMPLERS:
        _fail(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(r.scheduler, str) or not _known_scheduler(r.scheduler):
        _fail(f"unknown scheduler {r.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if r.spacing not in SPACINGS:
        _fail(f"unknown timestep spacing {r.spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 0 < r.strength <= 1:
        _fail(f"strength must be in (0, 1], not {r.strength}")
    if r.steps_run < 1:
        _fail(f"strength {r.strength} of {r.steps} steps runs no step; raise either")
    if not 0 <= r.refiner_switch <= 1:
        _fail(f"refiner_switch must be in [0, 1], not {r.refiner_switch}")
    for name in ("eta", "s_noise"):
        value = getattr(r, name)
        if value is not None and not 0 <= value <= MAX_NOISE:
            _fail(f"{name} must be between 0 and {MAX_NOISE:g}, not {value}")
    if r.cfg_scale is not None and not -MAX_CFG_SCALE <= r.cfg_scale <= MAX_CFG_SCALE:
        _fail(f"cfg_scale must be between -{MAX_CFG_SCALE:g} and {MAX_CFG_SCALE:g}, not {r.cfg_scale}")


def _check_prompts(r: GenerationRequest) -> None:
    """LoRA tags that can be read, at weights that keep the latents finite; emphasis weights in range."""
    for text in r.prompts:
        try:
            tags = extract_lora_tags(text)[1]
        except ValueError as e:
            _fail(str(e))
        for tag in tags:
            if abs(weight := max(tag.te_weight, tag.unet_weight, key=abs)) > MAX_LORA_WEIGHT:  # (the latents go NaN)
                _fail(f"prompt: <lora:{tag.name}> at a weight of {weight:g} is beyond ±{MAX_LORA_WEIGHT:g}")
    for text in {*r.prompts, *(r.negative_prompts or [])} if r.prompt_syntax else ():
        if (weight := max((abs(w) for _, w in parse_emphasis(text)), default=1.0)) > MAX_EMPHASIS:
            _fail(f"prompt: an emphasis weight of {weight:.3g} is beyond ±{MAX_EMPHASIS:g} (brackets nested too deep?)")


def _fewest_per_group(cfg, h: int, w: int) -> int:
    """The fewest values one of the U-Net's GroupNorm(32) layers normalises together, for one h×w latent: the
    channels of a group times the level's size (each level halves it, rounding up); a level's first block
    normalises the previous level's channels."""
    fewest, previous = [], cfg.unet.channel_mult[0]
    for mult in cfg.unet.channel_mult:
        fewest.append(cfg.unet.model_channels * min(mult, previous) // 32 * h * w)
        previous, h, w = mult, (h + 1) // 2, (w + 1) // 2
    return min(fewest)


def _check_refiner(model: LatentDiffusion, refiner: LatentDiffusion) -> None:
    """A refiner continues the model's latents: the same latent space and noise schedule, and no inpainting input."""
    if refiner.cfg.inpainting or refiner.cfg.concat_channels:
        _fail("the refiner is an inpainting model; a refiner takes only the noisy latent")
    same = ("scale_factor", "timesteps", "linear_start", "linear_end")
    if refiner.cfg.autoencoder.embed_dim != model.cfg.autoencoder.embed_dim or any(
        getattr(refiner.cfg, k) != getattr(model.cfg, k) for k in same
    ):
        _fail(
            f"the refiner ({refiner.cfg.family.title}) does not share this {model.cfg.family.title} model's latent "
            f"space and noise schedule"
        )
    if (refiner.device, refiner.dtype) != (model.device, model.dtype):
        _fail(f"the refiner is on {refiner.device} in {refiner.dtype}, the model on {model.device} in {model.dtype}")


def _known_scheduler(name: str) -> bool:
    try:
        find_scheduler(name)
    except ValueError:
        return False
    return True


def _is_utf8(text: str) -> bool:
    """False for text with lone surrogates: bytes that were not UTF-8 (Python's surrogateescape of argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_images(r: GenerationRequest) -> None:
    height, width = r.init_image.shape[-2:]
    if any(len(t) not in (1, len(r.prompts)) for t in (r.init_image, r.mask) if t is not None):
        _fail(f"init images and masks must be one for all images or one per image ({len(r.prompts)})")
    if r.mask is not None and r.mask.shape[-2:] != r.init_image.shape[-2:]:
        _fail(
            f"the mask is {r.mask.shape[-1]}x{r.mask.shape[-2]} but the image is {width}x{height}; "
            "they must be the same size"
        )
    if (r.width or width, r.height or height) != (width, height):
        _fail(f"the image is {width}x{height}, not the requested {r.width}x{r.height}; resize it first")


def _resolve(r: GenerationRequest, pipeline: Pipeline) -> GenerationRequest:
    """The checks that need the model (or the images, which front ends may attach after the first check)."""
    model = pipeline.model
    cfg = model.cfg
    if r.init_image is None and (r.mask is not None or r.strength < 1):
        _fail("a mask or a strength below 1 needs an init image")
    if cfg.unet.adm_in_channels and not cfg.micro_conditioning:
        _fail("this model needs a vector conditioning (y), which this project does not produce for it yet")
    if cfg.inpainting and r.mask is None:
        _fail(f"this is an inpainting model ({cfg.unet.in_channels} input channels): it needs an image and a mask")
    size = r.init_image.shape[-2:] if r.init_image is not None else (r.height, r.width)
    height, width = (cfg.default_size if side is None else side for side in size)
    f = cfg.autoencoder.downsampling_factor
    if any(side is not None and side % f for side in (r.width, r.height)):  # asked for, before any image's size
        asked = [cfg.default_size if side is None else side for side in (r.width, r.height)]
        _fail(f"width and height must be positive multiples of {f}, not {asked[0]}x{asked[1]}")
    if r.init_image is not None and (width % f or height % f):
        _fail(f"the image is {width}x{height}: its sides must be multiples of {f}; resize it")
    if width % f or height % f or width <= 0 or height <= 0:
        _fail(f"width and height must be positive multiples of {f}, not {width}x{height}")
    if r.clip_skip is not None and not 1 <= r.clip_skip <= cfg.text.layers:
        _fail(f"clip_skip must be in [1, {cfg.text.layers}] for this text encoder, not {r.clip_skip}")
    if max(width, height) > MAX_SIDE:
        _fail(f"the image is {width}x{height}: at most {MAX_SIDE} pixels per side")
    if _fewest_per_group(cfg, height // f, width // f) < 2:
        _fail(
            f"the image is {width}x{height}: too small for this model, whose deepest U-Net level would be left with "
            f"one value per normalisation group; make it larger"
        )
    sampler = SAMPLERS[r.sampler]
    if sampler.discrete:  # the sampler visits timesteps of the model's table
        t = sampling_timesteps(r.steps, r.spacing, cfg.timesteps)
        if len(set(t.tolist())) < r.steps or t.max() > cfg.timesteps - 1:
            _fail(
                f"steps: {r.steps} steps with {r.spacing} spacing do not fit the model's {cfg.timesteps} timesteps "
                f"(they repeat or run past the last); use fewer"
            )
    for text in dict.fromkeys(r.prompts):
        lora_set(text, pipeline.loras)  # every name known, one weight per name
    have = available_memory(model.device)
    tiled = r.vae_tiling
    if tiled is None:  # automatic: tiles where the whole image would not fit and tiles need less
        untiled = needed_memory(r, cfg, width, height, model.dtype, tiled=False)
        tiled = have is not None and untiled > have > needed_memory(r, cfg, width, height, model.dtype, tiled=True)
    need = needed_memory(r, cfg, width, height, model.dtype, tiled=tiled)
    if have is not None and need > have:
        _fail(
            f"batch_size: {min(r.batch_size, len(r.prompts))} images of {width}x{height} need about "
            f"{_bytes(need)} at once{' even with VAE tiling' if tiled else ''}, more than the {_bytes(have)} "
            f"free on {model.device}"
        )
    return dataclasses.replace(
        r,
        width=width,
        height=height,
        cfg_scale=cfg.default_cfg_scale if r.cfg_scale is None else r.cfg_scale,
        negative_prompts=r.negative_prompts or [""] * len(r.prompts),
        vae_tiling=tiled,
    )


def lora_set(prompt: str, files: dict[str, Path]) -> frozenset[LoraTag]:
    """The LoRAs a prompt names, with their weights. Images of different sets never share a U-Net batch: a batch
    runs on one set of merged weights. RequestError for a name that is not among the LoRA `files`, or one named at
    two weights."""
    tags: dict[str, LoraTag] = {}
    for tag in extract_lora_tags(prompt)[1]:
        if tag.name not in files:
            known = ", ".join(sorted(files)) or "none: give a folder with --lora-dir"
            _fail(f"prompt: <lora:{tag.name}> names no LoRA file here; these are: {known}")
        if tags.setdefault(tag.name, tag) != tag:
            _fail(f"prompt: LoRA {tag.name} at two weights in one prompt; use one")
    return frozenset(tags.values())


def needed_memory(r: GenerationRequest, cfg, width: int, height: int, dtype: torch.dtype, tiled: bool) -> int:
    """Bytes one U-Net batch needs at its peak, the decode: about 8 tensors of the decoder's first-level width at
    full resolution per image (measured on CPU, built-in model: 6.1 at batch 200, 9.2 at 50; SD 512² in float32:
    8 × 128 × 512² × 4 B = 1 GiB per image). Tiled: those of one tile, plus the float32 image and its blending
    weights being assembled."""
    images = min(r.batch_size, len(r.prompts))
    side = vae_tiling.TILE * cfg.autoencoder.downsampling_factor
    pixels = min(width, side) * min(height, side) if tiled else width * height
    need = images * 8 * cfg.autoencoder.ch * cfg.autoencoder.ch_mult[0] * pixels * dtype.itemsize
    return need + (images * 3 + 1) * width * height * 4 if tiled else need


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on the device; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def infotext_fields(r: GenerationRequest, pipeline: Pipeline) -> dict:
    """The settings of a resolved request as the web UI's infotext fields, without the seed."""
    sampler = get_sampler(r.sampler)
    _, schedule_type = schedule_for(sampler, r.scheduler)
    # "Seed" holds its place in the web UI's order until `infotext` fills it in
    fields = {
        "Steps": r.steps,
        "Sampler": sampler.display_name,
        "Schedule type": schedule_type,
        "CFG scale": r.cfg_scale,
        "Seed": None,
        "Size": f"{r.width}x{r.height}",
    }
    if schedule_type is None:
        del fields["Schedule type"]
    if pipeline.checkpoint is not None:
        fields |= {"Model hash": model_hash(pipeline.checkpoint), "Model": pipeline.checkpoint.stem}
    if pipeline.vae_file is not None:
        fields |= {"VAE hash": model_hash(pipeline.vae_file), "VAE": pipeline.vae_file.name}
    eta = "Eta DDIM" if sampler.discrete else "Eta"  # the web UI's names: DDIM and PLMS apart from k-diffusion's
    for option, name in (("eta", eta), ("s_noise", "Sigma noise")):  # where not the sampler's default, as the web UI
        value = getattr(r, option)
        if option in sampler.options and value not in (None, inspect.signature(sampler.fn).parameters[option].default):
            fields[name] = value
    if r.clip_skip is not None and r.clip_skip > 1:
        fields["Clip skip"] = r.clip_skip
    if loras := sorted({tag.name for text in r.prompts for tag in extract_lora_tags(text)[1]}):
        fields["Lora hashes"] = ", ".join(f"{_bare(name)}: {lora_hash(pipeline.loras[name])}" for name in loras)
    if used := embeddings_used(r, pipeline):
        fields["TI hashes"] = ", ".join(f"{_bare(e.name)}: {e.shorthash}" for e in used)
    if r.init_image is not None:
        fields["Denoising strength"] = r.strength
    if pipeline.refiner is not None:
        file = pipeline.refiner_checkpoint
        name, hash_ = (file.stem, f" [{model_hash(file)}]") if file else ("refiner", "")
        fields |= {"Refiner": name + hash_, "Refiner switch at": r.refiner_switch}
    return fields


def embeddings_used(r: GenerationRequest, pipeline: Pipeline) -> list:
    """The textual-inversion embeddings that the request's prompts (in any of their edits) use."""
    if not pipeline.embeddings:
        return []
    tokenizer, used = clip_tokenizer(pipeline.model.cfg.text.max_length), {}
    for text in {*r.prompts, *(r.negative_prompts or [])}:
        text = extract_lora_tags(text)[0]
        for _, variant in r.schedule(text):
            for chunk in chunk_prompt(variant, tokenizer, r.prompt_syntax, pipeline.embeddings):
                used |= {e.name: e for _, e in chunk.embeddings}
    return [used[name] for name in sorted(used)]


def _bare(name: str) -> str:
    """A name as the web UI writes it in a "name: hash, ..." field: without the `:` and `,` that separate them."""
    return name.replace(":", "").replace(",", "")


def context_lengths(r: GenerationRequest, pipeline: Pipeline) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The 77-token chunk counts of the request's prompts and of its negative prompts, each the longest of its
    variants (its prompt-editing schedule), as `generate` encodes them. Requests whose counts differ would pad each
    other's contexts in one U-Net batch, which changes their images: a server batches only requests of equal ones."""
    tokenizer = clip_tokenizer(pipeline.model.cfg.text.max_length)

    @functools.cache
    def chunks(text: str) -> int:  # (a request repeats its prompt per image, a schedule its variants per step)
        variants = dict.fromkeys(v for _, v in r.schedule(text))
        return max(len(chunk_prompt(v, tokenizer, r.prompt_syntax, pipeline.embeddings)) for v in variants)

    prompts = tuple(chunks(extract_lora_tags(text)[0]) for text in r.prompts)
    return prompts, tuple(chunks(text) for text in r.negative_prompts or [""] * len(r.prompts))


def infotext(r: GenerationRequest, i: int, fields: dict) -> str:
    """Image i's `parameters` text: its prompt, negative prompt, and the fields with its seed."""
    return parameters_text(r.prompts[i], r.negative_prompts[i], {**fields, "Seed": r.seeds[i]})
