"""VAE decode of a large image, whole and in tiles, ours and diffusers' (`enable_tiling`): seconds and peak memory.

SD-size autoencoder with random weights (memory and time do not depend on them), diffusers' AutoencoderKL given
the same weights through its single-file converter. Each variant runs in a fresh process of its own, so that
its peak resident memory (CPU) or peak allocated memory (CUDA) is its own.

    python benchmarks/vae_tiling.py                  # 1024x1024 on this device
    python benchmarks/vae_tiling.py --size 2048 --only ours-tiled diffusers-tiled
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

VARIANTS = ("ours-whole", "ours-tiled", "diffusers-whole", "diffusers-tiled")


def peak_resident() -> int:
    """Bytes: this process's peak resident memory (VmHWM; ru_maxrss would include the parent's, inherited)."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def run_one(variant: str, size: int) -> dict:
    from latent_diffusion import preset
    from latent_diffusion.models.autoencoder import AutoencoderKL as Ours

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    cfg = preset("sd-v1.5")
    torch.manual_seed(0)
    vae = Ours(cfg.autoencoder)
    z = torch.randn(1, cfg.autoencoder.embed_dim, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    if variant.startswith("ours"):
        vae = vae.to(device, dtype).eval()
        decode = lambda z: vae.decode(z, tiled=variant == "ours-tiled")  # noqa: E731
    else:
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

        from latent_diffusion.models.yaml_config import to_ldm_config

        sd = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
        theirs_cfg = create_vae_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
        theirs = AutoencoderKL(**theirs_cfg)
        theirs.load_state_dict(convert_ldm_vae_checkpoint(sd, theirs_cfg))
        del vae
        theirs = theirs.to(device, dtype).eval()
        if variant == "diffusers-tiled":
            theirs.enable_tiling()
        decode = lambda z: theirs.decode(z).sample  # noqa: E731
    z = z.to(device, dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        start = time.perf_counter()
        image = decode(z)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_resident()
    # What generation adds to every decode to catch a float16 overflow (`generate.decode`): two finiteness checks
    # of the image (the float16 one and the final one), each a reduction to one bool read by the host. In generation
    # the per-step checks of the latents have run these kernels before; here one untimed check runs them first (a
    # process's first launch of a CUDA kernel loads it; the first GPU run's 62 ms most likely counted that).
    bool(torch.isfinite(image).all())
    start = time.perf_counter()
    finite = all(bool(torch.isfinite(image).all()) for _ in range(2))
    check = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "peak_gib": peak / 2**30, "shape": list(image.shape),
            "finite": finite, "check_seconds": check}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process: one variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size)))
        return
    print(f"{machine()}, torch {torch.__version__}, SD-size VAE decode of {args.size}x{args.size}")
    print("| variant | seconds | peak memory | overflow checks (generation's two) |")
    print("| --- | --- | --- | --- |")
    for variant in args.only:
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--size", str(args.size)],
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            print(f"| {variant} | failed: {out.stderr.strip().splitlines()[-1]} | | |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        check = f"{r['check_seconds'] * 1e3:.2f} ms = {r['check_seconds'] / r['seconds']:.3%} of the decode"
        print(f"| {variant} | {r['seconds']:.1f} | {r['peak_gib']:.2f} GiB | {check} |", flush=True)


if __name__ == "__main__":
    main()
