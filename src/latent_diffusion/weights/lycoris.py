"""LyCORIS's network types beside LoRA (KohakuBlueleaf's LyCORIS; kohya-ss's OFT): LoHa, LoKr, OFT and BOFT, and
(IA)³, each as the change ΔW it makes to a weight W, computed as the web UI's built-in Lora extension computes it
(`extensions-builtin/Lora/network_{hada,lokr,oft,ia3}.py`, `calc_updown`, then `network.py`'s `finalize_updown`).
`lora.apply_lora` merges W' = W + w·ΔW(W) with the tag's strength w and takes it out bit for bit, as it does LoRA's.

With s = α / r (1 where the file has no α, or no rank: LoKr of two full factors; r the factors' inner size):
- LoHa (Hadamard product of two low-rank matrices): ΔW = s · (w1_a · w1_b) ⊙ (w2_a · w2_b). With CP factors
  (`hada_t1`, `hada_t2`, a convolution's k×k core) each half is t ×₁ w_a ×₂ w_b:
  half[o, i, k, l] = Σ_{p,q} t[p, q, k, l] · w_a[p, o] · w_b[q, i].
- LoKr (Kronecker product): ΔW = s · w1 ⊗ w2, each factor full (`lokr_w1`) or low rank (`lokr_w1_a · lokr_w1_b`),
  w2 possibly CP (`lokr_t2`); a convolution's w1 is (a, c) and w2 (b, d, k, k) or (b, d·k·k).
- OFT (orthogonal fine-tuning): an orthogonal R, block-diagonal with n blocks of b×b (n·b = the outputs), turns
  each output block: W'[block] = Rₖᵀ · W[block], and ΔW = W' − W. kohya's and the new LyCORIS's `oft_blocks` hold
  Q, made skew (Q − Qᵀ), its norm clamped to α·out, and R = (I + Q)(I − Q)⁻¹ (Cayley); old LyCORIS's `oft_diag`
  holds R itself. BOFT (`oft_blocks` of (m, n, b, b)) applies m such block rotations, each between a butterfly
  shuffle of the output channels that pairs blocks 2ⁱ·b/2 apart. `rescale` (out, 1, ...) scales W' per output.
- (IA)³: ΔW = W ⊙ v, v one number per output channel (per input with `on_input`), so W' = W · (1 + w·v).
- DoRA magnitudes (`dora_scale`) beside LoHa or LoKr: W + w · (m · V / ‖V‖ − W), V = W + ΔW, as for LoRA.
OFT's and (IA)³'s changes depend on W: where two networks touch one weight the second sees the first's W', as in
the web UI, which applies its networks one after another onto the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The key suffixes (after the module's name and a dot) of these types; `lora.parse_lora` groups a file's keys by them.
KEYS = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "oft_diag", "rescale",
    "on_input", "weight",  # (IA)³; `weight` last, so that LoRA's `.lora_down.weight` keys match theirs first
)  # fmt: skip


def _scale(alpha: torch.Tensor | None, rank: int | None) -> float:
    """α / r; 1 without an α or a rank. α = 0 reads as α = r, as LyCORIS and kohya load it."""
    return float(alpha) / rank if alpha is not None and rank and float(alpha) else 1.0


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP (Tucker) factor: core t (r, r, k, k), wa (r, out), wb (r, in) -> (out, in, k, k) (the web UI's
    `lyco_helpers.make_weight_cp`)."""
    return torch.einsum("pqkl,po,qi->oikl", t, wa, wb)


def _fits_flat(shape: tuple[int, ...], out: int, inputs: int) -> bool:
    """A change of (out, inputs) fits a weight of `shape` where the outputs agree and the rest has `inputs` numbers
    (the web UI reshapes a change of the weight's size to its shape)."""
    return shape[0] == out and math.prod(shape[1:]) == inputs


