"""Where the seconds go when a fresh process generates with `--compile`: imports, load, each sampling step (the first
ones compile or read the cache, then capture CUDA graphs), the decode, and a second request in the same process.

Two fresh processes share one empty inductor cache folder (TORCHINDUCTOR_CACHE_DIR): the first compiles, the second
finds the first one's kernels. Each is timed from its start (the parent's clock) to its exit; inside, every stage
after a synchronise. The last line of each is dynamo's account of its main compile phases (seconds summed over the U-Net
and the decoder): tracing, the backend (compiling, or reading the cache), guards.

    python benchmarks/compiled_start.py                           # the file load.py writes, float16, CUDA
    python benchmarks/compiled_start.py --ckpt builtin --device cpu --dtype float32 --size 64   # a quick CPU check
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load import write_sd15_file  # benchmarks/load.py: run as a script, this folder is on sys.path

CHILD = """
import sys, time
start = time.perf_counter()
import torch
import latent_diffusion as ld
from latent_diffusion.cli import BUILTIN_MODEL
from latent_diffusion.generate import generate
from latent_diffusion.request import GenerationRequest
ckpt, device, dtype, size, steps = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
stamps = [('imports', time.perf_counter())]
if device == 'cuda':
    torch.zeros(1, device=device)
    sync()
    stamps.append(('CUDA initialisation', time.perf_counter()))
model = ld.load_model(BUILTIN_MODEL if ckpt == 'builtin' else ckpt, device=device, dtype=dtype)
sync()
stamps.append(('load_model', time.perf_counter()))
request = GenerationRequest(['a red cube'], [1], width=size, height=size, steps=steps, compile=True)

def step_done(progress):
    sync()
    stamps.append((f'step {progress.step}', time.perf_counter()))

generate(model, request, step_done)
sync()
stamps.append(('decode (compiled) and the rest of generate', time.perf_counter()))
generate(model, request)
sync()
stamps.append(('a second request, the same shapes', time.perf_counter()))
last = start
for name, t in stamps:
    print(f'{name}: {t - last:.3f} s')
    last = t
print(f'in process: {last - start:.1f} s')
names, seconds = torch._dynamo.utils.compile_times(repr='csv', aggregate=True)
phases = dict(zip(names, seconds))
wanted = ['_compile.compile_inner', 'bytecode_tracing', 'OutputGraph.call_user_compiler', 'fx_codegen_and_compile',
          'AOTAutogradCache.inductor_load', 'async_compile.wait', 'build_guards']
print('compile phases, both graphs:', ', '.join(f'{n} {float(phases[n]):.2f} s' for n in wanted if n in phases))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/sd15-fp16.safetensors", help="a checkpoint, or 'builtin'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.ckpt != "builtin":
        write_sd15_file(Path(args.ckpt))  # what load.py writes, if it has not run
    with tempfile.TemporaryDirectory() as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1"}
        for run in ("first process (empty cache)", "second process (the first one's kernels)"):
            print(f"--- {run}: {args.ckpt}, {args.size}×{args.size}, {args.steps} steps, {args.dtype}, {args.device}")
            begin = time.perf_counter()
            argv = [sys.executable, "-c", CHILD, args.ckpt, args.device, args.dtype, str(args.size), str(args.steps)]
            subprocess.run(argv, check=True, env={**os.environ, **env})
            print(f"whole process, interpreter start to exit: {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    main()
