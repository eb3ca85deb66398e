"""GGML's quantized block formats, dequantized in torch, and the layers that keep their weights in them: a GGUF file's
Linear and Conv2d weights stay quantized in memory (uint8 tensors of blocks) and each layer dequantizes its weight
to its input's dtype as it runs, as ComfyUI-GGUF does. The layer classes follow `weights/storage.py`'s: a stored layer's
class becomes the subclass below, whose forward converts; the module tree and the state-dict keys stay as they are.

A quantized tensor is cut, in memory order, into blocks of `block_size` numbers, each stored in `type_size` bytes
(the layouts of ggml's `ggml-common.h`; "f16" is one IEEE half in the block's bytes, little-endian):

| type | numbers | bytes | layout | value of number i |
| --- | --- | --- | --- | --- |
| Q8_0 | 32 | 34 | f16 d, 32 int8 q | d · q |
| Q4_0 | 32 | 18 | f16 d, 16 bytes: q of i < 16 in the low nibbles, of i ≥ 16 in the high | d · (q − 8) |
| Q4_1 | 32 | 20 | f16 d, f16 m, nibbles as Q4_0 | d · q + m |
| Q5_0 | 32 | 22 | f16 d, 32 bits (the 5th bit of each q), nibbles as Q4_0 | d · (q − 16) |
| Q5_1 | 32 | 24 | f16 d, f16 m, the 5th bits, nibbles | d · q + m |
| Q2_K … Q6_K | 256 | 84 … 210 | a super-block of 16 or 8 sub-blocks, each with its own 4- to 8-bit scale (and min) | below |
| F16, BF16 | 1 | 2 | one half or bfloat16 | itself |

The K-quants ("k" for ggml's k-quants): one f16 super-scale d (and dmin) per 256 numbers, a small integer scale s
per sub-block, value = d·s·q (Q3_K, Q6_K: q signed) or d·s·q − dmin·m (Q2_K, Q4_K, Q5_K: m a sub-block's min).
Each function's docstring gives its bit positions. Every product is formed in float32 in ggml's order, so the
numbers equal those of the gguf package's numpy `gguf.quants.dequantize`; the result is then cast to the
compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .storage import cast, reused_buffer

QK_K = 256  # numbers per K-quant super-block

# type -> (numbers per block, bytes per block), as gguf.GGML_QUANT_SIZES; the types ComfyUI-GGUF dequantizes in torch
BLOCKS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q5_1": (32, 24),
    "Q5_0": (32, 22),
    "Q4_1": (32, 20),
    "Q4_0": (32, 18),
    "Q6_K": (QK_K, 210),
    "Q5_K": (QK_K, 176),
    "Q4_K": (QK_K, 144),
    "Q3_K": (QK_K, 110),
    "Q2_K": (QK_K, 84),
}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored as plain torch tensors
QUANTIZED = [t for t in BLOCKS if t not in FLOATS]


def dequantize(blocks: torch.Tensor, qtype: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGML blocks of `qtype` (uint8, any shape holding whole blocks, in memory order) -> the tensor of `shape` in
    `dtype`. A float type's tensor is returned cast."""
    if qtype in FLOATS:
        return blocks.to(dtype).reshape(shape)
    type_size = BLOCKS[qtype][1]
    rows = blocks.reshape(-1, type_size)  # (n_blocks, type_size)
    return DEQUANTIZE[qtype](rows).to(dtype).reshape(shape)  # (n_blocks, block_size) -> shape


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) float32: one little-endian half per row."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) 4-bit numbers: the k low nibbles, then the k high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(b: torch.Tensor, count: int = 8) -> torch.Tensor:
    """(..., k) bytes -> (..., k, count): bit j of each byte, least significant first."""
    return (b.unsqueeze(-1) >> torch.arange(count, dtype=torch.uint8, device=b.device)) & 1


def _q8_0(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, 2:].view(torch.int8) * _f16(rows[:, :2])  # int8 · float32: promoted in the product, exactly


