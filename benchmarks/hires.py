"""The hires fix: a txt2img first pass, the latent enlarged 2x ("Latent", bilinear), and a second pass of img2img
over it; ours (one request with `HiresFix`) vs diffusers' equivalent two-pipeline flow on the same SD 1.5-size
random weights (StableDiffusionPipeline to latents, torch's interpolation, StableDiffusionImg2ImgPipeline on those
latents), in one process, interleaved. DDIM on both sides; the second pass runs `--hires-steps` steps of a schedule
of hires-steps / strength, which both count alike where that is whole (the defaults: 10 of 20).

    python benchmarks/hires.py                      # CPU: 128 -> 256, 5 + 5 steps, float32
    python benchmarks/hires.py --size 512 --steps 20 --hires-steps 10    # GPU default: 512 -> 1024, float16

The image check: both draw the first pass's noise from the seed, and the second pass's noise from a generator
seeded afresh (diffusers: its img2img pipeline's first draw, `add_noise`), so the images should agree to rounding.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline

from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest, HiresFix
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path
from txt2img import diffusers_pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="the first pass's side (the second: twice it)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hires-steps", type=int, default=None)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size, steps = args.size or (512 if cuda else 128), args.steps or (20 if cuda else 5)
    hires_steps = args.hires_steps or (10 if cuda else 5)
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    model = LatentDiffusion(preset("sd-v1.5")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = diffusers_pipeline(model, Path(tmp)).to(device, dtype)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    model = model.to(device, dtype)
    prompt, negative, seed = "a photograph of an astronaut riding a horse", "blurry, low quality", 1
    hires = HiresFix(scale=2.0, upscaler="Latent", steps=hires_steps, strength=args.strength)
    request = GenerationRequest([prompt], [seed], negative_prompts=[negative], width=size, height=size, steps=steps,
                                sampler="ddim", cfg_scale=7.5, hires=hires)  # fmt: skip
    schedule = int(hires_steps / args.strength)  # the web UI's (and ours): the second pass's schedule

    def ours():
        return generate(model, request).images

    def theirs():
        common = dict(prompt=prompt, negative_prompt=negative, guidance_scale=7.5)
        first = pipe(**common, height=size, width=size, num_inference_steps=steps, output_type="latent",
                     generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
        enlarged = F.interpolate(first, size=(size * 2 // 8, size * 2 // 8), mode="bilinear")
        return img2img(**common, image=enlarged, strength=args.strength, num_inference_steps=schedule,
                       generator=torch.Generator().manual_seed(seed), output_type="pt").images  # fmt: skip

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    for p in (pipe, img2img):
        p.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        _, a = timed(ours)  # warm-up, and the two images for the check below
        _, b = timed(theirs)
        t_ours, t_theirs = [], []
        for _ in range(args.iters):
            t_ours.append(timed(ours)[0])
            t_theirs.append(timed(theirs)[0])
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"hires fix SD 1.5-size random weights, {size}x{size} -> {2 * size}x{2 * size} (Latent), {steps} + "
          f"{hires_steps} DDIM steps (strength {args.strength}), CFG 7.5, {dtype}, {device} ({machine()}), "
          f"torch {torch.__version__}, {args.iters} iterations")  # fmt: skip
    print(f"  ours      median {mo:8.2f} s")
    print(f"  diffusers median {mt:8.2f} s")
    a, b = a.float(), b.float()
    print(f"  ratio ours/diffusers {mo / mt:.3f}   (max |difference| of the images {(a - b).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
