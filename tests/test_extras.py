"""The web UI's extras tab (`pipeline/extras.py`): `/sdapi/v1/extra-single-image` and `/extra-batch-images` through a
real socket with webuiapi (a published client of the web UI's API), and `ldm upscale`, against the web UI's
arithmetic written from its code (PIL for the resamplers) and our library's `upscale` (for a model of
`--upscaler-dir`: a tiny Compact 2x built from spandrel's classes, test_upscalers.py). Bad input: a 422 or exit 2 in
one line, and nothing written."""

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latent_diffusion.cli import main
from latent_diffusion.pipeline.extras import ExtrasUpscale, upscale_extras
from latent_diffusion.pipeline.images import from_pil, to_pil
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.upscalers import RESAMPLERS, load_upscaler, upscale
from latent_diffusion.serving.server import ServerLimits, create_app
from test_server import call
from test_upscalers import build, save

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
FILTERS = {"Lanczos": LANCZOS, "Nearest": NEAREST}
PARAMETERS = "a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, Seed: 7, Size: 37x45"


def picture(seed=0, size=(37, 45)) -> Image.Image:
    """Random RGB pixels with a web UI `parameters` chunk, as a generated image carries one."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer, info = io.BytesIO(), PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMETERS)
    image.save(buffer, format="PNG", pnginfo=info)
    return Image.open(io.BytesIO(buffer.getvalue()))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def web_ui_upscale(im: Image.Image, filter, scale: float) -> Image.Image:
    """modules/upscaler.py `Upscaler.upscale` with a resampler's `do_upscale`, written from its code."""
    dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
    for i in range(3):
        if im.width >= dest_w and im.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = im.size
        im = im.resize((int(im.width * scale), int(im.height * scale)), resample=filter)
        if shape == im.size:
            break
    if im.size != (dest_w, dest_h):
        im = im.resize((dest_w, dest_h), resample=LANCZOS)
    return im


def web_ui_extras(im, upscaler_1, upscaler_2="None", visibility=0.0, mode=0, by=2.0, w=512, h=512, crop=True):
    """scripts/postprocessing_upscale.py `process` and `upscale` for the resamplers, written from its code."""
    im = im.convert("RGB")
    if upscaler_1 == "None":
        return im

    def one(name):
        out = web_ui_upscale(im, FILTERS[name], by if mode == 0 else max(w / im.width, h / im.height))
        if mode == 1 and crop:
            cropped = Image.new("RGB", (w, h))
            cropped.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = cropped
        return out

    out = one(upscaler_1)
    if upscaler_2 != "None" and visibility > 0:
        out = Image.blend(out, one(upscaler_2), visibility)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        dict(upscaler_1="Lanczos", by=2.5),
        dict(upscaler_1="Nearest", by=1.7),
        dict(upscaler_1="Lanczos", by=0.5),  # (a scale below 1: Lanczos down, no pass)
        dict(upscaler_1="Lanczos", mode=1, w=100, h=60),  # wider than the image: cut at the top and bottom
        dict(upscaler_1="Nearest", mode=1, w=100, h=100),  # rounded down to 8s: black columns at the sides
        dict(upscaler_1="Lanczos", mode=1, w=100, h=100, crop=False),
        dict(upscaler_1="Lanczos", upscaler_2="Nearest", visibility=0.3, by=2),
        dict(upscaler_1="Lanczos", upscaler_2="Nearest", visibility=0.0, by=2),
        dict(upscaler_1="None", upscaler_2="Lanczos", visibility=1.0),  # "None" first: nothing at all
    ],
)
def test_the_extras_arithmetic_is_the_web_ui_s(settings):
    image = picture()
    expected = web_ui_extras(image, **settings)
    extras = ExtrasUpscale(
        upscaler=settings["upscaler_1"],
        scale=settings.get("by", 2.0),
        size=(settings["w"], settings["h"]) if settings.get("mode") == 1 else None,
        crop=settings.get("crop", True),
        upscaler_2=settings.get("upscaler_2", "None"),
        visibility_2=settings.get("visibility", 0.0),
    )
    ours, info = upscale_extras(image, extras, RESAMPLERS[extras.upscaler], RESAMPLERS[extras.upscaler_2])
    assert ours.size == expected.size and ours.tobytes() == expected.tobytes()
    if extras.upscaler == "None":
        assert info == {}


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory, spandrel):
    folder = tmp_path_factory.mktemp("ESRGAN")
    save(build("Compact", spandrel)[0], folder / "tiny-2x.pth")
    (folder / "broken.pth").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def server(ckpt, serve, upscaler_dir):
    pipeline = load_pipeline(ckpt, upscalers={p.stem: p for p in upscaler_dir.iterdir()})
    with serve(create_app(pipeline, limits=ServerLimits(max_side=400, max_images=3))) as base:
        yield base