@dataclass
class LoHa:
    w1a: torch.Tensor  # (out, r); (r, out) with t1
    w1b: torch.Tensor  # (r, in·k·k); (r, in) with t1
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None  # (r, r, k, k): CP cores
    t2: torch.Tensor | None
    scale: float
    dora_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.t1 is None:
            return self.w1a.shape[0], self.w1b[0].numel()
        return self.w1a.shape[1], self.w1b.shape[1] * self.t1[0, 0].numel()

    def fits(self, shape: tuple[int, ...]) -> bool:
        return _fits_flat(shape, *self.shape)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """ΔW for the weight w (float32), in its shape."""

        def half(a, b, t):
            a, b = a.float(), b.float()
            return (a.flatten(1) @ b.flatten(1) if t is None else _cp(t.float(), a, b)).reshape(w.shape)

        return half(self.w1a, self.w1b, self.t1) * half(self.w2a, self.w2b, self.t2) * self.scale


@dataclass
class LoKr:
    w1: torch.Tensor  # (a, c): full, or lokr_w1_a · lokr_w1_b
    w2: torch.Tensor  # (b, d), (b, d, k, k) or (b, d·k·k)
    scale: float
    dora_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2[0].numel()

    def fits(self, shape: tuple[int, ...]) -> bool:
        return _fits_flat(shape, *self.shape)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w1.float(), self.w2.float()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(w.shape) * self.scale


@dataclass
class OFT:
    blocks: torch.Tensor  # (n, b, b) Q (or R: given_r); BOFT (m, n, b, b)
    alpha: float | None  # the constraint: ‖Q‖ ≤ α·out (none where None or 0)
    rescale: torch.Tensor | None  # per output
    given_r: bool = False  # old LyCORIS's `oft_diag`: the rotation itself

    @property
    def shape(self) -> tuple[int]:
        return (self.blocks.shape[-3] * self.blocks.shape[-1],)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return shape[0] == self.shape[0]

    def rotations(self, out: int) -> torch.Tensor:
        """The blocks' rotations R: (n, b, b), or (m, n, b, b) for BOFT."""
        blocks = self.blocks.float()
        if self.given_r:
            return blocks
        eye = torch.eye(blocks.shape[-1])
        q = blocks - blocks.transpose(-1, -2)  # skew-symmetric, so that R is orthogonal
        if self.alpha:
            norm = q.flatten().norm()
            q = q * ((norm.clamp(max=self.alpha * out) + 1e-8) / (norm + 1e-8))
        return (eye + q) @ (eye - q).inverse()

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        r = self.rotations(w.shape[0])
        if r.ndim == 3:  # W'[k·b + m] = Σₙ R[k, n, m] · W[k·b + n]
            turned = torch.einsum("knm,kn...->km...", r, w.reshape(r.shape[0], r.shape[1], *w.shape[1:]))
        else:
            turned = _butterfly(r, w)
        turned = turned.reshape(w.shape)
        if self.rescale is not None:
            turned = self.rescale.float().reshape(-1, *[1] * (w.ndim - 1)) * turned
        return turned - w


def _butterfly(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """BOFT's m stages on W's output channels: stage i shuffles them so that rows 2ⁱ·b/2 apart meet in one block of
    b, turns each block by its R (W' = R · W there), and shuffles back (the web UI's einops
    "(c g k) -> (c k g)" with g = 2, k = 2ⁱ·b/2)."""
    b = r.shape[-1]
    x = w
    for i, stage in enumerate(r):  # stage: (n, b, b)
        k = 2**i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2)  # (c g k) -> (c k g)
        x = torch.einsum("nij,nj...->ni...", stage, x.unflatten(0, (-1, b))).flatten(0, 1)
        x = x.unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)  # (c k g) -> (c g k)
    return x


@dataclass
class IA3:
    weight: torch.Tensor  # per output channel (per input with on_input)
    on_input: bool

    @property
    def shape(self) -> tuple[int]:
        return (self.weight.numel(),)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.weight.numel() == shape[1 if self.on_input else 0]

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        v = self.weight.float().flatten()
        return w * (v.reshape(1, -1, *[1] * (w.ndim - 2)) if self.on_input else v.reshape(-1, *[1] * (w.ndim - 1)))


Network = LoHa | LoKr | OFT | IA3


