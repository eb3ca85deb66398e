"""The web UI's ControlNet extension through `ldm serve`, over a real socket: its units in txt2img and img2img
(`alwayson_scripts`) sent by webuiapi's `ControlNetUnit` unchanged, reaching generation (the image equals the library's
for the same unit) with the extension's infotext and its detected maps after the images; its routes' shapes
(Mikubill/sd-webui-controlnet 1.1.455 `scripts/api.py`); bad units answered 422 naming the unit and the field; and
requests whose control images differ still sharing a U-Net batch."""

import base64
import dataclasses
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion.models.config import UNetConfig
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.pipeline.control import control_fields, find_control_models
from latent_diffusion.pipeline.control_images import control_hint
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import from_pil
from latent_diffusion.pipeline.infotext import control_settings
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.preprocessors import detect
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest
from latent_diffusion.serving.server import ServerLimits, create_app
from test_server import bomb_png, call, decode

from conftest import FakeDetector, randomize, seeded

W, H = 48, 64


@pytest.fixture(scope="module")
def served(ckpt, tiny_models, serve, tmp_path_factory):
    """(base URL, pipeline, the canny model's listed name, the control-model folder, the save_images folder): the tiny
    SD 1.x model with a tiny ControlNet for it and one for SD 2.x's U-Net, jobs merged within a second."""
    folder = tmp_path_factory.mktemp("ControlNet")
    # An SD 2.x layout (its file is recognised as one): a model of another family
    sd2 = UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                     num_heads=None, num_head_channels=64, transformer_depth=2, context_dim=48,
                     use_linear_in_transformer=True)  # fmt: skip
    for name, unet, seed in (("control_canny", tiny_models["sd1"].cfg.unet, 1), ("control_sd2", sd2, 2)):
        with seeded(seed):
            save_file(randomize(ControlNet(unet), seed=seed).state_dict(), folder / f"{name}.safetensors")
    pipeline = load_pipeline(ckpt, controlnets=find_control_models(folder))
    listed = next(name for name in pipeline.controlnets if name.startswith("control_canny ["))
    outdir = tmp_path_factory.mktemp("outputs")
    app = create_app(pipeline, outdir, controlnet_dir=folder, limits=ServerLimits(batch_window=1.0))
    with serve(app) as base:
        yield base, pipeline, listed, folder, outdir


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """A control image of a size other than the generation's (so its map is resized), with edges for canny."""
    y, x = np.mgrid[0:40, 0:56]
    rings = ((np.hypot(x - 28, y - 20) // 6) % 2 * 200 + 30).astype(np.uint8)
    return Image.fromarray(np.stack([rings, rings[::-1], np.full_like(rings, 90)], axis=2))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(images: torch.Tensor) -> list[np.ndarray]:
    return list((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_a_webuiapi_unit_reaches_generation_with_the_extensions_infotext_and_map(served, picture):
    """webuiapi's ControlNetUnit with its own defaults (Resize and Fill, processor_res 512, thresholds 64): the image
    equals the library's for the same unit, the infotext's `ControlNet 0` field is the extension's serialization of
    that unit, and the canny map (at the generation's size) comes back after the image."""
    import webuiapi

    base, pipeline, listed, *_ = served
    api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler a", steps=3)
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="control_canny", weight=0.8)
    # A fresh `alwayson_scripts`: webuiapi's default is one shared dict that keeps the unit for the process's later calls
    result = api.txt2img(prompt="a red circle", seed=3, width=W, height=H, cfg_scale=5, controlnet_units=[unit],
                         alwayson_scripts={})  # fmt: skip
    assert [im.size for im in result.images] == [(W, H), (W, H)] and result.info["ignored"] == []
    assert result.info["infotexts"][0].endswith(
        f'ControlNet 0: "Module: canny, Model: {listed}, Weight: 0.8, Resize Mode: Resize and Fill, Processor Res: '
        "512, Threshold A: 64.0, Threshold B: 64.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        'Control Mode: Balanced"'
    )
    control = ControlUnit(listed, from_pil(picture), module="canny", weight=0.8, resize_mode="fill",
                          processor_res=512, threshold_a=64.0, threshold_b=64.0)  # fmt: skip
    request = GenerationRequest(["a red circle"], [3], width=W, height=H, steps=3, sampler="euler_ancestral",
                                eta=1.0, s_noise=1.0, cfg_scale=5.0, controls=[control])  # fmt: skip
    library = generate(pipeline, request)
    assert np.asarray(result.images[0]).tobytes() == pixels(library.images)[0].tobytes()
    plain = generate(pipeline, dataclasses.replace(request, controls=[])).images
    assert np.abs(pixels(plain)[0].astype(int) - np.asarray(result.images[0])).max() > 10  # the unit acted
    _, shown = control_hint(np.asarray(picture), "canny", size=(H, W), resize_mode="Resize and Fill",
                            processor_res=512, threshold_a=64, threshold_b=64)  # fmt: skip
    assert np.array_equal(np.asarray(result.images[1]), shown) and len(np.unique(shown)) == 2  # an edge map


def test_img2img_units_without_an_image_take_the_init_image(served, picture):
    """As the extension's `choose_input_image`: the init image as sent, at img2img's resize mode (here 0, "Just
    Resize"), so the answer equals one whose unit carries that image itself with that mode."""
    base, _, listed, *_ = served
    body = {"prompt": "a cat", "seed": 2, "steps": 2, "width": W, "height": H, "init_images": [b64(picture)],
            "denoising_strength": 0.6, "resize_mode": 0}  # fmt: skip
    unit = {"enabled": True, "model": listed, "module": "none", "resize_mode": "Just Resize"}
    answers = [call(base, "/sdapi/v1/img2img", {**body, "alwayson_scripts": {"ControlNet": {"args": [fields]}}})
               for fields in ({**unit, "resize_mode": "Resize and Fill"}, {**unit, "image": b64(picture)})]  # fmt: skip
    assert [status for status, _ in answers] == [200, 200]
    first, second = ([np.asarray(decode(image)) for image in answer["images"]] for _, answer in answers)
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, second))
    without = call(base, "/sdapi/v1/img2img", body)[1]["images"]
    assert len(without) == 1 and not np.array_equal(np.asarray(decode(without[0])), first[0])


def test_the_extensions_routes(served, picture):
    """version, model_list (read again unless update=false), module_list (names or labels, sliders), control_types,
    settings and detect, in the extension's shapes; detect's sliders lenient as the extension's."""
    import webuiapi

    base, _, listed, folder, _ = served
    assert call(base, "/controlnet/version") == (200, {"version": 3})
    models = call(base, "/controlnet/model_list")[1]["model_list"]
    assert models[0] == listed and models[1].startswith("control_sd2 [") and len(models) == 2
    shutil.copy(folder / "control_canny.safetensors", folder / "late_tile.safetensors")
    try:
        assert len(call(base, "/controlnet/model_list?update=false")[1]["model_list"]) == 2
        assert call(base, "/controlnet/model_list")[1]["model_list"][2].startswith("late_tile [")
    finally:
        (folder / "late_tile.safetensors").unlink()
        call(base, "/controlnet/model_list")
    names, labels = (call(base, f"/controlnet/module_list?alias_names={a}")[1] for a in ("false", "true"))
    assert names["module_list"][:3] == ["none", "ip-adapter-auto", "tile_resample"]  # (priority, then label, down)
    assert "depth_midas" in labels["module_list"] and "depth" in names["module_list"]
    assert names["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    types = call(base, "/controlnet/control_types")[1]["control_types"]
    assert list(types)[:3] == ["All", "Canny", "Depth"] and types["All"]["model_list"] == ["None", *models]
    assert types["Canny"] == {"module_list": ["none", "canny", "invert (from white bg & black line)"],
                              "model_list": ["None", listed], "default_option": "canny", "default_model": listed}  # fmt: skip
    assert call(base, "/controlnet/settings") == (200, {"control_net_unit_count": 3})

    api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1")
    found = api.controlnet_detect([picture], module="canny", processor_res=128, threshold_a=999)  # (999: default)
    expected = detect(np.asarray(picture), "canny", 128, None, 64)  # (webuiapi sends threshold_b=64)
    assert found.info == "Success" and np.array_equal(np.asarray(found.image), expected)
    body = {"controlnet_module": "inpaint_only", "controlnet_input_images": [b64(picture)]}
    status, answer = call(base, "/controlnet/detect", {**body, "controlnet_masks": [b64(picture.convert("L"))]})
    assert status == 200 and decode(answer["images"][0]).mode == "RGBA"
    assert call(base, "/controlnet/detect", body)[1]["detail"] == (
        "controlnet_module: ControlNet module 'inpaint_only' needs a mask (controlnet_masks)"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": "not an image"}, "ControlNet unit 1: image: not a base64-encoded image"),
        ({"image": bomb_png(5000, 5000)}, "ControlNet unit 1: image: the image is 5000x5000, over the limit"),
        ({"module": "nope"}, "ControlNet unit 1: unknown ControlNet module 'nope'"),
        (
            {"module": "revision_clipvision"},
            "ControlNet unit 1: ControlNet module 'revision_clipvision' needs the CLIP image tower clip_g",
        ),
        ({"model": "nope"}, "ControlNet unit 1: no control model 'nope' here"),
        ({"model": "control_sd2"}, "ControlNet unit 1: control model control_sd2.safetensors: a ControlNet for SD 2"),
        ({"weight": 11}, "ControlNet unit 1: weight must be between 0 and 10, not 11"),
        ({"weight": "strong"}, "ControlNet unit 1: weight must be a number, not 'strong'"),
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "ControlNet unit 1: guidance_start and guidance_end must be"),
        ({"control_mode": "loud"}, "ControlNet unit 1: control_mode must be one of Balanced"),
        ({"resize_mode": 7.5}, "ControlNet unit 1: resize_mode must be a name or 0, 1, 2"),
        ({"image": None}, "ControlNet unit 1: no image"),
        ({"image": {"image": "x"}, "mask": "y"}, "ControlNet unit 1: a mask in image and another in mask"),
        ({"image": [{"image": "x"}, {"image": "y"}]}, "ControlNet unit 1: several images are an IP-Adapter unit's"),
        ({"image": [{"image": 1}]}, "ControlNet unit 1: image must be base64-encoded images, not a int"),
        ({"image": [{"image": "x"}, {"mask": "y"}]}, "ControlNet unit 1: each entry of image needs its image"),
        ({"input_image": "x"}, "ControlNet unit 1: give image or its alias input_image, not both"),
        ({"hr_option": "Sometimes"}, "ControlNet unit 1: hr_option must be one of Both, Low res only, High res only"),
        ({"hr_option": 3}, "ControlNet unit 1: hr_option must be one of"),
        ({"advanced_weighting": [1, "x"]}, "ControlNet unit 1: advanced_weighting must be a list of numbers"),
        (
            {"advanced_weighting": [1, -2]},
            "ControlNet unit 1: advanced_weighting must be a tuple of 1 to 64 numbers in [0, 10]",
        ),
        ({"advanced_weighting": [1] * 65}, "ControlNet unit 1: advanced_weighting must be a tuple of 1 to 64 numbers"),
        ({"effective_region_mask": [1]}, "ControlNet unit 1: effective_region_mask must be one base64-encoded image"),
        ({"union_control_type": "Edges"}, "ControlNet unit 1: union_control_type must be one of OpenPose, Depth,"),
        ({"effective_region_mask": "x"}, "ControlNet unit 1: effective_region_mask:"),
        (
            {"module": "reference_only", "model": "None", "effective_region_mask": b64(Image.new("L", (4, 4)))},
            "ControlNet unit 1: a region mask applies to ControlNet, T2I-Adapter and IP-Adapter units only",
        ),
    ],
)
def test_bad_units_are_a_422_naming_the_unit_and_field_and_nothing_is_written(served, picture, fields, message):
    base, _, listed, _, outdir = served
    good = {"enabled": True, "model": listed, "image": b64(picture)}
    units = [{"enabled": False, "model": "nope"}, {**good, **fields}]  # (a disabled unit is not read)
    body = {"prompt": "x", "steps": 1, "width": W, "height": H, "save_images": True,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert status == 422 and answer["detail"].startswith(message), answer
    assert str(outdir.parent) not in answer["detail"]  # (the server's paths stay its own)
    assert list(outdir.iterdir()) == []
    fine = {**body, "save_images": False, "alwayson_scripts": {"ControlNet": {"args": [good]}}}
    assert call(base, "/sdapi/v1/txt2img", fine)[0] == 200  # the server goes on
    for entry in ({"args": {"a": 1}}, {"args": ["x"]}, [1]):
        status, answer = call(base, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"ControlNet": entry}})
        assert status == 422 and "ControlNet" in answer["detail"], answer


