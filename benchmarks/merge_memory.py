"""`ldm merge` of two SD 1.5-size float16 `.safetensors` (random weights, 2 GB each): peak memory against one model.

Each merge runs in a fresh process, which reports the growth of its peak resident memory (VmHWM) over the merge,
and the seconds it took (the merge recipe's SHA-256 of both inputs included). "whole state dicts" is the web UI's
way for comparison: both files loaded whole (safetensors' `load_file`, as its `read_state_dict` does), then the
weighted sum key by key into A's dict. The inputs are read once first, so they are in the page cache.

    python benchmarks/merge_memory.py     # writes /tmp/sd15-fp16.safetensors and /tmp/sd15-fp16-b.safetensors once
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

PROBE = """
import sys, time
kb = lambda field: int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1])
a, b, out, how = sys.argv[1:5]
import torch
from latent_diffusion.weights.merge import MergeOptions, merge_checkpoints
from safetensors.torch import load_file, save_file
before = kb('VmHWM')
start = time.perf_counter()
if how == 'streamed':
    merge_checkpoints([a, b], out, MergeOptions(alpha=0.3))
else:
    theta_1, theta_0 = load_file(b), load_file(a)
    for key in theta_0:
        if 'model' in key and key in theta_1:
            theta_0[key] = (1 - 0.3) * theta_0[key] + 0.3 * theta_1[key]
    save_file(theta_0, out, metadata={'format': 'pt'})
print(time.perf_counter() - start, kb('VmHWM') - before, kb('VmHWM'))
"""


def write_sd15_file(path: Path, seed: int) -> None:
    """An SD 1.5-size float16 file of random weights, if it is not there (seed 0: the one the other benchmarks use)."""
    if not path.exists():
        from latent_diffusion import LatentDiffusion, preset, save_model

        torch.manual_seed(seed)
        save_model(LatentDiffusion(preset("sd-v1.5")).half(), path)


def main():
    a, b, out = (
        Path("/tmp/sd15-fp16.safetensors"),
        Path("/tmp/sd15-fp16-b.safetensors"),
        Path("/tmp/merged.safetensors"),
    )
    for seed, path in enumerate((a, b)):
        write_sd15_file(path, seed)
        path.read_bytes()  # into the page cache
    model = os.path.getsize(a) / 2**30
    print(f"two {model:.2f} GiB float16 files, weighted sum, torch {torch.__version__} ({machine()})")
    print("| how | seconds | peak growth | peak growth / one model | peak of the process |")
    print("| --- | --- | --- | --- | --- |")
    for how in ("streamed", "whole state dicts"):
        probe = [sys.executable, "-c", PROBE, str(a), str(b), str(out), how]
        seconds, growth, peak = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
        growth_gib, peak_gib = int(growth) / 2**20, int(peak) / 2**20
        print(
            f"| {how} | {float(seconds):.1f} | {growth_gib:.2f} GiB | {growth_gib / model:.2f} | {peak_gib:.2f} GiB |"
        )
        out.unlink()


if __name__ == "__main__":
    main()