def _q4_0(rows: torch.Tensor) -> torch.Tensor:
    q = _nibbles(rows[:, 2:]).to(torch.int8) - 8
    return _f16(rows[:, :2]) * q.float()


def _q4_1(rows: torch.Tensor) -> torch.Tensor:
    q = _nibbles(rows[:, 4:])
    return _f16(rows[:, :2]) * q.float() + _f16(rows[:, 2:4])


def _fifth_bits(rows: torch.Tensor, at: int) -> torch.Tensor:
    """Q5_0/Q5_1: the 32 bits at bytes [at, at+4) -> (n, 32) values 0 or 16: bit i (little-endian) is number i's."""
    return _bits(rows[:, at : at + 4]).reshape(-1, 32) << 4


def _q5_0(rows: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(rows[:, 6:]) | _fifth_bits(rows, 2)).to(torch.int8) - 16
    return _f16(rows[:, :2]) * q.float()


def _q5_1(rows: torch.Tensor) -> torch.Tensor:
    q = _nibbles(rows[:, 8:]) | _fifth_bits(rows, 4)
    return _f16(rows[:, :2]) * q.float() + _f16(rows[:, 2:4])


def _q2_k(rows: torch.Tensor) -> torch.Tensor:
    """16 scale bytes (low nibble: scale, high: min), 64 bytes of 2-bit q, f16 d, f16 dmin. Number
    128·h + 32·j + 16·p + l (h < 2, j < 4, p < 2, l < 16) is bits 2j..2j+1 of q byte 32·h + 16·p + l, in
    sub-block 8·h + 2·j + p."""
    n = rows.shape[0]
    scales, qs = rows[:, :16], rows[:, 16:80]
    d, dmin = _f16(rows[:, 80:82]), _f16(rows[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 2, 4, 2, 1)  # (n, h, j, p, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 2, 4, 2, 1)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=rows.device).reshape(1, 1, 4, 1, 1)
    q = (qs.reshape(n, 2, 1, 2, 16) >> shifts) & 3  # (n, h, j, p, l)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q3_k(rows: torch.Tensor) -> torch.Tensor:
    """32 bytes hmask, 64 bytes of 2-bit q, 12 bytes of 16 6-bit scales, f16 d. Number 128·h + 32·j + 16·p + l is
    bits 2j..2j+1 of q byte 32·h + 16·p + l, minus 4 unless bit 4·h + j of hmask byte 16·p + l is set, in
    sub-block 8·h + 2·j + p. Scale i: low 4 bits from byte i mod 8 (high nibble for i ≥ 8), high 2 bits from byte
    8 + i mod 4 (bits 2·(i div 4)); minus 32."""
    n = rows.shape[0]
    hmask, qs, packed, d = rows[:, :32], rows[:, 32:96], rows[:, 96:108], _f16(rows[:, 108:110])
    low = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], dim=1)  # (n, 16)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=rows.device)
    high = ((packed[:, 8:12].unsqueeze(1) >> shifts.reshape(1, 4, 1)) & 3).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 2, 4, 2, 1)  # (n, h, j, p, 1)
    q = (qs.reshape(n, 2, 1, 2, 16) >> shifts.reshape(1, 1, 4, 1, 1)) & 3  # (n, h, j, p, l)
    bit = torch.arange(8, dtype=torch.uint8, device=rows.device).reshape(1, 2, 4, 1, 1)  # 4·h + j
    minus4 = (((hmask.reshape(n, 1, 1, 2, 16) >> bit) & 1) ^ 1) << 2  # (n, h, j, p, l): 4 where the bit is clear
    return (dl * (q.to(torch.int8) - minus4.to(torch.int8)).float()).reshape(n, QK_K)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 6-bit scales and 8 6-bit mins (n, 8), as ggml's get_scale_min_k4: sub-blocks 0-3
    in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11 with their top 2
    bits in bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scales, mins


