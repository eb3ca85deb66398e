"""The latent cache (`--cache-latents`): every image's posterior mean and std under the frozen autoencoder, encoded
once, so that a step draws z = mean + std·ε without running the encoder; and every caption's text embedding.

In memory by default. With --cache-latents-to-disk (kohya's flag), each image's latent is a file under
OUTDIR/cache/latents/, named by a hash of all it depends on: the image (its file's path, size and modification
time, or a shapes item's drawing), its bucket and resize rule, the autoencoder's weights and the device type that
encoded it. The first run writes them; later runs and resumes encode only what is new or changed, and read the
rest one batch at a time, so that a data set larger than memory trains. The files hold the floats the encoder
gave, so a run from them gives the weights of a run from memory bit for bit. With --cache-text-encoder-outputs-to-disk
(kohya's flag) each distinct caption's text embedding (SDXL: and pooled text) is a file under OUTDIR/cache/text/
alike, named by the caption, the text encoders' weights and the device type (SDXL's 77×2048 floats are 0.6 MB a
caption: 6 GB of memory for 10,000 captions).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from ..models.ldm import LatentDiffusion
from ..weights.checkpoint import save_tensors
from .common import TrainError
from .config import TrainConfig

ENCODE_BATCH = 16


def by_shape(images: list[torch.Tensor]) -> list[list[int]]:
    """The images' positions grouped by shape (aspect-ratio buckets): each group can be stacked into one batch."""
    groups: dict[torch.Size, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return list(groups.values())


@torch.no_grad()
def encode(model: LatentDiffusion, dataset, indices: list[int], device, quiet: bool):
    """Yields (data set index, mean (c, h, w), std (c, h, w), item) of each readable image of `indices`, encoded
    ENCODE_BATCH at a time, the images of one bucket together."""
    order = sorted(indices, key=dataset.bucket)
    for start in tqdm(range(0, len(order), ENCODE_BATCH), desc="caching latents", disable=quiet, unit="batch"):
        read = [(i, it) for i in order[start : start + ENCODE_BATCH] if (it := dataset.load(i)) is not None]
        for group in by_shape([it.image for _, it in read]):  # (a batch may straddle two buckets)
            posterior = model.first_stage_model.encode(torch.stack([read[k][1].image for k in group]).to(device))
            for k, mean, std in zip(group, posterior.mean.cpu(), posterior.std.cpu()):
                yield read[k][0], mean, std, read[k][1]


def build_cache(model: LatentDiffusion, dataset, device, cfg: TrainConfig, quiet: bool, outdir=None, rank=0, world=1):
    """Every readable image's row: its latent's (mean, std) under "latents" (row i: a pair of (c, h, w) tensors;
    images of different buckets have different shapes), its bucket and micro-conditioning, the data set's index of
    each (where unreadable images are left out, they differ), and the text embedding (and pooled text, SDXL) of
    every distinct caption (none when the text encoder trains or tags are shuffled: the captions are then encoded
    every step). With cfg.cache_latents_to_disk, the latents are read from outdir's cache files (module docstring);
    rank 0 writes the missing ones while the other processes wait."""
    if cfg.cache_latents_to_disk:
        source, latents, micro = disk_rows(model, dataset, device, Path(outdir), quiet, rank, world)
        captions = [dataset.caption(i) for i in source]
    else:
        encoded = {
            i: (mean, std, item) for i, mean, std, item in encode(model, dataset, range(len(dataset)), device, quiet)
        }
        source = sorted(encoded)  # rows in the data set's order
        latents = [encoded[i][:2] for i in source]
        micro = [(*encoded[i][2].original_size, *encoded[i][2].crop) for i in source]
        captions = [encoded[i][2].caption for i in source]
    if not source:
        raise TrainError(f"none of the {len(dataset)} images of the data set can be read")
    return {
        "latents": latents,
        "bucket": [dataset.bucket(i) for i in source],  # (width, height) in pixels: each row's shape
        "micro": torch.tensor(micro, dtype=torch.float32),  # (original height, width, crop top, left)
        "source": source,
        **caption_cache(model, cfg, captions, device, outdir, rank, world),
    }


@torch.no_grad()
def caption_cache(model: LatentDiffusion, cfg: TrainConfig, captions: list[str], device, outdir, rank, world) -> dict:
    """Each row's caption as an index into the distinct captions, and their embeddings where they are cached: in
    memory, or in files (`DiskRows`, module docstring) that rank 0 writes while the other processes wait."""
    unique = sorted(set(captions) | {""})
    embeddings = pooled = None
    if cfg.cache_text_encoder_outputs_to_disk:
        embeddings, pooled = disk_text(model, unique, device, Path(outdir), rank, world)
    elif not cfg.train_text_encoder and not cfg.shuffle_caption:
        parts = [model.get_text_conditioning(unique[i : i + 64], pooled=True) for i in range(0, len(unique), 64)]
        embeddings = torch.cat([context for context, _ in parts])
        pooled = torch.cat([p for _, p in parts]) if parts[0][1] is not None else None
    index = {c: i for i, c in enumerate(unique)}
    return {
        "caption": [index[c] for c in captions],
        "captions": unique,
        "index": index,
        "embeddings": embeddings,
        "pooled": pooled,
    }


# On disk ------------------------------------------------------------------------------------------------------


class DiskLatents:
    """Rows of latents in files: row i's (mean, std) is read when a batch asks for it."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(self.paths[row])
        return tensors["mean"], tensors["std"]


class DiskRows:
    """One tensor of each of a list of files: `rows[[i, j, ...]]` reads those files' `name` tensors, stacked, as
    indexing a tensor of them would give (that tensor's bytes alone: the context and the pooled text of one file are
    two reads of its parts)."""

    def __init__(self, paths: list[Path], name: str):
        self.paths, self.name = paths, name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        tensors = []
        for i in rows:
            with safe_open(self.paths[i], "pt") as f:
                tensors.append(f.get_tensor(self.name))
        return torch.stack(tensors)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes and bytes): a cache file names the encoder it came from."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_path(root: Path, key: str) -> Path:
    name = hashlib.sha256(key.encode()).hexdigest()
    return root / name[:2] / f"{name}.safetensors"  # 256 subfolders: no folder of a million files


def disk_rows(model: LatentDiffusion, dataset, device, outdir: Path, quiet: bool, rank: int, world: int):
    """(the data set index of each row, the rows' latents as `DiskLatents`, each row's micro-conditioning), once
    every readable image has its file; rank 0 encodes the images that have none."""
    root = outdir / "cache" / "latents"
    encoder = f"{weights_hash(model.first_stage_model)}|{torch.device(device).type}"
    paths = {}
    for i in range(len(dataset)):
        key = dataset.cache_key(i)
        paths[i] = None if key is None else cache_path(root, f"{key}|{encoder}")
    if rank == 0:
        missing = [i for i, path in paths.items() if path is not None and not path.is_file()]
        for i, mean, std, item in encode(model, dataset, missing, device, quiet):
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            micro = ",".join(map(str, (*item.original_size, *item.crop)))
            save_tensors({"mean": mean, "std": std}, paths[i], {"micro": micro}, "the latent cache")
    if world > 1:
        dist.barrier()  # every file rank 0 could write is there
    source = [i for i, path in paths.items() if path is not None and path.is_file()]  # (unreadable: no file)
    micro = []
    for i in source:
        with safe_open(paths[i], "pt") as f:  # the header alone
            micro.append(tuple(int(v) for v in f.metadata()["micro"].split(",")))
    return source, DiskLatents([paths[i] for i in source]), micro


def disk_text(model: LatentDiffusion, captions: list[str], device, outdir: Path, rank: int, world: int):
    """(the captions' text embeddings as `DiskRows`, their pooled texts as `DiskRows` or None): a file per caption,
    rank 0 encoding those that have none, 64 at a time."""
    root = outdir / "cache" / "text"
    encoders = f"{weights_hash(nn.ModuleList(model.text_encoders))}|{torch.device(device).type}"
    paths = [cache_path(root, f"{caption}|{encoders}") for caption in captions]
    missing = [k for k, path in enumerate(paths) if not path.is_file()] if rank == 0 else []
    for start in range(0, len(missing), 64):
        rows = missing[start : start + 64]
        context, pooled = model.get_text_conditioning([captions[k] for k in rows], pooled=True)
        for j, k in enumerate(rows):
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            tensors = {"context": context[j]} | ({} if pooled is None else {"pooled": pooled[j]})
            save_tensors(tensors, paths[k], {}, "the text cache")
    if world > 1:
        dist.barrier()  # every file is there
    pools = any(encoder.cfg.pooled for encoder in model.text_encoders)  # (SDXL's)
    return DiskRows(paths, "context"), DiskRows(paths, "pooled") if pools else None
