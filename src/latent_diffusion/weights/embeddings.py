"""Textual inversion (Gal et al. 2022): learned token vectors, used by writing an embedding's name in a prompt.

An embeddings folder is scanned once; each file's stem is its name. Where a prompt's tokens spell a name, the
web UI's chunking (`syntax.chunk_prompt`) puts that many placeholder tokens in its place (never across two
chunks) and the text encoder takes the embedding's vectors instead of those tokens' embeddings
(`TextEncoder.forward(..., vectors=...)`), before the transformer.

Formats, as the web UI reads them: its own `.pt` (`string_to_param` with one entry), diffusers'
`learned_embeds.bin` (`{token: (width,) or (n, width)}`), `.safetensors` with one tensor (`emb_params`), and
SDXL's `.safetensors` with `clip_l` (n, 768) and `clip_g` (n, 1280), held as one (n, 768 + 1280) tensor whose
columns each text encoder takes its part of, in the order of the model's context.
Pickled files go through the checkpoint reader's safe loader: nothing in them is run.

A LoRA file may bundle embeddings (the web UI's `bundle_emb.NAME.string_to_param.*`, `bundle_emb.NAME.clip_l` ...,
any of the formats above under `bundle_emb.NAME.`): a prompt that names the LoRA may use them by NAME, unless the
embeddings folder has one of that name (the web UI skips the bundled one then). Their "TI hashes" entry is the
LoRA's name, as the web UI writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import sha256_of
from .reader import CheckpointError, load_pickle, read_state_dict

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str  # the file's stem: what a prompt writes
    vectors: torch.Tensor  # (n, width) float32
    path: Path
    bundled_in: str = ""  # the LoRA that bundles it, by the name prompts use

    @property
    def shorthash(self) -> str:
        """The first 12 hex digits of the file's SHA-256, as the web UI's "TI hashes" infotext field; a bundled
        embedding's is its LoRA's name (the web UI's `BundledTIHash`)."""
        return self.bundled_in or sha256_of(self.path)[:12]


def read_embedding(path: str | os.PathLike) -> torch.Tensor:
    """One embedding file -> its vectors (n, width), float32. CheckpointError (a ValueError) if it holds none."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data = read_state_dict(path)[0]
    else:
        data = load_pickle(path)
    return embedding_vectors(data, str(path))


def embedding_vectors(data: object, source: str) -> torch.Tensor:
    """An embedding's data, in any of the formats of the module docstring -> its vectors (n, width), float32.
    CheckpointError (a ValueError) naming `source` if it holds none."""
    if isinstance(data, dict) and "string_to_param" in data:  # the web UI's (and the original code's) format
        data = data["string_to_param"]
        data = getattr(data, "_parameters", data)  # an early file's pickled ParameterDict
    if isinstance(data, dict) and data.keys() == {"clip_l", "clip_g"}:  # SDXL's: vectors for each text encoder
        clip_l, clip_g = data["clip_l"], data["clip_g"]
        tensors = isinstance(clip_l, torch.Tensor) and isinstance(clip_g, torch.Tensor)
        if tensors and clip_l.ndim == clip_g.ndim == 2 and len(clip_l) == len(clip_g):
            data = {"": torch.cat([clip_l, clip_g], dim=1)}
    if not isinstance(data, dict) or len(data) != 1 or not isinstance(next(iter(data.values())), torch.Tensor):
        raise CheckpointError(f"{source}: not a textual-inversion embedding (one tensor of token vectors)")
    vectors = next(iter(data.values())).detach().float()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not len(vectors) or not torch.isfinite(vectors).all():
        raise CheckpointError(f"{source}: not a textual-inversion embedding (one tensor of token vectors)")
    return vectors


def bundled_embeddings(path: str | os.PathLike, lora: str, width: int) -> dict[str, Embedding]:
    """The embeddings a LoRA file bundles, for text encoders of this width, by name (the web UI's `networks.py`:
    `string_to_param.*` gathered into one dict). Ones of another width, or of no vectors, are left out, as the web
    UI skips them. CheckpointError if the file cannot be read."""
    data: dict[str, dict] = {}
    for key, t in read_state_dict(path)[0].items():
        if key.startswith("bundle_emb."):
            _, name, part = key.split(".", 2) if key.count(".") >= 2 else (None, key, "")
            if part.startswith("string_to_param."):
                data.setdefault(name, {})["string_to_param"] = {part.partition(".")[2]: t}
            else:
                data.setdefault(name, {})[part] = t
    found = {}
    for name, parts in data.items():
        try:
            vectors = embedding_vectors(parts, f"{path}: bundle_emb.{name}")
        except CheckpointError:
            continue
        if vectors.shape[1] == width:
            found[name] = Embedding(name, vectors, Path(path), bundled_in=lora)
    return found


def load_embeddings(folder: str | os.PathLike, width: int) -> tuple[dict[str, Embedding], list[str]]:
    """Every embedding file in `folder` (and its subfolders) for text encoders of this width together (the U-Net's
    context_dim) -> ({name: embedding}, notices). A file that cannot be read, or whose vectors have another width
    (made for another family: 768 for SD 1.x, 1024 for SD 2.x, 768 + 1280 for SDXL), is skipped with a notice."""
    embeddings, notices = {}, []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()):
        try:
            vectors = read_embedding(path)
        except CheckpointError as e:
            notices.append(f"embedding skipped: {e}")
            continue
        if vectors.shape[1] != width:
            notices.append(
                f"embedding skipped: {path} has vectors of width {vectors.shape[1]}; this model's text "
                f"encoder takes {width}"
            )
            continue
        if path.stem in embeddings:
            notices.append(f"embedding skipped: {path} has the name of {embeddings[path.stem].path}")
            continue
        embeddings[path.stem] = Embedding(path.stem, vectors, path)
    return embeddings, notices
