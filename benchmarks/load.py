"""`load_model` of an SD 1.5-size float16 `.safetensors` (random weights, 2 GB): seconds and peak memory.

Each load runs in a fresh process, which reports the growth of its peak resident memory (VmHWM) over the load and
its resident memory after it. "converted from the mapping" is the same load converting the memory-mapped tensors
(what `load_model` did before), which leaves the file's pages resident beside the copy, for comparison. Medians of
three runs of each, alternating. The file is read once first, so it is in the page cache.

    python benchmarks/load.py                 # writes /tmp/sd15-fp16.safetensors once, then loads it
    python benchmarks/load.py --device cuda   # to the GPU: seconds from the call to the weights on the device

On CUDA the process initialises CUDA before the clock starts (a process pays that once, whatever it loads), the
clock stops after a synchronise, and the peak figure is host memory: what the load costs the machine beside the GPU.
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

PROBE = """
import sys, time, torch, latent_diffusion as ld, latent_diffusion.weights.checkpoint as ck
kb = lambda field: int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1])
device = sys.argv[4]
if device == 'cuda':
    torch.zeros(1, device=device)  # CUDA's initialisation
if sys.argv[3] == 'keep':
    ck.safetensors_index = lambda path: {}  # convert the memory-mapped tensors, as before
before = kb('VmHWM')
start = time.perf_counter()
m = ld.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]), device=device)
if device == 'cuda':
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(seconds, kb('VmHWM') - before, kb('VmRSS') - before)
"""


def write_sd15_file(path: Path) -> None:
    """The SD 1.5-size float16 file of random weights (seed 0) that the GPU benchmarks load, if it is not there."""
    if not path.exists():
        from latent_diffusion import LatentDiffusion, preset, save_model

        torch.manual_seed(0)
        save_model(LatentDiffusion(preset("sd-v1.5")).half(), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/sd15-fp16.safetensors")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    path = Path(args.file)
    write_sd15_file(path)
    path.read_bytes()  # into the page cache
    print(
        f"{path} ({os.path.getsize(path) / 2**30:.2f} GiB), torch {torch.__version__}, to {args.device} ({machine()})"
    )
    print("| load as | how | seconds | peak growth | resident after | peak / resident |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in ("float16", "float32"):
        runs = {"release": [], "keep": []} if args.device == "cpu" else {"release": []}
        for _ in range(3):  # alternating, medians: single loads vary by a second on this machine
            for mode in runs:
                probe = [sys.executable, "-c", PROBE, str(path), dtype, mode, args.device]
                out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
                runs[mode].append((float(out[0]), int(out[1]) / 2**20, int(out[2]) / 2**20))
        for mode, results in runs.items():
            seconds, peak, resident = (statistics.median(r[i] for r in results) for i in range(3))
            label = "read, then converted" if mode == "release" else "converted from the mapping"
            print(f"| {dtype} | {label} | {seconds:.2f} | {peak:.2f} GiB | {resident:.2f} GiB | "
                  f"{peak / resident:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
