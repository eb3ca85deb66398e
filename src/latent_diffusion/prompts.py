"""Prompts in the web UI's language: emphasis weights, BREAK, and prompts of any length in chunks of 75 tokens.

Emphasis ("Original" in the web UI): `(text)` ×1.1, `[text]` ÷1.1, `(text:w)` ×w, nesting multiplies, a bracket
left open applies to the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal. Each chunk is BOS + 75 tokens + EOS; when a
chunk fills up, the text after its last comma moves to the next chunk if that comma is at most 20 tokens back;
`BREAK` ends a chunk. The chunks' encodings are concatenated along the token axis, and each token's hidden state
is multiplied by its weight (`LatentDiffusion.conditioning`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .tokenizer import CLIPTokenizer

if TYPE_CHECKING:  # embeddings.py imports checkpoint.py, which imports the model: a cycle at import time
    from .embeddings import Embedding

# One match per syntax element: escapes, brackets, a weight with its closing bracket, text, or a lone colon.
ELEMENT = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75  # tokens of prompt text per chunk, between BOS and EOS
BACKTRACK = 20  # how far back a comma may be for the text after it to move to the next chunk
PLACEHOLDER = 0  # the token id in the places of an embedding's vectors (the web UI's; the vectors replace it)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """text -> [(fragment, weight)], adjacent fragments of equal weight merged; ("BREAK", -1) marks a BREAK."""
    parts: list[list] = []  # [fragment, weight], weights multiplied in place as brackets close
    open_round, open_square = [], []  # where each open bracket's span starts in `parts`

    def multiply_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in ELEMENT.finditer(text):
        element, weight = m.group(0), m.group(1)
        if element.startswith("\\"):
            parts.append([element[1:], 1.0])
        elif element == "(":
            open_round.append(len(parts))
        elif element == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif element == ")" and open_round:
            multiply_from(open_round.pop(), 1.1)
        elif element == "]" and open_square:
            multiply_from(open_square.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(BREAK.split(element)):
                if i:
                    parts.append(["BREAK", -1.0])
                parts.append([piece, 1.0])
    for start in open_round:
        multiply_from(start, 1.1)
    for start in open_square:
        multiply_from(start, 1 / 1.1)
    merged: list[list] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1] and part[1] != -1:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(fragment, weight) for fragment, weight in merged]


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)  # BOS + 75 + EOS once closed (77)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, Embedding]] = field(default_factory=list)  # (position of its first vector, it)


def chunk_prompt(
    text: str, tokenizer: CLIPTokenizer, syntax: bool = True, embeddings: Mapping[str, Embedding] | None = None
) -> list[Chunk]:
    """A prompt -> its chunks of 77 token ids and weights, padded with EOS (the family's pad comes later).
    Where the tokens spell an embedding's name (the longest that matches), its vectors take that many places,
    all in one chunk. syntax=False: the plain text, every weight 1, no BREAK."""
    comma = tokenizer.encoder[",</w>"]
    by_first_token: dict[int, list[tuple[list[int], Embedding]]] = {}
    for embedding in (embeddings or {}).values():
        ids = tokenizer.encode(embedding.name)
        by_first_token.setdefault(ids[0], []).append((ids, embedding))
    for candidates in by_first_token.values():
        candidates.sort(key=lambda c: -len(c[0]))
    chunks, chunk, last_comma = [], Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK - len(chunk.tokens)
        chunks.append(Chunk([tokenizer.sot_id, *chunk.tokens, *[tokenizer.eot_id] * pad, tokenizer.eot_id],
                            [1.0, *chunk.weights, *[1.0] * pad, 1.0],
                            [(position + 1, e) for position, e in chunk.embeddings]))  # fmt: skip
        chunk, last_comma = Chunk(), -1

    for fragment, weight in parse_emphasis(text) if syntax else [(text, 1.0)]:
        if weight == -1:  # BREAK
            close()
            continue
        tokens, i = tokenizer.encode(fragment), 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:],
                              [(p - cut, e) for p, e in chunk.embeddings if p >= cut])  # fmt: skip
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.embeddings = [(p, e) for p, e in chunk.embeddings if p < cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            ids, embedding = next(((ids, e) for ids, e in by_first_token.get(token, []) if tokens[i : i + len(ids)] == ids),
                                  ([token], None))  # fmt: skip
            if embedding is not None:
                n = min(len(embedding.vectors), CHUNK)
                if len(chunk.tokens) + n > CHUNK:
                    close()
                chunk.embeddings.append((len(chunk.tokens), embedding))
                chunk.tokens += [PLACEHOLDER] * n
                chunk.weights += [weight] * n
            else:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
            i += len(ids)
    if chunk.tokens or not chunks:
        close()
    return chunks


# Prompt editing and alternation ---------------------------------------------------------------------------------
#
# `[from:to:when]` is `from` until step `when` and `to` after it (`[to:when]`: nothing, then `to`; `[from::when]`:
# `from`, then nothing); `when` below 1 is a fraction of the steps, else a step number. `[a|b|c]` takes a, b, c
# in turn, one per step. As the web UI, steps count the denoiser's evaluations from 1.

NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")


def _close(text: str, start: int) -> int:
    """The index of the `]` that closes the `[` at text[start], or -1; escapes and nested brackets are skipped."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in "[(":
            depth += 1
        elif text[i] in "])":
            depth -= 1
            if depth == 0:
                return i if text[i] == "]" else -1
        i += 1
    return -1


def _split_top(text: str, sep: str) -> list[str]:
    """text split at the `sep` characters that are outside every bracket and not escaped."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += (text[i] in "[(" and 1) or -(text[i] in "])")
        if text[i] == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return [*parts, text[start:]]


def _parse(text: str, steps: int):
    """text -> a list of parts: str, ("edit", before, after, when) or ("alternate", [options]); nested lists."""
    parts, plain, i = [], "", 0
    while i < len(text):
        if text[i] == "\\":
            plain, i = plain + text[i : i + 2], i + 2
            continue
        end = _close(text, i) if text[i] == "[" else -1
        if end == -1:
            plain, i = plain + text[i], i + 1
            continue
        inner = text[i + 1 : end]
        options, fields = _split_top(inner, "|"), _split_top(inner, ":")
        if len(fields) in (2, 3) and NUMBER.fullmatch(fields[-1]):  # before alternation, as the web UI parses
            when = float(fields[-1])
            when = int(when * steps if when < 1 else when)
            before = fields[0] if len(fields) == 3 else ""
            node = ("edit", _parse(before, steps), _parse(fields[-2], steps), min(steps, when))
        elif len(options) > 1:
            node = ("alternate", [_parse(o, steps) for o in options])
        else:
            node = ["[", *_parse(inner, steps), "]"]
        parts, plain, i = [*parts, plain, node], "", end + 1
    return [*parts, plain]


def _steps_of(tree, steps: int) -> set[int]:
    found = set()
    for part in tree:
        if isinstance(part, tuple) and part[0] == "edit":
            found |= ({part[3]} if part[3] >= 1 else set()) | _steps_of(part[1], steps) | _steps_of(part[2], steps)
        elif isinstance(part, tuple):
            found |= set(range(1, steps + 1))
            for option in part[1]:
                found |= _steps_of(option, steps)
        elif isinstance(part, list):
            found |= _steps_of(part, steps)
    return found


def _at_step(tree, step: int) -> str:
    out = []
    for part in tree:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, list):
            out.append(_at_step(part, step))
        elif part[0] == "edit":
            out.append(_at_step(part[1] if step <= part[3] else part[2], step))
        else:
            out.append(_at_step(part[1][(step - 1) % len(part[1])], step))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, prompt)]: the prompt to use up to and including each step (steps counted from 1)."""
    tree = _parse(text, steps)
    ends = sorted({steps, *(s for s in _steps_of(tree, steps) if s < steps)})
    return [(end, _at_step(tree, end)) for end in ends]


# Extra networks ----------------------------------------------------------------------------------------------------
#
# `<lora:name>`, `<lora:name:weight>` or `<lora:name:te weight:unet weight>` (also `te=`, `unet=`) name a LoRA to
# apply while the prompt is sampled; the tag itself is removed from the text, as the web UI does. `<lyco:...>` is
# the old name of the same thing.

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float = 1.0  # on the text encoder
    unet_weight: float = 1.0  # on the U-Net


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """A prompt -> (the prompt without its extra-network tags, its LoRA tags). ValueError for a tag of another kind
    of network or a weight that is not a number."""
    tags = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1).lower(), m.group(2).split(":")
        if kind not in ("lora", "lyco"):
            raise ValueError(
                f"prompt: <{m.group(1)}:...> networks are not supported here; LoRA is (<lora:name:weight>)"
            )
        positional = [a for a in args[1:] if "=" not in a]
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"prompt: the weights of {m.group(0)} are not numbers") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise ValueError(f"prompt: the weights of {m.group(0)} must be finite")
        tags.append(LoraTag(args[0].strip(), te, unet))
        return ""

    return EXTRA_NETWORK.sub(take, text), tags