def lycoris_layer(h: dict[str, torch.Tensor]) -> Network | None:
    """One module's tensors by key suffix -> its network, in the web UI's order of types (`networks.module_types`:
    LoHa, IA3, LoKr, OFT), or None where they make none (a lone part). ValueError for factors that do not fit."""
    alpha, dora = h.get("alpha"), h.get("dora_scale")
    if all(k in h for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        w1a, w1b, w2a, w2b = (h[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        layer = LoHa(w1a, w1b, w2a, w2b, h.get("hada_t1"), h.get("hada_t2"), _scale(alpha, w1b.shape[0]), dora)
        if (layer.t1 is None) != (layer.t2 is None) or _numel(layer, 1) != _numel(layer, 2):
            raise ValueError(f"LoHa factors {_shapes(h, 'hada_')} do not make two changes of one shape")
        return layer
    if "weight" in h and "on_input" in h:
        return IA3(h["weight"], bool(h["on_input"].item()))
    w1 = h.get("lokr_w1", _product(h, "lokr_w1_a", "lokr_w1_b"))
    w2 = h.get("lokr_w2")
    if w2 is None and "lokr_t2" in h and "lokr_w2_a" in h and "lokr_w2_b" in h:
        w2 = _cp(h["lokr_t2"].float(), h["lokr_w2_a"].float(), h["lokr_w2_b"].float())
    w2 = _product(h, "lokr_w2_a", "lokr_w2_b") if w2 is None else w2
    if w1 is not None and w2 is not None:
        rank = next((h[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in h), None)
        return LoKr(w1, w2, _scale(alpha, rank), dora)
    if "oft_blocks" in h or "oft_diag" in h:
        blocks = h.get("oft_blocks", h.get("oft_diag"))
        if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(f"OFT blocks {tuple(blocks.shape)} are not square blocks")
        given_r = "oft_blocks" not in h
        return OFT(blocks, None if given_r or alpha is None else float(alpha), h.get("rescale"), given_r)
    return None


def _product(h: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor | None:
    return h[a].float().flatten(1) @ h[b].float() if a in h and b in h else None


def _numel(layer: LoHa, half: int) -> int:
    a, b, t = (layer.w1a, layer.w1b, layer.t1) if half == 1 else (layer.w2a, layer.w2b, layer.t2)
    return a.shape[0] * b[0].numel() if t is None else a.shape[1] * b.shape[1] * t[0, 0].numel()


def _shapes(h: dict[str, torch.Tensor], prefix: str) -> str:
    return ", ".join(f"{k} {tuple(t.shape)}" for k, t in h.items() if k.startswith(prefix))


def dora(weight: torch.Tensor, merged: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """DoRA's m · V / ‖V‖ for V = `merged` (float32, of the weight's shape): the norm per input channel, over the
    outputs and the kernel (the web UI's `apply_weight_decompose`). Magnitudes per input (1, in[, 1, 1]), as LyCORIS
    writes them by default, or per output (out, 1[, 1, 1]) (its wd_on_output), broadcast against the per-input
    norm as the web UI does."""
    out, inputs = weight.shape[:2]
    v = merged.reshape(out, inputs, -1)  # (out, in, k·k)
    norm = v.transpose(0, 1).reshape(inputs, -1).norm(dim=1).reshape(1, inputs, 1)
    m = magnitudes.to(device=weight.device, dtype=torch.float32)
    per_input = m.numel() == inputs and (m.ndim == 1 or m.shape[0] == 1)
    m = m.reshape(1, inputs, 1) if per_input else m.reshape(out, 1, 1)
    return (v * (m / norm)).reshape(merged.shape)


def merged(w: torch.Tensor, layer: Network, strength: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + strength·ΔW(W) as a new tensor of W's shape in `dtype` (None: W's), ΔW in float32 (the module docstring);
    with DoRA magnitudes W + strength·(m·V/‖V‖ − W), V = W + ΔW."""
    original = w.float()
    change = layer.delta(original)
    if getattr(layer, "dora_scale", None) is not None:
        change = dora(original, original + change, layer.dora_scale) - original
    return (original + strength * change).to(dtype or w.dtype)
