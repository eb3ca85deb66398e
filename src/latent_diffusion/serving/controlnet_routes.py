"""The web UI's ControlNet extension's own API (Mikubill/sd-webui-controlnet 1.1.455, `scripts/api.py`):
`/controlnet/version`, `/model_list`, `/module_list`, `/control_types`, `/settings` and `/detect`, with its paths,
parameters and answer shapes; its units in txt2img and img2img requests (`serving/controlnet_units.py` reads them);
and the detected maps that its answers carry after the images.

The control model files are those of `ldm serve --controlnet-dir`, listed as the extension lists them ("name
[hash]"); `/controlnet/model_list?update=true` (the default, as the extension's) reads the folder again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..pipeline.control import find_control_models
from ..pipeline.control_modules import CONTROL_TYPES, PreprocessorError, sorted_modules, tagged
from ..pipeline.images import as_mode
from ..pipeline.loading import Pipeline
from ..pipeline.preprocessors import detect, module_list
from ..pipeline.request import RequestError
from . import controlnet_units
from .controlnet_units import UNIT_COUNT, InitImage, prepared_mask
from .job_queue import Job
from .web_ui_api import Txt2ImgRequest, png_base64

API_VERSION = 3  # the extension's `get_api_version()` at 1.1.455
# `Preprocessor.tag_to_filters`: words besides its own name that mark a model file as one of a control type
TYPE_FILTERS = {
    "instructp2p": ["ip2p"], "segmentation": ["seg"], "normalmap": ["normal"],
    "t2i-adapter": ["t2i_adapter", "t2iadapter", "t2ia"], "ip-adapter": ["ip_adapter", "ipadapter"],
    "openpose": ["openpose", "densepose"], "instant-id": ["instant_id", "instantid"], "scribble": ["sketch"],
    "tile": ["blur"],
}  # fmt: skip
# `ControlNetUnionControlType.all_tags`: the types a ControlNet union model serves, so "union" files are listed too
UNION_TYPES = (
    "openpose",
    "depth",
    "softedge",
    "scribble",
    "canny",
    "lineart",
    "mlsd",
    "normalmap",
    "segmentation",
    "inpaint",
    "tile",
)


class DetectRequest(BaseModel):
    """`POST /controlnet/detect`'s body, the extension's fields and defaults (-1: the module's default)."""

    model_config = ConfigDict(extra="allow")
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)  # base64
    controlnet_images: list[str] = Field(default_factory=list)  # the same, as webuiapi's controlnet_detect names it
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)  # the inpaint modules' masks, one per image
    low_vram: bool = False  # (nothing to move off the device: these modules run on the CPU)


