"""One U-Net forward of a classifier-free-guided step (batch 2), ours vs diffusers, same weights and inputs.

SD 1.5-size U-Net with random weights; diffusers' UNet2DConditionModel gets the same weights through
diffusers' own single-file converter. Ours and diffusers' run interleaved in one process; medians are printed
with the ratio ours/diffusers (below 1.0: ours is faster).

    python benchmarks/unet_step.py                 # CPU float32 at 256x256 (32x32 latents)
    python benchmarks/unet_step.py --size 512      # on a GPU: float16 at 512x512 unless --dtype says otherwise
    python benchmarks/unet_step.py --preset sdxl-base --shared-weights   # SDXL on a 24 GiB CPU machine
    python benchmarks/unet_step.py --size 512 --compile   # both compiled (CUDA graphs on a GPU)
    python benchmarks/unet_step.py --size 512 --compile --profile   # and where our step's time goes, per kernel
    python benchmarks/unet_step.py --size 512 --compile --channels-last --compile-mode max-autotune   # levers
    python benchmarks/unet_step.py --size 512 --compile --sdpa-backend cudnn   # cuDNN's attention, not flash's

SDXL presets get the vector conditioning (pooled text and size embeddings; diffusers' added_cond_kwargs).
--shared-weights: diffusers' model takes our weight tensors themselves (its converter's output, assigned), so
one copy of the weights is in memory: two float32 SDXL U-Nets (2 x 10.3 GB) do not fit in 24 GiB.
"""

import argparse
import statistics
import time
from collections import Counter
from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from torch.nn.attention import SDPBackend, sdpa_kernel

from latent_diffusion import LatentDiffusion, LatentDiffusionConfig, preset
from latent_diffusion.models.ldm import micro_conditioning
from latent_diffusion.models.unet import UNetModel, timestep_embedding
from latent_diffusion.models.yaml_config import to_ldm_config
from latent_diffusion.pipeline.compiling import compile_mode
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

# Kernel (GPU) or operator (CPU) names by what they compute, first match wins: inductor names its fused Triton
# kernels after the operations they hold ("triton_poi_fused_convolution_..."), so those come first.
CATEGORIES = (
    ("fused by inductor (Triton)", ("triton",)),
    ("layout conversion (NCHW <-> NHWC)", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("attention", "flash", "fmha", "sdpa")),
    ("convolution", ("conv", "fprop", "implicit")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "mm")),
)

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip


