"""GGUF U-Nets on a CPU: peak memory, the time of a guided U-Net step and the image of a short run, float32 against
fp8 storage (`--unet-weights-dtype` / `--text-weights-dtype`) and a Q8_0 or Q4_0 GGUF U-Net (`--unet-gguf`, the
text encoder and VAE in float32 from the checkpoint beside it), all computed in float32.

SD 1.5 size, random weights: the float16 `.safetensors` that `benchmarks/load.py` writes (2 GB, seed 0), its U-Net
converted once by `ldm convert --to gguf` (city96's layout). Each setting runs in a fresh process, which loads,
runs one guided step (batch 2, 256x256: 32x32 latents, 77 context tokens) to warm up, times `--steps` more, then
makes a 256x256 image in `--image-steps` Euler steps at CFG 7 (prompt, seed 1) and decodes it; it reports its
peak resident memory (VmHWM) after the load and at the end, the bytes its parameters hold, its U-Net output and
its image, so that each is compared with float32's on the same inputs. Rounds alternate the settings; medians.

    python benchmarks/gguf_memory.py                          # float32, fp8_e4m3fn, Q8_0, Q4_0: 2 rounds
    python benchmarks/gguf_memory.py --rounds 1 --steps 2 --formats Q8_0

On a machine shared with other work, the separate processes' step times follow the load more than the formats;
`--interleaved` loads every setting into one process instead and times their guided steps in turn, round after
round, so that each setting's steps meet the same load (its memory figures are the whole process's, not reported).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from load import write_sd15_file  # benchmarks/load.py: run as a script, this folder is on sys.path
from machine import machine

PROBE = """
import sys, time, torch
from latent_diffusion import load_model
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.weights.storage import FP8_DTYPES
kb = lambda field: int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1])
path, setting, steps, image_steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fp8 = FP8_DTYPES.get(setting)
unet_gguf = setting if setting.endswith('.gguf') else None
start = time.perf_counter()
model = load_model(path, dtype=torch.float32, unet_weights_dtype=fp8, text_weights_dtype=fp8, unet_gguf=unet_gguf)
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
request = GenerationRequest(["a photograph of a red sofa"], [1], width=256, height=256, steps=image_steps,
                            sampler="euler", cfg_scale=7.0)
image = generate(model, request).images
torch.save({"eps": eps, "image": image}, out)
weights = sum(p.nbytes for p in model.parameters())
print(load_seconds, after_load, kb('VmHWM'), weights, *times[1:])
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/sd15-fp16.safetensors")
    parser.add_argument("--formats", nargs="+", default=["fp8_e4m3fn", "Q8_0", "Q4_0"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed guided steps per process")
    parser.add_argument("--image-steps", type=int, default=4, help="Euler steps of the image compared with float32's")
    parser.add_argument("--interleaved", action="store_true", help="time the steps of all settings in one process")
    args = parser.parse_args()
    path = Path(args.file)
    write_sd15_file(path)
    settings = {"float32": "float32"}
    for fmt in args.formats:
        settings[fmt] = fmt if fmt.startswith("fp8") else str(gguf_file(path, fmt))
    path.read_bytes()  # into the page cache
    print(f"{path} ({os.path.getsize(path) / 2**30:.2f} GiB), torch {torch.__version__}, {machine()}")
    if args.interleaved:
        return interleaved(path, settings, args.rounds, args.steps)
    runs: dict[str, list] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for name, setting in settings.items():
                out = Path(folder) / f"{name}.pt"
                probe = [sys.executable, "-c", PROBE, str(path), setting, str(args.steps), str(args.image_steps)]
                fields = subprocess.run([*probe, str(out)], capture_output=True, text=True, check=True).stdout.split()
                load_s, after_load, peak, weights, *steps = (float(v) for v in fields)
                runs[name].append((load_s, after_load / 2**20, peak / 2**20, weights / 2**30, steps))
        reference = torch.load(Path(folder) / "float32.pt")
        results = {s: torch.load(Path(folder) / f"{s}.pt") for s in settings}
    columns = ["weights", "load, s", "peak RSS after load", "peak RSS, whole process", "weights in memory"]
    columns += ["s / guided step", "U-Net output vs float32", f"image vs float32 ({args.image_steps} steps)"]
    print("| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|")
    for name, rows in runs.items():
        load_s, after_load, peak, weights = (statistics.median(r[i] for r in rows) for i in range(4))
        step = statistics.median(s for r in rows for s in r[4])
        error = relative_error(results[name]["eps"], reference["eps"])
        pixels = (results[name]["image"] - reference["image"]).abs().mean().item()
        cells = [describe(name), f"{load_s:.2f}", f"{after_load:.2f} GiB", f"{peak:.2f} GiB", f"{weights:.2f} GiB"]
        cells += [f"{step:.2f}", f"{error:.4f}", f"{pixels:.4f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def interleaved(path: Path, settings: dict[str, str], rounds: int, steps: int) -> None:
    """Every setting loaded into this process; in each round, `steps` guided steps of each in turn; medians."""
    from latent_diffusion import load_model
    from latent_diffusion.weights.storage import FP8_DTYPES

    models = {}
    for name, setting in settings.items():
        fp8, unet_gguf = FP8_DTYPES.get(setting), setting if setting.endswith(".gguf") else None
        models[name] = load_model(path, unet_weights_dtype=fp8, text_weights_dtype=fp8, unet_gguf=unet_gguf)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([500, 500])
    cond = {"crossattn": torch.randn(2, 77, 768, generator=g)}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(x, t, cond)
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    model(x, t, cond)
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["float32"])
    print("| weights | s / guided step (median) | against float32 | all steps, s |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        step = statistics.median(values)
        print(f"| {describe(name)} | {step:.2f} | {step / base:.2f}x | {', '.join(f'{v:.1f}' for v in values)} |")


def gguf_file(path: Path, quant: str) -> Path:
    """The checkpoint's U-Net as a GGUF file of `quant` beside it, written once (`ldm convert --to gguf`)."""
    from latent_diffusion.weights.gguf_convert import convert_to_gguf

    out = path.with_name(f"{path.stem}-unet-{quant}.gguf")
    if not out.exists():
        convert_to_gguf(path, out, quant)
    return out


def describe(name: str) -> str:
    if name == "float32":
        return "float32"
    if name.startswith("fp8"):
        return f"U-Net and text encoder {name}, float32 compute"
    return f"U-Net {name} GGUF (--unet-gguf), text encoder float32, float32 compute"


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """|out - reference| / |reference|, Frobenius norms."""
    return ((out - reference).norm() / reference.norm()).item()


if __name__ == "__main__":
    main()
