"""A request resolved against a pipeline, once: checked against its models and files, its defaults filled in, and
its prompts parsed (`Plan`). Everything after takes the plan: generation, the server's batching and the infotexts
read it and parse nothing again.

Per distinct prompt the plan holds its text without extra-network tags, the LoRAs it names, and per AND part its
weight, its prompt-editing schedule and the 77-token chunks of each variant of that schedule (`ParsedPrompt`).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import torch

from ..devices import host_memory
from ..files import lora_hash, model_hash
from ..models import vae_tiling
from ..models.ldm import LatentDiffusion
from ..models.tokenizer import clip_tokenizer
from ..prompts.styles import apply_styles
from ..prompts.syntax import Chunk, LoraTag, chunk_prompt, extract_lora_tags, split_and
from ..sampling.noise_schedule import sampling_timesteps
from ..sampling.samplers import SAMPLERS, get_sampler
from ..sampling.sigma_schedules import find_scheduler, schedule_for
from ..weights.embeddings import Embedding, bundled_embeddings
from ..weights.storage import stores_fp8
from .control import ResolvedControl, check_fits_hires, control_fields, fitted, merged_controls, resolve_controls
from .hires import LATENT_MODES, HiresSize, second_pass, target_size
from .infotext import parameters_text
from .loading import Pipeline
from .request import MAX_SIDE, GenerationRequest, fail, validate
from .upscalers import RESAMPLERS


@dataclass(frozen=True)
class PromptPart:
    """One AND part of a prompt (`syntax.split_and`; a prompt without AND is one part): its weight, its prompt-editing
    schedule [(last step, variant)], and each variant's chunks (with the pipeline's embeddings)."""

    weight: float
    schedule: list[tuple[int, str]]
    chunks: dict[str, list[Chunk]]


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt read once: its text without extra-network tags, the LoRAs it names (with their weights), and its
    parts."""

    body: str
    loras: tuple[LoraTag, ...]  # in the prompt's order, merged in turn (`lora_tags`)
    parts: tuple[PromptPart, ...]

    @property
    def context_length(self) -> int:
        """Chunks of the longest variant: the variants of one part are encoded together, padded to it."""
        return max(len(c) for part in self.parts for c in part.chunks.values())

    @property
    def composed(self) -> bool:
        """Whether it asks for more than its one part at weight 1 (then guidance needs the unconditional output)."""
        return len(self.parts) > 1 or self.parts[0].weight != 1


@dataclass
class Plan:
    request: GenerationRequest  # validated, with its defaults filled in
    pipeline: Pipeline  # what it was resolved against
    prompts: dict[str, ParsedPrompt]  # each distinct prompt, by its text
    negatives: dict[str, ParsedPrompt]  # each distinct negative prompt (tags stay text there)
    hires: Plan | None = None  # txt2img's hires pass (`hires.py`), resolved with the first
    hires_size: HiresSize | None = None  # where its first pass is enlarged to
    controls: list[ResolvedControl] = field(default_factory=list)  # its control units, with their maps at its size

    def lora_sets(self) -> list[tuple[LoraTag, ...]]:
        """Per image, the LoRAs its prompt names: images of different sets never share merged weights."""
        return [self.prompts[text].loras for text in self.request.prompts]

    def part(self, start: int, stop: int) -> Plan:
        """Images start..stop, as parsed here."""
        r = self.request
        rows = slice(start, stop)
        per_image = {
            k: v[rows] for k in ("init_image", "mask", "latent_mask") if (v := getattr(r, k)) is not None and len(v) > 1
        }
        request = dataclasses.replace(
            r, prompts=r.prompts[rows], seeds=r.seeds[rows], negative_prompts=r.negative_prompts[rows], **per_image
        )
        hires = self.hires.part(start, stop) if self.hires else None
        controls = [c.rows(start, stop) for c in self.controls]
        return dataclasses.replace(self, request=request, hires=hires, controls=controls)

    def batch_key(self) -> tuple:
        """What plans must share to run as one U-Net batch (`merge`): every setting but the per-image ones, the prompts'
        chunk counts (padding one to another's length would change its image) and their LoRA sets (a batch runs on
        one set of merged weights), in both passes."""
        r = self.request
        settings = tuple(_hashable(getattr(r, f.name)) for f in dataclasses.fields(r) if f.name not in PER_IMAGE)
        lengths = (
            frozenset(self.prompts[text].context_length for text in r.prompts),
            frozenset(self.negatives[text].context_length for text in r.negative_prompts),
        )
        hires = self.hires.batch_key() if self.hires else ()
        controls = tuple(c.key() for c in self.controls)  # (their maps are per image)
        return *settings, *hires, lengths, frozenset(self.lora_sets()), controls

    def embeddings_used(self) -> list[Embedding]:
        """The textual-inversion embeddings that the prompts (in any of their edits) use, by name."""
        used = {
            e.name: e
            for parsed in (*self.prompts.values(), *self.negatives.values())
            for part in parsed.parts
            for chunks in part.chunks.values()
            for chunk in chunks
            for _, e in chunk.embeddings
        }
        return [used[name] for name in sorted(used)]


