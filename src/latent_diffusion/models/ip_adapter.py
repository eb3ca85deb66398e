"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): an image as a prompt. A CLIP image
embedding (`clip_vision.py`) becomes a few context tokens, and every cross-attention of the U-Net attends to them
beside the text, with its own keys and values ("decoupled cross-attention"):

    out = to_out( softmax(q kᵀ/√d) v  +  w · softmax(q k_ipᵀ/√d) v_ip )      q = to_q(x), the same for both
    k = to_k(text), v = to_v(text)          k_ip = to_k_ip(tokens), v_ip = to_v_ip(tokens)

Key names are the files' (tencent-ailab's `ip_adapter.bin`, flattened as its `.safetensors` are): `image_proj.*`, the
projection of the image embedding into tokens, and `ip_adapter.{n}.to_k_ip/to_v_ip`, where n = 2i + 1 for the
U-Net's i-th cross-attention counted in diffusers' order of attention processors (down blocks, up blocks, middle
block; the even n were the self-attentions', which have none). The projections, by what the file holds:

- base (`image_proj.proj`, `image_proj.norm`): T tokens from the projected embedding (b, E),
      tokens = LayerNorm(Linear(E → T·C)(e).reshape(b, T, C))
- plus (`image_proj.latents`, ...): a perceiver resampler from the penultimate hidden states (b, 257, E): 16 learnt
  queries, 4 layers of [attention of the queries on (states; queries), then a feed-forward], each a residual;
- full face (`image_proj.proj.0`, `.proj.3`): per token of the penultimate states, Linear → GELU → Linear → LayerNorm,
  257 tokens.

Two kinds take a face's identity (InsightFace's ArcFace 512-vector, `pipeline/face_analysis.py`) in the image
embedding's place:
- faceid (IP-Adapter FaceID, `image_proj.proj.0/.2`, `image_proj.norm`): T tokens,
      tokens = LayerNorm(Linear(2E → T·C)(GELU(Linear(E → 2E)(e))).reshape(b, T, C))
- faceid_plus (`image_proj.perceiver_resampler`): those tokens as the queries of a perceiver (the plus resampler's
  layers, no learnt queries) on CLIP's penultimate states; v2 adds the queries back to its output.
- instantid (InstantID's `ip-adapter.bin`): the plus resampler on the identity as one state (b, 1, 512).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, attention
from .clip_vision import VisionOutput
from .shadowing import shadowed
from .unet import layer_grid

HEAD_WIDTH = 64  # the resampler's attention heads are 64 wide
IDENTITY_WIDTH = 512  # InsightFace's ArcFace identity


@dataclass(frozen=True)
class IPAdapterConfig:
    kind: str  # "base", "plus", "full", "faceid", "faceid_plus" or "instantid" (module docstring)
    embed_dim: int  # E: the CLIP width it takes (projected embedding for base, hidden width otherwise)
    context_dim: int  # C: the U-Net's cross-attention context width, the tokens' width
    tokens: int  # T: tokens per image (base: from the file; plus: the resampler's queries; full: 257)
    layers: tuple[int, ...]  # the n of its `ip_adapter.{n}` layers, in order
    widths: tuple[int, ...]  # the inner width of the cross-attention each feeds (its keys' and values' width)
    resampler_dim: int = 0  # plus: the resampler's width
    shortcut: bool = False  # faceid_plus: v2 (the file's name says so, as the extension reads it)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        inner = heads * HEAD_WIDTH
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim), latents: (b, q, dim) -> (b, q, dim): the queries attending to the states and themselves."""
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (b, n + q, inner) each
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class PerceiverResampler(nn.Module):
    """Queries (b, q, dim) attending to states (b, n, E) in `depth` layers -> (b, q, C) tokens."""

    def __init__(self, embed_dim: int, dim: int, context_dim: int, depth: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, dim // HEAD_WIDTH),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, 4 * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(states)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverResampler):
    """IP-Adapter plus's projection: (b, 257, E) hidden states -> (b, queries, C) tokens, from learnt queries."""

    def __init__(self, embed_dim: int, dim: int, context_dim: int, queries: int, depth: int = 4):
        super().__init__(embed_dim, dim, context_dim, depth)
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return super().forward(self.latents.expand(len(states), -1, -1), states)


