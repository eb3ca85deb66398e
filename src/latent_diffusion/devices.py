"""`--device` names -> torch devices, checked before any work is done."""

from __future__ import annotations

import contextlib
import ctypes

import torch


def resolve_device(name: str) -> torch.device:
    """auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps; ValueError naming the problem otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps is not available here")
    return device


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware: a CUDA GPU that supports them (Ampere on), or a CPU with
    AVX-512 BF16 or AMX. Elsewhere oneDNN emulates them, and bf16 autocast is far slower than float32: a training
    step of the built-in autoencoder took 15× as long on an AVX2-only AMD EPYC (BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def computes_natively(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` runs `dtype`'s matrix products and convolutions in hardware. bfloat16: `has_native_bfloat16`;
    float16 on a CPU needs AMX-FP16: elsewhere oneDNN emulates it, a 3x3 convolution taking 340x float32's time on
    an AVX-512 EPYC whose bfloat16 ran at twice float32's speed (BENCHMARKS.md)."""
    if dtype == torch.bfloat16:
        return has_native_bfloat16(device)
    if dtype == torch.float16 and device.type == "cpu":
        return getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()
    return True


def emulated_warning(dtype: torch.dtype, device: torch.device) -> str:
    """The line printed when `dtype` is asked for on a device that does not compute it natively."""
    name = str(dtype).removeprefix("torch.")
    return f"ldm: warning: {device.type} has no native {name} here, so {name} is emulated and much slower than float32"


def release_freed_heap() -> None:
    """Give the heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere): what a load read the
    file through and quantized in stays resident otherwise, 0.14 GiB after loading SD 1.5 with Q8_0 storage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without waiting for the device. A copy from pageable memory to a GPU may first wait
    for everything queued on it, which idles the GPU between sampling steps; from pinned memory it is queued like a
    kernel, and torch's pinned-memory cache keeps the source until the copy has run. Only on CUDA: a non-blocking
    copy to MPS can read its source after it is freed (pytorch issue 189690)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_memory() -> tuple[int, int] | None:
    """(total, available) bytes of the host's RAM, from /proc/meminfo; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


def memory_report() -> dict:
    """The web UI's /sdapi/v1/memory: the host's RAM (from /proc/meminfo where there is one) and CUDA's, or why not."""
    ram = {"error": "this system has no /proc/meminfo"}
    if (host := host_memory()) is not None:
        total, free = host
        ram = {"free": free, "used": total - free, "total": total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "CUDA is not available here"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    cuda = {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
    return {"ram": ram, "cuda": cuda}
