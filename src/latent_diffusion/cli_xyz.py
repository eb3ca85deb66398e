"""`ldm xyz`: the web UI's X/Y/Z plot on the command line (`pipeline/xyz_plot.py`). txt2img's flags give the request
every cell starts from; `--x "Steps:10,20,30" --y "CFG Scale:3,5,7" --z "Sampler:Euler a,DPM++ 2M"` the axes.
The grid is written as xyz-NNNNN.png with the first cell's infotext and the axes', and each cell as its own PNG."""

from __future__ import annotations

import functools
from pathlib import Path

from .cli_common import UsageError
from .cli_generate import cmd_generate, in_flag_words, load_from_args, write_png
from .files import claim_numbered
from .pipeline.images import save_png
from .pipeline.request import GenerationRequest, RequestError
from .pipeline.xyz_plot import AXES, Axis, axis_values, find_axis, xyz_plot

XYZ_HELP = (
    "Generate one image per cell of up to three axes of the web UI's X/Y/Z plot, and a grid of them with the "
    "values along its edges. An axis is LABEL:VALUES, the label one of the web UI's axis options (Seed, Steps, "
    "CFG Scale, Prompt S/R, Sampler, Schedule type, ...), the values comma-separated, ranges for numbers as the "
    "web UI reads them: 1-5, 1-9 (+2), 0-1 [5]. Cells that can share a U-Net batch do."
)
ALIASES = {"cfg": "CFG Scale", "scheduler": "Schedule type", "s/r": "Prompt S/R", "denoise": "Denoising"}


def add_axis_arguments(p) -> None:
    axes = ", ".join(axis.label for axis in AXES if axis is not None)
    for name in "xyz":
        p.add_argument(f"--{name}", metavar="LABEL:VALUES", help=f"the {name.upper()} axis: one of {axes}")
    p.add_argument("--no-legend", action="store_true", help="the grid without the axes' values")


def xyz_axes(args) -> list[tuple[Axis, str]]:
    """--x, --y, --z as axes and their values' text, each checked (UsageError naming the flag)."""
    axes = []
    for name in "xyz":
        value = getattr(args, name)
        if value is None:
            continue
        label, colon, text = value.partition(":")
        try:
            if not colon:
                raise RequestError(f"write LABEL:VALUES, as Steps:10,20,30, not {value!r}")
            axis = find_axis(ALIASES.get(label.strip().lower(), label))
            axis_values(axis, text)
        except RequestError as e:
            raise UsageError(f"--{name}: {str(e).removeprefix('X/Y/Z plot: ')}") from None
        axes.append((axis, text))
    if not axes:
        raise UsageError("ldm xyz needs an axis: --x LABEL:VALUES (and --y, --z)")
    return axes


def cmd_xyz(args) -> None:
    cmd_generate(args, write=functools.partial(write_xyz, xyz_axes(args)))


def write_xyz(axes, args, request: GenerationRequest, outdir: Path, embeddings, loras, device, dtype) -> None:
    """The plot once the flags are checked and the folder is there: every cell checked before any runs."""
    pipeline = load_from_args(args, embeddings, loras, device, dtype)
    with in_flag_words():
        plot = xyz_plot(pipeline, request, axes, draw_legend=not args.no_legend)
    for seed, image, info in zip(plot.seeds, plot.images, plot.infotexts):
        write_png(outdir, seed, image, info, quiet=True)
    path = claim_numbered(outdir, "xyz.png")
    save_png(plot.grid, path, plot.grid_infotext)
    if not args.quiet:
        print(f"wrote {path} and its {len(plot.seeds)} cells")
