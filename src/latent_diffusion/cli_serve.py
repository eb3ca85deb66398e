"""`ldm serve`'s arguments: what it loads and serves, and its limits (`ServerLimits`); cli.py's `cmd_serve` runs it."""

from __future__ import annotations

from .cli_common import (
    ANNOTATOR_DIR_HELP,
    CLIP_VISION_DIR_HELP,
    DTYPE_CHOICES,
    DTYPE_HELP,
    STYLES_HELP,
    UPSCALER_DIR_HELP,
    add_weights_arguments,
    command,
)


def add_serve(sub) -> None:
    serve = command(
        sub,
        "serve",
        "serve the web UI's HTTP API (/sdapi/v1/...)",
        "Load the model once and answer the AUTOMATIC1111 web UI's API on HOST:PORT, so that its clients "
        "work unchanged (txt2img, img2img, extras' upscale, samplers, schedulers, sd-models, upscalers, options, "
        "progress, interrupt, png-info, the ControlNet extension's /controlnet/...), and a web page at /.",
    )
    serve.add_argument("--ckpt", help="checkpoint file (default: the first of --models-dir, or the built-in model)")
    serve.add_argument("--models-dir", help="checkpoints that clients may switch to (sd_model_checkpoint)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    add_weights_arguments(serve)
    serve.add_argument("--outdir", default="outputs", help="where save_images writes")
    serve.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model loaded (see txt2img --compile): the first request of each size "
        "waits for the compilation",
    )
    serve.add_argument("--api-auth", metavar="USER:PASSWORD", help="require HTTP basic auth with these credentials")
    serve.add_argument(
        "--cors-allow-origins",
        nargs="+",
        metavar="ORIGIN",
        help="origins whose pages may call the API (none by default)",
    )
    serve.add_argument("--lora-dir", help="LoRA files for <lora:NAME:WEIGHT> (default: models/Lora where it exists)")
    serve.add_argument("--embeddings-dir", help="textual-inversion embeddings (default: embeddings/ where it exists)")
    serve.add_argument("--upscaler-dir", help=UPSCALER_DIR_HELP)
    serve.add_argument(
        "--controlnet-dir",
        help="ControlNet, T2I-Adapter and IP-Adapter files for the ControlNet extension's API (default: "
        "models/ControlNet where it exists)",
    )
    serve.add_argument("--clip-vision-dir", help=CLIP_VISION_DIR_HELP)
    serve.add_argument("--annotator-dir", help=ANNOTATOR_DIR_HELP)
    serve.add_argument(
        "--vae-dir", help="VAE files that clients may choose (sd_vae; default: models/VAE where it exists)"
    )
    serve.add_argument("--styles-file", help=STYLES_HELP)
    add_serve_limits(serve)


def add_serve_limits(serve) -> None:
    """`ldm serve`'s limits: what one request may ask for, and how much the server takes on (`ServerLimits`)."""
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="images of queued requests with the same settings run as one U-Net batch (1: never)",
    )
    limits.add_argument("--max-queue", type=int, default=32, help="jobs running or waiting; more are answered 503")
    limits.add_argument("--max-size", type=int, default=2048, help="largest width and height")
    limits.add_argument("--max-steps", type=int, default=300)
    limits.add_argument("--max-images", type=int, default=64, help="largest batch_size x n_iter")
    limits.add_argument("--max-prompt", type=int, default=20_000, help="characters of a prompt or negative prompt")
    limits.add_argument(
        "--max-init-pixels",
        type=int,
        default=4096 * 4096,
        help="largest init image or mask, in pixels (read from its header before decoding)",
    )
    limits.add_argument("--max-body-mb", type=int, default=64, help="largest request body, in MiB")
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=600,
        help="seconds a request may wait and run; then it is cancelled and answered 503",
    )
