"""Where the seconds go when a fresh process generates with `--compile`: imports, load, each sampling step (the first
ones compile or read the cache, then capture CUDA graphs), the decode, and a second request in the same process.

Two fresh processes share one empty inductor cache folder (TORCHINDUCTOR_CACHE_DIR): the first compiles, the second
finds the first one's kernels. Each is timed from its start (the parent's clock) to its exit; inside, every stage
after a synchronise. The last line of each is dynamo's account of its main compile phases (seconds summed over the U-Net
and the decoder): tracing, the backend (compiling, or reading the cache), guards.

--precompiled measures the other way to start: `torch.compile(...).aot_compile` (torch 2.10+, experimental). The
first process records the U-Net's inputs in a one-step eager run, compiles its forward ahead of time for them, saves
the artifact and installs it; the second loads the artifact, which skips dynamo's tracing and guard building. Only
the U-Net is compiled that way (the decoder stays eager), in the mode `compiling.compile_mode` picks: on CUDA
"reduce-overhead", if aot_compile takes it (the script says so if not, and falls back to "default"). The weights are
inputs of the compiled function, not part of the artifact; the child checks that outputs follow a parameter change.

    python benchmarks/compiled_start.py                           # the file load.py writes, float16, CUDA
    python benchmarks/compiled_start.py --ckpt builtin --device cpu --dtype float32 --size 64   # a quick CPU check
    python benchmarks/compiled_start.py --precompiled                # the same, by an aot_compile artifact
    python benchmarks/compiled_start.py --cprofile                   # and where the second one's first request goes
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
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
ckpt, device, dtype, size, steps = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
artifact = sys.argv[6]  # '-': torch.compile and the inductor cache; else the path of an aot_compile artifact
profile = sys.argv[7] == '1'  # cProfile the first request: where step 1's seconds go outside dynamo's own account
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
stamps = [('imports', time.perf_counter())]
if device == 'cuda':
    torch.zeros(1, device=device)
    sync()
    stamps.append(('CUDA initialisation', time.perf_counter()))
model = ld.load_model(BUILTIN_MODEL if ckpt == 'builtin' else ckpt, device=device, dtype=dtype)
sync()
stamps.append(('load_model', time.perf_counter()))
request = GenerationRequest(['a red cube'], [1], width=size, height=size, steps=steps, compile=artifact == '-')
if artifact != '-':
    import dataclasses, os
    from latent_diffusion.pipeline.compiling import compile_mode
    unet = model.unet
    if hasattr(torch._dynamo.config, 'enable_aot_compile'):  # off by default before torch 2.12
        torch._dynamo.config.enable_aot_compile = True
    if not os.path.exists(artifact):  # first process: record the U-Net's inputs, compile ahead of time, save
        seen = []
        hook = unet.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)) if not seen else None, with_kwargs=True)
        generate(model, dataclasses.replace(request, steps=1))
        hook.remove()
        sync()
        stamps.append(('one eager step, to record the inputs', time.perf_counter()))
        mode = compile_mode(model.device)
        with torch.no_grad():  # generate's grad mode: it is one of the artifact's guards
            try:
                fn = torch.compile(unet, fullgraph=True, dynamic=False, mode=mode).forward.aot_compile(seen[0])
            except Exception as e:
                print(f'aot_compile with mode {mode!r} failed ({type(e).__name__}: {str(e)[:200]}); mode "default"')
                fn = torch.compile(unet, fullgraph=True, dynamic=False).forward.aot_compile(seen[0])
        sync()
        stamps.append(('aot_compile of the U-Net', time.perf_counter()))
        fn.save_compiled_function(artifact)
        stamps.append(('save the artifact', time.perf_counter()))
    else:
        with open(artifact, 'rb') as f:
            fn = torch.compiler.load_compiled_function(f)
        sync()
        stamps.append(('load the artifact', time.perf_counter()))
    # the module is the compiled function's first argument; the call goes in through the wrapper above the U-Net
    # (an instance attribute 'forward' on the U-Net itself fails one of the artifact's guards)
    model.model.forward = lambda x, t, cond: fn(unet, x, t, context=cond.get('crossattn'), y=cond.get('vector'))

def step_done(progress):
    sync()
    stamps.append((f'step {progress.step}', time.perf_counter()))

if profile:
    import cProfile, pstats
    profiler = cProfile.Profile()
    profiler.enable()
generate(model, request, step_done)
if profile:
    profiler.disable()
    for order, count in (('tottime', 25), ('cumulative', 40)):
        pstats.Stats(profiler).strip_dirs().sort_stats(order).print_stats(count)
sync()
stamps.append(('decode (compiled unless --precompiled) and the rest of generate', time.perf_counter()))
generate(model, request)
sync()
stamps.append(('a second request, the same shapes', time.perf_counter()))
last = start
for name, t in stamps:
    print(f'{name}: {t - last:.3f} s')
    last = t
print(f'in process: {last - start:.1f} s')
if artifact != '-':  # the weights are inputs: a changed parameter changes the output
    bias = model.unet.out[2].bias
    with torch.no_grad():
        before = generate(model, request).images
        bias.add_(1.0)
        after = generate(model, request).images
        bias.sub_(1.0)
    print('a parameter changed in place changes the output:', not torch.equal(before, after))
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
    parser.add_argument("--precompiled", action="store_true", help="an aot_compile artifact of the U-Net (see above)")
    parser.add_argument("--cprofile", action="store_true",
                        help="the second process's first request under cProfile (its stamps then include the overhead)")  # fmt: skip
    args = parser.parse_args()
    if args.ckpt != "builtin":
        write_sd15_file(Path(args.ckpt))  # what load.py writes, if it has not run
    with tempfile.TemporaryDirectory() as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1"}
        artifact = str(Path(cache) / "unet-aot.pt") if args.precompiled else "-"
        settings = [args.ckpt, args.device, args.dtype, str(args.size), str(args.steps), artifact]
        for run in ("first process (empty cache)", "second process (the first one's kernels)"):
            profile = args.cprofile and run.startswith("second")
            argv = [sys.executable, "-c", CHILD, *settings, "1" if profile else "0"]
            print(f"--- {run}: {args.ckpt}, {args.size}×{args.size}, {args.steps} steps, {args.dtype}, {args.device}")
            begin = time.perf_counter()
            subprocess.run(argv, check=True, env={**os.environ, **env})
            print(f"whole process, interpreter start to exit: {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    main()
