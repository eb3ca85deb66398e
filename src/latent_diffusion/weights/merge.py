"""Checkpoint merging as the web UI's Checkpoint Merger does it (AUTOMATIC1111 `modules/extras.py`,
`run_modelmerger`), streamed tensor by tensor.

With α the multiplier, each key of A that the merge touches becomes
- weighted sum:     (1 − α)·A + α·B
- add difference:   A + α·(B − C)
- no interpolation: A (to bake in a VAE, save in float16 or drop weights)
in the dtype torch gives these expressions, as the web UI computes them.

As the web UI:
- a key is merged when its name contains "model" and B has it; every other key of A is written as A has it; keys that
  only B has are left out. `...text_model.embeddings.position_ids` is never merged (`checkpoint_dict_skip_on_merge`).
- add difference: a key that B has and C lacks adds nothing (B − C is taken as zeros).
- an inpainting (9 input channels) or instruct-pix2pix (8) A with a normal B: the first 4 input channels of
  `input_blocks.0.0.weight` are merged and the others stay A's; a normal A with such a B is refused.
- float16: a merged tensor (and a baked VAE's) that is float32 is saved as float16, other keys keep their dtype;
  with no interpolation every float32 tensor is halved.
- --bake-vae replaces `first_stage_model.*`; then weights whose name matches --discard-weights are left out.
- metadata: A's, B's, then C's, each over the one before; "format": "pt"; the merge recipe (`sd_merge_recipe`,
  `sd_merge_models`) as the web UI writes it with "Save metadata" and "Add merge recipe metadata" on.

Where this differs, on purpose: checkpoints of different families, tensors of different shapes and a VAE that does
not fit are refused before any work (the web UI fails midway, or writes a broken model); a tensor that is not floating
point (SDXL's CLIP position ids are int64, not on the web UI's skip list) keeps A's, where the web UI would turn it into
floats; our config (`latent_diffusion.config`) is always A's, since the merged tensors have A's keys and shapes.

Memory: the web UI holds B (and C) whole, then A. Here each output tensor is computed from the inputs' tensors of its
key, read from .safetensors files by pread (not memory-mapped: touched pages of a mapping stay resident and count
against the process) and written at once to the output, whose header is written first: the peak is a few tensors
beside the runtime. A pickle (.ckpt) is loaded whole, memory-mapped where it is a zip: a pickle cannot be read key by
key.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write, legacy_model_hash, sha256_of
from ..models.family import EMA, VAE, family_of_keys
from .architecture import CONFIG_METADATA_KEY, check_checkpoint_keys, infer_config
from .block_weights import BASE, block_of, parse_block_weights
from .checkpoint import add_text_model_level
from .reader import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    first_line,
    is_pickle,
    read_state_dict,
    read_tensor,
    safetensors_index,
)

MODES = {"weighted-sum": "Weighted sum", "add-difference": "Add difference", "no-interpolation": "No interpolation"}
MODELS = {"weighted-sum": 2, "add-difference": 3, "no-interpolation": 1}  # A, B, C: how many each mode takes
SKIP_ON_MERGE = "text_model.embeddings.position_ids"  # SD 1.x's in the web UI's list; SDXL's CLIP has one too
INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the problem in one line."""


@dataclass(frozen=True)
class MergeOptions:
    """The Checkpoint Merger's settings. alpha is its "Multiplier (M)"; block_weights SuperMerger's 25 (or 26) αs."""

    mode: str = "weighted-sum"
    alpha: float = 0.3
    block_weights: str | None = None
    float16: bool = False  # "Save as float16"
    bake_vae: str | os.PathLike | None = None  # "Bake in VAE": a VAE file
    discard_weights: str = ""  # "Discard weights with matching name": a regular expression
    drop_ema: bool = False  # leave out model_ema.* (the web UI does this with the discard expression)
    copy_metadata: bool = True  # "Copy metadata from merged models"
    recipe: bool = True  # "Add merge recipe metadata"

    def discard_pattern(self) -> str:
        """--discard-weights, with --drop-ema's `^model_ema\\.` joined to it: what the recipe records."""
        parts = [p for p in (self.discard_weights, r"^model_ema\." if self.drop_ema else "") if p]
        return "|".join(f"(?:{p})" for p in parts) if len(parts) > 1 else "".join(parts)