def build(cfg: LatentDiffusionConfig, device, dtype, shared: bool = False):
    torch.manual_seed(0)
    ours = UNetModel(cfg.unet).to(device, dtype)
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    theirs_cfg = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
    with torch.device("meta" if shared else "cpu"):
        theirs = UNet2DConditionModel(**theirs_cfg)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, theirs_cfg), strict=True, assign=shared)
    return ours.eval(), theirs.to(device, dtype).eval()


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def device_setting(args) -> tuple[str, torch.dtype, int, int, object]:
    """(device, dtype, size, iterations, sync) of the step benchmarks: a GPU in float16 at 512² (30 iterations) where
    there is one, else the CPU in float32 at 256² (5); --size and --iters override."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    size, iters = args.size or (512 if cuda else 256), args.iters or (30 if cuda else 5)
    return device, dtype, size, iters, torch.cuda.synchronize if cuda else (lambda: None)


def model_around(unet: torch.nn.Module, cfg: LatentDiffusionConfig) -> LatentDiffusion:
    """A whole model holding `unet`, the rest of it on the meta device (only the U-Net is run: nothing allocated)."""
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.model.diffusion_model = unet
    return model


def interleaved(run_ours, run_theirs, iters: int, sync) -> tuple[float, float, float]:
    """(max |difference| of the two outputs, ours' median time, theirs') after two warm-up runs of each, the timed
    runs interleaved so that drift in machine load hits both alike."""
    with torch.inference_mode():
        diff = (run_ours() - run_theirs().float()).abs().max().item()
        for _ in range(2):
            run_ours()
            run_theirs()
        times_ours, times_theirs = [], []
        for _ in range(iters):
            times_ours.append(timed(run_ours, sync))
            times_theirs.append(timed(run_theirs, sync))
    return diff, statistics.median(times_ours), statistics.median(times_theirs)


def print_medians(ours: float, theirs: float, diff: float) -> None:
    print(f"  ours      median {ours * 1e3:8.1f} ms")
    print(f"  diffusers median {theirs * 1e3:8.1f} ms")
    print(f"  ratio ours/diffusers {ours / theirs:.3f}   (max |difference| of outputs {diff:.2e})")


def sd15_step(parser: argparse.ArgumentParser):
    """The step benchmarks' common start: --size and --iters parsed, the setting (`device_setting`), and SD 1.5-size
    U-Nets, ours inside a model -> (args, setting, cfg, our model, diffusers' U-Net)."""
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    setting = device_setting(args)
    cfg = preset("sd-v1.5")
    unet, their_unet = build(cfg, *setting[:2])
    return args, setting, cfg, model_around(unet, cfg), their_unet


def report(title: str, run_ours, run_theirs, setting: tuple) -> None:
    """A step benchmark's comparison (`interleaved`) under `device_setting`'s setting, printed with its title."""
    device, dtype, size, iters, sync = setting
    diff, ours, theirs = interleaved(run_ours, run_theirs, iters, sync)
    where = f"{device} ({machine()}), torch {torch.__version__}"
    print(f"{title}, batch 2, {size}x{size}, {dtype}, {where}, {iters} iterations")
    print_medians(ours, theirs, diff)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd-v1.5")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (latents are 8x smaller)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--shared-weights", action="store_true", help="one copy of the weights for both models")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both (ours as `compiling.py` does; mode reduce-overhead on CUDA)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="then our step's 15 costliest operations and the time by kind (CATEGORIES), 5 steps")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="both models' weights and inputs NHWC")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for both (default: compiling.compile_mode's, reduce-overhead on CUDA)")  # fmt: skip
    parser.add_argument("--sdpa-backend", default=None, choices=list(SDPA_BACKENDS),
                        help="only this scaled_dot_product_attention kernel, both models (default: torch's choice, flash "
                             "where it applies); SD 1.5's heads of 40 and 80 channels are padded to 64 and 96 by flash")  # fmt: skip
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if args.sdpa_backend in ("cudnn", "efficient") and not cuda:
        parser.error(f"--sdpa-backend {args.sdpa_backend} needs CUDA")
    device = "cuda" if cuda else "cpu"
    size = args.size or (512 if cuda else 256)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    iters = args.iters or (30 if cuda else 5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    cfg = preset(args.preset)
    ours, theirs = build(cfg, device, dtype, args.shared_weights)
    if args.compile:  # the same settings for both: static shapes, CUDA graphs on a GPU
        for net in (ours, theirs):
            net.compile(mode=args.compile_mode or compile_mode(torch.device(device)), dynamic=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.unet.in_channels, size // 8, size // 8, generator=g).to(device, dtype)
    t = torch.tensor([999, 999], device=device)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    y, added = None, None
    if cfg.micro_conditioning:  # SDXL: y = [pooled | embeddings of (h, w, top, left, target h, w)], both ways
        pooled = torch.randn(2, sum(t.embed_dim for t in cfg.texts if t.pooled), generator=g)
        micro = micro_conditioning(2, (size, size), negative=False)  # what generation feeds
        numbers = torch.cat([micro[m] for m in cfg.micro_conditioning], dim=1)  # diffusers' time_ids
        sizes = timestep_embedding(numbers.flatten(), cfg.micro_conditioning_width).reshape(2, -1)
        y = torch.cat([pooled, sizes], dim=1).to(device, dtype)
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": numbers.to(device)}
    if args.channels_last:  # convolutions in NHWC: cuDNN's tensor-core kernels, oneDNN's blocked ones
        ours, theirs = (net.to(memory_format=torch.channels_last) for net in (ours, theirs))
        x = x.contiguous(memory_format=torch.channels_last)

    def run_ours():
        return ours(x, t, context, y)

    def run_theirs():
        return theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    # The backend is chosen when a graph is traced (--compile) or at each call (eager): set for the whole run.
    def backend():
        return sdpa_kernel(SDPA_BACKENDS[args.sdpa_backend]) if args.sdpa_backend else nullcontext()

    with backend(), torch.inference_mode():
        # clone: a CUDA graph's output is overwritten by the next replay of any graph (--compile on a GPU)
        diff = (run_ours().clone() - run_theirs()).abs().max().item()
        for _ in range(3):  # warm-up (and compilation, with --compile)
            run_ours()
            run_theirs()
        times_ours, times_theirs = [], []
        for _ in range(iters):  # interleaved, so drift in machine load hits both alike
            times_ours.append(timed(run_ours, sync))
            times_theirs.append(timed(run_theirs, sync))

    a, b = statistics.median(times_ours), statistics.median(times_theirs)
    where = machine()
    print(f"U-Net {args.preset}, batch 2, {size}x{size} ({size // 8}x{size // 8} latents), {dtype}, {device} ({where}), "
          f"torch {torch.__version__}, {iters} iterations{', shared weights' if args.shared_weights else ''}"
          f"{', compiled' if args.compile else ', eager'}{f' ({args.compile_mode})' if args.compile_mode else ''}"
          f"{', channels-last' if args.channels_last else ''}"
          f"{f', attention by {args.sdpa_backend} only' if args.sdpa_backend else ''}")  # fmt: skip
    print(f"  ours      median {a * 1e3:8.1f} ms")
    print(f"  diffusers median {b * 1e3:8.1f} ms")
    print(f"  ratio ours/diffusers {a / b:.3f}   (max |difference| of outputs {diff:.2e})")
    if args.profile:  # where the step's time goes: convolutions, matrix products, attention, fused elementwise
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with backend(), torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                run_ours()
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = prof.key_averages()
        print(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
        by_kind = Counter()
        for e in events:  # on CUDA only kernels have device time of their own; on CPU every operator has CPU time
            kind = next((k for k, words in CATEGORIES if any(w in e.key.lower() for w in words)), "other")
            by_kind[kind] += getattr(e, key)
        total = by_kind.total()
        print(f"our step by kind, {total / 5e3:.2f} ms per step:")
        for kind, us in by_kind.most_common():
            print(f"  {kind:36} {us / 5e3:8.2f} ms  {100 * us / total:5.1f} %")


if __name__ == "__main__":
    main()