PER_IMAGE = {"prompts", "seeds", "negative_prompts", "batch_size", "vae_tiling", "controls"}  # (merge: tiling again)


def _hashable(value):
    """A request's field as part of a key: a tensor by its identity, a list as a tuple."""
    return id(value) if isinstance(value, torch.Tensor) else tuple(value) if isinstance(value, list) else value


def resolve(request: GenerationRequest, pipeline: Pipeline) -> Plan:
    """Every check of a request against the pipeline, before any work (RequestError naming the problem), and its
    prompts parsed once."""
    checked = validate(request)
    no_prompt = not any(checked.prompts) and not any(checked.negative_prompts or [])  # (revision's rule: unstyled)
    r = _styled(checked, pipeline)
    if pipeline.refiner is not None:
        _check_follower(pipeline.model, pipeline.refiner, "the refiner")
    resolved = _check_against(r, pipeline)
    plan = Plan(resolved, pipeline, *_parsed(resolved, pipeline))
    size, second = (resolved.height, resolved.width), None
    if r.hires is not None:
        plan.hires_size, f = _check_hires(resolved, pipeline), pipeline.model.cfg.autoencoder.downsampling_factor
        second = second_pass(resolved, plan.hires_size, f, r.vae_tiling)
    final = size if second is None else (second.height, second.width)  # (+lama's outpainting fits to it)
    plan.controls = resolve_controls(_unit_modules(r), pipeline, size, resolved.seeds, no_prompt, final)
    if second is not None:
        hires = hires_pipeline(pipeline)
        second = dataclasses.replace(second, vae_tiling=_tiling(second, hires.model))
        plan.hires = Plan(second, hires, *_parsed(second, hires))
        plan.hires.controls = [
            dataclasses.replace(fitted(c, (second.height, second.width), hires.model), acts=c.unit.hr_option != "low")
            for c in plan.controls
        ]
        if hires.model is not pipeline.model:  # (a hires checkpoint: each unit acting there must fit it too)
            for k, c in enumerate(plan.hires.controls):
                check_fits_hires(c, hires.model, k)
        plan.controls = [dataclasses.replace(c, acts=c.unit.hr_option != "high") for c in plan.controls]
    return plan


def _unit_modules(r: GenerationRequest) -> list:
    """The request's control units, inpaint_only (that name exactly) as inpaint where the request inpaints: two ways
    of keeping the outside would fight, and the extension falls back so (its infotext then says inpaint)."""
    if r.mask is None:
        return r.controls
    return [dataclasses.replace(u, module="inpaint") if u.module == "inpaint_only" else u for u in r.controls]


def _styled(r: GenerationRequest, pipeline: Pipeline) -> GenerationRequest:
    """The request with its styles applied to its prompts and negative prompts, as the web UI applies them before
    anything reads the prompts (RequestError for a style the pipeline does not have)."""
    if not r.styles:
        return r
    if missing := [name for name in r.styles if name not in pipeline.styles]:
        known = ", ".join(pipeline.styles) or "none: give a styles.csv"
        fail(f"styles: no style {missing[0]!r} here; these are: {known}")
    chosen = [pipeline.styles[name] for name in r.styles]

    def styled(text: str | None, kind: str) -> str | None:
        return None if text is None else apply_styles(text, [getattr(style, kind) for style in chosen])

    prompts = [styled(p, "prompt") for p in r.prompts]
    negatives = [styled(p, "negative_prompt") for p in r.negative_prompts or [""] * len(prompts)]
    hires = r.hires  # (its own prompts too, as the web UI's)
    if hires is not None:
        prompt, negative = styled(hires.prompt, "prompt"), styled(hires.negative_prompt, "negative_prompt")
        hires = dataclasses.replace(hires, prompt=prompt, negative_prompt=negative)
    return validate(dataclasses.replace(r, prompts=prompts, negative_prompts=negatives, hires=hires, styles=[]))


