"""A full txt2img generation (text encoding, N steps with classifier-free guidance, VAE decode), ours vs
diffusers' StableDiffusionPipeline on the same SD 1.5-size random weights, in one process, interleaved.

diffusers' pipeline is assembled from our weights with diffusers' own single-file converters, a DDIM
scheduler with SD's settings, and a transformers CLIPTokenizer written from our shipped vocabulary.

    python benchmarks/txt2img.py                       # CPU: 256x256, 10 steps, float32
    python benchmarks/txt2img.py --size 512 --steps 50 # GPU default: float16
    python benchmarks/txt2img.py --batch 8 --steps 20   # throughput: 8 images per call, images per second
    python benchmarks/txt2img.py --compile              # both compiled: U-Net and VAE decoder (CUDA graphs on a GPU)

--batch N: N images of the prompt in one call (ours: one U-Net call for the batch; diffusers: num_images_per_prompt),
the image check compares the first image of each, drawn from the same seed on both sides.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.models.tokenizer import clip_tokenizer
from latent_diffusion.models.yaml_config import to_ldm_config
from latent_diffusion.pipeline.compiling import compile_mode
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path


def diffusers_pipeline(model: LatentDiffusion, workdir: Path) -> StableDiffusionPipeline:
    sd, original = model.state_dict(), {"model": to_ldm_config(model.cfg)}
    unet_cfg = create_unet_diffusers_config_from_ldm(original, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg))
    vae_cfg = create_vae_diffusers_config_from_ldm(original, sd)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_cfg))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768))  # fmt: skip
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()})
    ours = clip_tokenizer()
    (workdir / "vocab.json").write_text(json.dumps(ours.encoder))
    merges = sorted(ours.bpe_ranks, key=ours.bpe_ranks.get)
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(workdir / "vocab.json"), str(workdir / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # fmt: skip
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides' U-Net and VAE decoder")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = args.size or (512 if cuda else 256)
    steps = args.steps or (50 if cuda else 10)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    model = LatentDiffusion(preset("sd-v1.5")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = diffusers_pipeline(model, Path(tmp)).to(device, dtype)
    model = model.to(device, dtype)
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    n = args.batch
    request = GenerationRequest([prompt] * n, list(range(1, n + 1)), negative_prompts=[negative] * n, width=size,
                                height=size, steps=steps, sampler="ddim", cfg_scale=7.5, batch_size=n,
                                compile=args.compile)  # fmt: skip

    def ours():
        return generate(model, request).images

    def theirs():
        return pipe(prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=7.5, num_images_per_prompt=n, generator=torch.Generator().manual_seed(1), output_type="pt").images  # fmt: skip

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    pipe.set_progress_bar_config(disable=True)
    if args.compile:  # what `compiling.compile_model` does to ours (on the first call): the same modules and mode
        for module in (pipe.unet, pipe.vae.decoder):
            module.compile(mode=compile_mode(torch.device(device)), dynamic=False)
    with torch.inference_mode():
        _, a = timed(ours)  # warm-up, and the two images for the check below (the first of a batch)
        _, b = timed(theirs)
        if args.compile:  # CUDA graphs are recorded on the second call of a shape, replayed from the third
            timed(ours), timed(theirs)
        a, b = a[:1].float(), b[:1].float()
        t_ours, t_theirs = [], []
        for _ in range(args.iters):
            t_ours.append(timed(ours)[0])
            t_theirs.append(timed(theirs)[0])
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    where = machine()
    print(f"txt2img SD 1.5-size random weights, {size}x{size}, {steps} DDIM steps, CFG 7.5, batch {n}, {dtype}, "
          f"{device} ({where}), torch {torch.__version__}, {args.iters} iterations"
          f"{', compiled' if args.compile else ''}")  # fmt: skip
    print(f"  ours      median {mo:8.2f} s   {n / mo:6.2f} images/s")
    print(f"  diffusers median {mt:8.2f} s   {n / mt:6.2f} images/s")
    print(f"  ratio ours/diffusers {mo / mt:.3f}   (max |difference| of the images {(a - b).abs().max().item():.2e})")
    # In float16, random SD-size weights can overflow on either side: say which, and how many pixels differ.
    finite = {name: torch.isfinite(x).float().mean().item() for name, x in (("ours", a), ("diffusers", b))}
    differ = ((a - b).abs() > 1 / 255).float().mean().item()
    print(
        f"  finite pixels: ours {finite['ours']:.1%}, diffusers {finite['diffusers']:.1%}; "
        f"pixels differing by more than 1/255: {differ:.1%}"
    )


if __name__ == "__main__":
    main()
