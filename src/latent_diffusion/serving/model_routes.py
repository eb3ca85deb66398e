"""The web UI's endpoints for the autoencoder and for the models' place in memory: the VAE files of `--vae-dir`
(`/sdapi/v1/sd-vae`, `/sdapi/v1/refresh-vae`, and the option `sd_vae`, which puts one in place of the checkpoint's
autoencoder, for the model loaded now and each one loaded after), and `/sdapi/v1/unload-checkpoint` and
`/reload-checkpoint`, which move the models to the CPU and back (the web UI's `send_model_to_cpu` and
`send_model_to_device`; the next job moves them back by itself, as the web UI reloads before it generates).

"Automatic" is the autoencoder the server started with (`--vae`, else the checkpoint's own; the web UI's also looks
for a VAE file named after the checkpoint, which this does not), "None" the checkpoint's own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from fastapi import FastAPI, Request

from ..pipeline.loading import Pipeline
from ..pipeline.request import RequestError
from ..weights.checkpoint import load_vae
from ..weights.reader import CheckpointError, first_line
from .job_queue import Call

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
AUTOMATIC, NONE = "Automatic", "None"


def vae_files(folder: Path | None) -> dict[str, Path]:
    """The VAE files of a folder and its subfolders by file name, as the web UI lists them."""
    if folder is None or not folder.is_dir():
        return {}
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VAE_SUFFIXES and p.is_file())
    return {p.name: p for p in paths}


class ModelRoutes:
    def __init__(self, state, vae_dir: Path | None):
        self.state, self.vae_dir = state, vae_dir
        self.files = vae_files(vae_dir)
        self.chosen = AUTOMATIC  # the option sd_vae
        self.started_with = state.worker.pipeline.vae_file  # what Automatic means here
        self.parked: torch.device | None = None  # where the models were before /unload-checkpoint

    def add_routes(self, app: FastAPI) -> None:
        app.add_api_route("/sdapi/v1/sd-vae", self.sd_vae, methods=["GET"])
        app.add_api_route("/sdapi/v1/refresh-vae", self.refresh, methods=["POST"])
        app.add_api_route("/sdapi/v1/unload-checkpoint", self.unload, methods=["POST"])
        app.add_api_route("/sdapi/v1/reload-checkpoint", self.reload, methods=["POST"])

    def sd_vae(self) -> list[dict]:
        return [{"model_name": name, "filename": str(path)} for name, path in self.files.items()]

    async def refresh(self) -> dict:
        self.files = vae_files(self.vae_dir)
        return {}

    # The option sd_vae --------------------------------------------------------------------------------------------

    async def choose(self, value, http: Request) -> None:
        """Set sd_vae: the autoencoder changes on the worker, between jobs (RequestError for a name it does not
        have, or a file that is not an autoencoder of this model: the old one stays)."""
        known = [AUTOMATIC, NONE, *self.files]
        if not isinstance(value, str) or value not in known:
            raise RequestError(f"sd_vae: no VAE {value!r} here; these are: {', '.join(known)}")
        before, self.chosen = self.chosen, value

        def work(pipeline: Pipeline) -> None:
            self.state.worker.pipeline = self.with_vae(pipeline)

        try:
            await self.state.wait(Call(work=work), http)
        except Exception:
            self.chosen = before
            raise

    def with_vae(self, pipeline: Pipeline) -> Pipeline:
        """The pipeline with the chosen autoencoder's weights in its model (read from a file: a VAE file, or the
        checkpoint itself for its own)."""
        path = self.files.get(self.chosen) if self.chosen not in (AUTOMATIC, NONE) else None
        path = self.started_with if self.chosen == AUTOMATIC else path
        if path == pipeline.vae_file:
            return pipeline
        source = path or pipeline.checkpoint
        if source is None:
            raise RequestError("sd_vae: this model was not loaded from a file, so it has no autoencoder to return to")
        try:
            load_vae(pipeline.model, source)
        except (CheckpointError, OSError) as e:  # (named by the list's name: the path is the server's)
            name = self.chosen if path else "the checkpoint's own"
            raise RequestError(f"sd_vae {name}: {first_line(e).replace(str(source), '').removeprefix(': ')}") from None
        return dataclasses.replace(pipeline, vae_file=path)

    # Unload and reload ----------------------------------------------------------------------------------------------

    async def unload(self, http: Request) -> dict:
        """The models off their device (to the CPU), on the worker between jobs."""
        await self.state.wait(Call(work=self.park), http)
        return {}

    async def reload(self, http: Request) -> dict:
        await self.state.wait(Call(work=self.unpark), http)
        return {}

    def park(self, pipeline: Pipeline) -> None:
        if self.parked is None:
            self.parked = pipeline.model.device
            self.state.worker.pipeline = _moved(pipeline, torch.device("cpu"))

    def unpark(self, pipeline: Pipeline) -> None:
        if self.parked is not None:
            self.state.worker.pipeline = _moved(pipeline, self.parked)
            self.parked = None


def _moved(pipeline: Pipeline, device: torch.device) -> Pipeline:
    """The pipeline's models on `device` (the same objects: `nn.Module.to` moves in place)."""
    for model in (pipeline.model, pipeline.refiner, pipeline.hires_pipeline and pipeline.hires_pipeline.model):
        if model is not None:
            model.to(device)
    return pipeline
