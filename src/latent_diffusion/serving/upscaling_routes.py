"""The web UI's extras tab through its API: `/extra-single-image`, `/extra-batch-images` and `/realesrgan-models`
(`pipeline/extras.py` does the work). The upscales run on the server's worker in the queue's turn, as the web UI runs
them under its queue lock; the images are decoded, checked and encoded in threads beside it.
"""

from __future__ import annotations

import html
import io
import time
from typing import Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..pipeline.extras import (
    ExtrasUpscale,
    check_output_size,
    check_upscalers,
    load_upscalers,
    postprocessing_text,
    text_chunks,
    upscale_extras,
)
from ..pipeline.images import as_mode, open_image
from ..pipeline.loading import Pipeline
from ..pipeline.request import RequestError
from ..pipeline.upscalers import UpscalerError
from . import web_ui_api
from .job_queue import Call

# The extras request's names of the upscale settings (`pipeline/extras.py`), for its messages
EXTRAS_FIELDS = {
    "upscaler": "upscaler_1",
    "upscaler_2": "upscaler_2",
    "scale": "upscaling_resize",
    "size": "upscaling_resize_w and upscaling_resize_h",
}


class ExtrasRequest(BaseModel):
    """The web UI's `ExtrasBaseRequest` (the extras tab's upscale), its fields, defaults and ranges; other fields are
    accepted and named in `ignored` where set."""

    model_config = ConfigDict(extra="allow")
    resize_mode: Literal[0, 1] = 0  # 0: by upscaling_resize, 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True  # (the web UI's API answers with the images either way)
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(2, gt=0, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False  # before face restoration, which this server does not do


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str  # base64
    name: str


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData]  # (the web UI's name)


def extras_settings(body: ExtrasRequest) -> ExtrasUpscale:
    """The extras request's upscale fields as settings (the web UI's `run_extras` mapping)."""
    return ExtrasUpscale(
        upscaler=body.upscaler_1,
        scale=body.upscaling_resize,
        size=(body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None,
        crop=body.upscaling_crop,
        upscaler_2=body.upscaler_2,
        visibility_2=body.extras_upscaler_2_visibility,
    )


def extras_ignored(body: ExtrasRequest) -> list[str]:
    """The fields of an extras request this server does not implement that would change the web UI's result: face
    restoration (CodeFormer's weight only where CodeFormer is visible), and any field of no web UI's that is set."""
    ignored = [name for name in ("gfpgan_visibility", "codeformer_visibility") if getattr(body, name)]
    if body.codeformer_visibility and body.codeformer_weight:
        ignored.append("codeformer_weight")
    ignored += [name for name, value in (body.model_extra or {}).items() if value not in (None, "", 0, False, [], {})]
    return sorted(ignored)


def html_info(text: str) -> str:
    """The web UI's `plaintext_to_html`: each line escaped, joined by <br>, in one paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


class UpscalingRoutes:
    """The extras routes over the server's state (its worker, limits and `wait`)."""

    def __init__(self, state):
        self.state = state

    def realesrgan_models(self) -> list[dict]:
        """The web UI lists its Real-ESRGAN models here; this server, its upscaler model files, whatever their
        architecture (their scale is known once one is loaded)."""
        return [
            {"name": name, "path": str(path), "scale": None}
            for name, path in self.state.worker.pipeline.upscalers.items()
        ]

    async def single_image(self, body: ExtrasSingleImageRequest, http: Request):
        """The extras tab's upscale of one image -> {html_info, image} (and `ignored`)."""
        answer = await self.upscale(body, [body.image], ["image"], http)
        if isinstance(answer, Response):
            return answer
        return {"html_info": answer["html_info"], "image": answer["images"][0], "ignored": answer["ignored"]}

    async def batch_images(self, body: ExtrasBatchImagesRequest, http: Request):
        """The extras tab's upscale of each image of `imageList` -> {html_info, images} (and `ignored`)."""
        fields = [f"imageList[{i}]" for i in range(len(body.imageList))]
        return await self.upscale(body, [file.data for file in body.imageList], fields, http)

    async def upscale(self, body: ExtrasRequest, data: list[str], fields: list[str], http: Request):
        """Images opened and checked (in a thread), upscaled on the worker in its turn (`pipeline/extras.py`),
        encoded as PNGs with their text chunks and the web UI's "postprocessing" chunk (in a thread)."""
        arrived = time.monotonic()
        settings = extras_settings(body)
        images = await run_in_threadpool(self.inputs, settings, data, fields)

        def work(pipeline: Pipeline) -> list:
            device, dtype = pipeline.model.device, pipeline.model.dtype
            try:
                first, second = load_upscalers(settings, pipeline.upscalers, EXTRAS_FIELDS, device=device, dtype=dtype)
                return [upscale_extras(rgb, settings, first, second) for _, rgb in images]
            except UpscalerError as e:  # (its text names no path of the server's)
                raise RequestError(str(e)) from None

        task = Call(work=work)
        if not await self.state.wait(task, http, arrived):
            return Response(status_code=499)  # nobody reads it: the client has gone
        results = task.result

        def encode() -> list[str]:
            return [
                web_ui_api.png_base64(image, text_chunks(opened, info))
                for (opened, _), (image, info) in zip(images, results)
            ]

        text = postprocessing_text(results[-1][1]) if results else ""  # (the web UI's: the last image's)
        encoded = await run_in_threadpool(encode)
        return {"html_info": html_info(text), "images": encoded, "ignored": extras_ignored(body)}

    def inputs(self, settings: ExtrasUpscale, data: list[str], fields: list[str]) -> list:
        """Every check that needs no model file, before any work: the upscalers' names, the count of images, each
        image (its pixels, read from its header before it is decoded) and the size it would be upscaled to ->
        [(the opened image, for its text chunks; it as RGB)]."""
        try:
            check_upscalers(settings, self.state.worker.pipeline.upscalers, EXTRAS_FIELDS)
        except UpscalerError as e:
            raise RequestError(str(e)) from None
        if len(data) > self.state.limits.max_images:
            raise RequestError(
                f"imageList: {len(data)} images, over this server's limit of {self.state.limits.max_images}"
            )
        images = []
        for field, one in zip(fields, data):
            try:
                opened = open_image(io.BytesIO(web_ui_api.image_bytes(one, field)), field, self.state.limits.max_pixels)
                check_output_size(settings, opened.size, self.state.limits.max_side, field, EXTRAS_FIELDS)
                images.append((opened, as_mode(opened, "RGB", field)))
            except ValueError as e:  # (UpscalerError is one)
                raise RequestError(str(e)) from None
        return images
