"""fp8 weight storage on a CPU: peak memory and the time of a guided U-Net step, float32 against the U-Net's and the
text encoder's weights stored in float8 (`--unet-weights-dtype` / `--text-weights-dtype`) and computed in float32.

SD 1.5 size, random weights: the float16 `.safetensors` that `benchmarks/load.py` writes (2 GB, seed 0). Each
setting runs in a fresh process, which loads the file and runs one guided step (batch 2, 256x256: 32x32 latents,
77 context tokens) to warm up, then times `--steps` more; it reports its peak resident memory (VmHWM) after the
load and at the end, and its U-Net output, so that the float8 output's distance from float32's is measured on the
same inputs. Rounds alternate the settings; medians.

    python benchmarks/fp8_memory.py                      # float32 and fp8_e4m3fn, 2 rounds, 3 timed steps each
    python benchmarks/fp8_memory.py --rounds 1 --steps 2 --formats fp8_e4m3fn fp8_e5m2
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from load import write_sd15_file  # benchmarks/load.py: run as a script, this folder is on sys.path
from machine import machine

PROBE = """
import sys, time, torch
from latent_diffusion import load_model
from latent_diffusion.weights.storage import FP8_DTYPES
kb = lambda field: int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1])
path, storage, steps, out = sys.argv[1], FP8_DTYPES.get(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
model = load_model(path, dtype=torch.float32, unet_weights_dtype=storage, text_weights_dtype=storage)
load_seconds, after_load = time.perf_counter() - start, kb('VmHWM')
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 32, 32, generator=g)
t = torch.tensor([500, 500])
with torch.no_grad():
    cond = {"crossattn": model.get_text_conditioning(["a photograph of a red sofa", ""])}
    times = []
    for _ in range(steps + 1):  # the first warms up
        start = time.perf_counter()
        eps = model(x, t, cond)
        times.append(time.perf_counter() - start)
torch.save(eps, out)
weights = sum(p.nbytes for p in model.parameters())
print(load_seconds, after_load, kb('VmHWM'), weights, *times[1:])
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/sd15-fp16.safetensors")
    parser.add_argument("--formats", nargs="+", default=["fp8_e4m3fn"], choices=["fp8_e4m3fn", "fp8_e5m2"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed guided steps per process")
    args = parser.parse_args()
    path = Path(args.file)
    write_sd15_file(path)
    path.read_bytes()  # into the page cache
    print(f"{path} ({os.path.getsize(path) / 2**30:.2f} GiB), torch {torch.__version__}, {machine()}")
    settings = ["float32", *args.formats]
    runs: dict[str, list] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for setting in settings:
                out = Path(folder) / f"{setting}.pt"
                probe = [sys.executable, "-c", PROBE, str(path), setting, str(args.steps), str(out)]
                fields = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
                load_s, after_load, peak, weights, *steps = (float(v) for v in fields)
                runs[setting].append((load_s, after_load / 2**20, peak / 2**20, weights / 2**30, steps))
        reference = torch.load(Path(folder) / "float32.pt")
        errors = {s: relative_error(torch.load(Path(folder) / f"{s}.pt"), reference) for s in settings}
    columns = ["weights", "load, s", "peak RSS after load", "peak RSS, whole process", "weights in memory"]
    columns += ["s / guided step", "U-Net output vs float32"]
    print("| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|")
    for setting, results in runs.items():
        load_s, after_load, peak, weights = (statistics.median(r[i] for r in results) for i in range(4))
        step = statistics.median(s for r in results for s in r[4])
        name = "float32" if setting == "float32" else f"U-Net and text encoder {setting}, float32 compute"
        cells = [name, f"{load_s:.2f}", f"{after_load:.2f} GiB", f"{peak:.2f} GiB", f"{weights:.2f} GiB"]
        cells += [f"{step:.2f}", f"{errors[setting]:.4f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """|out - reference| / |reference|, Frobenius norms."""
    return ((out - reference).norm() / reference.norm()).item()


if __name__ == "__main__":
    main()
