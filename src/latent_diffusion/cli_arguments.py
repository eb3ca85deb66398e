"""The `ldm` command's arguments: one argparse subcommand per job, each flag with its help and default. `cli.py`
runs the command they name."""

from __future__ import annotations

import argparse

from .cli_common import (
    DTYPE_CHOICES,
    DTYPE_HELP,
    DTYPES,
    STYLES_HELP,
    UPSCALER_DIR_HELP,
    UsageError,
    add_weights_arguments,
    command,
)
from .cli_control import add_control_arguments
from .cli_convert import add_convert
from .cli_merge import add_merge
from .cli_serve import add_serve
from .cli_upscale import add_upscale
from .cli_xyz import XYZ_HELP, add_axis_arguments
from .pipeline.request import STEP_COUNTS
from .sampling.noise_schedule import SPACINGS
from .sampling.samplers import SAMPLERS
from .sampling.sigma_schedules import SCHEDULERS
from .training.autoencoder import AUTOENCODER_HELP, AutoencoderTrainConfig
from .training.common import add_config_arguments
from .training.config import CONTROLNET_HELP, NOT_FLAGS, TRAIN_HELP, ControlNetTrainConfig, TrainConfig
from .training.data import EVAL_FORMS
from .weights.checkpoint import BUILTIN_CONTROLNET, BUILTIN_LORA, BUILTIN_MODEL

GENERATION_COMMANDS = ("txt2img", "img2img", "inpaint")
UNET_GGUF_HELP = (
    "a GGUF U-Net (city96's layout, as ComfyUI-GGUF reads; `ldm convert --to gguf` makes one) in place of --ckpt's, "
    "which then brings only the VAE and text encoders; its weights stay quantized and each layer is dequantized to "
    "--dtype as it runs. --ckpt may itself be a .gguf whole model (stable-diffusion.cpp's layout)"
)
__all__ = ["DTYPES", "GENERATION_COMMANDS", "UsageError", "build_parser"]


GENERATE_HELP = {
    "txt2img": "Generate images from a text prompt with a Stable Diffusion checkpoint (SD 1.x, 2.x).",
    "img2img": "Redraw --init-image following the prompt. --strength sets how much of the noise schedule is "
    "run: 1.0 keeps little of the image (as the web UI, it is noised to the highest level, not replaced), small "
    "values keep it close.",
    "inpaint": "Repaint the white part of --mask in --init-image. With an inpainting checkpoint (9 input "
    "channels) the model sees the mask; with a standard one the known region is held at every step. Pixels "
    "outside the mask are kept as they were; a grey (soft) mask edge blends the two, fully repainted from half "
    "grey up, as the web UI lays in a blurred mask.",
}
EPILOG = (
    "Files are named NNNNN-SEED.png; each carries the settings in a `parameters` PNG text chunk, in the form the "
    "Stable Diffusion web UI writes. Image i of a batch uses seed SEED+i, so it can be regenerated alone."
)