def hires_pipeline(pipeline: Pipeline) -> Pipeline:
    """What the hires pass runs on: the pipeline's own hires checkpoint, with its refiner (the web UI's default: the
    refiner in the last pass), or the pipeline itself."""
    hires = pipeline.hires_pipeline
    if hires is None:
        return pipeline
    return dataclasses.replace(hires, refiner=pipeline.refiner, refiner_checkpoint=pipeline.refiner_checkpoint)


def _parsed(r: GenerationRequest, pipeline: Pipeline) -> tuple[dict[str, ParsedPrompt], dict[str, ParsedPrompt]]:
    """A request's distinct prompts and negative prompts, each parsed once."""
    tokenizer = clip_tokenizer(pipeline.model.cfg.text.max_length)

    def part(text: str, weight: float, embeddings: dict[str, Embedding]) -> PromptPart:
        schedule = r.schedule(text)
        variants = dict.fromkeys(variant for _, variant in schedule)
        chunks = {v: chunk_prompt(v, tokenizer, r.prompt_syntax, embeddings) for v in variants}
        return PromptPart(weight, schedule, chunks)

    prompts = {}
    for text in dict.fromkeys(r.prompts):  # (a negative prompt is one part, AND in it is text, as the web UI's)
        body, tags = extract_lora_tags(text)
        loras = lora_tags(tags, pipeline.loras)
        embeddings = {**_bundled(loras, pipeline), **pipeline.embeddings}  # (the folder's first, as the web UI's)
        parts = split_and(body) if r.prompt_syntax else [(body, 1.0)]
        prompts[text] = ParsedPrompt(body, loras, tuple(part(words, weight, embeddings) for words, weight in parts))
    negatives = {
        text: ParsedPrompt(text, (), (part(text, 1.0, pipeline.embeddings),))
        for text in dict.fromkeys(r.negative_prompts)
    }
    return prompts, negatives


def _check_hires(r: GenerationRequest, pipeline: Pipeline) -> HiresSize:
    """The hires fix of a resolved request against the pipeline: an upscaler it has, a larger size the model can
    draw -> where the first pass is enlarged to."""
    h, cfg = r.hires, pipeline.model.cfg
    if r.init_image is not None:
        fail("the hires fix is txt2img's: img2img and inpainting draw at the init image's size")
    known = [*LATENT_MODES, *RESAMPLERS, *pipeline.upscalers]
    if h.upscaler is not None and h.upscaler not in known:
        fail(f"hr_upscaler: no upscaler {h.upscaler!r} here; these are: {', '.join(known)}")
    if pipeline.hires_pipeline is not None:  # (an image upscaler decodes, and the hires model encodes again)
        latent = (h.upscaler or "Latent") in LATENT_MODES
        _check_follower(pipeline.model, pipeline.hires_pipeline.model, "the hires checkpoint", latent=latent)
    f = cfg.autoencoder.downsampling_factor
    size = target_size(r.width, r.height, h.scale, h.resize_x, h.resize_y, f)
    height, width = size.latent(f)
    if max(*size.upscale_to, width * f, height * f) > MAX_SIDE:
        fail(f"the hires fix enlarges to {size.upscale_to[0]}x{size.upscale_to[1]}: at most {MAX_SIDE} per side")
    if min(width, height) < 1 or _fewest_per_group(cfg, height, width) < 2:
        fail(f"the hires fix's size {width * f}x{height * f} is too small for this model; enlarge more")
    return size


