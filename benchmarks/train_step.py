"""One training step (forward, backward, AdamW) of the SD 1.5-size U-Net: ours vs diffusers'
UNet2DConditionModel with the same weights and batch; and the tiny preset's training throughput with and
without latent caching.

Each U-Net runs in its own subprocess (two SD-size models with AdamW state do not fit in 24 GB together),
so each peak-memory figure is that model's alone.

    python benchmarks/train_step.py                  # CPU: 32x32 latents, batch 1, float32
    python benchmarks/train_step.py --latent 64 --batch 8 --precision bf16   # the GPU setting
    python benchmarks/train_step.py --latent 64 --batch 32 --precision bf16 --fused --tiny-steps 0

--fused: both sides' AdamW as one fused kernel (`ldm train`'s optimizer on CUDA and CPU). --checkpointing: both
recompute their blocks' activations in the backward pass (ours: `unet.checkpointing`, `ldm train
--gradient-checkpointing`; diffusers: `enable_gradient_checkpointing`). --compile: both U-Nets torch.compiled
(inductor, static shapes), as `ldm train --compile` does. --channels-last: both U-Nets' weights and inputs in
NHWC memory layout (the layout of cuDNN's and oneDNN's fastest convolutions). --tiny-steps 0 leaves out the tiny preset's throughput.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

OPTIONS = ("fused", "checkpointing", "compile", "channels-last")


def one_side(which: str, latent: int, batch: int, precision: str, iters: int, options: set) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from latent_diffusion import preset
    from latent_diffusion.models.unet import UNetModel
    from latent_diffusion.models.yaml_config import to_ldm_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = preset("sd-v1.5")
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet)
    if which == "diffusers":
        sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
        theirs_cfg = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
        theirs = UNet2DConditionModel(**theirs_cfg)
        theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, theirs_cfg))
        del unet, sd
        unet = theirs
    unet = unet.to(device).train()
    if "checkpointing" in options:
        if which == "ours":
            unet.checkpointing = True
        else:
            unet.enable_gradient_checkpointing()
    if "channels-last" in options:
        unet = unet.to(memory_format=torch.channels_last)
    if "compile" in options:
        unet.compile(dynamic=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused="fused" in options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    if "channels-last" in options:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = torch.randn(batch, 77, 768, generator=g).to(device)
    target = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with torch.autocast(**autocast):
            out = unet(x, t, context) if which == "ours" else unet(x, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and AdamW state allocation, and compilation with --compile)
    step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {"median_s": statistics.median(times), "peak_gib": peak, "device": machine()}  # fmt: skip


def tiny_throughput(cache: bool, steps: int) -> float:
    """Steady-state samples/s: the time of a 2N-step run minus that of an N-step run (set-up and the cache
    building cancel out)."""
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.diffusion import train

    def run(n: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(outdir=out, steps=n, batch_size=8, image_size=64, shapes_count=256, cache_latents=cache,
                              save_every=10**9, quiet=True, train_text_encoder=True, device="cpu")  # fmt: skip
            start = time.perf_counter()
            train(cfg)
            return time.perf_counter() - start

    return steps * 8 / (run(2 * steps) - run(steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--tiny-steps", type=int, default=40)
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny preset's throughput")
    for option in OPTIONS:
        parser.add_argument(f"--{option}", action="store_true")
    args = parser.parse_args()
    options = [o for o in OPTIONS if getattr(args, o.replace("-", "_"))]
    if args.side:
        print(json.dumps(one_side(args.side, args.latent, args.batch, args.precision, args.iters, set(options))))
        return
    results = {}
    for side in () if args.tiny_only else ("ours", "diffusers"):
        run = subprocess.run([sys.executable, __file__, "--side", side, "--latent", str(args.latent), "--batch",
                              str(args.batch), "--precision", args.precision, "--iters", str(args.iters),
                              *(f"--{o}" for o in options)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results[side] = json.loads(run.stdout.strip().splitlines()[-1])
    if not args.tiny_only:
        report(args, results, options)
    if args.tiny_steps == 0:
        return
    cached, uncached = tiny_throughput(True, args.tiny_steps), tiny_throughput(False, args.tiny_steps)
    print(f"tiny preset, 64x64 shapes, batch 8, text encoder trained, steady state over {args.tiny_steps} steps: "
          f"{cached:.1f} samples/s with latent caching, {uncached:.1f} without")  # fmt: skip


def report(args, results: dict, options: list) -> None:
    a, b = results["ours"], results["diffusers"]
    options = "".join(f", {o}" for o in options)
    print(f"U-Net training step, SD 1.5 size, batch {args.batch}, {args.latent}x{args.latent} latents, {args.precision},"
          f" AdamW{options}, {a['device']}, torch {torch.__version__}, {args.iters} iterations")  # fmt: skip
    for name, r in (("ours     ", a), ("diffusers", b)):
        print(
            f"  {name} median {r['median_s']:7.3f} s   {args.batch / r['median_s']:6.1f} samples/s   "
            f"peak memory {r['peak_gib']:5.1f} GiB"
        )
    print(f"  ratio ours/diffusers {a['median_s'] / b['median_s']:.3f}")


if __name__ == "__main__":
    main()