def test_requests_with_different_control_images_share_a_batch(served, picture):
    """Two clients at once, the same unit settings and different images: merged into one U-Net batch (the plans' batch
    key leaves the maps out), and each image the one its request gets from the library alone (within one 8-bit
    level: a batched matmul rounds differently) with its own detected map."""
    base, pipeline, listed, *_ = served
    images = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    bodies = [{"prompt": "a cat", "seed": 5, "steps": 2, "width": W, "height": H, "cfg_scale": 4,
               "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "model": listed, "module": "canny",
                                                              "image": b64(image)}]}}} for image in images]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda body: call(base, "/sdapi/v1/txt2img", body), bodies))
    assert [json.loads(answer["info"])["batched_with"] for _, answer in answers] == [2, 2]
    for image, (_, answer) in zip(images, answers):
        unit = ControlUnit(listed, from_pil(image), module="canny")
        request = GenerationRequest(["a cat"], [5], width=W, height=H, steps=2, sampler="euler", cfg_scale=4.0,
                                    controls=[unit])  # fmt: skip
        library = pixels(generate(pipeline, request).images)[0].astype(int)
        got, shown = (np.asarray(decode(b), dtype=int) for b in answer["images"])
        assert np.abs(got - library).max() <= 1
        assert np.array_equal(shown, resolve(request, pipeline).controls[0].detected[0])


