"""txt2img, img2img and inpainting: one sampling loop in latent space, started from noise or from a noised
image latent, with the known region of an inpainting mask held in place.

Seeds: image i uses its own generator, seeded `seeds[i]`, for everything random about it (its posterior
sample, initial noise and per-step noise), so any image of a grid can be regenerated alone. Random numbers
are drawn on the CPU, so a seed gives the same noise on every device. The order of draws is diffusers' for a
single image: image latent (img2img, inpainting), initial noise, masked-image latent (inpainting models),
then the sampler's per-step noise.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..devices import to_device
from ..models.ldm import LatentDiffusion
from ..sampling.noise import BrownianNoise, per_image_randn
from ..sampling.noise_schedule import sigma_to_t
from ..sampling.parameterization import sigma_from_alpha_bar
from ..sampling.samplers import Step, get_sampler
from ..sampling.sigma_schedules import sampling_schedule
from ..weights import storage
from ..weights.lora import LoRA, LoRAError, apply_lora, read_lora, remove_lora
from .compiling import compile_model
from .conditioning import scheduled_denoiser
from .control_fixes import after_decode, first_noise
from .control_hook import SamplingClock, control_conditioning, controlled_unet
from .hires import LATENT_MODES, as_8_bit, truncate, upscale_latent
from .loading import Pipeline, as_pipeline
from .plan import Plan, infotext, infotext_fields, resolve
from .request import GenerationRequest, GenerationResult, RequestError
from .upscalers import RESAMPLERS, Upscaler, UpscalerError, UpscalerModel, load_upscaler, upscale


@dataclass
class Progress:
    step: int  # sampling steps done, over the whole request
    total: int  # sampling steps of the whole request
    sampler_step: Step  # σ, the latent x and the x0 estimate of this step, for previews


class NonFiniteError(RuntimeError):
    """A run that produced NaN or inf where an image should be: nothing is written."""


class FiniteLatents:
    """Stops a run at its first step whose latents hold NaN or inf, read one step late: the answer about step i is
    read when step i + 1 is queued. A read of a GPU tensor waits for everything queued before it; read at once,
    the host would queue each step only after the one before had finished, and the GPU would idle meanwhile. On
    CUDA the answer is copied to pinned host memory right after step i, and an event marks that copy: waiting for
    it leaves step i + 1's kernels running."""

    def __init__(self, steps: int, seeds: list[int]):
        self.steps, self.seeds = steps, seeds
        self.pending = None  # (step index, all finite: a 0-d bool tensor on the host, its CUDA event or None)

    def check(self, step: Step | None) -> None:
        """Queue this step's check and read the one before (None: read the last)."""
        pending, self.pending = self.pending, None if step is None else (step.i, *self.ask(step.x))
        if pending is None:
            return
        i, finite, ready = pending
        if ready is not None:
            ready.synchronize()
        if not finite:
            raise NonFiniteError(
                f"step {i + 1} of {self.steps} gave non-finite latents (NaN or inf) for seeds {self.seeds}; "
                "the likely causes are the checkpoint's weights or the guidance scale"
            )

    @staticmethod
    def ask(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """(whether x is all finite, a 0-d bool tensor the host can read; the CUDA event to wait for first, or None)"""
        finite = torch.isfinite(x).all()
        if not finite.is_cuda:
            return finite, None
        answer = torch.empty((), dtype=torch.bool, pin_memory=True)
        answer.copy_(finite, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return answer, ready


def decode(model: LatentDiffusion, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Latents -> images (float32, about [-1, 1]), in overlapping tiles if `tiled`. A float16 decode that overflows
    is done again in float32 (the web UI's automatic VAE precision); a copy of the decoder in float32 exists only
    for that retry. A family whose VAE is known to overflow in float16 (SDXL's) decodes in float32 at once, as
    diffusers' `force_upcast`."""
    storage.free_buffers()  # the U-Net's weights are done with for now
    upcast = model.dtype == torch.float16 and model.cfg.family.vae_overflows_in_float16
    images = None if upcast else model.autoencoder_decode(z.to(model.dtype), tiled=tiled).float()
    if model.dtype == torch.float16 and (upcast or not torch.isfinite(images).all()):
        vae = copy.deepcopy(model.first_stage_model).float()
        images = vae.decode(z.float() / model.scale_factor, tiled=tiled)
    if not torch.isfinite(images).all():
        raise NonFiniteError("the autoencoder decoded non-finite pixels (NaN or inf): its weights are broken")
    return images


def generate(
    pipeline: Pipeline | LatentDiffusion,
    request: GenerationRequest,
    progress: Callable[[Progress], None] | None = None,
) -> GenerationResult:
    """Run a request, batch_size images per U-Net call; RequestError before any work if it cannot run. With the
    pipeline's refiner (SDXL's), that second model denoises the low-noise end of the schedule (`Experts`)."""
    return generate_plan(resolve(request, as_pipeline(pipeline)), progress)


@torch.no_grad()
def generate_plan(plan: Plan, progress: Callable[[Progress], None] | None = None) -> GenerationResult:
    """Run a resolved request (`plan.resolve`): its images in U-Net batches, each pass on its LoRAs' merged weights."""
    pipeline, r = plan.pipeline, plan.request
    passes = [p for p in (plan, plan.hires) if p is not None]
    if r.compile:
        for m in {id(m): m for p in passes for m in (p.pipeline.model, p.pipeline.refiner) if m}.values():
            compile_model(m)
    sets = [p.lora_sets() for p in passes]
    batches = unet_batches(list(zip(*sets)), r.batch_size)  # (a batch shares its LoRA set in every pass)
    loras = read_loras(pipeline.loras, [tags for pass_sets in sets for tags in pass_sets])
    steps = sum(p.request.steps_run for p in passes)  # per image
    upscaler = hires_upscaler(plan)  # (a model file loaded before any work, as the LoRAs are read)
    images, warnings = [], []
    for number, batch in enumerate(batches):
        done = itertools.count(number * steps + 1)

        def step_done(step: Step, done=done) -> None:
            if progress:
                progress(Progress(next(done), len(batches) * steps, step))

        out, notes = sample(plan, batch, step_done, lambda p, tags: merged(p, loras, tags, warnings), upscaler)
        images.append(out)
        warnings.extend(n for n in notes if n not in warnings)
    fields = infotext_fields(plan)  # after the work: the checkpoint's hash reads the whole file (1.3 s for 2 GB)
    infotexts = [infotext(r, i, fields) for i in range(len(r.prompts))]
    return GenerationResult(torch.cat(images), infotexts, warnings, r, fields)


@contextlib.contextmanager
def merged(pipeline: Pipeline, loras: dict[str, LoRA], tags: tuple, warnings: list[str]):
    """The LoRAs `tags` name merged into the model's weights for the block in the prompt's order (each onto the
    weights the ones before it left, as the web UI applies its networks), and taken out again bit for bit after;
    their warnings added to `warnings`."""
    model, applied = pipeline.model, []
    try:
        for tag in tags:
            try:
                applied.append(apply_lora(model, loras[tag.name], tag.unet_weight, te_weight=tag.te_weight))
            except LoRAError as e:
                raise lora_error(tag.name, pipeline.loras[tag.name], e) from None
            warnings += [w for w in applied[-1].warnings if w not in warnings]
        yield
    finally:
        for a in reversed(applied):
            remove_lora(model, a)


def unet_batches(lora_sets: list[tuple], batch_size: int) -> list[range]:
    """Consecutive images in U-Net batches of at most batch_size, and a new batch wherever the LoRA set changes:
    a batch samples on one set of merged weights, which must not reach an image that does not name them."""
    batches, start = [], 0
    for i in range(1, len(lora_sets) + 1):
        if i == len(lora_sets) or i - start == batch_size or lora_sets[i] != lora_sets[start]:
            batches.append(range(start, i))
            start = i
    return batches


def read_loras(files: dict[str, Path], lora_sets: list[tuple]) -> dict[str, LoRA]:
    """Every LoRA the request's prompts name, read once, before any work (RequestError for a file that is not
    a LoRA)."""
    found = {}
    for name in sorted({tag.name for tags in lora_sets for tag in tags}):
        try:
            found[name] = read_lora(files[name])
        except ValueError as e:  # CheckpointError, LoRAError
            raise lora_error(name, files[name], e) from None
    return found


def lora_error(name: str, path: Path, e: Exception) -> RequestError:
    """A LoRA file's error as the prompt's: named by its tag, without the file's path (a server's, in an answer)."""
    return RequestError(f"<lora:{name}>: {str(e).replace(str(path), '').removeprefix(': ')}")


def rows(images: torch.Tensor, batch: range) -> torch.Tensor:
    """The batch's rows of a request's (1 or n, c, H, W) images: one image for all, or one per image."""
    return images.expand(len(batch), -1, -1, -1) if len(images) == 1 else images[batch.start : batch.stop]


def _batch_images(r: GenerationRequest, batch: range, device: torch.device, latent_size: tuple[int, int]):
    """The batch's init image in [-1, 1] and its mask (white = repaint, soft where blurred) at pixel and at latent
    size, or Nones. As the web UI: the latent mask is the mask (or the request's latent mask) resized (bicubic) and
    rounded to 0 or 1."""
    if r.init_image is None:
        return None, None, None
    image = rows(r.init_image, batch).to(device, torch.float32) * 2 - 1
    if r.mask is None:
        return image, None, None
    mask = rows(r.mask, batch).to(device, torch.float32)
    held = mask if r.latent_mask is None else rows(r.latent_mask, batch).to(device, torch.float32)
    latent_mask = F.interpolate(held, size=latent_size, mode="bicubic", antialias=True).round().clamp(0, 1)
    return image, mask, latent_mask


class Experts:
    """SDXL's ensemble of experts (Podell et al. 2023, section 2.5), as diffusers' denoising_end / denoising_start:
    the base model denoises timesteps t >= cutoff = round(T·(1 − switch)), the refiner those below. Both see the
    same latents, noise and σs; the sampler does not know there are two."""

    def __init__(self, base, refiner, model: LatentDiffusion, switch: float):
        self.base, self.refiner = base, refiner
        self.log_sigmas = sigma_from_alpha_bar(model.alphas_cumprod.double()).log().cpu()
        self.cutoff = round(model.cfg.timesteps * (1 - switch))
        self.refined = False  # whether the refiner denoised any step (then its autoencoder decodes)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64).cpu(), self.log_sigmas) >= self.cutoff:
            return self.base(x, sigma)
        self.refined = True
        return self.refiner(x, sigma)


@dataclass
class Stage:
    """One pass of the sampler over a range of the noise schedule, with everything it needs by name (in the spirit
    of flux's `prepare()`). txt2img, img2img and inpainting are one stage; SDXL's refiner takes over within it (the
    web UI switches models between two steps of one pass, which keeps a multistep sampler's history). A second
    pass (hires fix) is another stage that starts from this one's latent; a ControlNet is one more input of a
    stage's denoiser, active in a window of its steps."""

    sigmas: torch.Tensor  # (n + 1,) float64 on the CPU: the noise levels the sampler walks, x's first
    x: torch.Tensor  # (b, c, h, w): the latent at sigmas[0]
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, σ) -> the x0 estimate
    noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (σ, σ_next) -> fresh noise like x
    hold: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # after step i: the known region put back
    after_step: Callable[[Step], None] | None = None  # told of each step's end (control units' guidance windows)


def hires_upscaler(plan: Plan) -> str | UpscalerModel | None:
    """The hires fix's upscaler: a latent mode's or a resampler's name, or its model file loaded on the model's device
    in its dtype (RequestError naming it, without the file's path, for a file that is not an upscaler)."""
    if plan.hires is None:
        return None
    name, pipeline = plan.request.hires.upscaler or "Latent", plan.pipeline
    if name in LATENT_MODES or name in RESAMPLERS:
        return name
    path, model = pipeline.upscalers[name], pipeline.model
    try:
        return load_upscaler(Upscaler(name, path), device=model.device, dtype=model.dtype)
    except UpscalerError as e:
        message = str(e).replace(str(path), "").removeprefix(": ")
        raise RequestError(f"hr_upscaler {name}: {message}") from None


def sample(
    plan: Plan,
    batch: range,
    step_done: Callable[[Step], None],
    with_loras: Callable,
    upscaler: str | UpscalerModel | None = None,
):
    """Images `batch` of a plan -> ((b, 3, H, W) in [0, 1], prompt warnings): each pass prepared and run on the LoRAs
    its prompts name (`with_loras(pipeline, tags)`: a context, `merged`), and the last pass decoded. With the hires fix the first pass's latent
    is enlarged (`hires.py`) and a second pass runs over it."""
    r, seeds = plan.request, [plan.request.seeds[i] for i in batch]
    with contextlib.ExitStack() as merged_loras:
        first = (plan.pipeline, plan.lora_sets()[batch.start])
        merged_loras.enter_context(with_loras(*first))
        stage, pixel_mask, notes = prepare(plan, batch)
        x = run(stage, r, seeds, step_done)
        if plan.hires is None:
            return finish(plan, batch, stage, x, pixel_mask), notes
        latent, image = enlarge(plan, x, upscaler)
        second = (plan.hires.pipeline, plan.hires.lora_sets()[batch.start])
        if second[0] is not first[0] or second[1] != first[1]:  # (the same LoRAs stay merged for both passes)
            merged_loras.close()
            merged_loras.enter_context(with_loras(*second))
        stage, _, more = prepare(plan.hires, batch, latent=latent, start_image=image)
        x = run(stage, plan.hires.request, seeds, step_done)
    notes += [n for n in more if n not in notes]
    return finish(plan.hires, batch, stage, x, None), notes


def enlarge(
    plan: Plan, x: torch.Tensor, upscaler: str | UpscalerModel
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The first pass's latents (b, c, h, w) enlarged for the hires pass -> (the latents at its size, None) in a latent
    mode, or (None, the images at its size in [0, 1]) with an image upscaler: decoded, through 8-bit pixels as the
    web UI's, enlarged as its `images.resize_image` does, and cut where the latent would be truncated (the hires pass
    encodes them as img2img does)."""
    size, model = plan.hires_size, plan.pipeline.model
    f = model.cfg.autoencoder.downsampling_factor
    if isinstance(upscaler, str) and upscaler in LATENT_MODES:
        return upscale_latent(x, size, upscaler, f), None
    images = as_8_bit((decode(model, x, tiled=plan.request.vae_tiling) / 2 + 0.5).clamp(0, 1))
    images = upscale(images, upscaler, size=size.upscale_to)
    tx, ty = size.truncate
    return None, truncate(images, (tx * f, ty * f))


def prepare(
    plan: Plan, batch: range, latent: torch.Tensor | None = None, start_image: torch.Tensor | None = None
) -> tuple[Stage, torch.Tensor | None, list[str]]:
    """The batch's stage: its σs, its starting latent (noise, or the init image's latent noised to the first σ), the
    conditioning of its denoiser and its per-step noise, all drawn from each image's own generator. A hires pass
    starts from the batch's enlarged `latent` or `start_image` (in [0, 1]). -> (the stage, the inpainting mask at pixel
    size or None, prompt warnings)."""
    pipeline, r = plan.pipeline, plan.request
    model = pipeline.model
    refiner = pipeline.refiner if plan.hires is None else None  # (the web UI's default: the refiner in the last pass)
    sampler = get_sampler(r.sampler)
    device, dtype = model.device, model.dtype
    generators = [torch.Generator().manual_seed(r.seeds[i]) for i in batch]
    f = model.cfg.autoencoder.downsampling_factor
    latent_shape = (model.cfg.autoencoder.embed_dim, r.height // f, r.width // f)
    sigmas = sampling_schedule(sampler, r.scheduler, r.schedule_steps, model.alphas_cumprod.cpu(), r.spacing)
    sigmas = sigmas[r.schedule_steps - r.steps_run :]  # img2img starts part-way

    def encode(image: torch.Tensor) -> torch.Tensor:
        noise = per_image_randn(latent_shape, generators)
        return model.autoencoder_encode(image.to(dtype), noise=noise, tiled=r.vae_tiling).float()

    image, pixel_mask, latent_mask = _batch_images(r, batch, device, latent_shape[1:])
    if start_image is not None:
        image = start_image.to(device, torch.float32) * 2 - 1
    from_image = (image is not None or latent is not None) and r.noises_the_image
    image_latent = latent
    if image is not None and (from_image or (pixel_mask is not None and not model.cfg.inpainting)):
        image_latent = encode(image)
    noise = to_device(per_image_randn(latent_shape, generators), device)
    if r.latent_fill is not None and image_latent is not None:  # the web UI's "latent noise" draws the seed's first
        # noise, which is also its initial noise: here the same tensor
        fill = noise if r.latent_fill == "noise" else torch.zeros_like(noise)
        image_latent = image_latent * (1 - latent_mask) + fill * latent_mask
    start = noise  # (+lama leans the first pass's toward its fill)
    if latent is None and start_image is None:
        start = first_noise(noise, plan.controls, batch, model, r.vae_tiling)
    if from_image:
        x = image_latent + sigmas[0].item() * start
    else:
        x = start * (1 + sigmas[0].item() ** 2) ** 0.5
    inpainting = model.cfg.inpainting  # (the model sees a mask and a masked image beside the latent)
    extra = {"concat": inpainting_input(r, batch, image, pixel_mask, encode, device).to(dtype)} if inpainting else {}

    def hold(i: int, x: torch.Tensor) -> torch.Tensor:
        """Standard models: the known region at the noise level the sampler is now at (clean after the last step)."""
        sigma = sigmas[i + 1].item() if i + 2 < len(sigmas) else 0.0
        return latent_mask * x + (1 - latent_mask) * (image_latent + sigma * noise)

    def noise_sampler(sigma, sigma_next) -> torch.Tensor:
        return to_device(per_image_randn(latent_shape, generators), device)

    if sampler.brownian:
        noise_sampler = BrownianNoise(latent_shape, sigmas, [r.seeds[i] for i in batch], device)

    denoiser, after_step, notes = stage_denoiser(plan, batch, refiner, extra)
    keep = hold if latent_mask is not None and not model.cfg.inpainting else None
    return Stage(sigmas, x, denoiser, noise_sampler, keep, after_step), pixel_mask, notes


def inpainting_input(r: GenerationRequest, batch: range, image, pixel_mask, encode: Callable, device) -> torch.Tensor:
    """An inpainting U-Net's extra input (b, 1 + c, h, w): the mask (hard: the model was trained on hard masks) at the
    latent's size and the latent of the image with the hole cut out (`encode`: in [-1, 1], its draws the images').
    Without a mask (txt2img, img2img, a hires pass) all of the image is the hole, as the web UI's
    `txt2img_image_conditioning` has it: a mask of ones and the latent of a mid-grey image."""
    full = torch.ones(len(batch), 1, r.height, r.width, device=device)
    binary = full if pixel_mask is None else (pixel_mask >= 0.5).float()
    hole = encode((torch.zeros_like(binary).expand(-1, 3, -1, -1) if image is None else image) * (1 - binary))
    return torch.cat([F.interpolate(binary, size=hole.shape[-2:]), hole], dim=1)


def stage_denoiser(plan: Plan, batch: range, refiner, extra: dict):
    """The batch's denoiser: the model's, with its control units (their maps batched as conditioning fields, as the
    text is) and their step counter, handing over to the refiner's at its switch. -> (denoiser, what runs after each
    step or None, prompt warnings)."""
    model, r = plan.pipeline.model, plan.request
    calls = itertools.count()  # the model evaluations so far, for prompt editing (the web UI counts over both)
    clock = net = None
    if plan.controls:  # ControlNets and T2I-Adapters
        clock = SamplingClock(r.steps_run)
        extra = extra | control_conditioning(plan.controls, batch, model.device)
        net = controlled_unet(model, plan.controls, clock, r.vae_tiling)
    denoiser, notes = scheduled_denoiser(model, plan, batch, extra, calls, net=net)
    if clock is not None:  # (a refiner's steps run without control)
        denoiser = clock.counting(denoiser)
    if refiner is not None:
        refined, more = scheduled_denoiser(refiner, plan, batch, {}, calls, own_chunks=False)
        denoiser = Experts(denoiser, refined, model, r.refiner_switch)
        notes += [n for n in more if n not in notes]
    return denoiser, (clock.step_done if clock is not None else None), notes


def run(stage: Stage, r: GenerationRequest, seeds: list[int], step_done: Callable[[Step], None]) -> torch.Tensor:
    """The request's sampler over the stage -> the latent at its last σ, in the VP scale the autoencoder reads.
    Stops at the first step whose latents are not finite (`FiniteLatents`)."""
    sampler = get_sampler(r.sampler)
    options = {k: getattr(r, k) for k in sampler.options if getattr(r, k) is not None}
    finite = FiniteLatents(r.steps_run, seeds)

    def callback(step: Step) -> None:
        finite.check(step)
        if stage.after_step is not None:
            stage.after_step(step)
        step_done(step)

    # σs stay float64 on the CPU (0-d values mix with tensors on any device; MPS has no float64)
    x = sampler.fn(
        stage.denoiser, stage.x, stage.sigmas, noise=stage.noise, callback=callback, hold=stage.hold, **options
    )
    finite.check(None)  # the last step's, before the decode
    if sampler.lands_at == "sigma_min":  # DDIM/PLMS stop at σ_0 > 0: back to the VP latent there
        x = x / (1 + stage.sigmas[-1].item() ** 2) ** 0.5
    return x


def finish(plan: Plan, batch: range, stage: Stage, x: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """The last pass's latent -> images (b, 3, H, W) in [0, 1], decoded by the autoencoder of the model that denoised
    last, fixed by its control units (`control_fixes.after_decode`), and laid over the init image through the mask
    (inpainting, unless the caller pastes)."""
    pipeline, r = plan.pipeline, plan.request
    refined = isinstance(stage.denoiser, Experts) and stage.denoiser.refined
    images = (decode(pipeline.refiner if refined else pipeline.model, x, tiled=r.vae_tiling) / 2 + 0.5).clamp(0, 1)
    images = after_decode(images, plan.controls, batch)
    if pixel_mask is not None and r.paste:  # the input's pixels outside the mask; a soft mask's edge at half opacity
        overlay = (pixel_mask * 2).clamp(max=1)  # (the web UI's overlay: a blurred mask's 0.5 is fully repainted)
        images = overlay * images + (1 - overlay) * rows(r.init_image, batch).to(images.device, torch.float32)
    return images
