"""The built-in model's commands: `ldm demo` (a grid of what it draws, with its ControlNet and its LoRA) and
`ldm eval` (prompt adherence of a model trained on the shapes data, read back from the pixels)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .cli_common import UsageError, describe
from .cli_generate import checked, pick_device, prepare_outdir, sampler_and_scheduler
from .files import atomic_write, remove_empty
from .pipeline.generate import generate
from .pipeline.images import grid, save_png, to_pil
from .pipeline.infotext import parameters_text
from .pipeline.loading import Pipeline, load_pipeline
from .pipeline.request import ControlUnit, GenerationRequest
from .training.data import CORNERS, EVAL_FORMS, HELD_OUT_PAIRS, POSITIONS, Shape, ShapesDataset, draw, to_hint
from .training.evaluate import ATTRIBUTES, BOTH, CONTROL_FORMS, LEFT_TO_CHANCE, control_adherence, prompt_adherence
from .weights.checkpoint import BUILTIN_CONTROLNET, BUILTIN_LORA, BUILTIN_MODEL
from .weights.lora import LoRAError, apply_lora, read_lora

DEMO_PROMPTS = (  # the template caption, then shorter and reordered wordings (data.EVAL_FORMS)
    "a large yellow square in the center on a black background",
    "a yellow circle",
    "a purple square on a white background",
    "red triangle, green background",
    "a blue background with a small orange circle at the left",
    "a green triangle on a white background",  # a held-out (colour, shape) pair
)


def cmd_demo(args) -> None:
    """The built-in model draws a grid: one row per prompt, one column per seed."""
    if args.columns < 1:
        raise UsageError("--columns must be at least 1")
    outdir = Path(args.outdir)
    created = prepare_outdir(outdir)
    try:
        draw_demo(args, outdir)
    except BaseException:
        remove_empty(created)
        raise


PLACE_FORMS = ("template", "background first")  # the prompt forms that name a position (`ldm eval --corners`)

# The control row's shapes, one per column: the ControlNet gets each one's mask and the prompt names its colours.
DEMO_CONTROLS = (
    Shape("circle", "red", "blue", "small", "left"),
    Shape("square", "yellow", "black", "large", "right"),
    Shape("triangle", "green", "white", "small", "top"),  # a held-out (colour, shape) pair
    Shape("circle", "orange", "purple", "large", "center"),
    Shape("square", "white", "red", "small", "bottom"),  # held out too
    Shape("triangle", "blue", "yellow", "large", "left"),
)


def draw_demo(args, outdir: Path) -> None:
    start = time.perf_counter()
    pipeline = load_pipeline(
        BUILTIN_MODEL,
        controlnets={BUILTIN_CONTROLNET.stem: BUILTIN_CONTROLNET},
        loras={BUILTIN_LORA.stem: BUILTIN_LORA},
    )
    print(f"built-in model {BUILTIN_MODEL}: {describe(pipeline.model)}")
    seeds = [args.seed + i for i in range(args.columns)]
    rows = []
    for prompt in DEMO_PROMPTS:  # the model's own defaults: its size and guidance scale
        result = generate(pipeline, GenerationRequest([prompt] * len(seeds), seeds, batch_size=len(seeds)))
        rows += [to_pil(im) for im in result.images]
        print(f"  row {len(rows) // len(seeds)}: {prompt}")
    rows += control_rows(pipeline, seeds)
    rows += corner_rows(pipeline, seeds)
    fields = {**result.fields, "Seed": args.seed}
    path = outdir / "demo-grid.png"
    save_png(grid(rows, len(seeds)), path, parameters_text(" | ".join(DEMO_PROMPTS), "", fields))
    print(
        f"wrote {path} ({len(DEMO_PROMPTS)} prompts x {len(seeds)} seeds, then control images and the images drawn "
        f"from them, then corners without and with the built-in LoRA) in {time.perf_counter() - start:.1f} s"
    )
    print('next: ldm txt2img --prompt "a large red square at the right on a white background" --batch-size 4 --grid')


def control_rows(pipeline: Pipeline, seeds: list[int]) -> list:
    """Two rows: the built-in ControlNet's control images (shape masks), and the images it draws from them, each
    prompt naming the colours and shape but not where or how large."""
    shapes = [DEMO_CONTROLS[i % len(DEMO_CONTROLS)] for i in range(len(seeds))]
    masks = torch.stack([to_hint(draw(s, pipeline.model.cfg.image_size, mask=True)) for s in shapes])
    prompts = [EVAL_FORMS["on background"].write(s) for s in shapes]
    unit = ControlUnit(BUILTIN_CONTROLNET.stem, masks, resize_mode="resize")
    result = generate(pipeline, GenerationRequest(prompts, seeds, batch_size=len(seeds), controls=[unit]))
    print(f"  rows of the built-in ControlNet {BUILTIN_CONTROLNET.name}: its control images, then e.g. {prompts[0]!r}")
    return [to_pil(m) for m in masks] + [to_pil(im) for im in result.images]


# The corner rows' prompts, one per column: the same prompt without the built-in LoRA, then with it (its tag).
DEMO_CORNERS = (
    "a yellow circle in the top left corner on a blue background",
    "a red square at the bottom right",
    "a large white triangle in the top right corner on a black background",
    "purple circle, bottom left, green background",  # tags
    "an orange background with a small blue square in the upper left corner",
    "a small green circle at the bottom left on a white background",
)


def corner_rows(pipeline: Pipeline, seeds: list[int]) -> list:
    """Two rows: prompts that put the shape in a corner, as the built-in model draws them alone (it never saw a
    shape in a corner), then with its LoRA, `<lora:shapes-corners:1>`, which taught it the corners."""
    prompts = [DEMO_CORNERS[i % len(DEMO_CORNERS)] for i in range(len(seeds))]
    rows = []
    for tag in ("", f"<lora:{BUILTIN_LORA.stem}:1> "):
        result = generate(pipeline, GenerationRequest([tag + p for p in prompts], seeds, batch_size=len(seeds)))
        rows += [to_pil(im) for im in result.images]
    print(f"  rows of the built-in LoRA {BUILTIN_LORA.name}: e.g. {prompts[0]!r} without it, then with it")
    return rows


def cmd_eval(args) -> None:
    """Prompt adherence of a model trained on the shapes data; with --controlnet, control adherence."""
    if args.count < 1 or args.image_size % 8 or args.image_size <= 0:
        raise UsageError("--count must be at least 1 and --image-size a positive multiple of 8")
    if args.json and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: a folder, not a file")
    if args.controlnet and not Path(args.controlnet).is_file():
        raise UsageError(f"--controlnet {args.controlnet}: no such file")
    sampler, scheduler = sampler_and_scheduler(args)
    settings = checked(
        GenerationRequest(
            [""],
            [0],
            width=args.image_size,
            height=args.image_size,
            steps=args.steps,
            sampler=sampler,
            scheduler=scheduler,
            cfg_scale=args.cfg_scale,
            batch_size=args.batch_size,
        )
    )
    default = CONTROL_FORMS if args.controlnet else PLACE_FORMS if args.corners else tuple(EVAL_FORMS)
    forms = tuple(f.strip() for f in args.forms.split(",")) if args.forms else default
    if unknown := [f for f in forms if f not in EVAL_FORMS]:
        raise UsageError(f"--forms: no prompt form {unknown[0]!r}; the forms are {', '.join(EVAL_FORMS)}")
    lora_path, _, weight = (args.lora or "").partition(":")
    if args.lora and not Path(lora_path).is_file():
        raise UsageError(f"--lora {lora_path}: no such file")
    controlnets = {"control": Path(args.controlnet)} if args.controlnet else {}
    pipeline = load_pipeline(args.ckpt, device=pick_device(args.device), controlnets=controlnets)
    if args.lora:
        try:
            apply_lora(pipeline.model, read_lora(lora_path), float(weight or 1))
        except (LoRAError, ValueError) as e:
            raise UsageError(f"--lora {args.lora}: {e}") from None
    batches = -(-args.count // max(1, args.batch_size))  # per split
    bar = tqdm(total=2 * len(forms) * batches * settings.steps, disable=args.quiet, unit="step", desc="eval")
    options = dict(seed=args.seed, forms=forms, progress=lambda p: bar.update(1))
    if args.controlnet:
        report, result = control_adherence(
            pipeline, "control", args.count, settings, weight=args.control_weight, **options
        )
    else:
        positions = tuple(CORNERS) if args.corners else tuple(POSITIONS)
        report, result = prompt_adherence(pipeline, args.count, settings, positions=positions, **options)
    bar.close()
    print_report(args, report, result)
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))


def print_report(args, report: dict, result) -> None:
    """`ldm eval`'s table: a row per prompt form and split, a column per attribute."""
    held_out = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS))
    settings, fields = result.request, result.fields
    sampler = " ".join(filter(None, (fields["Sampler"], fields.get("Schedule type"))))
    control = f"; ControlNet {args.controlnet} at weight {args.control_weight:g}" if args.controlnet else ""
    lora = f"; LoRA {args.lora}" if args.lora else ""
    print(
        f"{args.ckpt}: {settings.steps} steps {sampler}, CFG {settings.cfg_scale}, "
        f"{args.image_size}x{args.image_size}; held-out pairs: {held_out}{control}{lora}"
    )
    columns = (*ATTRIBUTES, BOTH) if args.controlnet else ATTRIBUTES
    print(f"{'form':18s}{'split':10s}{'images':>8s}" + "".join(f"{a:>12s}" for a in columns))
    positions = tuple(CORNERS) if args.corners else tuple(POSITIONS)
    example = ShapesDataset(1, seed=args.seed + 1, positions=positions).specs[0]  # the first seen-split shape
    for form, splits in report.items():
        print(f"{form:18s}e.g. {EVAL_FORMS[form].write(example)!r}")
        for split, row in splits.items():
            cells = "".join(f"{row[a]:12.1%}" if a in row else f"{unnamed(row, a):>12s}" for a in columns)
            print(f"{'':18s}{split:10s}{row['images']:8d}{cells}")
    if args.controlnet:
        print("size, position and both: against each image's control image (the mask of the prompt's shape)")
    if any("most common" in row for splits in report.values() for row in splits.values()):
        chance = ", ".join(f"{a} {share:.0%}" for a, share in LEFT_TO_CHANCE.items())
        print(f"~: not in the prompt, so not scored; the value read most often and its share (chance: {chance})")


def unnamed(row: dict, attribute: str) -> str:
    """An eval cell for an attribute the prompt leaves out: "~top 91%", the value read most often, or "-"."""
    value, share = row.get("most common", {}).get(attribute, (None, 0))
    return f"~{value} {share:.0%}" if value else "-"
