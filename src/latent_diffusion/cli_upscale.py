"""`ldm upscale`: the web UI's extras tab on image files (`pipeline/extras.py`). Every image is read and its result's
size checked, and the upscaler models are loaded, before anything is written; then each result is written as
NNNNN-NAME.png with the input's text chunks, and the web UI's "postprocessing" and "extras" chunks."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cli_common import DTYPE_CHOICES, DTYPE_HELP, UPSCALER_DIR_HELP, UsageError, command, pick_dtype
from .cli_generate import pick_device, prepare_outdir, upscaler_args
from .files import claim_numbered, remove_empty
from .pipeline.extras import (
    ExtrasUpscale,
    check_output_size,
    check_upscalers,
    load_upscalers,
    text_chunks,
    upscale_extras,
)
from .pipeline.images import as_mode, open_image, save_png
from .pipeline.request import MAX_SIDE
from .pipeline.upscalers import OVERLAP, TILE, UpscalerError

FLAGS = {"upscaler": "--upscaler", "upscaler_2": "--upscaler-2", "scale": "--scale", "size": "--width and --height"}


def settings_from_args(args) -> ExtrasUpscale:
    """The flags as the extras tab's settings: by --scale (4 by default), or to --width x --height."""
    width, height, scale = (getattr(args, name, None) for name in ("width", "height", "scale"))
    if (width is None) != (height is None):
        raise UsageError("give --width and --height together (the web UI's 'Scale to' takes both)")
    if width is not None and scale is not None:
        raise UsageError("give --scale, or --width and --height, not both")
    if width is not None and min(width, height) < 1:
        raise UsageError(f"--width and --height must be at least 1, not {width} and {height}")
    scale = SCALE_BY_DEFAULT if scale is None else scale
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--scale must be a positive number, not {scale}")
    if not 0 <= args.upscaler_2_visibility <= 1:
        raise UsageError(f"--upscaler-2-visibility must be in [0, 1], not {args.upscaler_2_visibility}")
    if args.tile < 0 or args.tile_overlap < 0:
        raise UsageError("--tile and --tile-overlap must be 0 or more")
    return ExtrasUpscale(
        upscaler=args.upscaler,
        scale=scale,
        size=None if width is None else (width, height),
        crop=args.crop,
        upscaler_2=args.upscaler_2,
        visibility_2=args.upscaler_2_visibility,
    )


def cmd_upscale(args) -> None:
    """Check every flag and image and load the upscalers, then upscale and write image after image."""
    settings = settings_from_args(args)
    files = upscaler_args(args.upscaler_dir)
    try:
        check_upscalers(settings, files, FLAGS)
        for path in args.images:  # (decoded to find a damaged file now; decoded again when its turn comes)
            check_output_size(settings, open_image(path).size, MAX_SIDE, str(path), FLAGS)
    except UpscalerError as e:
        raise UsageError(str(e)) from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        first, second = load_upscalers(settings, files, FLAGS, device=device, dtype=dtype)
    except UpscalerError as e:
        raise UsageError(str(e)) from None
    outdir = Path(args.outdir)
    created = prepare_outdir(outdir)
    try:
        for path in args.images:
            opened = open_image(path)
            result, info = upscale_extras(
                as_mode(opened, "RGB", str(path)), settings, first, second, tile=args.tile, overlap=args.tile_overlap
            )
            out = claim_numbered(outdir, f"{Path(path).stem}.png")
            try:
                save_png(result, out, text_chunks(opened, info, saved=True))
            except BaseException:
                out.unlink(missing_ok=True)  # the claimed name, still empty
                raise
            if not args.quiet:
                print(f"wrote {out} ({result.width}x{result.height})")
    except BaseException:
        remove_empty(created)  # leave no folder behind where nothing was written
        raise


SCALE_BY_DEFAULT = 4.0  # the extras tab's "Resize" by default


def add_upscale(sub) -> None:
    up = command(
        sub,
        "upscale",
        "enlarge images with an upscaler, as the web UI's extras tab",
        "Enlarge each image by --scale, or to --width x --height, with a resampler (Lanczos, Nearest) or an "
        "upscaler model of --upscaler-dir (ESRGAN and its kin, through spandrel), as the web UI's extras tab does: "
        "the sizes rounded down to multiples of 8, a second upscaler blended in by its visibility. Each result is "
        "OUTDIR/NNNNN-NAME.png, keeping the input's `parameters` text and adding the web UI's "
        "'Postprocess upscale by' (or 'to') and 'Postprocess upscaler' fields.",
    )
    up.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    up.add_argument(
        "--upscaler",
        required=True,
        default=argparse.SUPPRESS,  # (no "default: None" in --help)
        help="None (no change), Lanczos, Nearest, or a model of --upscaler-dir by its file name without suffix",
    )
    up.add_argument(
        "--scale",
        type=float,
        default=argparse.SUPPRESS,  # (given or not: --width and --height exclude it)
        help=f"enlarge by this factor (default: {SCALE_BY_DEFAULT:g})",
    )
    size = "with --height: enlarge to cover this size instead of by --scale"
    up.add_argument("--width", type=int, default=argparse.SUPPRESS, help=size)
    up.add_argument("--height", type=int, default=argparse.SUPPRESS, help="with --width")
    up.add_argument(
        "--crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --width and --height: centre the result on a canvas of exactly that size (the web UI's 'Crop "
        "to fit'); --no-crop keeps the whole enlarged image",
    )
    up.add_argument("--upscaler-2", default="None", help="a second upscaler, blended in by --upscaler-2-visibility")
    up.add_argument("--upscaler-2-visibility", type=float, default=0.0, help="0: the first alone, 1: the second alone")
    up.add_argument("--upscaler-dir", help=UPSCALER_DIR_HELP)
    up.add_argument(
        "--tile",
        type=int,
        default=TILE,
        help="a model runs on tiles of at most this many input pixels per side (the web UI's ESRGAN_tile; 0: whole)",
    )
    up.add_argument("--tile-overlap", type=int, default=OVERLAP, help="input pixels that neighbouring tiles share")
    up.add_argument("--outdir", default="outputs", help="where the PNGs go")
    up.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    up.add_argument("--dtype", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    up.add_argument("--quiet", action="store_true", help="no line per image written")
