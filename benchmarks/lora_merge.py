"""Merging a LoRA into SD 1.5 and taking it out again: `apply_lora` and `remove_lora` on the full-size model.

SD 1.5-size model with random weights; a random rank-128 kohya-ss LoRA (float16, as trainers save them) on every
layer kohya trains: the U-Net's attention to_q/to_k/to_v/to_out, proj_in/proj_out and feed-forward, and the text
encoder's q/k/v/out projections and MLP (about 150 MB at rank 128). The file is written to a temporary folder
and read back memory-mapped, as a user's would be. Medians over the iterations.

    python benchmarks/lora_merge.py                  # CPU, float32 weights
    python benchmarks/lora_merge.py --rank 32        # a smaller LoRA
    python benchmarks/lora_merge.py --dtype float16  # on a GPU: the model in float16 (the delta still in float32)
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.weights.lora import apply_lora, module_table, read_lora, remove_lora
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

# The layers kohya-ss's LoRA (not LoCon) trains, by the end of their kohya name.
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp_fc1", "mlp_fc2")


def random_kohya_lora(model: LatentDiffusion, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = model.state_dict()
    sd = {}
    for name, target in module_table(model).items():
        part, _, path = name.partition(".")
        kohya = "." not in path and (
            (
                part == "unet"
                and path.startswith(("down_blocks", "mid_block", "up_blocks"))
                and path.endswith(UNET_LAYERS)
            )
            or (part == "text_encoder" and path.endswith(TEXT_LAYERS))
        )
        if not kohya:
            continue
        w = params[target.param]
        out = w.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + path
        sd[key + ".lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=g) * 0.01).half()
        kernel = (1, 1) if w.ndim == 4 else ()  # SD 1.x's proj_in/proj_out are 1×1 convolutions
        sd[key + ".lora_up.weight"] = (torch.randn(out, rank, *kernel, generator=g) * 0.01).half()
        sd[key + ".alpha"] = torch.tensor(rank / 2)
    return sd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    model = LatentDiffusion(preset("sd-v1.5")).to(device, getattr(torch, args.dtype)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(random_kohya_lora(model, args.rank), path)
        size = path.stat().st_size
        start = time.perf_counter()
        lora = read_lora(path)
        read = time.perf_counter() - start
        before = {k: v.clone() for k, v in model.state_dict().items()}
        applies, removes = [], []
        for _ in range(args.iters):
            sync()
            start = time.perf_counter()
            applied = apply_lora(model, lora, 0.8)
            sync()
            applies.append(time.perf_counter() - start)
            start = time.perf_counter()
            remove_lora(model, applied)
            sync()
            removes.append(time.perf_counter() - start)
        restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    where = machine()
    print(f"LoRA merge, SD 1.5 ({args.dtype}), kohya rank {args.rank}: {len(lora.layers)} layers, "
          f"{size / 1e6:.0f} MB; {device} ({where}), torch {torch.__version__}, {args.iters} iterations")  # fmt: skip
    print(f"  read_lora          {read * 1e3:8.1f} ms")
    print(f"  apply_lora median  {statistics.median(applies) * 1e3:8.1f} ms   (all: {', '.join(f'{t * 1e3:.0f}' for t in applies)})")  # fmt: skip
    print(f"  remove_lora median {statistics.median(removes) * 1e3:8.1f} ms   (restored bit for bit: {restored})")


if __name__ == "__main__":
    main()