def add_generation_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """txt2img's, img2img's and inpaint's flags."""
    p.epilog = EPILOG
    add_model_arguments(p)
    add_prompt_arguments(p)
    add_size_arguments(p, command)
    add_sampling_arguments(p)
    add_control_arguments(p)
    add_output_arguments(p)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What is loaded: the checkpoint, a VAE, a refiner, LoRA files and embeddings, and how it runs."""
    p.add_argument(
        "--ckpt",
        help="Stable Diffusion checkpoint (.safetensors or .ckpt), original layout "
        "(default: the built-in model, trained by this project on the shapes data)",
    )
    p.add_argument("--config", help="CompVis inference YAML (optional: the architecture is read off the keys)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    p.add_argument("--vae", help="a separate autoencoder file (original layout) in place of the checkpoint's")
    p.add_argument("--unet-gguf", metavar="FILE", help=UNET_GGUF_HELP)
    p.add_argument("--refiner", help="a second checkpoint (SDXL's refiner) that denoises the end of the schedule")
    p.add_argument(
        "--refiner-switch",
        type=float,
        default=0.8,
        help="with --refiner: the part of the timestep range, from the noisiest, the model denoises "
        "before the refiner takes over (default 0.8)",
    )
    p.add_argument(
        "--lora-dir",
        help="LoRA files, used by <lora:NAME:WEIGHT> in the prompt, NAME a file's name "
        "(default: models/Lora where it exists)",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="apply this LoRA file (repeatable): adds <lora:NAME:WEIGHT> to the prompt",
    )
    p.add_argument(
        "--embeddings-dir",
        help="textual-inversion embeddings, used by writing a file's name in the prompt "
        "(default: embeddings/ where it exists)",
    )
    p.add_argument("--upscaler-dir", help=UPSCALER_DIR_HELP)
    add_weights_arguments(p)
    p.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        help="encode and decode in overlapping tiles, for images too large for memory at once (default: "
        "when the whole image would not fit)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net and VAE decoder (CUDA graphs on a GPU): the first image of each size "
        "waits for the compilation, later ones are faster on a GPU (on a CPU, slower than eager: "
        "BENCHMARKS.md); compiled kernels are cached across runs in $TORCHINDUCTOR_CACHE_DIR",
    )


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="what to draw, in the web UI's prompt language, any length")
    p.add_argument(
        "--infotext",
        help="settings from a web UI infotext: an image with a `parameters` chunk, a text "
        "file, or the text; flags given here win",
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from (empty: the unconditional prompt)")
    p.add_argument(
        "--old-edit-timelines",
        action="store_true",
        help="prompt editing's `when` as the web UI read it before 1.6 (below 1 a fraction, else a step number)",
    )
    p.add_argument(
        "--style", action="append", help="a prompt style of --styles-file, applied as the web UI (repeatable)"
    )
    p.add_argument("--styles-file", help=STYLES_HELP)


def add_size_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """txt2img: the size; img2img and inpaint: the init image, the mask and the strength."""
    if command == "txt2img":
        p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's, 512 for SD)")
        p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's, 512 for SD)")
        add_hires_arguments(p)
    else:
        p.add_argument("--init-image", required=True, help="the image to start from")
        if command == "inpaint":
            p.add_argument("--mask", required=True, help="same size as the image; white = repaint, black = keep")
        p.add_argument(
            "--strength",
            type=float,
            default=1.0 if command == "inpaint" else 0.75,
            help="fraction of the schedule to run, in (0, 1]",
        )
        p.add_argument(
            "--step-count",
            choices=STEP_COUNTS,
            default="web_ui",
            help="img2img's steps: the web UI's int(strength × steps) + 1 of --steps; fixed: exactly --steps (its "
            "img2img_fix_steps); diffusers: int(strength × steps) of --steps",
        )
        p.add_argument("--resize", action="store_true", help="resize the image (and mask) to --width x --height")
        if command == "img2img":
            add_sd_upscale_arguments(p)
            add_outpaint_arguments(p)
        p.add_argument("--width", type=int, help="with --resize: pixels, a multiple of 8 (default: as txt2img's)")
        p.add_argument("--height", type=int, help="with --resize: pixels, a multiple of 8 (default: as txt2img's)")


def add_hires_arguments(p: argparse.ArgumentParser) -> None:
    """The web UI's hires fix: --hires-scale or --hires-resize turns it on."""
    hires = p.add_argument_group(
        "hires fix",
        "draw at --width x --height, enlarge, and draw again over it at the larger size (the web UI's hires fix)",
    )
    hires.add_argument("--hires-scale", type=float, help="enlarge by this factor (the web UI's hr_scale)")
    hires.add_argument("--hires-resize", metavar="WxH", help="enlarge to this size (0 for a side: keep the aspect)")
    hires.add_argument(
        "--hires-upscaler",
        help="Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
        "Latent (nearest), Latent (nearest-exact), None, Lanczos, Nearest, or a model of --upscaler-dir",
    )
    hires.add_argument("--hires-steps", type=int, help="steps of the second pass (default and 0: --steps)")
    hires.add_argument("--hires-denoise", type=float, help="denoising strength of the second pass (default: 0.7)")
    hires.add_argument("--hires-sampler", help="the second pass's sampler (default: --sampler)")
    hires.add_argument("--hires-scheduler", help="the second pass's schedule type (default: --scheduler)")
    hires.add_argument("--hires-cfg-scale", type=float, help="the second pass's guidance (default: --cfg-scale)")
    hires.add_argument("--hires-prompt", help="the second pass's prompt (default: --prompt)")
    hires.add_argument("--hires-negative-prompt", help="the second pass's negative prompt (default: the first's)")
    hires.add_argument("--hires-checkpoint", help="a checkpoint for the second pass (default: --ckpt)")


