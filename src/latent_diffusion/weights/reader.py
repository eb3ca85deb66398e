"""Reading checkpoint files without running code from them: the tensors and metadata of a file, whatever its format,
for the model loader (`weights/checkpoint.py`), LoRA and embeddings alike. It imports nothing of the model.

- `.safetensors` is memory-mapped: tensors are views of the file's pages.
- `.ckpt` (a pickle) goes through `torch.load(weights_only=True)`, which refuses any pickle that would
  import or call anything beyond tensors and plain containers (a few Lightning/numpy names that training
  checkpoints carry beside the weights are read as inert stand-ins, see `_STAND_INS`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the problem."""


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors by key, metadata). Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if is_pickle(path, head):
        return _unwrap(load_pickle(path), path), {}
    return _read_safetensors(path)


def is_pickle(path: Path, head: bytes) -> bool:
    """A zip (PyTorch's format), or a pickle's suffix on a file whose first 8 bytes are no safetensors header size."""
    pickle_suffix = path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin")
    safetensors_header = len(head) == 8 and 2 <= int.from_bytes(head, "little") < 100_000_000
    return zipfile.is_zipfile(path) or (pickle_suffix and not safetensors_header)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None


class _Discarded:
    """Stands in for a class that training checkpoints pickle beside the weights; holds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _discarded(*args, **kwargs) -> None:
    return None


# Globals that original Stable Diffusion training checkpoints (PyTorch Lightning) pickle beside the weights:
# the callback state, numpy scalars such as global_step. They are mapped to the inert stand-ins above, so
# their code is never imported or run and their values are dropped; anything else is still refused.
_STAND_INS = [
    (_Discarded, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_Discarded, "numpy.dtype"),
    *((_Discarded, f"numpy.dtypes.{t}DType") for t in ("Int64", "Int32", "Float64", "Float32", "Bool")),
    (_discarded, "numpy.core.multiarray.scalar"),
    (_discarded, "numpy._core.multiarray.scalar"),
    (_discarded, "_codecs.encode"),
]


class _ModuleState:
    """Stands in for torch.nn.ParameterDict, which early textual-inversion files pickle as `string_to_param`:
    keeps the state it is given (its `_parameters`, tensors), runs no module code."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


_STAND_INS.append((_ModuleState, "torch.nn.modules.container.ParameterDict"))


def load_pickle(path: str | os.PathLike):
    """A PyTorch pickle's contents, loaded without running code from it: tensors, plain containers and the inert
    stand-ins above; anything else is refused with a CheckpointError naming what it would have imported."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return _torch_load(path)
    except pickle.UnpicklingError as e:
        glob = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"would import or call {glob.group(1)}" if glob else "uses pickle instructions beyond plain data"
        raise CheckpointError(
            f"{path}: refused: its pickle {what}, which is not a tensor or plain container; nothing from it was run"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        with warnings.catch_warnings():  # torch warns of a pickle protocol it may not read; the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for k, part in obj.items():  # a dict of parts (an IP-Adapter's `image_proj`, `ip_adapter`): keys `part.key`
        if isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
            tensors |= {f"{k}.{kk}": v for kk, v in part.items()}
    return tensors


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# safetensors' dtype names -> torch's, for reading a tensor's bytes straight from the file (float8: the web UI's and
# ComfyUI's fp8 files)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def safetensors_index(path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """key -> (dtype, shape, first byte, end byte) of each tensor in a .safetensors file (from its JSON header)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {
        k: (
            SAFETENSORS_DTYPES[v["dtype"]],
            v["shape"],
            8 + length + v["data_offsets"][0],
            8 + length + v["data_offsets"][1],
        )
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES
    }


def read_tensor(f, dtype: torch.dtype, shape: list[int], start: int, end: int, scratch: bytearray) -> torch.Tensor:
    """One tensor of a .safetensors file, read into `scratch` (valid until the next read: copy it at once).
    Converting a memory-mapped tensor instead would leave the file's pages resident beside the copy: a float16
    file loaded as float32 would peak at 1.5x the model's size; read like this, the peak is the model's size."""
    view, done = memoryview(scratch)[: end - start], 0
    while done < end - start:  # one read returns at most about 2 GiB
        n = os.preadv(f.fileno(), [view[done:]], start + done)
        if n == 0:
            raise CheckpointError(f"{f.name}: truncated (the tensor at byte {start} runs past the end)")
        done += n
    return torch.frombuffer(view, dtype=dtype).reshape(shape) if end > start else torch.empty(shape, dtype=dtype)