def test_an_existing_client_gets_the_web_ui_s_upscale(server):
    """webuiapi's extra_single_image with its defaults for every other field: the web UI's image and html_info, the
    input's `parameters` chunk kept and its "postprocessing" chunk added; nothing in `ignored`."""
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=server + "/sdapi/v1")
    image = picture()
    result = api.extra_single_image(image, upscaler_1="Lanczos", upscaling_resize=2.5)
    expected = web_ui_extras(image, "Lanczos", by=2.5)
    library = to_pil(upscale(from_pil(image), "Lanczos", scale=2.5)[0])
    assert result.image.size == (88, 112) and result.image.tobytes() == expected.tobytes() == library.tobytes()
    assert result.info == "<p>Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos</p>"
    assert result.image.text == {
        "parameters": PARAMETERS,
        "postprocessing": "Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos",
    }
    assert result.json["ignored"] == []

    # To a size, cropped, with a second upscaler half visible, in a batch of two
    images = [picture(1), picture(2, (50, 30))]
    result = api.extra_batch_images(images, resize_mode=1, upscaling_resize_w=96, upscaling_resize_h=64,
                                    upscaler_1="Nearest", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5,
                                    gfpgan_visibility=0.4, codeformer_weight=0.5)  # fmt: skip
    for ours, image in zip(result.images, images):
        expected = web_ui_extras(image, "Nearest", "Lanczos", 0.5, mode=1, w=96, h=64)
        assert ours.size == (96, 64) and ours.tobytes() == expected.tobytes()
    text = (
        "Postprocess upscale to: 96x64, Postprocess crop to: 96x64, Postprocess upscaler: Nearest, "
        "Postprocess upscaler 2: Lanczos"
    )
    assert result.info == f"<p>{text}</p>" and result.images[1].text["postprocessing"] == text
    assert result.json["ignored"] == ["gfpgan_visibility"]  # (CodeFormer's weight does nothing while it is invisible)

    # "None" first: the image as it came, and nothing said about it
    result = api.extra_single_image(image, upscaler_1="None", upscaler_2="Lanczos", extras_upscaler_2_visibility=1)
    assert result.image.tobytes() == image.convert("RGB").tobytes() and result.info == "<p></p>"


