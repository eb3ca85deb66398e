"""The machine a benchmark ran on, as BENCHMARKS.md records it: the GPU's name, or the CPU's model and threads."""

import contextlib
import platform

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), None)
    return f"{name or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
