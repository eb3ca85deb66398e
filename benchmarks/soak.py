"""`ldm serve` soaked: a real server process under a mix of clients for a set time, then every kept answer checked
against the same request made alone.

Clients, in threads of this process, on the loopback address only, each a loop until the time is up:
txt2img (a third of them naming a LoRA), img2img with a mask, a switch of model for one request
(override_settings), progress polling, a client that leaves before its answer (a disconnect), and an interrupt now
and then. Recorded: throughput, p50/p95/p99 latency, answers by status, and the server's RSS, open files and threads
once a second. Then up to `--check` kept answers (not interrupted ones) are asked for again, one at a time, and
must be within one 8-bit level of what the loaded server answered.

    python benchmarks/soak.py                      # 10 minutes on the built-in model; prints a JSON report
    python benchmarks/soak.py --seconds 60         # what tests/test_soak.py runs
"""

import argparse
import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SMALL = {"steps": 4, "width": 64, "height": 64, "cfg_scale": 1.75}


def call(base: str, path: str, body=None, timeout: float = 120) -> tuple[int, dict | None]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)


def server_stats(pid: int) -> dict:
    """The server process's resident memory (MiB), open files and threads, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`ldm serve` on a free loopback port, with two checkpoints to switch between and one LoRA file."""
    from safetensors.torch import save_file

    from latent_diffusion import load_model
    from latent_diffusion.weights.checkpoint import BUILTIN_MODEL

    models, loras = folder / "models", folder / "Lora"
    models.mkdir()
    loras.mkdir()
    shutil.copy(BUILTIN_MODEL, models / "shapes.safetensors")
    shutil.copy(BUILTIN_MODEL, models / "shapes-copy.safetensors")
    proj_in = load_model(BUILTIN_MODEL).unet.input_blocks[1][1].proj_in.weight  # (out, in, 1, 1)
    g, key = torch.Generator().manual_seed(0), "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(2, proj_in.shape[1], 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(proj_in.shape[0], 2, 1, 1, generator=g),
               f"{key}.alpha": torch.tensor(2.0)}, loras / "style.safetensors")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ldm = [sys.executable, "-m", "latent_diffusion.cli"]
    args = ["serve", "--models-dir", models, "--lora-dir", loras, "--port", port, "--device", "cpu",
            "--outdir", folder / "out", "--max-queue", 64]  # fmt: skip
    with open(folder / "server.log", "w") as log:  # a file, not a pipe: a full pipe would stop the server
        server = subprocess.Popen([*ldm, *map(str, args)], stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if call(base, "/sdapi/v1/options", timeout=5)[0] == 200:
                return server, base
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ldm serve did not start: {(folder / 'server.log').read_text()}")
        time.sleep(0.2)


class Soak:
    """The clients' loops and what they record."""

    def __init__(self, base: str, seconds: float, seed: int = 0):
        self.base, self.end = base, time.monotonic() + seconds
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.kept: list[tuple[str, dict, str]] = []  # (path, body, the first image) of answers to check again
        self.rng = random.Random(seed)
        mask = Image.new("L", (64, 64))
        mask.paste(255, (16, 16, 48, 48))
        self.init, self.mask = png_base64(Image.new("RGB", (64, 64), (40, 80, 200))), png_base64(mask)

    def record(self, kind: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] = self.statuses.get(f"{kind} {status}", 0) + 1
            if seconds is not None:
                self.latencies.append(seconds)

    def body(self) -> tuple[str, dict]:
        with self.lock:
            seed, choice = self.rng.randrange(10**6), self.rng.random()
        if choice < 0.25:
            return "/sdapi/v1/txt2img", {**SMALL, "seed": seed, "prompt": "a red circle <lora:style:1>"}
        if choice < 0.45:
            path, body = "/sdapi/v1/img2img", {**SMALL, "seed": seed, "prompt": "a yellow square"}
            return path, {**body, "init_images": [self.init], "mask": self.mask, "denoising_strength": 0.7}
        if choice < 0.55:
            switch = {"override_settings": {"sd_model_checkpoint": "shapes-copy"}}
            return "/sdapi/v1/txt2img", {**SMALL, "seed": seed, "prompt": "a blue triangle", **switch}
        return "/sdapi/v1/txt2img", {**SMALL, "seed": seed, "prompt": "a green square on white"}

    def generating_client(self) -> None:
        while time.monotonic() < self.end:
            path, body = self.body()
            start = time.perf_counter()
            status, answer = call(self.base, path, body)
            self.record(path.rsplit("/", 1)[1], status, time.perf_counter() - start)
            if status == 200 and not json.loads(answer["info"])["interrupted"]:
                with self.lock:
                    self.kept.append((path, body, answer["images"][0]))

    def other_client(self) -> None:
        """Progress polls, clients that leave before their answer, an interrupt now and then."""
        while time.monotonic() < self.end:
            choice = self.rng.random()
            if choice < 0.7:
                self.record("progress", call(self.base, "/sdapi/v1/progress")[0])
            elif choice < 0.9:
                try:
                    call(self.base, "/sdapi/v1/txt2img", {**SMALL, "prompt": "gone", "steps": 30}, timeout=0.2)
                except OSError:  # the client left
                    self.record("disconnect", 0)
            else:
                self.record("interrupt", call(self.base, "/sdapi/v1/interrupt", {})[0])
            time.sleep(0.3)


def run(seconds: float = 600, clients: int = 6, check: int = 30) -> dict:
    """Soak a fresh `ldm serve` for `seconds` -> the report (see the module's docstring)."""
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    server, base = start_server(folder)
    try:
        soak, samples = Soak(base, seconds), []
        threads = [threading.Thread(target=soak.generating_client) for _ in range(clients)]
        threads += [threading.Thread(target=soak.other_client) for _ in range(2)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append({"t": round(time.monotonic() - start, 1), **server_stats(server.pid)})
            time.sleep(1)
        wall = time.monotonic() - start
        chosen = random.Random(1).sample(soak.kept, min(check, len(soak.kept)))
        changed = []
        for path, body, image in chosen:  # one at a time: each alone in its batch
            status, answer = call(base, path, body)
            if status != 200 or np.abs(pixels(answer["images"][0]) - pixels(image)).max() > 1:
                changed.append(body["prompt"])
        lat = sorted(soak.latencies)
        quantile = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
        half = len(samples) // 2
        return {
            "seconds": round(wall, 1),
            "images": len(soak.kept),
            "images_per_s": round(len(soak.kept) / wall, 2),
            "latency_s": {"p50": quantile(0.5), "p95": quantile(0.95), "p99": quantile(0.99)},
            "statuses": dict(sorted(soak.statuses.items())),
            "server_errors": sum(n for k, n in soak.statuses.items() if k.split()[-1].startswith("5")),
            "checked_alone": len(chosen),
            "changed": changed,
            "rss_mib": {
                "first_half_max": max(s["rss_mib"] for s in samples[:half] or samples),
                "second_half_max": max(s["rss_mib"] for s in samples[half:]),
                "median": statistics.median(s["rss_mib"] for s in samples),
            },
            "open_files": {"min": min(s["open_files"] for s in samples), "max": max(s["open_files"] for s in samples)},
            "threads": {"min": min(s["threads"] for s in samples), "max": max(s["threads"] for s in samples)},
            "server_alive": server.poll() is None,
            "server_log_lines": len((folder / "server.log").read_text().splitlines()),
        }
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=6, help="clients that ask for images, besides two others")
    parser.add_argument("--check", type=int, default=30, help="answers asked for again alone")
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.clients, args.check), indent=2))


if __name__ == "__main__":
    main()