def test_detected_maps_with_the_hires_fix_and_when_turned_off(served, picture):
    """With the hires fix the extension sends, per unit, the hires pass's map and then the first pass's; a unit's
    save_detected_map false or the option control_net_no_detectmap sends none; hr_option and advanced_weighting are
    applied (test_control_options.py), not named as ignored."""
    base, _, listed, *_ = served
    unit = {"enabled": True, "model": listed, "module": "canny", "image": b64(picture)}
    body = {"prompt": "a cat", "seed": 1, "steps": 1, "width": W, "height": H, "enable_hr": True, "hr_scale": 2,
            "hr_second_pass_steps": 1}  # fmt: skip
    scripts = lambda **more: {"alwayson_scripts": {"ControlNet": {"args": [{**unit, **more}]}}}  # noqa: E731
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts()})
    assert status == 200 and [decode(b).size for b in answer["images"]] == [(2 * W, 2 * H), (2 * W, 2 * H), (W, H)]
    assert len(call(base, "/sdapi/v1/txt2img", {**body, **scripts(save_detected_map=False)})[1]["images"]) == 1
    off = {**body, **scripts(), "override_settings": {"control_net_no_detectmap": True}}
    status, answer = call(base, "/sdapi/v1/txt2img", off)
    assert len(answer["images"]) == 1 and json.loads(answer["info"])["ignored"] == []
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts(hr_option="Low res only")})
    assert status == 200 and json.loads(answer["info"])["ignored"] == []
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts(hr_option=2, advanced_weighting=[0.5] * 13)})
    assert status == 200 and json.loads(answer["info"])["ignored"] == []
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts(hr_option="HiResFixOption.HIGH_RES_ONLY")})
    assert status == 200 and json.loads(answer["info"])["ignored"] == []
    region = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # (its red channel as stored, transparent or not)
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts(effective_region_mask=b64(region))})
    assert status == 200 and json.loads(answer["info"])["ignored"] == []
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, **scripts(union_control_type="Hard Edge")})
    assert status == 200 and json.loads(answer["info"])["ignored"] == []  # (a ControlNet not of the union kind: unused)