class TokenProjection(nn.Module):
    """The base projection: (b, E) -> (b, T, C)."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).unflatten(-1, (self.tokens, -1)))


class MLPProjection(nn.Module):
    """The full-face projection: (b, 257, E) -> (b, 257, C), token by token."""

    def __init__(self, embed_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, context_dim), nn.LayerNorm(context_dim)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.proj(states)


class FaceIDProjection(nn.Module):
    """IP-Adapter FaceID's projection: (b, E) identities -> (b, T, C)."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, tokens * context_dim)
        )
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, identities: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(identities).unflatten(-1, (self.tokens, -1)))


class FaceIDPlusProjection(nn.Module):
    """IP-Adapter FaceID plus's projection: the identity's tokens (as FaceID's) as the queries of a perceiver on CLIP's
    penultimate states; v2 (`shortcut`) adds the identity's tokens back. (b, 512), (b, 257, E) -> (b, T, C)."""

    def __init__(self, identity_dim: int, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(
            nn.Linear(identity_dim, 2 * identity_dim), nn.GELU(), nn.Linear(2 * identity_dim, tokens * context_dim)
        )
        self.norm = nn.LayerNorm(context_dim)
        self.perceiver_resampler = PerceiverResampler(embed_dim, context_dim, context_dim)

    def forward(self, identities: torch.Tensor, states: torch.Tensor, shortcut: bool) -> torch.Tensor:
        x = self.norm(self.proj(identities).unflatten(-1, (self.tokens, -1)))
        out = self.perceiver_resampler(x, states)
        return x + out if shortcut else out


class ImagePromptLayer(nn.Module):
    """One cross-attention's keys and values of the image tokens."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.cfg = cfg
        E, C = cfg.embed_dim, cfg.context_dim
        if cfg.kind == "base":
            self.image_proj = TokenProjection(E, C, cfg.tokens)
        elif cfg.kind in ("plus", "instantid"):
            self.image_proj = Resampler(E, cfg.resampler_dim, C, cfg.tokens)
        elif cfg.kind == "faceid":
            self.image_proj = FaceIDProjection(E, C, cfg.tokens)
        elif cfg.kind == "faceid_plus":
            self.image_proj = FaceIDPlusProjection(IDENTITY_WIDTH, E, C, cfg.tokens)
        else:
            self.image_proj = MLPProjection(E, C)
        self.ip_adapter = nn.ModuleDict({str(n): ImagePromptLayer(C, w) for n, w in zip(cfg.layers, cfg.widths)})

    @property
    def takes_identity(self) -> bool:
        """Whether its tokens come from a face's identity (faceid, instantid), not from a CLIP image tower."""
        return self.cfg.kind in ("faceid", "faceid_plus", "instantid")

    def tokens(self, clip: VisionOutput) -> torch.Tensor:
        """A CLIP output (b images) -> their tokens (b, T, C)."""
        return self.image_proj(clip.image_embeds if self.cfg.kind == "base" else clip.penultimate)

    def identity_tokens(self, identities: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """Faces' identities (b, 512) (and, for faceid_plus, CLIP's penultimate states (b, 257, E)) -> their tokens
        (b, T, C)."""
        if self.cfg.kind == "faceid_plus":
            return self.image_proj(identities, states, self.cfg.shortcut)
        return self.image_proj(identities if self.cfg.kind == "faceid" else identities[:, None])


def cross_attentions(unet: nn.Module) -> list[CrossAttention]:
    """The U-Net's cross-attentions in the order of the `ip_adapter.{2i + 1}` keys: input blocks, output blocks, then
    the middle block (diffusers registers its up blocks before its middle block)."""

    def found(blocks) -> list[CrossAttention]:
        return [m.attn2 for block in blocks for m in block.modules() if hasattr(m, "attn2")]

    return found(unet.input_blocks) + found(unet.output_blocks) + found([unet.middle_block])


def attention_blocks(unet: nn.Module) -> list[int]:
    """Each cross-attention's block (in `cross_attentions` order), numbered as the web UI's ControlNet extension numbers
    the blocks an IP-Adapter's per-block weights address (its `transformer_index`): the blocks that hold
    cross-attention in the order the U-Net runs them, input blocks, the middle block, output blocks; 16 in SD 1.x and
    2.x, 11 in SDXL, whose blocks of several transformers share one weight."""

    def attends(block) -> bool:
        return any(hasattr(m, "attn2") for m in block.modules())

    running = [b for b in (*unet.input_blocks, unet.middle_block, *unet.output_blocks) if attends(b)]
    number = {id(b): k for k, b in enumerate(running)}
    order = [*unet.input_blocks, *unet.output_blocks, unet.middle_block]  # (`cross_attentions`')
    return [number[id(b)] for b in order for m in b.modules() if hasattr(m, "attn2")]


def decoupled_attention(attn: CrossAttention, prompts: list, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The cross-attention with image prompts (module docstring). x: (b, n, query_dim), context: (b, m, C); prompts:
    [(k_ip, v_ip, w, region)], k_ip and v_ip (b, T, inner) already projected, region None or (a mask (1, 1, H, W),
    the latent's (h, w)): the image prompt's output times the mask at this layer's grid."""
    q = attn.to_q(x)
    out = attention(q, attn.to_k(context), attn.to_v(context), attn.heads)
    for k_ip, v_ip, w, region in prompts:
        prompted = w * attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype), attn.heads)
        out = out + (prompted if region is None else prompted * region_weights(*region, x.shape[1]).to(out))
    return attn.to_out(out)


def region_weights(mask: torch.Tensor, latent: tuple[int, int], n: int) -> torch.Tensor:
    """A region mask (1, 1, H, W) resized (bilinear) to the grid of a layer of n places (`layer_grid` of the latent's
    (h, w)) -> (1, n, 1); the extension's `apply_effective_region_mask` of its IP-Adapter, which finds the grid as
    √(n / hw)·(h, w)."""
    return F.interpolate(mask, size=layer_grid(latent, n), mode="bilinear").reshape(1, n, 1)


def image_prompted(unet: nn.Module, prompts: list[tuple]):
    """The U-Net's cross-attentions attending to image prompts while this lasts (`shadowed`): per prompt, an adapter,
    the tokens of each row of the U-Net's batch (rows, T, C), its weight w, or one weight per block that holds
    cross-attention (`attention_blocks`: the extension's advanced weighting), and its region or None
    (`decoupled_attention`). A layer at weight 0 attends to nothing more."""
    attentions = cross_attentions(unet)
    blocks = attention_blocks(unet) if any(isinstance(w, tuple) for _, _, w, _ in prompts) else None
    for adapter, *_ in prompts:
        if len(adapter.cfg.layers) != len(attentions):
            raise ValueError(f"an IP-Adapter of {len(adapter.cfg.layers)} layers, for a U-Net of {len(attentions)}")
    forwards = {}
    for i, attn in enumerate(attentions):
        kv = []
        for adapter, tokens, w, region in prompts:
            w = w[blocks[i]] if isinstance(w, tuple) else w
            if w == 0:
                continue
            layer = adapter.ip_adapter[str(adapter.cfg.layers[i])]
            kv.append((layer.to_k_ip(tokens), layer.to_v_ip(tokens), w, region))  # (rows, T, inner) each
        forwards[attn] = functools.partial(decoupled_attention, attn, kv)
    return shadowed(forwards)