def add_sd_upscale_arguments(p: argparse.ArgumentParser) -> None:
    """The web UI's SD upscale script: --sd-upscale SCALE turns it on."""
    group = p.add_argument_group(
        "SD upscale",
        "enlarge the init image, then redraw it in overlapping tiles of --width x --height (the web UI's script)",
    )
    group.add_argument("--sd-upscale", type=float, metavar="SCALE", help="enlarge by this factor, then redraw")
    group.add_argument(
        "--sd-upscale-upscaler",
        default="Lanczos",
        help="None, Lanczos, Nearest, or a model of --upscaler-dir",
    )
    group.add_argument("--sd-upscale-overlap", type=int, default=64, help="pixels that neighbouring tiles share")


def add_outpaint_arguments(p: argparse.ArgumentParser) -> None:
    """The web UI's outpainting scripts: --outpaint PIXELS turns them on."""
    group = p.add_argument_group(
        "outpainting",
        'extend the init image on chosen sides and draw the new border (the web UI\'s "Outpainting mk2" and "Poor '
        "man's outpainting\" scripts); --width and --height: the most each pass (tile) redraws",
    )
    group.add_argument("--outpaint", type=int, metavar="PIXELS", help="add this many pixels on each chosen side")
    group.add_argument("--outpaint-sides", metavar="SIDES", default="left,right,up,down", help="comma-separated")
    group.add_argument("--outpaint-method", choices=("mk2", "poor-man"), default="mk2", help="which script")
    group.add_argument("--outpaint-mask-blur", type=int, metavar="PIXELS", help="None: the script's, mk2 8, poor-man 4")
    group.add_argument("--outpaint-fill", choices=OUTPAINT_FILLS, help="poor-man's masked content; None: fill")
    group.add_argument("--outpaint-falloff", type=float, metavar="Q", help="mk2's, 0 to 4, lower: finer; None: 1")
    group.add_argument("--outpaint-color-variation", type=float, metavar="V", help="mk2's, 0 to 1; None: 0.05")