def test_a_model_of_the_upscaler_folder_is_the_library_s_upscale(server, upscaler_dir, monkeypatch):
    """tiny-2x (Compact 2x) by 3: a pass of the model, a second, then Lanczos down to the size rounded to 8s, as
    `upscale` does (tested against spandrel in test_upscalers.py); on the server's worker thread, in the order of
    the queue. /realesrgan-models lists the model files."""
    status, models = call(server, "/sdapi/v1/realesrgan-models")
    assert status == 200 and {"name": "tiny-2x", "path": str(upscaler_dir / "tiny-2x.pth"), "scale": None} in models
    images = [picture(3), picture(4, (24, 16))]
    model = load_upscaler(upscaler_dir / "tiny-2x.pth")
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return upscale_extras(*args, **kwargs)

    monkeypatch.setattr("latent_diffusion.serving.upscaling_routes.upscale_extras", recording)
    body = {"imageList": [{"data": b64(im), "name": f"{i}.png"} for i, im in enumerate(images)],
            "upscaler_1": "tiny-2x", "upscaling_resize": 3}  # fmt: skip
    status, answer = call(server, "/sdapi/v1/extra-batch-images", body)
    assert status == 200, answer
    assert threads == ["ldm-serve-worker"] * 2
    for data, image in zip(answer["images"], images):
        ours = Image.open(io.BytesIO(base64.b64decode(data)))
        expected = to_pil(upscale(from_pil(image), model, scale=3)[0])
        assert ours.size == (image.width * 3 // 8 * 8, image.height * 3 // 8 * 8)
        assert ours.tobytes() == expected.tobytes()
    assert answer["html_info"] == "<p>Postprocess upscale by: 3.0, Postprocess upscaler: tiny-2x</p>"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1: no upscaler '4x-UltraSharp' here; these are: None, Lanczos,"),
        ({"upscaler_2": "nope", "extras_upscaler_2_visibility": 0.5}, "upscaler_2: no upscaler 'nope' here"),
        ({"upscaling_resize": 0}, "upscaling_resize: Input should be greater than 0"),
        ({"upscaling_resize": float("nan")}, "upscaling_resize: Input should be a finite number"),
        ({"upscaling_resize": 1e6}, "upscaling_resize: image (37x45) would be 37000000x45000000; each side must be"),
        (
            {"resize_mode": 1, "upscaling_resize_w": 800},
            "upscaling_resize_w and upscaling_resize_h: image (37x45) "
            "would be 800x512; each side must be between 1 and 400",
        ),
        ({"resize_mode": 1, "upscaling_resize_w": 0}, "upscaling_resize_w: Input should be greater than or equal"),
        ({"resize_mode": 2}, "resize_mode: Input should be 0 or 1"),
        ({"extras_upscaler_2_visibility": 2}, "extras_upscaler_2_visibility: Input should be less than or equal to 1"),
        ({"image": base64.b64encode(b"hello").decode()}, "image: cannot read the image"),
        ({"image": "not base64!"}, "image: not a base64-encoded image"),
        ({"image": ""}, "image: cannot read the image"),
        ({"upscaler_1": "broken"}, "upscaler_1 broken: "),
    ],
)
def test_bad_input_is_a_422_in_one_line(server, upscaler_dir, fields, message):
    body = {"image": b64(picture()), "upscaler_1": "Lanczos", "upscaling_resize": 2, **fields}
    status, answer = call(server, "/sdapi/v1/extra-single-image", body)
    assert status == 422 and message in answer["detail"], answer
    assert "\n" not in answer["detail"] and str(upscaler_dir) not in answer["detail"]


def test_too_many_images_and_then_a_good_request(server):
    file = {"data": b64(picture()), "name": "a.png"}
    status, answer = call(server, "/sdapi/v1/extra-batch-images", {"imageList": [file] * 4, "upscaler_1": "Lanczos"})
    assert status == 422 and answer["detail"] == "imageList: 4 images, over this server's limit of 3"
    status, answer = call(server, "/sdapi/v1/extra-batch-images", {"imageList": [], "upscaler_1": "Lanczos"})
    assert (status, answer["images"], answer["html_info"]) == (200, [], "<p></p>")
    status, answer = call(server, "/sdapi/v1/extra-batch-images", {"imageList": [file], "upscaler_1": "Lanczos"})
    assert status == 200 and len(answer["images"]) == 1


def run(*args) -> int:
    return main([str(a) for a in args])


