"""`ldm serve` under load: N clients at once against the same N requests sent one after another, with the queue's
batching on (waiting requests with the same settings share U-Net batches) and off (--max-batch 1).

A real uvicorn server on a loopback port and HTTP clients in threads of this process; every request is a web UI
txt2img of one image with its own seed. Prints images/s and the p50/p95 latency of a request per mode.

    python benchmarks/serve.py                                   # CPU: the built-in model at 64x64, 20 steps
    python benchmarks/serve.py --preset sd-v1.5 --size 512       # GPU: SD 1.5-size random weights, float16
"""

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from latent_diffusion import LatentDiffusion, load_model, preset
from latent_diffusion.serving.http_edge import serving
from latent_diffusion.serving.server import ServerLimits, create_app
from latent_diffusion.weights.checkpoint import BUILTIN_MODEL
from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path


def txt2img(base: str, body: dict) -> float:
    """One request -> its latency in seconds."""
    request = urllib.request.Request(base + "/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        answer = json.loads(response.read())
    assert len(answer["images"]) == 1
    return time.perf_counter() - start


def run(model, max_batch: int, clients: int, requests: int, body: dict) -> tuple[float, list[float]]:
    """-> (wall seconds for all requests, latencies)."""
    with serving(create_app(model, limits=ServerLimits(max_batch=max_batch, max_queue=max(32, requests)))) as base:
        txt2img(base, {**body, "seed": 0})  # warm-up
        bodies = [{**body, "seed": 1 + i} for i in range(requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(lambda b: txt2img(base, b), bodies))
        return time.perf_counter() - start, latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="random weights of this preset (default: the built-in model's file)")
    parser.add_argument("--size", type=int, help="default: the model's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if args.preset:
        torch.manual_seed(0)
        model = LatentDiffusion(preset(args.preset)).to(device, dtype).eval()
    else:
        model = load_model(BUILTIN_MODEL, device=device, dtype=dtype)
    size = args.size or model.cfg.default_size
    body = {"prompt": "a small red circle at the left on a blue background", "steps": args.steps, "width": size,
            "height": size, "sampler_name": "DPM++ 2M"}  # fmt: skip
    print(f"{machine()}; {args.preset or 'built-in model'} at {size}x{size}, {args.steps} steps, {args.requests} "
          f"requests of one image, torch {torch.__version__}")  # fmt: skip
    print("| mode | images/s | p50 latency | p95 latency |")
    print("| --- | --- | --- | --- |")
    for name, clients, max_batch in [("sequential (1 client)", 1, 1),
                                     (f"{args.requests} clients, batching off", args.requests, 1),
                                     (f"{args.requests} clients, batching on (max {args.max_batch})", args.requests,
                                      args.max_batch)]:  # fmt: skip
        wall, latencies = run(model, max_batch, clients, args.requests, body)
        p50, p95 = statistics.median(latencies), statistics.quantiles(latencies, n=20)[-1]
        print(f"| {name} | {args.requests / wall:.2f} | {p50:.2f} s | {p95:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