def _k4_values(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: d·s·q − dmin·m with q (n, 8, 32), sub-block s = 2·g + p for q byte 32·g + l's nibble p."""
    n = rows.shape[0]
    scales, mins = _scale_min_k4(rows[:, 4:16])
    d = (_f16(rows[:, :2]) * scales.float()).reshape(n, 8, 1)
    m = (_f16(rows[:, 2:4]) * mins.float()).reshape(n, 8, 1)
    return (d * q.float() - m).reshape(n, QK_K)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> (n, 8, 32): for each 32-byte group g, its low nibbles (sub-block 2g), then its high (2g+1)."""
    groups = qs.reshape(-1, 4, 1, 32)
    return torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(rows: torch.Tensor) -> torch.Tensor:
    """f16 d, f16 dmin, 12 bytes of scales and mins, 128 bytes of nibbles (`_k_nibbles`)."""
    return _k4_values(rows, _k_nibbles(rows[:, 16:]))


def _q5_k(rows: torch.Tensor) -> torch.Tensor:
    """As Q4_K with 32 bytes qh before the nibbles: bit s of qh byte l is the 5th bit of sub-block s's number l."""
    high = _bits(rows[:, 16:48]).transpose(1, 2)  # (n, 8 sub-blocks, 32)
    return _k4_values(rows, _k_nibbles(rows[:, 48:]) | (high << 4))


def _q6_k(rows: torch.Tensor) -> torch.Tensor:
    """128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales, f16 d. Number 128·h + 32·k + l
    (k < 4, l < 32): nibble k div 2 of ql byte 64·h + 32·(k mod 2) + l, bits 2k..2k+1 of qh byte 32·h + l, minus
    32; sub-block 8·h + 2·k + l div 16."""
    n = rows.shape[0]
    ql, qh, scales, d = rows[:, :128], rows[:, 128:192], rows[:, 192:208], _f16(rows[:, 208:210])
    halves = ql.reshape(n, 2, 1, 64)
    low = torch.cat([halves & 0x0F, halves >> 4], dim=2).reshape(n, 2, 4, 32)  # (n, h, k, l)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=rows.device).reshape(1, 1, 4, 1)
    high = (qh.reshape(n, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * scales.view(torch.int8).float()).reshape(n, 2, 4, 2, 1)  # (n, h, k, l div 16, 1)
    return (dl * q.reshape(n, 2, 4, 2, 16).float()).reshape(n, QK_K)


DEQUANTIZE = {
    "Q8_0": _q8_0,
    "Q5_1": _q5_1,
    "Q5_0": _q5_0,
    "Q4_1": _q4_1,
    "Q4_0": _q4_0,
    "Q6_K": _q6_k,
    "Q5_K": _q5_k,
    "Q4_K": _q4_k,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
}


# Layers ------------------------------------------------------------------------------------------------------------


def weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype`: its blocks dequantized, or, while a LoRA is merged (`weights/lora.py`), the
    merged weight that replaced them. Q8_0 goes into the thread's reused float32 buffer where it can
    (`storage.cast`'s reason), in two passes over it: the int8 numbers, then each block times its scale; then cast
    to `dtype` (into its reused buffer)."""
    w = layer.weight
    if w.dtype != torch.uint8:
        return cast(w, dtype)
    if layer.ggml_type == "Q8_0":
        out = reused_buffer(layer.weight_shape, torch.float32, w.device)
        if out is not None:
            rows = w.reshape(-1, 34)  # (n_blocks, 34): f16 d, 32 int8 q
            out.view(-1, 32).copy_(rows[:, 2:].view(torch.int8)).mul_(_f16(rows[:, :2]))  # as _q8_0, in place
            return cast(out, dtype)  # (bfloat16: rounded once, from the float32 product, as `dequantize`)
    return dequantize(w, layer.ggml_type, layer.weight_shape, dtype)


def quantize_q8_0(t: torch.Tensor) -> torch.Tensor:
    """A float tensor whose numbers fill whole blocks of 32 -> its Q8_0 blocks (n/32, 34) uint8, in memory order, as
    ggml's `quantize_row_q8_0_ref` and the gguf package's quantizer make them: d = max |x| / 127 per block, stored in
    float16; q = x / d (x · (1/d) in float32) rounded half away from zero, as C's roundf: trunc(q + copysign(0.5, q)),
    the truncation done by the cast to int8.

    In pieces of 2^14 blocks (2 MiB in float32) that stay in the cache: a whole SD 1.5 U-Net quantizes in about a
    second on 2 cores, 4x faster than whole-tensor passes, with no full-size temporaries to raise the peak."""
    x = t.detach().reshape(-1, 32)
    blocks = torch.empty(x.shape[0], 34, dtype=torch.uint8)
    half = torch.tensor(0.5)
    for start in range(0, x.shape[0], 1 << 14):
        piece = x[start : start + (1 << 14)].float()  # (k, 32)
        d = piece.abs().amax(dim=1, keepdim=True).div_(127)  # (k, 1)
        q = torch.mul(piece, torch.where(d == 0, 0.0, 1 / d))
        q.add_(torch.copysign(half, q))
        out = blocks[start : start + (1 << 14)]
        out[:, :2].copy_(d.half().view(torch.uint8))
        out[:, 2:].view(torch.int8).copy_(q)
    return blocks


class _Blocks:
    """What both quantized layers add to their nn.Module: loading blocks in place of the weight, and a state dict
    that holds the weight dequantized."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # The blocks' shape is not the weight's: take them as they are, then the rest as nn.Module does.
        self.weight = nn.Parameter(state_dict[prefix + "weight"], requires_grad=False)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # What a file of the original layout holds: `save_model` writes it, a Control-LoRA adds to it.
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        destination[prefix + "weight"] = weight(self, self.compute_dtype)


class QuantizedLinear(_Blocks, nn.Linear):
    """nn.Linear whose weight is GGML blocks (`ggml_type`, `weight_shape` once dequantized), dequantized to the
    input's dtype as it runs; its bias is a plain tensor in the compute dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight(self, x.dtype), _cast(self.bias, x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.ggml_type}"


class QuantizedConv2d(_Blocks, nn.Conv2d):
    """nn.Conv2d whose weight is GGML blocks, dequantized to the input's dtype as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight(self, x.dtype), _cast(self.bias, x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.ggml_type}"


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


QUANTIZED_LAYERS = {nn.Linear: QuantizedLinear, nn.Conv2d: QuantizedConv2d}


def quantize_layer(layer: nn.Module, qtype: str, shape: torch.Size, dtype: torch.dtype) -> None:
    """Make a Linear or Conv2d layer take GGML blocks of `qtype` as its weight (of `shape` once dequantized) at
    the next load_state_dict, and dequantize them to its input's dtype as it runs."""
    layer.__class__ = QUANTIZED_LAYERS[type(layer)]
    layer.ggml_type, layer.weight_shape, layer.compute_dtype = qtype, torch.Size(shape), dtype


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (QuantizedLinear, QuantizedConv2d)) and layer.weight.dtype == torch.uint8


def parameter_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Each parameter's shape by name, a quantized weight's as dequantized (its blocks' shape is not the weight's)."""
    shapes = {}
    for prefix, m in module.named_modules():
        for name, p in m.named_parameters(recurse=False):
            shapes[f"{prefix}.{name}" if prefix else name] = (
                m.weight_shape if name == "weight" and is_quantized(m) else p.shape
            )
    return shapes


def parameter_count(module: nn.Module) -> int:
    """Numbers in the module's parameters, a quantized weight counted as the numbers it holds, not its bytes."""
    return sum(math.prod(shape) for shape in parameter_shapes(module).values())


def storage(module: nn.Module) -> dict[str, int]:
    """GGML type -> how many of the module's layers hold their weight in it ({} for none)."""
    found: dict[str, int] = {}
    for m in module.modules():
        if is_quantized(m):
            found[m.ggml_type] = found.get(m.ggml_type, 0) + 1
    return found
