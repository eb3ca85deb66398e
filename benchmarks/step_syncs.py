"""How often sampling makes the host wait for the GPU: the synchronising operations torch reports
(`torch.cuda.set_sync_debug_mode("warn")`) in each sampling step, and where in the code the ones after step 1 are.

A step that waits leaves the GPU idle while the host queues the next one. Step 1 may wait (the prompt's encoding
and the first copies); after it none should. The built-in model, 64×64, eager, three samplers: an ODE one, an
ancestral one (fresh noise each step) and an SDE one (Brownian noise).

    python benchmarks/step_syncs.py            # CUDA only
"""

import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

import latent_diffusion
from latent_diffusion import load_model
from latent_diffusion.cli import BUILTIN_MODEL
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest

PACKAGE = str(Path(latent_diffusion.__file__).parent)


def syncs_per_step(model, request: GenerationRequest) -> tuple[list[int], Counter]:
    """(the synchronisations of each step, the lines of this package that made those after step 1)."""
    counts, places, stacks = [], Counter(), []

    def record(message, *args, **kwargs):  # warnings.showwarning, called where the warning is raised
        if "synchroniz" in str(message):
            stacks.append(traceback.extract_stack()[:-1])

    def step_done(progress):
        counts.append(len(stacks))
        if progress.step > 1:
            for stack in stacks:  # the innermost frame of this package: the line to change
                ours = [f for f in stack if f.filename.startswith(PACKAGE)]
                places[f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside the package"] += 1
        stacks.clear()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, request, step_done)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts, places


def main():
    if not torch.cuda.is_available():
        sys.exit("step_syncs.py: needs CUDA (on a CPU nothing waits)")
    model = load_model(BUILTIN_MODEL, device="cuda")
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m_sde"):
        request = GenerationRequest(["a red circle"], [1], steps=10, sampler=sampler, width=64, height=64)
        generate(model, request)  # warm-up: cuBLAS, cuDNN, the pinned-memory cache
        counts, places = syncs_per_step(model, request)
        print(f"{sampler}: synchronisations per step {counts}")
        for place, n in places.most_common(10):
            print(f"  after step 1, {n}x at {place}")


if __name__ == "__main__":
    main()