class ControlNetRoutes:
    """The extension's routes over the server's state (its worker's pipeline, its limits, `open_request_image`)."""

    def __init__(self, state, folder: Path | None):
        self.state, self.folder = state, folder

    def add_routes(self, app: FastAPI) -> None:
        lists = {"version": version, "model_list": self.model_list, "module_list": self.modules, "settings": settings}
        for path, endpoint in {**lists, "control_types": self.control_types}.items():
            app.add_api_route(f"/controlnet/{path}", endpoint, methods=["GET"])
        app.add_api_route("/controlnet/detect", self.detect, methods=["POST"])

    def model_list(self, update: bool = True) -> dict:
        """The control model files, "name [hash]"; `update` reads the folder first (as the extension does)."""
        pipeline = self.state.worker.pipeline
        if update and self.folder is not None:
            found = find_control_models(self.folder)
            if found != pipeline.controlnets:  # (the worker reads the attribute when it resolves a job)
                pipeline.controlnets = found
        return {"model_list": list(pipeline.controlnets)}

    def adopt(self, pipeline: Pipeline) -> None:
        """A pipeline loaded for a checkpoint switch gets the control models as last listed."""
        if self.folder is not None:
            pipeline.controlnets = dict(self.state.worker.pipeline.controlnets)

    def modules(self, alias_names: bool = False) -> dict:
        """`/controlnet/module_list`: names (labels with `alias_names`) and each module's sliders, as the
        extension's; `available` says which can run with the pipeline's folders (annotators, CLIP image towers)."""
        pipeline = self.state.worker.pipeline
        return module_list(alias_names, pipeline.annotators, pipeline.clip_vision)

    def control_types(self) -> dict:
        """`/controlnet/control_types`: per type ("All" first), its modules (labels), the models whose names mark
        them as of that type, and the defaults the extension's UI picks (`global_state.select_control_type`)."""
        models = ["None", *self.state.worker.pipeline.controlnets]
        labels = [m.label for m in sorted_modules()]
        every = {"module_list": labels, "model_list": models, "default_option": "none", "default_model": "None"}
        return {"control_types": {"All": every} | {name: control_type(name, models) for name in sorted(CONTROL_TYPES)}}

    async def detect(self, body: DetectRequest) -> dict:
        """The module's map of each image, as the extension's `/controlnet/detect` answers: {"images": [...],
        "info": "Success"}. Its sliders are lenient as there (out of range: the default). Run beside the queue, as
        the extension runs it: these modules do not use the model."""
        images = body.controlnet_input_images or body.controlnet_images
        if not images:
            raise RequestError("controlnet_input_images: no image (a list of base64-encoded images)")
        if len(images) > self.state.limits.max_images or len(body.controlnet_masks) > len(images):
            raise RequestError(
                f"controlnet_input_images: 1 to {self.state.limits.max_images} images, a mask at most each"
            )
        poses = []
        answer = {"images": await run_in_threadpool(self.detect_maps, body, images, poses), "info": "Success"}
        return answer | ({"poses": poses} if poses else {})

    def detect_maps(self, body: DetectRequest, images: list[str], poses: list) -> list[str]:
        """Each image's map, base64 PNG; `poses` gets the poses of the modules that estimate them (DWPose and the
        animal poses), one per image, as the extension sends them. (The extension sends poses for its OpenPose
        modules too; those run through controlnet_aux here, which draws them without giving their keypoints.)"""
        maps = []
        for i, data in enumerate(images):
            image = self.rgb(data, f"controlnet_input_images[{i}]")
            masks = body.controlnet_masks
            mask = self.rgb(masks[i], f"controlnet_masks[{i}]") if i < len(masks) else None
            sliders = body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b
            folder = self.state.worker.pipeline.annotators
            try:
                found = detect(
                    image,
                    body.controlnet_module,
                    *sliders,
                    mask=mask,
                    annotator_folder=folder,
                    strict=False,
                    poses=poses,
                )
            except PreprocessorError as e:
                raise RequestError(f"controlnet_module: {e}") from None
            maps.append(png_base64(Image.fromarray(found), ""))
        return maps

    def rgb(self, data: str, field: str) -> np.ndarray:
        """A request's base64 image as (H, W, 3) uint8, alpha over white (the extension's HWC3)."""
        try:
            return np.asarray(as_mode(self.state.open_request_image(data, field, (1, 1), 0), "RGB", field))
        except ValueError as e:  # (RequestError is one too: it passes unchanged)
            raise RequestError(str(e)) from None

    def units(self, body: Txt2ImgRequest, init: InitImage | None = None) -> list:
        """The request's enabled units as `ControlUnit`s (`controlnet_units.control_units`)."""

        def opened(data: str, field: str) -> Image.Image:
            return self.state.open_request_image(data, field, (1, 1), 0)  # (its pixel count checked from its header)

        return controlnet_units.control_units(body, self.state.worker.pipeline, opened, init)

    def img2img_units(self, body, image: Image.Image, mask: Image.Image | None, box, size, blur) -> list:
        """img2img's units: those without an image take the init image as sent (RGB), the inpaint modules its mask
        prepared as the extension prepares it; in "only masked" inpainting each image is cut to the `box` worked at
        `size` (width, height)."""
        if not controlnet_units.enabled_units(body):
            return []
        prepared = None
        if mask is not None:
            prepared = prepared_mask(mask, bool(body.inpainting_mask_invert), *blur).resize(image.size)
        return self.units(body, InitImage(image, body.resize_mode, prepared, box, size))

    def detected_maps(self, body: Txt2ImgRequest, job: Job) -> list[str]:
        """The maps the extension's answer carries after the images (its `Script.postprocess`): per unit that saves
        them, the hires pass's map, then the first pass's; none where the request turns them off (the unit's
        `save_detected_map`, the option `control_net_no_detectmap`) or sends no images."""
        if job.plan is None or not body.send_images or (body.override_settings or {}).get("control_net_no_detectmap"):
            return []
        hires = job.plan.hires.controls if job.plan.hires is not None else [None] * len(job.plan.controls)
        maps = []
        for control, second, saved in zip(job.plan.controls, hires, controlnet_units.saves_detected_maps(body)):
            if saved:
                maps += [*(second.detected[:1] if second is not None else ()), *control.detected[:1]]
        return [png_base64(Image.fromarray(np.ascontiguousarray(m)), "") for m in maps]


def control_type(name: str, models: list[str]) -> dict:
    """One control type's entry: the models whose names hold its name or one of its words ("None" first), and the
    defaults: the second module of its list and the first model with "11" in its name, else the first model."""
    key = name.lower()
    words = {key, *TYPE_FILTERS.get(key, []), *(["union"] if key in UNION_TYPES else [])}
    listed = [m for m in models if m == "None" or any(word in m.lower() for word in words)]
    default = next((m for m in listed[1:] if "11" in m.split("[")[0]), listed[1] if len(listed) > 1 else "None")
    labels = [m.label for m in tagged(name)]
    first = labels[min(1, len(labels) - 1)]
    return {"module_list": labels, "model_list": listed, "default_option": first, "default_model": default}


def version() -> dict:
    return {"version": API_VERSION}


def settings() -> dict:
    return {"control_net_unit_count": UNIT_COUNT}
