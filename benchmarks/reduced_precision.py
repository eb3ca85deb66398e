"""Reduced precision against float32, ours beside diffusers: what a guided U-Net step costs in each precision, and
how far each side's output moves from its own float32 output.

SD 1.5-size random weights, diffusers' StableDiffusionPipeline assembled from them (`txt2img.diffusers_pipeline`);
four models in one process: ours and diffusers', each in float32 and in the reduced dtype (bfloat16 on CPU,
float16 on a GPU). The question of issue 15, goal 7: is our bfloat16 step on a CPU with native bfloat16 at most
0.75× diffusers' float32 step, with agreement to float32 at least as good as diffusers' in bfloat16?

    python benchmarks/reduced_precision.py                  # CPU: bfloat16, 256x256, 10 DDIM steps
    python benchmarks/reduced_precision.py --dtype float16  # on a GPU (its default), 512x512

Agreement, each side against its own float32 model on the same inputs:
  - U-Net output: relative error |out - out32| / |out32| (Frobenius norms) of one guided step (batch 2, t = 999);
  - image: a whole txt2img (DDIM, CFG 7.5, same seed): mean and max |difference| in 8-bit levels, and the share of
    pixels more than one level apart. With random weights the images are noise-like; what matters is the
    comparison of the two sides on equal terms;
  - trained weights: the built-in model's demo prompts (ours only), the same figures.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latent_diffusion import LatentDiffusion, load_model, preset
from latent_diffusion.cli import DEMO_PROMPTS
from latent_diffusion.devices import has_native_bfloat16
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.weights.checkpoint import BUILTIN_MODEL
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path
from txt2img import diffusers_pipeline


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the image comparison")
    parser.add_argument("--iters", type=int, default=5, help="timed U-Net steps per model")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (512 if cuda else 256)
    low = getattr(torch, args.dtype or ("float16" if cuda else "bfloat16"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if low == torch.bfloat16 and not has_native_bfloat16(device):
        print(f"note: {device.type} has no native bfloat16 here: bfloat16 is emulated, and slow")

    torch.manual_seed(0)
    model = LatentDiffusion(preset("sd-v1.5")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = diffusers_pipeline(model, Path(tmp))
    pipe.set_progress_bar_config(disable=True)
    ours = {torch.float32: model.to(device), low: copy.deepcopy(model).to(device, low)}
    theirs = {torch.float32: pipe.to(device), low: copy.deepcopy(pipe).to(device, low)}
    names = {torch.float32: "float32", low: str(low).removeprefix("torch.")}

    # One guided U-Net step: batch 2 (negative and positive), the noisiest timestep, a random 77-token context.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    t = torch.tensor([999, 999], device=device)
    context = torch.randn(2, 77, 768, generator=g)

    def step(side: str, dtype: torch.dtype):
        xs, cs = x.to(device, dtype), context.to(device, dtype)
        if side == "ours":
            unet = ours[dtype].unet
            return lambda: unet(xs, t, cs)
        unet = theirs[dtype].unet
        return lambda: unet(xs, t, encoder_hidden_states=cs).sample

    runs = {(side, dtype): step(side, dtype) for side in ("ours", "diffusers") for dtype in (low, torch.float32)}
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    request = GenerationRequest([prompt], [1], negative_prompts=[negative], width=size, height=size,
                                steps=args.steps, sampler="ddim", cfg_scale=7.5)  # fmt: skip

    def image(side: str, dtype: torch.dtype) -> torch.Tensor:  # (3, H, W) in [0, 1], float32
        if side == "ours":
            out = generate(ours[dtype], request).images[0]
        else:
            out = theirs[dtype](prompt, negative_prompt=negative, height=size, width=size,
                                num_inference_steps=args.steps, guidance_scale=7.5,
                                generator=torch.Generator().manual_seed(1), output_type="pt").images[0]  # fmt: skip
        return out.float().cpu()

    with torch.inference_mode():
        outputs = {key: run().float().cpu() for key, run in runs.items()}  # also the warm-up
        times = {key: [] for key in runs}
        for _ in range(args.iters):  # interleaved, so drift in machine load hits all alike
            for key, run in runs.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[key].append(time.perf_counter() - start)
        images = {key: image(*key) for key in runs}

    median = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"reduced precision, SD 1.5-size random weights, {size}x{size} ({size // 8}x{size // 8} latents), "
          f"{device} ({machine()}), torch {torch.__version__}, {args.iters} iterations")  # fmt: skip
    print("  guided U-Net step (batch 2), median:")
    for (side, dtype), m in median.items():
        print(f"    {side:9s} {names[dtype]:8s} {m * 1e3:9.1f} ms")
    base = median[("diffusers", torch.float32)]
    print(f"  ours {names[low]} / diffusers float32: {median[('ours', low)] / base:.3f}   "
          f"diffusers {names[low]} / diffusers float32: {median[('diffusers', low)] / base:.3f}   "
          f"ours float32 / diffusers float32: {median[('ours', torch.float32)] / base:.3f}")  # fmt: skip
    print(f"  agreement of {names[low]} with float32 (each side against its own float32 model):")
    for side in ("ours", "diffusers"):
        step_error = relative_error(outputs[(side, low)], outputs[(side, torch.float32)])
        levels = (images[(side, low)] - images[(side, torch.float32)]).abs() * 255
        print(f"    {side:9s} U-Net output relative error {step_error:.2e}; image after {args.steps} steps: mean "
              f"{levels.mean():.2f} levels, max {levels.max():.0f}, {(levels > 1).float().mean():.1%} of pixels "
              f"more than one level apart")  # fmt: skip
    a, b = images[("ours", torch.float32)], images[("diffusers", torch.float32)]
    print(f"  float32 images, ours against diffusers: max |difference| {(a - b).abs().max():.2e}")

    # Trained weights: the built-in model, its demo prompts, its own settings (ours only: diffusers has no
    # pipeline for its 2-layer text encoder).
    builtin = {dtype: load_model(BUILTIN_MODEL, device=device, dtype=dtype) for dtype in (torch.float32, low)}
    request = GenerationRequest([p for p in DEMO_PROMPTS for _ in range(4)], list(range(4 * len(DEMO_PROMPTS))),
                                batch_size=4 * len(DEMO_PROMPTS))  # fmt: skip
    with torch.inference_mode():
        out = {dtype: generate(m, request).images.float().cpu() for dtype, m in builtin.items()}
    levels = (out[low] - out[torch.float32]).abs() * 255
    print(f"  the built-in model (trained), {len(request.prompts)} images of its demo prompts, {names[low]} against "
          f"float32: mean {levels.mean():.2f} levels, max {levels.max():.0f}, {(levels > 1).float().mean():.1%} of "
          f"pixels more than one level apart")  # fmt: skip


if __name__ == "__main__":
    main()