@dataclass(frozen=True)
class MergeResult:
    path: Path
    tensors: int  # written
    merged: int  # computed from two or three models
    discarded: int
    is_inpainting: bool
    is_instruct_pix2pix: bool


# The inputs --------------------------------------------------------------------------------------------------


class Source:
    """One input checkpoint: its keys (as the web UI reads them, see `add_text_model_level`), each tensor's dtype and
    shape, its metadata, and its tensors one at a time."""

    def __init__(self, path: Path, role: str):
        self.path, self.role = path, role
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
        with open(path, "rb") as f:
            head = f.read(8)
        self._file, self._tensors = None, None
        if is_pickle(path, head):
            self._tensors, self.metadata = read_state_dict(path)  # the whole file: a pickle has no index
            specs = {k: (t.dtype, tuple(t.shape)) for k, t in self._tensors.items()}
        else:
            self.metadata, self._index = _safetensors_header(path)
            specs = {k: (dtype, tuple(shape)) for k, (dtype, shape, *_) in self._index.items()}
            self._file = open(path, "rb")  # noqa: SIM115 (open for the merge; closed by `close`)
        self._origin = add_text_model_level({k: k for k in specs})  # our key -> the file's
        self.specs = {k: specs[origin] for k, origin in self._origin.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor of the file in memory of its own (a copy: the caller may change it)."""
        if self._tensors is not None:
            return self._tensors[self._origin[key]].clone()
        dtype, shape, start, end = self._index[self._origin[key]]
        # into torch's own (64-byte aligned) memory: arithmetic on a bytearray's is 4x slower in float16
        return read_tensor(self._file, dtype, shape, start, end, torch.empty(end - start, dtype=torch.uint8).numpy())

    def config_json(self) -> str:
        """Our config of the model: from its metadata, else read off its keys and shapes (and v from its name)."""
        return infer_config(self._shapes(), self.metadata, self.path).to_json()

    def check_is_model(self) -> str:
        """The family's title; CheckpointError (one line) if the file is no Stable Diffusion checkpoint."""
        check_checkpoint_keys(self.specs, self.path)  # raises, naming what is missing
        return family_of_keys(self.specs.keys()).title

    def _shapes(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in self.specs.items()}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header, and that each tensor lies in the file
            metadata = f.metadata() or {}
        return metadata, safetensors_index(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None


# What each key of the output is ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    kind: str  # "keep" (A's as it is), "half" (A's, float32 -> float16), "vae", "merge", "inpaint"
    alpha: float = 0.0
    dtype: torch.dtype = torch.float32  # of the output
    shape: tuple[int, ...] = ()


def plan_merge(sources: list[Source], options: MergeOptions, vae: dict[str, torch.Tensor] | None) -> list[Step]:
    """One step per key of the output, every check done: MergeError on the first problem."""
    a = sources[0]
    sdxl = family_of_keys(a.specs.keys()).name == "sdxl"
    base, blocks = (None, None)
    if options.block_weights is not None:
        base, blocks = parse_block_weights(options.block_weights, sdxl)
    discard = re.compile(options.discard_pattern()) if options.discard_pattern() else None
    steps = []
    for key, (dtype, shape) in a.specs.items():
        if discard is not None and discard.search(key):
            continue
        if vae is not None and key in vae:
            steps.append(Step(key, "vae", dtype=_half(vae[key].dtype, options.float16), shape=shape))
            continue
        if options.mode == "no-interpolation":
            steps.append(
                Step(key, "half" if options.float16 else "keep", dtype=_half(dtype, options.float16), shape=shape)
            )
            continue
        alpha = _alpha_of(key, options.alpha, base, blocks, sdxl)
        if alpha is None or not _merged(key, sources):
            steps.append(Step(key, "keep", dtype=dtype, shape=shape))
            continue
        kind = _check_shapes(key, sources)
        probes = [_probe(s, key) for s in (*sources, None)[:3]]  # A, B and C (or None)
        out = dtype if kind == "inpaint" else _merge(*probes, alpha, options.mode).dtype
        steps.append(Step(key, kind, alpha, _half(out, options.float16), shape))
    return steps


def _alpha_of(key: str, alpha: float, base: float | None, blocks: dict[str, float] | None, sdxl: bool) -> float | None:
    """α for the key: --alpha, or its block's (None: a key SuperMerger leaves as A's)."""
    if blocks is None:
        return alpha
    block = block_of(key, sdxl)
    if block is None:
        return None
    return (alpha if base is None else base) if block == BASE else blocks[block]


def _merged(key: str, sources: list[Source]) -> bool:
    """The web UI's rule ("model" in the name, B has it, not skipped), and floating point in A and B."""
    a, b = sources[0], sources[1]
    if "model" not in key or key not in b or key.endswith(SKIP_ON_MERGE):
        return False
    return a.specs[key][0].is_floating_point and b.specs[key][0].is_floating_point


def _check_shapes(key: str, sources: list[Source]) -> str:
    """ "merge", or "inpaint" where A has more input channels than B (the web UI's case); MergeError otherwise."""
    a, b = sources[0].specs[key][1], sources[1].specs[key][1]
    if len(sources) == 3 and key in sources[2] and sources[2].specs[key][1] != b:
        raise MergeError(f"{key}: B has shape {list(b)}, C {list(sources[2].specs[key][1])}: not the same architecture")
    if a == b:
        return "merge"
    if len(a) == len(b) > 1 and a[:1] + a[2:] == b[:1] + b[2:]:
        if a[1] == 4 and b[1] in (8, 9):
            kind = "inpainting" if b[1] == 9 else "instruct-pix2pix"
            raise MergeError(f"When merging {kind} model with a normal one, A must be the {kind} model.")
        if a[1] in (8, 9) and b[1] == 4:
            return "inpaint"
    raise MergeError(f"{key}: A has shape {list(a)}, B {list(b)}: not the same architecture")


def _probe(source: Source | None, key: str) -> torch.Tensor | None:
    """A one-element tensor of the key's dtype (None where the source lacks it): the merge's dtype without the work."""
    return torch.zeros(1, dtype=source.specs[key][0]) if source is not None and key in source else None


def _half(dtype: torch.dtype, float16: bool) -> torch.dtype:
    return torch.float16 if float16 and dtype == torch.float32 else dtype


def _merge(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, alpha: float, mode: str) -> torch.Tensor:
    """The web UI's arithmetic, term for term (its `weighted_sum`, `get_difference`, `add_difference`)."""
    if mode == "weighted-sum":
        return ((1 - alpha) * a) + (alpha * b)
    difference = b - c if c is not None else torch.zeros_like(b)
    return a + (alpha * difference)


def compute(step: Step, sources: list[Source], mode: str, vae: dict | None) -> torch.Tensor:
    """The output tensor of one step."""
    key = step.key
    if step.kind == "vae":
        return vae[key].reshape(step.shape).to(step.dtype)
    a = sources[0].tensor(key)
    if step.kind in ("keep", "half"):
        return a.to(step.dtype)
    b = sources[1].tensor(key)
    c = sources[2].tensor(key) if mode == "add-difference" and key in sources[2] else None
    if step.kind == "inpaint":  # only the 4 latent channels B has; the mask and masked-image channels stay A's
        a[:, 0:4] = _merge(a[:, 0:4], b, c, step.alpha, mode)
        return a.to(step.dtype)
    return _merge(a, b, c, step.alpha, mode).to(step.dtype)


# The VAE to bake in --------------------------------------------------------------------------------------------


def read_vae(path, a: Source) -> dict[str, torch.Tensor]:
    """A VAE file's tensors under A's `first_stage_model.` names; MergeError unless they are exactly A's VAE keys,
    each with A's number of elements (a [c, c] attention weight fits a [c, c, 1, 1] one)."""
    sd, _ = read_state_dict(path)
    if any(k.startswith(VAE) for k in sd):  # a whole checkpoint's VAE
        sd = {k.removeprefix(VAE): v for k, v in sd.items() if k.startswith(VAE)}
    sd = {VAE + k: v for k, v in sd.items() if not k.startswith(("loss", EMA)) and "." in k}
    wanted = {k for k in a.specs if k.startswith(VAE)}
    missing, extra = sorted(wanted - sd.keys()), sorted(sd.keys() - wanted)
    wrong = [k for k in sorted(wanted & sd.keys()) if sd[k].numel() != math.prod(a.specs[k][1])]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        what = "lacks" if missing else "has an unexpected" if extra else "has a wrong-shaped"
        raise MergeError(
            f"{path}: not a VAE of A's model: it {what} {first} ({len(missing + extra + wrong)} such keys)"
        )
    if any(not v.is_floating_point() for v in sd.values()):
        raise MergeError(f"{path}: not a VAE: it has tensors that are not floating point")
    return sd


# Metadata ----------------------------------------------------------------------------------------------------


def merged_metadata(sources: list[Source], options: MergeOptions, out: Path, steps: list[Step]) -> dict[str, str]:
    """The web UI's metadata of a merge: the models' own (A's, B's, C's, each over the one before), "format": "pt",
    and the merge recipe; our config is A's."""
    metadata = {}
    if options.copy_metadata:
        for source in sources:
            metadata.update(source.metadata)
    metadata["format"] = "pt"
    metadata[CONFIG_METADATA_KEY] = sources[0].config_json()
    if options.recipe:
        metadata["sd_merge_recipe"] = json.dumps(merge_recipe(sources, options, out, steps))
        models = {}
        for source in sources:  # the web UI's add_model_metadata: each model, then the models it was merged from
            models[sha256_of(source.path)] = {
                "name": source.path.name,
                "legacy_hash": legacy_model_hash(source.path),
                "sd_merge_recipe": _json_field(source.metadata, "sd_merge_recipe"),
            }
            models.update(_json_field(source.metadata, "sd_merge_models") or {})
        metadata["sd_merge_models"] = json.dumps(models)
    return metadata


def merge_recipe(sources: list[Source], options: MergeOptions, out: Path, steps: list[Step]) -> dict:
    """The web UI's `sd_merge_recipe`, field for field; "block_weights" is ours, written only when given."""
    hashes = [sha256_of(s.path) for s in sources] + [None, None]
    vae = options.bake_vae
    recipe = {
        "type": "webui",  # the web UI's built-in merger
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": MODES[options.mode],
        "multiplier": options.alpha,
        "save_as_half": options.float16,
        "custom_name": out.stem,
        "config_source": 0,  # "A, B or C": ours is A's
        "bake_in_vae": Path(vae).name if vae is not None else "None",
        "discard_weights": options.discard_pattern(),
        "is_inpainting": _input_channels(steps) == 9,
        "is_instruct_pix2pix": _input_channels(steps) == 8,
    }
    if options.block_weights is not None:
        recipe["block_weights"] = options.block_weights
    return recipe


def _input_channels(steps: list[Step]) -> int | None:
    """The input channels of A's first convolution where only its first 4 were merged (9: inpainting, 8: pix2pix)."""
    return next((s.shape[1] for s in steps if s.kind == "inpaint"), None)


def _json_field(metadata: dict[str, str], name: str):
    """A metadata field that holds JSON, parsed as the web UI reads it (None if absent or not JSON)."""
    try:
        return json.loads(metadata[name])
    except (KeyError, TypeError, ValueError):
        return None


# Writing -----------------------------------------------------------------------------------------------------


def write_streamed(path: Path, steps: list[Step], tensors, metadata: dict[str, str]) -> None:
    """A .safetensors file written tensor by tensor: the header (every dtype, shape and offset, known from the
    steps) first, then each tensor's bytes as `tensors` yields it. The layout is safetensors' own (an 8-byte
    little-endian header size, the JSON header padded with spaces to 8 bytes, the data in header order)."""
    header, offset = {"__metadata__": metadata}, 0
    for step in steps:
        size = math.prod(step.shape) * step.dtype.itemsize
        header[step.key] = {
            "dtype": DTYPE_NAMES[step.dtype],
            "shape": list(step.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for step, t in zip(steps, tensors, strict=True):
            assert t.dtype == step.dtype and tuple(t.shape) == step.shape, f"{step.key}: {t.dtype} {list(t.shape)}"
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# The merge ---------------------------------------------------------------------------------------------------


def check_options(options: MergeOptions, models: int) -> None:
    """MergeError for settings wrong whatever the models: the mode, the number of models, α, the expression."""
    if options.mode not in MODES:
        raise MergeError(f"no merge mode {options.mode!r}; the modes are {', '.join(MODES)}")
    wanted = MODELS[options.mode]
    if models != wanted:
        names = ("A", "A and B", "A, B and C")[wanted - 1]
        raise MergeError(f"{options.mode} takes {wanted} model{'s' if wanted > 1 else ''} ({names}), not {models}")
    if not math.isfinite(options.alpha):
        raise MergeError(f"--alpha must be a finite number, not {options.alpha}")
    try:
        re.compile(options.discard_pattern())
    except re.error as e:
        raise MergeError(f"--discard-weights {options.discard_weights!r}: not a regular expression ({e})") from None


def merge_checkpoints(paths: list, out, options: MergeOptions) -> MergeResult:
    """Merge the checkpoints (A, B[, C]) into `out`, a .safetensors file written whole or not at all.
    Every check (settings, files, families, shapes, the VAE) is done before the first tensor is read."""
    check_options(options, len(paths))
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise MergeError(f"{out}: the merge is written as .safetensors; use that suffix")
    if not out.parent.is_dir():
        raise MergeError(f"{out}: the folder {out.parent} does not exist")
    sources = []
    try:
        for path, role in zip(paths, "ABC"):
            sources.append(Source(Path(path), role))
        _check_families(sources)
        vae = read_vae(options.bake_vae, sources[0]) if options.bake_vae is not None else None
        try:
            steps = plan_merge(sources, options, vae)
        except ValueError as e:  # the block weights' one line
            raise MergeError(str(e)) from None
        metadata = merged_metadata(sources, options, out, steps)
        tensors = (compute(step, sources, options.mode, vae) for step in steps)
        with atomic_write(out) as tmp:
            write_streamed(tmp, steps, tensors, metadata)
    finally:
        for source in sources:
            source.close()
    return MergeResult(
        path=out,
        tensors=len(steps),
        merged=sum(s.kind in ("merge", "inpaint") for s in steps),
        discarded=len(sources[0].specs) - len(steps),
        is_inpainting=_input_channels(steps) == 9,
        is_instruct_pix2pix=_input_channels(steps) == 8,
    )


def _check_families(sources: list[Source]) -> None:
    titles = [s.check_is_model() for s in sources]
    if len(set(titles)) > 1:
        which = ", ".join(f"{s.role} ({s.path.name}) is {t}" for s, t in zip(sources, titles))
        raise MergeError(f"checkpoints of different families do not merge: {which}")