def test_the_infotext_is_the_extensions_serialization_and_reads_back(served, picture):
    """`ControlUnit.serialize` of the extension, written out: `infotext_fields()` in order, str() of the pydantic
    field (floats for weight, guidance and thresholds, an int resolution), enums by label, and a slider value out of
    the module's range replaced by the slider's declared default (invert hides its resolution: 0..1, default 0.5)."""
    _, pipeline, listed, *_ = served
    units = [ControlUnit(listed, from_pil(picture), module="canny", weight=1, processor_res=256, control_mode="prompt"),
             ControlUnit(listed, from_pil(picture), module="invert", threshold_a=64.0, resize_mode="resize")]  # fmt: skip
    plan = resolve(GenerationRequest(["x"], [1], width=W, height=H, steps=1, controls=units), pipeline)
    fields = control_fields(plan.controls)
    assert fields == {
        "ControlNet 0": f"Module: canny, Model: {listed}, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: "
        "256, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        "Control Mode: My prompt is more important",
        "ControlNet 1": f"Module: invert, Model: {listed}, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 0.5, "
        "Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        "Control Mode: Balanced",
    }
    settings = control_settings(fields)
    assert settings["control_processor_res"] == [256, None] and settings["control_threshold_a"] == [100.0, 0.5]
    assert settings["control_mode"] == ["prompt", "balanced"] and settings["control_resize"] == ["crop", "resize"]


