"""Prompts in the web UI's language -> the text part of the model's conditioning mapping: chunks of 77 tokens
(`syntax.chunk_prompt`: emphasis, BREAK, embeddings' places) through the model's text encoders, each token's hidden
state weighted by its emphasis, chunks side by side; for SDXL also the pooled text and the micro-conditioning ("vector").

The model knows token ids and vectors only; the prompt language, emphasis and embeddings live here and in `prompts/syntax.py`.
"""

from __future__ import annotations

import torch

from ..models.ldm import LatentDiffusion, micro_conditioning
from ..models.tokenizer import clip_tokenizer
from ..weights.embeddings import Embedding
from .syntax import Chunk, chunk_prompt


def encode_prompts(
    model: LatentDiffusion,
    prompts: list[str],
    *,
    embeddings: dict[str, Embedding] | None = None,
    clip_skip: int | None = None,
    syntax: bool = True,
    size: tuple[int, int] | None = None,
    negative: bool = False,
    joint: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """prompts -> ({"crossattn": (b, 77·k, context_dim)}, warnings), and for SDXL "vector": y (b, adm_in_channels).

    Each prompt is k chunks of 77 tokens (prompts with fewer get empty-prompt chunks). Each token's hidden state
    is multiplied by its emphasis weight, then each chunk is rescaled to the mean it had unweighted, as the
    web UI's "Original" emphasis. The web UI takes that mean over its whole batch, which holds the variants of
    one prompt (its prompt-editing schedule): joint=True for those; per prompt otherwise, so that an image of
    a batch stays the image its seed gives alone. syntax=False reads the prompts as plain text; `embeddings`
    are the textual-inversion embeddings a prompt may name.

    SDXL: each text encoder encodes the chunks (emphasis applies to each), and the contexts are concatenated
    along the features. y is the pooled text of the first chunk, as the web UI's, then the micro-conditioning:
    original and target size `size` (height, width of the image), crop (0, 0), aesthetic score 6 (2.5 for
    negative prompts), diffusers' and the web UI's defaults. An empty negative prompt is all zeros, text and
    pooled (generative-models' `force_zero_embeddings`, as the reference sampling and the web UI use it).
    CLIP skip does not apply to SDXL, as in the web UI."""
    tokenizer = clip_tokenizer(model.cfg.text.max_length)
    chunked = [chunk_prompt(p, tokenizer, syntax, embeddings or {}) for p in prompts]
    options = dict(clip_skip=clip_skip, size=size, negative=negative, joint=joint)
    return encode_chunked(model, chunked, empty=[p == "" for p in prompts], **options)


def encode_chunked(
    model: LatentDiffusion,
    chunked: list[list[Chunk]],
    *,
    empty: list[bool],
    clip_skip: int | None = None,
    size: tuple[int, int] | None = None,
    negative: bool = False,
    joint: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`encode_prompts` for prompts already in chunks (`syntax.chunk_prompt`); empty: which prompts are "" (an
    empty negative prompt of SDXL is zeros)."""
    xl = bool(model.cfg.micro_conditioning)
    notes = ["clip_skip has no effect on SDXL models (as in the web UI)"] if xl and clip_skip is not None else []
    clip_skip = None if xl else clip_skip
    empty_chunk = chunk_prompt("", clip_tokenizer(model.cfg.text.max_length), syntax=False)[0]
    encoded, pooled = [], None
    for i in range(max(len(c) for c in chunked)):
        row = [c[i] if i < len(c) else empty_chunk for c in chunked]
        context, chunk_pooled = encode_chunks(model, row, clip_skip, joint)
        encoded.append(context)
        pooled = chunk_pooled if pooled is None else pooled  # (b, embed_dim), the first chunk's
    cond = {"crossattn": torch.cat(encoded, dim=1)}
    if xl:
        micro = micro_conditioning(len(chunked), size or (model.cfg.default_size,) * 2, negative)
        cond["vector"] = model.conditioner.vector(pooled, micro)
        zero = torch.tensor([negative and e for e in empty], device=model.device)
        cond["crossattn"] = cond["crossattn"].masked_fill(zero[:, None, None], 0)
        cond["vector"][:, : pooled.shape[1]] = pooled.masked_fill(zero[:, None], 0)
    return cond, notes


def encode_chunks(
    model: LatentDiffusion, chunks: list[Chunk], clip_skip: int | None, joint: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk per prompt -> (their emphasized hidden states, every text encoder's side by side (b, 77, d); the
    pooled text (b, embed_dim) of the encoder that pools, or None)."""
    weights = torch.tensor([c.weights for c in chunks], device=model.device)[..., None]  # (b, 77, 1)
    vectors = [[(position, e.vectors) for position, e in c.embeddings] for c in chunks]
    parts, pooled, offset = [], None, 0
    for encoder in model.text_encoders:
        tokens = torch.tensor([encoder.pad(c.tokens) for c in chunks], device=model.device)
        columns = [[(p, v[:, offset : offset + encoder.cfg.width]) for p, v in row] for row in vectors]
        offset += encoder.cfg.width  # (an embedding's vectors hold every encoder's part, side by side)
        z = encoder(tokens, clip_skip, columns, pooled=encoder.cfg.pooled)  # (b, 77, d)
        if encoder.cfg.pooled:
            z, pooled = z
        parts.append(emphasized(z, weights, joint))
    return torch.cat(parts, dim=-1), pooled


def emphasized(z: torch.Tensor, weights: torch.Tensor, joint: bool = False) -> torch.Tensor:
    """Hidden states (b, 77, d) times their tokens' weights (b, 77, 1), rescaled to the mean they had unweighted:
    each row's mean, or with joint the mean of all rows."""
    if (weights == 1).all():
        return z
    weighted = z * weights.to(z.dtype)
    dims = (0, 1, 2) if joint else (1, 2)
    mean, new_mean = z.mean(dim=dims, keepdim=True), weighted.mean(dim=dims, keepdim=True)
    return weighted * torch.where(new_mean == 0, 1, mean / new_mean)
