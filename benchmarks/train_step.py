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

--lora RANK: a LoRA step instead, the U-Net frozen: ours through `ldm train --lora`'s adapters (`training/lora.py`,
hooked into the whole SD 1.5-size model's U-Net: every Linear and 1x1 layer of its transformer blocks, kohya's
choice), diffusers' through peft's LoRA (`unet.add_adapter`, the same layers by name, as diffusers'
train_text_to_image_lora.py adds it); AdamW over the adapters alone on both sides. Ours' full fine-tuning step is
run beside them (the --lora-full side), so that the report shows what a LoRA saves.

    python benchmarks/train_step.py --lora 16 --tiny-steps 0
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


# diffusers' names of the layers kohya's LoRA adapts in a transformer block (peft matches them by suffix)
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def lora_unet(which: str, rank: int):
    """The SD 1.5-size U-Net, frozen, with rank-`rank` adapters on kohya's layers: ours hooked in by `LoRANetwork`
    (inside the whole model, as `ldm train --lora` runs it), or diffusers' with peft's. -> (callable U-Net, the
    adapters' parameters)."""
    from latent_diffusion import LatentDiffusion, preset
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.lora import LoRANetwork, lora_targets

    torch.manual_seed(0)
    model = LatentDiffusion(preset("sd-v1.5")).requires_grad_(False)
    if which == "ours":
        network = LoRANetwork(model, lora_targets(model, TrainConfig(outdir="-", lora=rank)), dropout=0.0)
        network.attach(model)
        # Only the U-Net runs here: the text encoder and autoencoder go, so that peak memory compares U-Nets
        model.cond_stage_model, model.first_stage_model = torch.nn.Identity(), torch.nn.Identity()
        return model.unet, model, list(network.parameters())
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from peft import LoraConfig

    from latent_diffusion.models.yaml_config import to_ldm_config

    sd = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    theirs_cfg = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(model.cfg)}, sd)
    del model
    unet = UNet2DConditionModel(**theirs_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, theirs_cfg))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    return unet, unet, [p for p in unet.parameters() if p.requires_grad]


def one_side(which: str, latent: int, batch: int, precision: str, iters: int, options: set, lora: int = 0) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from latent_diffusion import preset
    from latent_diffusion.models.unet import UNetModel
    from latent_diffusion.models.yaml_config import to_ldm_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = preset("sd-v1.5")
    torch.manual_seed(0)
    if lora:
        unet, holder, trained = lora_unet(which.removesuffix("-lora"), lora)
        holder.to(device)  # the whole model on the device (ours: its text encoder and VAE too, unused here)
        unet.train()
    else:
        unet = UNetModel(cfg.unet)
        trained = None
    if which == "diffusers" and not lora:
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
    optimizer = torch.optim.AdamW(trained or unet.parameters(), lr=1e-5, fused="fused" in options)
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
            ours = which in ("ours", "ours-lora")
            out = unet(x, t, context) if ours else unet(x, t, encoder_hidden_states=context).sample
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
    parser.add_argument("--side", choices=["ours", "diffusers", "ours-lora", "diffusers-lora"], help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=int, default=0, help="a LoRA step of this rank (and ours' full step beside it)")
    parser.add_argument("--tiny-steps", type=int, default=40)
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny preset's throughput")
    for option in OPTIONS:
        parser.add_argument(f"--{option}", action="store_true")
    args = parser.parse_args()
    options = [o for o in OPTIONS if getattr(args, o.replace("-", "_"))]
    if args.side:
        lora = args.lora if args.side.endswith("-lora") else 0
        print(json.dumps(one_side(args.side, args.latent, args.batch, args.precision, args.iters, set(options), lora)))
        return
    results = {}
    sides = ("ours-lora", "diffusers-lora", "ours") if args.lora else ("ours", "diffusers")
    for side in () if args.tiny_only else sides:
        run = subprocess.run([sys.executable, __file__, "--side", side, "--latent", str(args.latent), "--batch",
                              str(args.batch), "--precision", args.precision, "--iters", str(args.iters),
                              "--lora", str(args.lora), *(f"--{o}" for o in options)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results[side] = json.loads(run.stdout.strip().splitlines()[-1])
    if args.lora:
        report_lora(args, results, options)
    elif not args.tiny_only:
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


def report_lora(args, results: dict, options: list) -> None:
    options = "".join(f", {o}" for o in options)
    print(f"LoRA rank {args.lora} training step, SD 1.5 size, batch {args.batch}, {args.latent}x{args.latent} latents, "
          f"{args.precision}, AdamW{options}, {results['ours']['device']}, torch {torch.__version__}, "
          f"{args.iters} iterations")  # fmt: skip
    names = {"ours-lora": "ours, LoRA     ", "diffusers-lora": "diffusers, peft", "ours": "ours, full     "}
    for side, name in names.items():
        r = results[side]
        print(f"  {name} median {r['median_s']:7.3f} s   peak memory {r['peak_gib']:5.1f} GiB")
    ratio = results["ours-lora"]["median_s"] / results["diffusers-lora"]["median_s"]
    print(f"  ratio ours/diffusers (LoRA) {ratio:.3f}")


if __name__ == "__main__":
    main()
