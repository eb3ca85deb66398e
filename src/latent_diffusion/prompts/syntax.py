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

from ..models.tokenizer import CLIPTokenizer
from ..weights.embeddings import Embedding

# One match per syntax element: escapes, brackets, a weight with its closing bracket, text, or a lone colon. The web
# UI's weight pattern, [.\d]+, also takes "1.2.3" and ".", on which it fails; here those are not weights (the colon
# and the digits stay text), so every prompt parses.
ELEMENT = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|[^\\()\[\]:]+|:")
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
    by_first_token = _names_by_first_token(embeddings or {}, tokenizer)
    chunks, chunk, last_comma = [], Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK - len(chunk.tokens)
        chunks.append(
            Chunk(
                [tokenizer.sot_id, *chunk.tokens, *[tokenizer.eot_id] * pad, tokenizer.eot_id],
                [1.0, *chunk.weights, *[1.0] * pad, 1.0],
                [(position + 1, e) for position, e in chunk.embeddings],
            )
        )
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
                moved = Chunk(
                    chunk.tokens[cut:], chunk.weights[cut:], [(p - cut, e) for p, e in chunk.embeddings if p >= cut]
                )
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.embeddings = [(p, e) for p, e in chunk.embeddings if p < cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            ids, embedding = next(
                ((ids, e) for ids, e in by_first_token.get(token, []) if tokens[i : i + len(ids)] == ids),
                ([token], None),
            )
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


def _names_by_first_token(
    embeddings: Mapping[str, Embedding], tokenizer: CLIPTokenizer
) -> dict[int, list[tuple[list[int], Embedding]]]:
    """The embeddings' names as token ids, by their first token, longest first (the longest name that matches wins)."""
    found: dict[int, list[tuple[list[int], Embedding]]] = {}
    for embedding in embeddings.values():
        ids = tokenizer.encode(embedding.name)
        found.setdefault(ids[0], []).append((ids, embedding))
    for candidates in found.values():
        candidates.sort(key=lambda c: -len(c[0]))
    return found


# Prompt editing and alternation ---------------------------------------------------------------------------------
#
# `[from:to:when]` is `from` until step `when` and `to` after it (`[to:when]`: nothing, then `to`; `[from::when]`:
# `from`, then nothing). `when` written with a point is a fraction of the steps (0.5, 1.0, .25), without one a
# step number (3, -1, 1e1): the web UI's rule since 1.6 ("Old prompt editing timelines" off). `[a|b|c]` takes a, b,
# c in turn, one per step. As the web UI, steps count the denoiser's evaluations. In a hires fix's second pass `when`
# goes on counting from the first pass: a fraction from 1 (1.5: half-way through the second pass), a step number
# from the first pass's steps; an edit whose `when` fell in the first pass is past.
#
# The syntax is the web UI's grammar (its prompt_parser.py), parsed here by recursive descent:
#
#   text      := (element | one of `[ ] ( ) :` as plain text)*
#   prompt    := element*                      (no bare `[ ] ( ) : |`: brackets must pair up inside)
#   element   := plain | `(` prompt `)` | `(` prompt `:` prompt `)` | `[` prompt `]`
#              | `[` [prompt `:`] prompt `:` NUMBER `]`          an edit (spaces allowed around NUMBER)
#              | `[` prompt (`|` prompt)+ `]`                     an alternation
#   plain     := characters other than `\ [ ] ( ) : |`, or `\` and any character but a newline
#
# A text outside that language (a `|` outside an alternation, a trailing `\`) is used as written, without edits.

NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # `.` stops at a newline, as the web UI's grammar


class _Invalid(Exception):
    """The text is not in the grammar above."""


# The parse tree: a prompt is a list of parts; a part is text, a list of parts (a bracketed group, its brackets kept
# as text), an Edit or an Alternation.
@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`: `before` up to step `when`, `after` from the step after it."""

    before: list
    after: list
    when: str  # NUMBER as written: with a point, a fraction of the steps (`_when`)


@dataclass(frozen=True)
class Alternation:
    """`[a|b|c]`: the options in turn, one per step."""

    options: list[list]


def _prompt(text: str, i: int) -> tuple[list, int]:
    """Parse a `prompt` at text[i:] -> (its parts, where it stops: at `:`, `|`, `]`, `)` or the end)."""
    parts: list = []
    while i < len(text) and text[i] not in ":|])":
        if text[i] in "([":
            part, i = (_round if text[i] == "(" else _square)(text, i)
        elif m := PLAIN.match(text, i):
            part, i = m.group(0), m.end()
        else:  # a `\` at the end, or before a newline
            raise _Invalid
        parts.append(part)
    return parts, i


def _round(text: str, i: int) -> tuple[list, int]:
    """`(` prompt [`:` prompt] `)` at text[i] -> (its parts, the index after the `)`); its text stays as written."""
    parts, i = _prompt(text, i + 1)
    if i < len(text) and text[i] == ":":
        weight, i = _prompt(text, i + 1)
        parts = [*parts, ":", *weight]
    if i == len(text) or text[i] != ")":
        raise _Invalid
    return ["(", *parts, ")"], i + 1


def _square(text: str, i: int) -> tuple[object, int]:
    """The element that begins with the `[` at text[i]: an edit, an alternation or `[prompt]` -> (it, the index
    after its `]`)."""
    first, i = _prompt(text, i + 1)
    end = text[i] if i < len(text) else ""
    if end == "]":
        return ["[", *first, "]"], i + 1
    if end == "|":
        options = [first]
        while i < len(text) and text[i] == "|":
            option, i = _prompt(text, i + 1)
            options.append(option)
        if i < len(text) and text[i] == "]":
            return Alternation(options), i + 1
    elif end == ":":
        if m := NUMBER.match(text, i + 1):  # [to:when]
            return Edit([], first, m.group(1)), m.end()
        second, i = _prompt(text, i + 1)
        if i < len(text) and text[i] == ":" and (m := NUMBER.match(text, i + 1)):
            return Edit(first, second, m.group(1)), m.end()
    raise _Invalid


def _parse(text: str) -> list:
    """The whole text -> its parts (as `_prompt`'s); [text] where it is outside the grammar."""
    parts, i = [], 0
    try:
        while i < len(text):
            if text[i] in "([":
                try:
                    part, i = (_round if text[i] == "(" else _square)(text, i)
                    parts.append(part)
                    continue
                except _Invalid:  # not an element here: the bracket is plain text, as `]`, `)` and `:` are
                    pass
            if text[i] in "[]():":
                part, i = text[i], i + 1
            elif m := PLAIN.match(text, i):
                part, i = m.group(0), m.end()
            else:  # `|` outside an alternation, a `\` at the end or before a newline
                raise _Invalid
            parts.append(part)
    except (_Invalid, RecursionError):  # RecursionError: brackets nested a thousand deep
        return [text]
    return parts


def _when(number: str, steps: int, before: int = 0) -> int:
    """An edit's NUMBER -> the last step of its first part (< 1: none; the rule is above). before: in a hires pass,
    the first pass's steps, which NUMBER counts on from; -1: the web UI's old timelines (before 1.6: below 1 a
    fraction, else a step number, point or not, in each pass alone)."""
    if before < 0:
        value = float(number) * steps if float(number) < 1 else float(number)
    else:
        value = (float(number) - (1 if before else 0)) * steps if "." in number else float(number) - before
    if value >= steps:
        return steps
    return int(value) if value > 0 else 0  # 0 and below: never (-1e999 is -inf, which int() refuses)


def _steps_of(tree, steps: int, before: int) -> set[int]:
    """The steps after which some part of `tree` changes."""
    found = set()
    for part in tree:
        if isinstance(part, Edit):
            found |= {_when(part.when, steps, before)}
            found |= _steps_of(part.before, steps, before) | _steps_of(part.after, steps, before)
        elif isinstance(part, Alternation):
            found |= set(range(1, steps + 1))
            for option in part.options:
                found |= _steps_of(option, steps, before)
        elif isinstance(part, list):
            found |= _steps_of(part, steps, before)
    return found


def _at_step(tree, step: int, steps: int, before: int) -> str:
    out = []
    for part in tree:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, list):
            out.append(_at_step(part, step, steps, before))
        elif isinstance(part, Edit):
            chosen = part.before if step <= _when(part.when, steps, before) else part.after
            out.append(_at_step(chosen, step, steps, before))
        else:
            out.append(_at_step(part.options[(step - 1) % len(part.options)], step, steps, before))
    return "".join(out)


def prompt_schedule(text: str, steps: int, before: int = 0) -> list[tuple[int, str]]:
    """[(last step, prompt)]: the prompt to use up to and including each step (steps counted from 1). before: in a
    hires pass, the first pass's steps (the rule above)."""
    tree = _parse(text)
    ends = sorted({steps, *(s for s in _steps_of(tree, steps, before) if 1 <= s < steps)})
    return [(end, _at_step(tree, end, steps, before)) for end in ends]


# Composable prompts ------------------------------------------------------------------------------------------------
#
# `a castle AND a dragon :0.6` asks for one denoised output per part, combined with the weights: the unconditional
# output plus, for each part, weight × guidance × (its output − the unconditional), as the web UI's
# `get_multicond_prompt_list` and CFG denoiser do (Liu et al. 2022, "Compositional Visual Generation"). A part's
# weight is a number after a colon at its very end, else 1; so is a whole prompt's without AND, as the web UI reads it.

AND = re.compile(r"\bAND\b")
PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(text: str) -> list[tuple[str, float]]:
    """A prompt -> its AND parts [(text, weight)], the web UI's regular expressions (a part's text without the
    whitespace at its end)."""
    parts = []
    for part in AND.split(text):
        body, weight = PART_WEIGHT.search(part).groups()  # (the pattern matches every string)
        parts.append((body, 1.0 if weight is None else float(weight)))
    return parts


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
