"""Block weights for merging: one α per U-Net block, as the SuperMerger extension of the web UI writes and reads them
(hako-mikan/sd-webui-supermerger, `scripts/mergers/mergers.py`: `BLOCKID`, `BLOCKIDXLL`, `blockfromkey`,
`weighttoxl`).

The list is 25 αs, IN00-IN11, M00, OUT00-OUT11 (SD 1.x and 2.x have 12 input blocks, a middle block and 12 output
blocks), or 26 with BASE first: the α of every other key the merge touches (text encoders, VAE). SDXL's U-Net has
9 input and 9 output blocks; SuperMerger takes IN00-IN08, M00 and OUT00-OUT08 of the 25 for it (19 values, or 20
with BASE, are read as they are).

Which block a key belongs to is SuperMerger's answer, quirks included, so that a list shared for SuperMerger merges
the same blocks here:
- SD 1.x/2.x: `time_embed` and the final `out.` layers take OUT11's α (SuperMerger computes the index -2 for
  time_embed, "before input blocks", then reads `BLOCKID[-2 + 1]`, the list's last entry); a key with neither
  "weight" nor "bias" in its name is not merged (A's tensor is kept).
- SDXL: `time_embed` and `label_emb` are not merged; `out.` takes OUT08's α; the text encoders and VAE take BASE.
"""

from __future__ import annotations

import math
import re

from ..models.family import UNET

BLOCKS = (*(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SDXL_BLOCKS = (*BLOCKS[:9], "M00", *BLOCKS[13:22])  # SuperMerger's weighttoxl: weights[:9] + weights[12:22]
BASE = "BASE"

_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_MIDDLE = re.compile(r"\.middle_block\.(\d+)\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")


def parse_block_weights(text: str, sdxl: bool) -> tuple[float | None, dict[str, float]]:
    """ "0.5,0.5,...": 25 αs (or 26 with BASE first; SDXL also 19 or 20) -> (BASE's α or None, α by block name).
    ValueError with one line for a wrong count or a value that is not a finite number."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise ValueError(f"--block-weights: {bad!r} is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--block-weights: every α must be a finite number, not {text}")
    counts = (25, 26, 19, 20) if sdxl else (25, 26)
    if len(values) not in counts:
        wanted = "25 (IN00-IN11, M00, OUT00-OUT11) or 26 (BASE first)" + (", or 19/20 for SDXL" if sdxl else "")
        raise ValueError(f"--block-weights: {len(values)} values; give {wanted}")
    base = values.pop(0) if len(values) in (26, 20) else None
    names = BLOCKS if len(values) == 25 else SDXL_BLOCKS
    weights = dict(zip(names, values, strict=True))
    return base, {name: weights[name] for name in (SDXL_BLOCKS if sdxl else BLOCKS)}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_of(key: str, sdxl: bool) -> str | None:
    """The block whose α merges `key` (a name of BLOCKS, or BASE), or None where SuperMerger leaves the key as A's."""
    if "weight" not in key and "bias" not in key:
        return None
    return _sdxl_block(key) if sdxl else _sd_block(key)


def _sd_block(key: str) -> str:
    if "time_embed" in key or ".out." in key:
        return "OUT11"
    return _unet_block(key) or BASE  # (BASE: the text encoder, the VAE, EMA's flattened names)


def _sdxl_block(key: str) -> str | None:
    if "label_emb" in key or "time_embed" in key:
        return None
    if "conditioner.embedders" in key or "first_stage_model" in key:
        return BASE
    if UNET not in key:
        return None
    return "OUT08" if UNET + "out." in key else _unet_block(key)


def _unet_block(key: str) -> str | None:
    """An input block's, the middle block's or an output block's name, or None for another key."""
    if m := _INPUT.search(key):
        return f"IN{int(m.group(1)):02d}"
    if _MIDDLE.search(key):
        return "M00"
    if m := _OUTPUT.search(key):
        return f"OUT{int(m.group(1)):02d}"
    return None