def merge(plans: list[Plan]) -> Plan:
    """Plans of one pipeline and settings as one U-Net batch: their images in order, parsed as they were; only the
    memory (and so the VAE tiling) is decided again, for all images together (RequestError if they do not fit)."""
    first = plans[0].request
    r = dataclasses.replace(
        first,
        prompts=[p for plan in plans for p in plan.request.prompts],
        negative_prompts=[p for plan in plans for p in plan.request.negative_prompts],
        seeds=[s for plan in plans for s in plan.request.seeds],
        batch_size=sum(len(plan.request.prompts) for plan in plans),
        vae_tiling=None,
    )
    r = dataclasses.replace(r, vae_tiling=_tiling(r, plans[0].pipeline.model))
    prompts = {k: v for plan in plans for k, v in plan.prompts.items()}
    negatives = {k: v for plan in plans for k, v in plan.negatives.items()}
    hires = merge([plan.hires for plan in plans]) if first.hires is not None else None
    controls = merged_controls([plan.controls for plan in plans], [len(plan.request.prompts) for plan in plans])
    return Plan(r, plans[0].pipeline, prompts, negatives, hires, plans[0].hires_size, controls)


def lora_tags(tags: list[LoraTag], files: dict) -> tuple[LoraTag, ...]:
    """A prompt's LoRA tags in its order, each merged in turn (RequestError for a name that is not among the LoRA
    `files`). A LoRA named twice is merged twice, both times at its last tag's weights: the web UI's
    `networks.load_networks` lists one network object per tag and sets the weights of the one object each time."""
    for tag in tags:
        if tag.name not in files:
            known = ", ".join(sorted(files)) or "none: give a folder with --lora-dir"
            fail(f"prompt: <lora:{tag.name}> names no LoRA file here; these are: {known}")
    last = {tag.name: tag for tag in tags}
    return tuple(last[tag.name] for tag in tags)


def _bundled(loras: tuple[LoraTag, ...], pipeline: Pipeline) -> dict[str, Embedding]:
    """The embeddings that the prompt's LoRA files bundle, usable in it while they are named (RequestError for a file
    that cannot be read)."""
    found: dict[str, Embedding] = {}
    for name in dict.fromkeys(tag.name for tag in loras):
        try:
            found |= bundled_embeddings(pipeline.loras[name], name, pipeline.model.cfg.unet.context_dim)
        except ValueError as e:  # CheckpointError
            fail(f"<lora:{name}>: {str(e).replace(str(pipeline.loras[name]), '').removeprefix(': ')}")
    return found


def _check_follower(model: LatentDiffusion, other: LatentDiffusion, role: str, latent: bool = True) -> None:
    """A model that goes on from this one's latents (a refiner; a hires checkpoint in a latent mode): the same latent
    space and noise schedule (`latent`), no inpainting input, the same device and dtype."""
    if other.cfg.inpainting or other.cfg.concat_channels:
        fail(f"{role} is an inpainting model; it would take only the noisy latent")
    same = ("scale_factor", "timesteps", "linear_start", "linear_end")
    if latent and (
        other.cfg.autoencoder.embed_dim != model.cfg.autoencoder.embed_dim
        or any(getattr(other.cfg, k) != getattr(model.cfg, k) for k in same)
    ):
        fail(
            f"{role} ({other.cfg.family.title}) does not share this {model.cfg.family.title} model's latent space and "
            f"noise schedule"
        )
    if (other.device, other.dtype) != (model.device, model.dtype):
        fail(f"{role} is on {other.device} in {other.dtype}, the model on {model.device} in {model.dtype}")


