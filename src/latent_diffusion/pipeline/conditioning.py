"""A batch's denoiser with its prompts' conditioning: each prompt's AND parts and prompt-editing segments encoded
as the web UI encodes them, and the `Denoiser` of each segment (classifier-free guidance, composable prompts)
switched in as the model's evaluations reach it.
"""

from __future__ import annotations

import itertools

import torch

from ..models.ldm import LatentDiffusion
from ..prompts.encoding import encode_chunked, encode_prompts
from ..sampling.denoiser import Denoiser
from .control_hook import MARK
from .plan import ParsedPrompt, Plan


def row_fields(model: LatentDiffusion, parts_of: list | None, images: int, extra: dict, net=None):
    """The conditioning fields beside the text, for the conditional and the unconditional rows, and the network that
    reads them: an inpainting model's image input once per `AND` part (parts_of: each image's parts, where the
    prompts are composed); with control units (`net`), which rows are a prompt's (the ControlNet extension's
    cond_mark); else the model's own U-Net. -> (net, conditional fields, unconditional fields)."""
    extra_cond = extra
    if parts_of is not None:
        image_of_row = torch.tensor([i for i, image in enumerate(parts_of) for _ in image])
        extra_cond = {k: v[image_of_row.to(v.device)] for k, v in extra.items()}
    if net is not None:
        rows = sum(len(image) for image in parts_of) if parts_of is not None else images
        return net, {**extra_cond, MARK: torch.ones(rows)}, {**extra, MARK: torch.zeros(images)}

    def unet(x_in: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        return model.model(x_in.to(model.dtype), t, c).float()

    return unet, extra_cond, extra


def scheduled_denoiser(
    model: LatentDiffusion,
    plan: Plan,
    batch: range,
    extra: dict,
    calls: itertools.count | None = None,
    own_chunks: bool = True,
    net=None,
):
    """The denoiser of a batch, with the conditioning of each prompt-editing segment (`syntax.prompt_schedule`):
    evaluation k (from 0) uses the first segment that ends at or after k, as the web UI counts. Without prompt
    editing there is one segment. As the web UI, the variants of one prompt are encoded together (padded to the
    longest with empty chunks, one emphasis mean), and prompts of different lengths in one batch are padded by
    repeating their last vector. own_chunks: the plan's chunks, made with the pipeline's embeddings (False: the
    variants chunked again without them, for a refiner, whose text encoder they were not made for). net: the U-Net
    with control units (`control_hook.controlled_unet`), which also gets each row's mark: 1 for a prompt's rows, 0 for
    the unconditional ones. -> (denoiser, prompt warnings)."""
    r, notes = plan.request, []
    texts = [r.prompts[i] for i in batch]
    prompts = encoded_variants(model, plan, texts, plan.prompts, False, own_chunks, notes)  # (tags' LoRAs merged)
    composed = any(plan.prompts[text].composed for text in texts)  # (AND: then a row per part, with its weight)
    negatives = []
    if r.cfg_scale != 1 or composed:
        texts = [r.negative_prompts[i] for i in batch]
        negatives = encoded_variants(model, plan, texts, plan.negatives, True, own_chunks, notes)
    parts = [part for image in prompts for part in image]  # the conditional rows
    unconditional = [image[0] for image in negatives]
    ends = sorted({end for _, schedule, _ in (*parts, *unconditional) for end, _ in schedule})
    weights = [[weight for weight, _, _ in image] for image in prompts] if composed else None
    net, extra_cond, extra_uncond = row_fields(model, prompts if composed else None, len(batch), extra, net)

    def at(end: int, rows_of: list[tuple[float, list, dict]]) -> dict[str, torch.Tensor]:
        """The batch's conditioning for the segment that ends at `end`."""
        rows = [variants[next(v for last, v in schedule if end <= last)] for _, schedule, variants in rows_of]
        return {k: padded_cat([row[k] for row in rows]) for k in rows[0]}

    denoisers = {}
    for end in ends:
        cond, uncond = at(end, parts), at(end, unconditional) if unconditional else {}
        denoisers[end] = Denoiser(
            net=net,
            alphas_cumprod=model.alphas_cumprod,
            parameterization=model.parameterization,
            cond={**cond, **extra_cond},
            uncond={**uncond, **extra_uncond} if uncond else None,
            cfg_scale=r.cfg_scale,
            weights=weights,
        )
    if len(ends) == 1:
        return denoisers[ends[0]], notes
    calls = calls if calls is not None else itertools.count()  # shared with a refiner: one count over both models

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        k = next(calls)
        return denoisers[next((end for end in ends if k <= end), ends[-1])](x, sigma)

    return denoiser, notes


def encoded_variants(
    model: LatentDiffusion,
    plan: Plan,
    texts: list[str],
    table: dict[str, ParsedPrompt],
    negative: bool,
    own_chunks: bool,
    notes: list[str],
) -> list[list[tuple[float, list, dict]]]:
    """Each text -> per AND part (its weight, its schedule, {variant: its conditioning, each field (1, ...)}); the
    encoders' warnings are added to `notes`. The variants of one part are encoded together, as the web UI does."""
    r, found = plan.request, {}
    options = dict(clip_skip=r.clip_skip, size=(r.height, r.width), joint=True, negative=negative)
    for text in dict.fromkeys(texts):
        found[text] = []
        for part in table[text].parts:
            variants = list(part.chunks)  # each distinct variant, in the schedule's order
            if own_chunks:
                chunked, empty = [part.chunks[v] for v in variants], [v == "" for v in variants]
                cond, more = encode_chunked(model, chunked, empty=empty, **options)
            else:
                cond, more = encode_prompts(model, variants, syntax=r.prompt_syntax, **options)
            notes.extend(n for n in more if n not in notes)
            rows = {v: {k: c[i : i + 1] for k, c in cond.items()} for i, v in enumerate(variants)}
            found[text].append((part.weight, part.schedule, rows))
    return [found[text] for text in texts]


def padded_cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """(1, n_i, ...) rows -> (b, max n_i, ...): a shorter context repeats its last vector (the web UI's
    reconstruct_multicond_batch)."""
    if rows[0].ndim != 3:  # vectors (1, d): nothing to pad
        return torch.cat(rows)
    n = max(row.shape[1] for row in rows)
    return torch.cat([torch.cat([row, row[:, -1:].expand(-1, n - row.shape[1], -1)], dim=1) for row in rows])