def test_a_reference_unit_runs_without_a_model(served, picture):
    """The extension's reference_only takes "model": "None" (or no model): the unit runs, its module is listed as
    available, and nothing is named ignored; its map is the image itself."""
    base, *_ = served
    unit = {"enabled": True, "module": "reference_only", "model": "None", "image": b64(picture), "threshold_a": 0.7}
    body = {"prompt": "a cat", "seed": 1, "steps": 2, "width": W, "height": H, "cfg_scale": 5}
    status, answer = call(base, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert status == 200 and json.loads(answer["info"])["ignored"] == [] and len(answer["images"]) == 2
    plain = call(base, "/sdapi/v1/txt2img", body)[1]
    assert answer["images"][0] != plain["images"][0]
    listed = call(base, "/controlnet/module_list")[1]
    assert all(listed["module_detail"][m]["available"] for m in ("reference_only", "reference_adain"))


def test_dwpose_detects_through_the_server_with_its_poses(served, serve, tmp_path):
    """/controlnet/detect with dw_openpose_full (its ONNX files in the annotator folder): the map and the poses the
    extension sends back, one per image, through a real socket."""
    from test_pose_estimation import figures, networks, read, ref_dw_openpose_full, ref_encode_poses_as_json

    _, pipeline, _, folder, _ = served
    networks(tmp_path)
    image = figures()
    request = {"controlnet_module": "dw_openpose_full", "controlnet_processor_res": 256}
    request["controlnet_input_images"] = [b64(Image.fromarray(image))] * 2
    with serve(create_app(dataclasses.replace(pipeline, annotators=tmp_path), controlnet_dir=folder)) as base:
        status, answer = call(base, "/controlnet/detect", request)
    nets = [read(tmp_path / name) for name in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")]
    expected, poses = ref_dw_openpose_full(*nets, image, 256)
    assert status == 200 and len(answer["images"]) == 2
    assert np.array_equal(np.asarray(decode(answer["images"][1])), expected)
    assert answer["poses"] == [ref_encode_poses_as_json(poses, [], 256, 384)] * 2 and poses


def test_annotator_modules_run_with_the_servers_annotator_folder(served, picture, serve, fake_controlnet_aux, tmp_path):
    """`ldm serve --annotator-dir`: its modules are listed as available, /controlnet/detect and units run them
    (here controlnet_aux's MidasDetector stands in, its file in a subfolder as the extension's annotator/downloads
    keeps it); a server without the folder lists them unavailable and answers such a unit 422 saying what to give."""
    base, pipeline, listed, folder, _ = served
    (tmp_path / "midas").mkdir()
    (tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"weights")
    unit = {"enabled": True, "module": "depth_midas", "model": listed, "image": b64(picture), "processor_res": 64}
    body = {"prompt": "a cat", "seed": 2, "steps": 2, "width": W, "height": H}
    body |= {"alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    app = create_app(dataclasses.replace(pipeline, annotators=tmp_path), controlnet_dir=folder)
    with serve(app) as with_folder:
        modules = call(with_folder, "/controlnet/module_list?alias_names=true")[1]["module_detail"]
        found = call(with_folder, "/controlnet/detect", {"controlnet_module": "depth", "controlnet_input_images":
                                                        [b64(picture)], "controlnet_processor_res": 64})  # fmt: skip
        status, answer = call(with_folder, "/sdapi/v1/txt2img", body)
    assert modules["depth_midas"]["available"] and not modules["depth_zoe"]["available"]
    assert FakeDetector.built == [str(tmp_path / "midas")]  # (built once, from the subfolder holding its file)
    assert found[0] == 200 and np.array_equal(np.asarray(decode(found[1]["images"][0])), np.full((64, 64, 3), 7))
    assert status == 200 and len(answer["images"]) == 2 and len(FakeDetector.calls) == 2
    assert np.array_equal(np.asarray(decode(answer["images"][1])), np.full((H, W, 3), 7))  # the unit's map
    status, refused = call(base, "/sdapi/v1/txt2img", body)
    assert status == 422 and refused["detail"] == (
        "ControlNet unit 0: ControlNet module 'depth_midas' needs annotator weights (dpt_hybrid-midas-501f0c75.pt): "
        "no folder named (--annotator-dir)"
    )
    assert not call(base, "/controlnet/module_list?alias_names=true")[1]["module_detail"]["depth_midas"]["available"]