def _check_against(r: GenerationRequest, pipeline: Pipeline) -> GenerationRequest:
    """The checks that need the model (or the images, which front ends may attach after the first check) -> the
    request with its size, guidance, negative prompts and tiling filled in."""
    model = pipeline.model
    cfg = model.cfg
    if r.init_image is None and (r.mask is not None or r.strength < 1):
        fail("a mask or a strength below 1 needs an init image")
    if cfg.unet.adm_in_channels and not cfg.micro_conditioning:
        fail("this model needs a vector conditioning (y), which this project does not produce for it yet")
    size = r.init_image.shape[-2:] if r.init_image is not None else (r.height, r.width)
    height, width = (cfg.default_size if side is None else side for side in size)
    f = cfg.autoencoder.downsampling_factor
    if any(side is not None and side % f for side in (r.width, r.height)):  # asked for, before any image's size
        asked = [cfg.default_size if side is None else side for side in (r.width, r.height)]
        fail(f"width and height must be positive multiples of {f}, not {asked[0]}x{asked[1]}")
    if r.init_image is not None and (width % f or height % f):
        fail(f"the image is {width}x{height}: its sides must be multiples of {f}; resize it")
    if width % f or height % f or width <= 0 or height <= 0:
        fail(f"width and height must be positive multiples of {f}, not {width}x{height}")
    if r.clip_skip is not None and not 1 <= r.clip_skip <= cfg.text.layers:
        fail(f"clip_skip must be in [1, {cfg.text.layers}] for this text encoder, not {r.clip_skip}")
    if max(width, height) > MAX_SIDE:
        fail(f"the image is {width}x{height}: at most {MAX_SIDE} pixels per side")
    if _fewest_per_group(cfg, height // f, width // f) < 2:
        fail(
            f"the image is {width}x{height}: too small for this model, whose deepest U-Net level would be left with "
            f"one value per normalisation group; make it larger"
        )
    sampler = SAMPLERS[r.sampler]
    if sampler.discrete:  # the sampler visits timesteps of the model's table
        t = sampling_timesteps(r.steps, r.spacing, cfg.timesteps)
        if len(set(t.tolist())) < r.steps or t.max() > cfg.timesteps - 1:
            fail(
                f"steps: {r.steps} steps with {r.spacing} spacing do not fit the model's {cfg.timesteps} timesteps "
                f"(they repeat or run past the last); use fewer"
            )
    r = dataclasses.replace(
        r,
        width=width,
        height=height,
        cfg_scale=cfg.default_cfg_scale if r.cfg_scale is None else r.cfg_scale,
        negative_prompts=r.negative_prompts or [""] * len(r.prompts),
    )
    return dataclasses.replace(r, vae_tiling=_tiling(r, model))


def _tiling(r: GenerationRequest, model: LatentDiffusion) -> bool:
    """Whether the autoencoder works in tiles: as asked, or (None) where the whole image would not fit in the free
    memory and tiles would. RequestError where even that does not fit."""
    cfg, width, height = model.cfg, r.width, r.height
    have = available_memory(model.device)
    tiled = r.vae_tiling
    if tiled is None:  # automatic: tiles where the whole image would not fit and tiles need less
        untiled = needed_memory(r, cfg, width, height, model.dtype, tiled=False)
        tiled = have is not None and untiled > have > needed_memory(r, cfg, width, height, model.dtype, tiled=True)
    need = needed_memory(r, cfg, width, height, model.dtype, tiled=tiled)
    if have is not None and need > have:
        fail(
            f"batch_size: {min(r.batch_size, len(r.prompts))} images of {width}x{height} need about "
            f"{_bytes(need)} at once{' even with VAE tiling' if tiled else ''}, more than the {_bytes(have)} "
            f"free on {model.device}"
        )
    return tiled


def _fewest_per_group(cfg, h: int, w: int) -> int:
    """The fewest values one of the U-Net's GroupNorm(32) layers normalises together, for one h×w latent: the
    channels of a group times the level's size (each level halves it, rounding up); a level's first block
    normalises the previous level's channels."""
    fewest, previous = [], cfg.unet.channel_mult[0]
    for mult in cfg.unet.channel_mult:
        fewest.append(cfg.unet.model_channels * min(mult, previous) // 32 * h * w)
        previous, h, w = mult, (h + 1) // 2, (w + 1) // 2
    return min(fewest)


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
    if device.type == "cpu" and (host := host_memory()) is not None:
        return host[1]
    return None


def infotext_fields(plan: Plan) -> dict:
    """The settings of a plan as the web UI's infotext fields, without the seed."""
    r, pipeline = plan.request, plan.pipeline
    sampler = get_sampler(r.sampler)
    _, schedule_type = schedule_for(sampler, r.scheduler)
    # "Seed" holds its place in the web UI's order until `infotext` fills it in. "Schedule type" is the one the
    # sampler runs on, or (none resolved: DDIM's timesteps, Euler's own uniform levels) the one asked for, as the web
    # UI writes its `p.scheduler` and only its k-diffusion samplers put the resolved label in its place.
    fields = {
        "Steps": r.steps,
        "Sampler": sampler.display_name,
        "Schedule type": schedule_type or find_scheduler(r.scheduler).label,
        "CFG scale": r.cfg_scale,
        "Seed": None,
        "Size": f"{r.width}x{r.height}",
    }
    if pipeline.checkpoint is not None:
        fields |= {"Model hash": model_hash(pipeline.checkpoint), "Model": pipeline.checkpoint.stem}
    if stores_fp8(pipeline.model):  # the web UI's `opts.fp8_storage if devices.fp8`: "Enable" (it has no e5m2)
        fields["FP8 weight"] = "Enable"
    if pipeline.vae_file is not None:
        fields |= {"VAE hash": model_hash(pipeline.vae_file), "VAE": pipeline.vae_file.name}
    eta = "Eta DDIM" if sampler.discrete else "Eta"  # the web UI's names: DDIM and PLMS apart from k-diffusion's
    for option, name in (("eta", eta), ("s_noise", "Sigma noise")):  # where not the sampler's default, as the web UI
        value = getattr(r, option)
        if option in sampler.options and value not in (None, inspect.signature(sampler.fn).parameters[option].default):
            fields[name] = value
    if r.init_image is not None or r.hires is not None:
        fields["Denoising strength"] = r.strength if r.hires is None else r.hires.strength
    if r.clip_skip is not None and r.clip_skip > 1:
        fields["Clip skip"] = r.clip_skip
    if r.hires is not None:
        fields |= _hires_fields(r, schedule_type, pipeline.hires_pipeline)
    passes = [p for p in (plan, plan.hires) if p is not None]
    if loras := dict.fromkeys(tag.name for p in passes for tags in p.lora_sets() for tag in tags):  # (prompt order)
        fields["Lora hashes"] = ", ".join(f"{_bare(name)}: {lora_hash(pipeline.loras[name])}" for name in loras)
    if used := {e.name: e for p in passes for e in p.embeddings_used()}:
        fields["TI hashes"] = ", ".join(f"{_bare(e.name)}: {e.shorthash}" for _, e in sorted(used.items()))
    if r.old_edit_timelines:
        fields["Old prompt editing timelines"] = True
    if pipeline.refiner is not None:
        file = pipeline.refiner_checkpoint
        name, hash_ = (file.stem, f" [{model_hash(file)}]") if file else ("refiner", "")
        fields |= {"Refiner": name + hash_, "Refiner switch at": r.refiner_switch}
    return fields | control_fields(plan.controls)


def _hires_fields(r: GenerationRequest, schedule_type: str | None, hires: Pipeline | None) -> dict:
    """The hires fix's fields, in the web UI's order; "Hires prompt" and "Hires negative prompt" hold their places
    for `infotext`, which writes them for the images whose prompt they differ from."""
    h = r.hires
    fields = {"Hires prompt": None, "Hires negative prompt": None}
    if h.sampler is not None and h.sampler != r.sampler:
        fields = {"Hires sampler": get_sampler(h.sampler).display_name, **fields}
    if hires is not None:  # (the web UI's short title: name [hash])
        file = hires.checkpoint
        fields = {"Hires checkpoint": f"{file.stem} [{model_hash(file)}]" if file else "hires model", **fields}
    if h.cfg_scale is not None:  # (Forge's field; the web UI's hires pass runs at the first pass's guidance)
        fields["Hires CFG Scale"] = h.cfg_scale
    _, hires_schedule = schedule_for(get_sampler(h.sampler or r.sampler), h.scheduler or r.scheduler)
    if hires_schedule is not None and hires_schedule != schedule_type:
        fields["Hires schedule type"] = hires_schedule
    if h.resize_x == 0 and h.resize_y == 0:
        fields["Hires upscale"] = h.scale
    else:
        fields["Hires resize"] = f"{h.resize_x}x{h.resize_y}"
    if h.steps:
        fields["Hires steps"] = h.steps
    if h.upscaler is not None:
        fields["Hires upscaler"] = h.upscaler
    return fields


def _bare(name: str) -> str:
    """A name as the web UI writes it in a "name: hash, ..." field: without the `:` and `,` that separate them."""
    return name.replace(":", "").replace(",", "")


def infotext(r: GenerationRequest, i: int, fields: dict) -> str:
    """Image i's `parameters` text: its prompt, negative prompt, and the fields with its seed (and its hires prompts
    where they differ from its own)."""
    fields = {**fields, "Seed": r.seeds[i]}
    if r.hires is not None:
        prompts = {"Hires prompt": (r.hires.prompt, r.prompts[i])}
        prompts["Hires negative prompt"] = (r.hires.negative_prompt, r.negative_prompts[i])
        for key, (hires, own) in prompts.items():
            fields[key] = hires if hires is not None and hires != own else None
    return parameters_text(r.prompts[i], r.negative_prompts[i], {k: v for k, v in fields.items() if v is not None})