def test_ldm_upscale_writes_the_web_ui_s_pngs(tmp_path, upscaler_dir, capsys):
    """Each result as NNNNN-NAME.png with the input's `parameters` and the web UI's "postprocessing" and "extras"
    chunks (as its extras tab saves them); a model of --upscaler-dir as the library's `upscale` runs it."""
    image, other = picture(), picture(5, (30, 20))
    image.save(tmp_path / "a.png", pnginfo=png_info(image))
    other.save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    assert run("upscale", tmp_path / "a.png", tmp_path / "b.jpg", "--upscaler", "Lanczos", "--scale", 2.5,
               "--outdir", out, "--upscaler-dir", upscaler_dir) == 0  # fmt: skip
    assert capsys.readouterr().out == f"wrote {out / '00001-a.png'} (88x112)\nwrote {out / '00002-b.png'} (72x48)\n"
    text = "Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos"
    with Image.open(out / "00001-a.png") as ours:
        assert ours.tobytes() == web_ui_extras(image, "Lanczos", by=2.5).tobytes()
        assert ours.text == {"parameters": PARAMETERS, "postprocessing": text, "extras": text}
    with Image.open(out / "00002-b.png") as ours, Image.open(tmp_path / "b.jpg") as jpeg:
        assert ours.tobytes() == web_ui_extras(jpeg, "Lanczos", by=2.5).tobytes()
        assert ours.text == {"postprocessing": text, "extras": text}

    assert run("upscale", tmp_path / "a.png", "--upscaler", "tiny-2x", "--width", 64, "--height", 64,
               "--upscaler-dir", upscaler_dir, "--tile", 16, "--outdir", out, "--quiet") == 0  # fmt: skip
    model = load_upscaler(upscaler_dir / "tiny-2x.pth")
    s = max(64 / 37, 64 / 45)  # the scale that covers 64x64, the result's sides rounded down to 8s
    covering = to_pil(upscale(from_pil(image), model, scale=s, tile=16)[0])
    assert covering.size == (int(37 * s // 8 * 8), int(45 * s // 8 * 8)) == (64, 72)
    expected = Image.new("RGB", (64, 64))
    expected.paste(covering, (32 - covering.width // 2, 32 - covering.height // 2))
    with Image.open(out / "00003-a.png") as ours:
        assert ours.tobytes() == expected.tobytes()
        assert ours.text["extras"] == (
            "Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: tiny-2x"
        )


def png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in image.text.items():
        info.add_text(key, value)
    return info


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["IMAGE", "--upscaler", "nope"],
            "--upscaler: no upscaler 'nope' here; these are: None, Lanczos, Nearest, broken",
        ),
        (["IMAGE", "--upscaler", "Lanczos", "--scale", 0], "--scale must be a positive number, not 0.0"),
        (["IMAGE", "--upscaler", "Lanczos", "--scale", "nan"], "--scale must be a positive number, not nan"),
        (["IMAGE", "--upscaler", "Lanczos", "--scale", 1e6], "--scale: IMAGE (37x45) would be 37000000x45000000; each"),
        (["IMAGE", "--upscaler", "Lanczos", "--width", 64], "give --width and --height together"),
        (["IMAGE", "--upscaler", "Lanczos", "--width", 64, "--height", 64, "--scale", 2], "give --scale, or --width"),
        (
            ["IMAGE", "--upscaler", "Lanczos", "--upscaler-2-visibility", 1.5],
            "--upscaler-2-visibility must be in [0, 1]",
        ),
        (["IMAGE", "--upscaler", "broken"], "--upscaler broken: "),
        (
            ["IMAGE", "--upscaler", "Lanczos", "--upscaler-2", "broken", "--upscaler-2-visibility", 0.5],
            "--upscaler-2 broken:",
        ),
        (["IMAGE", "NOT-AN-IMAGE", "--upscaler", "Lanczos"], "NOT-AN-IMAGE: cannot read the image"),
        (["IMAGE", "--upscaler", "Lanczos", "--upscaler-dir", "MISSING"], "--upscaler-dir MISSING: no such folder"),
    ],
)
def test_bad_upscale_arguments_exit_2_in_one_line_and_write_nothing(tmp_path, upscaler_dir, capsys, args, message):
    picture().save(tmp_path / "in.png")
    (tmp_path / "text.png").write_text("not an image")
    names = {"NOT-AN-IMAGE": str(tmp_path / "text.png"), "IMAGE": str(tmp_path / "in.png"),
             "MISSING": str(tmp_path / "missing")}  # fmt: skip
    args = [names.get(str(a), a) for a in args]
    folder = [] if "--upscaler-dir" in args else ["--upscaler-dir", upscaler_dir]
    assert run("upscale", *args, *folder, "--outdir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    for name, path in names.items():
        message = message.replace(name, path)
    assert err.startswith("ldm: error: ") and message in err and err.count("\n") == 1, err
    assert str(upscaler_dir) not in err and not (tmp_path / "out").exists()


def test_help_names_the_command(capsys):
    for argv in (["--help"], ["upscale", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "ldm upscale photo.png --upscaler" in out and "--upscaler-dir" in out and "(default: 192)" in out
