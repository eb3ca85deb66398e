"""stable-diffusion.cpp beside ours on a CPU: the same SD 1.5-size `.safetensors` (`benchmarks/load.py`'s float16
file of random weights, 2 GB, in the page cache), 256x256, 10 Euler steps at CFG 7, seed 1, the same threads; each
setting a fresh process of its program's command line (`sd-cli`, `ldm txt2img`), one after the other.

Per run: the wall time; the peak resident memory (the process's ru_maxrss, from wait4); the time from the process's
start until its first step is done (its "1/10" shown) and until that step started (done minus one steady step, the
median of the later ones: the first step's own warm-up counts against it); the steady step; and the image's mean
absolute difference, in [0, 1], from its own program's full-precision image (sd.cpp's `--type f32`, our float32):
the two programs' images are not each other's, their noise differs.

stable-diffusion.cpp is not shipped; build its `sd-cli` from its source release (CMake, the CPU backend) and name it:

    git clone --recursive https://github.com/leejet/stable-diffusion.cpp && cd stable-diffusion.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j --target sd-cli
    python benchmarks/sd_cpp.py --sd-cli stable-diffusion.cpp/build/bin/sd-cli
    python benchmarks/sd_cpp.py --only ours            # ours alone, no sd-cli needed
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gguf_memory import gguf_file
from load import write_sd15_file  # benchmarks/load.py: run as a script, this folder is on sys.path
from machine import machine

PROMPT = "a photograph of a red sofa"
SD_CPP = {  # name -> sd-cli's options; the first is the reference of the others
    "sd.cpp f32": ["--type", "f32", "--diffusion-fa"],
    "sd.cpp q8_0": ["--type", "q8_0", "--diffusion-fa"],
}
Q8_0 = ["--unet-weights-dtype", "q8_0", "--text-weights-dtype", "q8_0"]
OURS = {  # name -> ldm txt2img's options; the first is the reference of the others
    "ours float32": ["--dtype", "float32"],
    "ours float32, Q8_0 weights": ["--dtype", "float32", *Q8_0],
    "ours bfloat16, Q8_0 weights": ["--dtype", "bfloat16", *Q8_0],
    # the U-Net converted once (`ldm convert --to gguf --quant Q8_0`, as sd.cpp's users convert): no quantizing at load
    "ours bfloat16, Q8_0 GGUF U-Net, text Q8_0": ["--dtype", "bfloat16", "--unet-gguf", "{gguf}", *Q8_0[2:]],
}


@dataclass
class Run:
    wall: float
    peak_gib: float
    first_done: float  # s from the process's start
    step: float  # the steady step, s
    image: Path

    @property
    def first_started(self) -> float:
        return self.first_done - self.step


def measure(command: list[str], env: dict, steps: int, image: Path) -> Run:
    """Run `command`, stamping each step's progress line ("k/steps") as it arrives; its peak RSS from wait4. (Linux
    folds the resident size of the process that spawned it into a child's ru_maxrss at exec: this process stays
    small, never holding the file.)"""
    start = time.monotonic()
    proc = subprocess.Popen(["stdbuf", "-o0", "-e0", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)  # fmt: skip
    shown: dict[int, float] = {}
    text = b""
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        now = time.monotonic() - start
        text += chunk
        for k in re.findall(rb"(?<![\d/])(\d+)/%d(?![\d/])" % steps, text[-len(chunk) - 16 :]):
            if int(k) > 0:  # (a bar's "0/10" is shown before the first step)
                shown.setdefault(int(k), now)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0 or sorted(shown) != list(range(1, steps + 1)):
        sys.exit(f"{command[0]} failed ({proc.returncode}):\n{text.decode(errors='replace')[-3000:]}")
    step = statistics.median(shown[k + 1] - shown[k] for k in range(1, steps))
    return Run(wall, usage.ru_maxrss / 2**20, shown[1], step, image)


def sd_cpp_command(sd_cli: str, file: Path, options: list[str], args, out: Path) -> list[str]:
    return [sd_cli, "-m", str(file), *options, "-p", PROMPT, "-W", str(args.size), "-H", str(args.size),
            "--steps", str(args.steps), "--cfg-scale", "7", "--sampling-method", "euler", "-t", str(args.threads),
            "-s", "1", "-o", str(out)]  # fmt: skip


def our_command(file: Path, options: list[str], args, outdir: Path) -> list[str]:
    ldm = shutil.which("ldm", path=str(Path(sys.executable).parent)) or "ldm"
    return [ldm, "txt2img", "--ckpt", str(file), *options, "--prompt", PROMPT, "--width", str(args.size),
            "--height", str(args.size), "--steps", str(args.steps), "--sampler", "euler", "--cfg-scale", "7",
            "--seed", "1", "--device", "cpu", "--outdir", str(outdir)]  # fmt: skip


def pixel_difference(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in (a, b))
    return float(np.abs(x - y).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/sd15-fp16.safetensors")
    parser.add_argument("--sd-cli", help="stable-diffusion.cpp's sd-cli (sd) program")
    parser.add_argument("--only", choices=["ours", "sd.cpp"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.only != "ours" and not args.sd_cli:
        parser.error("--sd-cli is needed unless --only ours")
    path = Path(args.file)
    write_sd15_file(path)
    with open(path, "rb") as f:  # into the page cache, a piece at a time: see `measure` on the peak
        while f.read(1 << 26):
            pass
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    print(f"{path} ({path.stat().st_size / 2**30:.2f} GiB), {args.size}x{args.size}, {args.steps} Euler steps, "
          f"CFG 7, {args.threads} threads; {machine()}", flush=True)  # fmt: skip
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.only != "ours":
            for name, options in SD_CPP.items():
                out = Path(folder) / f"{len(runs)}.png"
                runs[name] = measure(sd_cpp_command(args.sd_cli, path, options, args, out), env, args.steps, out)
                print(f"{name}: {runs[name]}", flush=True)
        if args.only != "sd.cpp":
            for name, options in OURS.items():
                options = [str(gguf_file(path, "Q8_0")) if o == "{gguf}" else o for o in options]
                outdir = Path(folder) / str(len(runs))
                run = measure(our_command(path, options, args, outdir), env, args.steps, outdir / "00001-1.png")
                runs[name] = run
                print(f"{name}: {run}", flush=True)
        print("| run | wall, s | peak RSS | first step done, s | first step started, s | s / step | image vs "
              "full precision |\n" + "| --- " * 7 + "|")  # fmt: skip
        for name, run in runs.items():
            reference = runs[next(iter(SD_CPP if name.startswith("sd.cpp") else OURS))]
            diff = "reference" if run is reference else f"{pixel_difference(run.image, reference.image):.4f}"
            print(f"| {name} | {run.wall:.1f} | {run.peak_gib:.2f} GiB | {run.first_done:.1f} | "
                  f"{run.first_started:.1f} | {run.step:.2f} | {diff} |")  # fmt: skip


if __name__ == "__main__":
    main()