OUTPAINT_FILLS = ("fill", "original", "latent-noise", "latent-nothing")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    add_sampler_arguments(p)
    p.add_argument(
        "--spacing",
        default="leading",
        choices=SPACINGS,
        help="timestep spacing of ddim, plms and ddpm, as diffusers' (leading: 901, 801, ..., 1 for 10 steps)",
    )
    p.add_argument("--eta", type=float, help="eta of the samplers that take one (default: theirs; DDIM: 0)")
    p.add_argument("--s-noise", type=float, help="noise scale of the ancestral samplers (default: 1)")
    p.add_argument(
        "--clip-skip",
        type=int,
        help="use the text encoder's hidden state N layers from the end, as the "
        "web UI's CLIP skip (1: the last; default: the model's own)",
    )


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Guidance, seeds, batches and where the images go."""
    p.add_argument(
        "--prompt-syntax",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the web UI's emphasis, (word:1.2), [word] and BREAK (--no-prompt-syntax: plain text)",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale (1: none; default: the model's own, 7.5 for Stable Diffusion, "
        "1.75 for the built-in model)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the first image, 0 <= seed < 2^64 (default and -1: random, written in the PNG)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per U-Net batch")
    p.add_argument("--n-iter", type=int, default=1, help="how many batches")
    p.add_argument("--outdir", default="outputs", help="where the PNGs go")
    p.add_argument("--grid", action="store_true", help="also write a grid of all images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line like every other error (the usage is --help's)."""

    def error(self, message: str):
        command = self.prog.removeprefix("ldm").strip()  # "txt2img", or "" for the top level
        self.exit(2, f"ldm: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm",
        allow_abbrev=False,  # --infotext must see every flag given as it is spelt
        description="Latent diffusion (Stable Diffusion) in the original checkpoint layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  ldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --prompt "a red sofa" --seed 42 --batch-size 4 --grid
  ldm img2img --ckpt model.safetensors --init-image photo.png --strength 0.6 --prompt "an oil painting"
  ldm inpaint --ckpt sd-v1-5-inpainting.ckpt --init-image photo.png --mask mask.png --prompt "a cat"
  ldm txt2img --ckpt model.safetensors --prompt "a castle AND a dragon :0.6" --hires-scale 2 --hires-steps 10
  ldm xyz --ckpt model.safetensors --prompt "a red sofa" --x "Steps:10,20,30" --y "CFG Scale:3-7 (+2)"
  ldm upscale photo.png --upscaler 4x-UltraSharp --scale 4 --upscaler-dir models/ESRGAN
  ldm merge a.safetensors b.safetensors --mode weighted-sum --alpha 0.3 --out merged.safetensors
  ldm convert model.safetensors --to gguf --quant Q8_0 --out unet-Q8_0.gguf
  ldm txt2img --ckpt model.safetensors --unet-gguf unet-Q8_0.gguf --prompt "a red sofa"
  ldm train --outdir runs/ft --ckpt model.safetensors --data my_images/ --image-size 512
  ldm train --lora 16 --outdir runs/mine --ckpt model.safetensors --data my_images/ --image-size 512
  ldm train-controlnet --outdir runs/cn --ckpt model.safetensors --data pairs/ --image-size 512
  torchrun --nproc_per_node 8 -m latent_diffusion.cli train ...      (several GPUs)
  ldm info model.safetensors

Each command has its own --help. Bad input is one line on stderr and exit code 2.""",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = (add_info, add_generation_commands, add_upscale, add_merge, add_convert, add_training_commands)
    for add in (*adders, add_eval, add_serve, add_demo):
        add(sub)
    return parser


def add_info(sub) -> None:
    info = command(
        sub,
        "info",
        "load a checkpoint and describe it",
        "Load a .safetensors, .ckpt or .gguf Stable Diffusion checkpoint (SD 1.x, 2.x, SDXL, inpainting) and print "
        "its variant and parts. Without --config the architecture is read off the keys.",
    )
    info.add_argument("ckpt", help="checkpoint file (.safetensors, .ckpt, or a .gguf whole model)")
    info.add_argument("--config", help="CompVis inference YAML (optional)")
    info.add_argument("--unet-gguf", metavar="FILE", help=UNET_GGUF_HELP)
    info.add_argument("--ema", action="store_true", help="load the model_ema.* U-Net weights")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", default="float32", choices=DTYPES)


def add_generation_commands(sub) -> None:
    for name, help_text in (
        ("txt2img", "generate images from a prompt"),
        ("img2img", "redraw an image following a prompt"),
        ("inpaint", "repaint the white part of a mask"),
    ):
        add_generation_arguments(command(sub, name, help_text, GENERATE_HELP[name]), name)
    xyz = command(sub, "xyz", "an X/Y/Z plot: a grid of txt2img images along up to three axes", XYZ_HELP)
    add_generation_arguments(xyz, "txt2img")
    add_axis_arguments(xyz)


def add_training_commands(sub) -> None:
    add_config_arguments(
        command(
            sub,
            "train",
            "train the U-Net in the latent space of a frozen autoencoder",
            "Train (or fine-tune) the diffusion U-Net on latents of the frozen autoencoder. Several processes: "
            "torchrun --nproc_per_node N -m latent_diffusion.cli train ...",
        ),
        TrainConfig,
        TRAIN_HELP,
    )
    add_config_arguments(
        command(
            sub,
            "train-controlnet",
            "train a ControlNet for a frozen model",
            "Train a ControlNet (lllyasviel's recipe: a copy of the base U-Net's encoder, zero convolutions, the "
            "base frozen) on images, their control images and captions; writes controlnet.safetensors in the "
            "original layout. Several processes: torchrun --nproc_per_node N -m latent_diffusion.cli "
            "train-controlnet ...",
        ),
        ControlNetTrainConfig,
        CONTROLNET_HELP,
        skip=NOT_FLAGS,
    )
    add_config_arguments(
        command(
            sub,
            "train-autoencoder",
            "train the KL autoencoder (stage 1)",
            "Train the KL autoencoder: L1/L2 reconstruction + KL, optionally a patch-GAN after a warm-up. Writes "
            "first_stage_model.* weights for `ldm train --autoencoder` and reports held-out PSNR.",
        ),
        AutoencoderTrainConfig,
        AUTOENCODER_HELP,
    )


def add_eval(sub) -> None:
    add_eval_arguments(
        command(
            sub,
            "eval",
            "prompt adherence of a model trained on the shapes data",
            "Generate images for captions of seen and held-out (colour, shape) pairs and read shape, colour, "
            "background, size and position back from the pixels with a deterministic analyser. With --controlnet, "
            "each image also has its shape's mask as control image, and size and position are scored against it.",
        )
    )


def add_demo(sub) -> None:
    demo = command(
        sub,
        "demo",
        "a grid of images from the built-in model",
        "The built-in model (trained by this project on the shapes data) draws a 64x64 image per prompt "
        "and seed for a handful of prompts, with the default sampler and settings, into one grid.",
    )
    demo.add_argument("--outdir", default="out", help="folder for the grid")
    demo.add_argument("--columns", type=int, default=6, help="seeds per prompt")
    demo.add_argument("--seed", type=int, default=0, help="seed of the first column")


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sampler",
        default="dpmpp_2m",
        help=f"one of: {', '.join(SAMPLERS)}; or the web UI's name, e.g. 'DPM++ 2M SDE'",
    )
    p.add_argument(
        "--scheduler",
        default="automatic",
        help=f"noise schedule of the sigma-space samplers, the web UI's 'Schedule type': "
        f"{', '.join(SCHEDULERS)} (automatic: the sampler's own, as the web UI)",
    )
    p.add_argument("--karras", dest="scheduler", action="store_const", const="karras", help="--scheduler karras")
    p.add_argument("--no-karras", dest="scheduler", action="store_const", const="uniform", help="--scheduler uniform")


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--ckpt", default=str(BUILTIN_MODEL), help="a model trained on the built-in shapes data")
    ev.add_argument("--count", type=int, default=200, help="images per split (seen, held-out)")
    ev.add_argument("--steps", type=int, default=20)
    add_sampler_arguments(ev)
    ev.add_argument("--cfg-scale", type=float, help="default: the model's own (1.75 for the built-in model)")
    ev.add_argument("--image-size", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--forms", help=f"comma-separated prompt forms to score (default: all: {', '.join(EVAL_FORMS)})")
    ev.add_argument(
        "--controlnet",
        metavar="FILE",
        help=f"score a ControlNet for the model instead (the built-in model's: {BUILTIN_CONTROLNET}): each prompt "
        "with its shape's mask as the control image; position and size against the mask's",
    )
    ev.add_argument("--control-weight", type=float, default=1.0, help="the ControlNet's weight (0: the model alone)")
    ev.add_argument(
        "--lora",
        metavar="FILE[:WEIGHT]",
        help=f"merge this LoRA into the model first (the built-in model's corners: {BUILTIN_LORA})",
    )
    ev.add_argument(
        "--corners",
        action="store_true",
        help="score prompts that put the shape in a corner (top left, top right, bottom left, bottom right), which "
        "the built-in model never saw; positions are then read among all nine places (default forms: the two that "
        "name a position)",
    )
    ev.add_argument("--json", help="also write the scores to this file")
    ev.add_argument("--quiet", action="store_true")
