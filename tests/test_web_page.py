"""The page at `/` in a real browser: headless Chromium (Debian's package, installed by `make test`) driven through
its chromedriver. It types a prompt, generates, and gets real images of the requested size with their infotext; it
paints an inpainting mask on a canvas, and what it did not paint comes back unchanged; it adds a ControlNet unit with
an uploaded control image, previews its map and gets the map back with the image."""

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion import load_pipeline
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.control_images import control_hint
from latent_diffusion.pipeline.preprocessors import detect
from latent_diffusion.serving.server import create_app

from conftest import randomize

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and CHROMEDRIVER, "make test installs Debian's chromium and chromium-driver"
    os.environ["SE_OFFLINE"] = "true"  # Selenium never downloads a driver: the one named here is used
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, ckpt, tiny_models, serve, tmp_path_factory):
    """The page of a server with the tiny model and a tiny ControlNet for it in its --controlnet-dir."""
    folder = tmp_path_factory.mktemp("ControlNet")
    net = randomize(ControlNet(tiny_models["sd1"].cfg.unet), seed=1)
    save_file(net.state_dict(), folder / "control_canny.safetensors")
    pipeline = load_pipeline(ckpt, controlnets=find_control_models(folder))
    with serve(create_app(pipeline, controlnet_dir=folder)) as base:
        browser.get(base + "/")
        yield browser


def set_field(driver, name: str, value) -> None:
    element = driver.find_element("id", name)
    element.clear()
    element.send_keys(str(value))


def results(driver) -> list:
    return driver.find_elements("css selector", "#gallery figure")


def wait_for_results(driver, count: int):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 120).until(lambda d: len(results(d)) >= count)
    WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "generate").is_enabled())
    error = driver.find_element("id", "error")
    assert not error.is_displayed(), error.text
    return results(driver)


def shown_image(figure) -> Image.Image:
    source = figure.find_element("tag name", "img").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2]))).convert("RGB")


def test_generate_from_the_page(page, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: len(d.find_elements("css selector", "#sampler_name option")) > 10)
    assert page.find_element("id", "sampler_name").get_attribute("value") == "DPM++ 2M"
    assert page.find_element("id", "checkpoint").get_attribute("value").startswith("tiny.safetensors [")
    page.find_element("id", "prompt").send_keys("a red circle")
    for name, value in {"width": 32, "height": 24, "steps": 3, "seed": 11, "batch_size": 2}.items():
        set_field(page, name, value)
    page.find_element("id", "generate").click()
    figures = wait_for_results(page, 2)

    # Newest first: the second image of the batch (seed 12) leads.
    assert [shown_image(f).size for f in figures] == [(32, 24), (32, 24)]
    captions = [f.find_element("tag name", "figcaption").text for f in figures]
    assert captions[0].startswith("a red circle") and "Seed: 12" in captions[0] and "Seed: 11" in captions[1]
    assert "Steps: 3, Sampler: DPM++ 2M" in captions[1]
    assert np.asarray(shown_image(figures[0])).std() > 0  # a picture, not a blank

    set_field(page, "seed", -1)
    figures[1].find_element("tag name", "button").click()  # reuse the settings of seed 11
    assert page.find_element("id", "seed").get_attribute("value") == "11"
    assert page.find_element("id", "batch_size").get_attribute("value") == "1"

    page.find_element("id", "enable_hr").click()  # the hires fix: the image drawn again at twice the size
    assert "Latent (bicubic)" in [o.text for o in page.find_elements("css selector", "#hr_upscaler option")]
    for name, value in {"hr_scale": 2, "hr_second_pass_steps": 2, "steps": 2}.items():
        set_field(page, name, value)
    page.find_element("id", "generate").click()
    figures = wait_for_results(page, 3)
    assert shown_image(figures[0]).size == (64, 48)
    caption = figures[0].find_element("tag name", "figcaption").text
    assert "Denoising strength: 0.7, Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Latent" in caption
    page.find_element("id", "enable_hr").click()

    screenshot = tmp_path / "page.png"
    assert page.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0


def test_inpaint_with_a_painted_mask(page, tmp_path):
    """The img2img tab: an init image from a file, a mask painted over its right side with the mouse; the left
    side, not painted, comes back as it was."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    picture = np.zeros((32, 32, 3), dtype=np.uint8)
    picture[:, :, 0], picture[:, :, 1] = np.arange(32)[None] * 8, 90  # a gradient: a resize would change it
    Image.fromarray(picture).save(tmp_path / "init.png")
    page.find_element("css selector", '.tab[data-mode="img2img"]').click()
    page.find_element("id", "init-file").send_keys(str(tmp_path / "init.png"))
    for name, value in {"width": 32, "height": 32, "steps": 4, "seed": 5, "batch_size": 1}.items():
        set_field(page, name, value)
    canvas = page.find_element("id", "mask-canvas")  # shown larger than its 32 pixels
    WebDriverWait(page, 10).until(lambda d: canvas.get_attribute("width") == "32")  # the image has loaded
    shown = canvas.size["width"]
    assert shown > 100 and canvas.size["height"] == shown
    page.execute_script("document.getElementById('brush').value = arguments[0]", shown // 4)  # 8 of 32 pixels
    before = len(results(page))
    # A stroke down the right side, from 10 % to 90 % of the height (offsets from the centre).
    ActionChains(page).move_to_element_with_offset(canvas, int(shown * 0.35), -int(shown * 0.4)).click_and_hold() \
        .move_by_offset(0, int(shown * 0.4)).move_by_offset(0, int(shown * 0.4)).release().perform()  # fmt: skip
    page.find_element("id", "generate").click()
    figure = wait_for_results(page, before + 1)[0]
    result = np.asarray(shown_image(figure))
    assert (result[:, :12] == picture[:, :12]).all()  # not painted: kept
    assert not (result[:, 24:] == picture[:, 24:]).all()  # painted: repainted


def test_the_extras_tab_upscales_a_file(page, tmp_path):
    """The extras tab: an image from a file, Lanczos by 2 through /extra-single-image; the result is PIL's Lanczos of
    it (the web UI's resampler), captioned with the "Postprocess" fields."""
    from selenium.webdriver.support.ui import Select

    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / "small.png")
    page.find_element("css selector", '.tab[data-mode="extras"]').click()
    assert not page.find_element("id", "prompt").is_displayed()
    page.find_element("id", "extras-file").send_keys(str(tmp_path / "small.png"))
    Select(page.find_element("id", "upscaler_1")).select_by_visible_text("Lanczos")
    set_field(page, "upscaling_resize", 2)
    before = len(results(page))
    page.find_element("id", "generate").click()
    figure = wait_for_results(page, before + 1)[0]
    assert np.array_equal(np.asarray(shown_image(figure)), np.asarray(picture.resize((80, 48), Image.LANCZOS)))
    caption = figure.find_element("tag name", "figcaption").text
    assert caption == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"
    page.find_element("css selector", '.tab[data-mode="txt2img"]').click()


def test_settings_from_an_images_infotext_and_an_xyz_plot(page, tmp_path):
    """A PNG's infotext fills the form (/png-info, as the web UI's "Send to txt2img"); the X/Y/Z panel asks for the
    script and shows its grid."""
    from PIL import PngImagePlugin
    from selenium.webdriver.support.ui import Select, WebDriverWait

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a green square\nNegative prompt: dark\nSteps: 3, Sampler: Euler, Schedule type: "
                  "Karras, CFG scale: 2.5, Seed: 77, Size: 32x24, Hires upscale: 2, Hires upscaler: Latent (bicubic)")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "made.png", pnginfo=info)
    page.find_element("id", "pnginfo-file").send_keys(str(tmp_path / "made.png"))
    WebDriverWait(page, 30).until(lambda d: d.find_element("id", "seed").get_attribute("value") == "77")
    values = {name: page.find_element("id", name).get_attribute("value")
              for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "hr_scale")}  # fmt: skip
    assert values == {"prompt": "a green square", "negative_prompt": "dark", "steps": "3", "cfg_scale": "2.5",
                      "width": "32", "height": "24", "hr_scale": "2"}  # fmt: skip
    assert Select(page.find_element("id", "sampler_name")).first_selected_option.text == "Euler"
    assert Select(page.find_element("id", "scheduler")).first_selected_option.text == "Karras"
    assert Select(page.find_element("id", "hr_upscaler")).first_selected_option.text == "Latent (bicubic)"
    assert page.find_element("id", "enable_hr").is_selected()
    page.find_element("id", "enable_hr").click()  # off again

    page.find_element("id", "xyz_enable").click()
    Select(page.find_element("id", "xyz_x_type")).select_by_visible_text("Steps")
    set_field(page, "xyz_x_values", "2,3")
    before = len(results(page))
    page.find_element("id", "generate").click()
    figure = wait_for_results(page, before + 1)[0]
    grid = shown_image(figure)
    assert grid.size[0] > 2 * 32 and grid.size[1] > 24  # two cells with the legend above them
    assert "Script: X/Y/Z plot, X Type: Steps" in figure.find_element("tag name", "figcaption").text
    page.find_element("id", "xyz_enable").click()


def test_a_controlnet_unit_from_the_panel(page, tmp_path):
    """The ControlNet panel: a control image uploaded, canny chosen from the extension's module list, its map
    previewed (/controlnet/detect); then generated: the image with the unit in its infotext, and the detected map
    after it (shown first: newest first)."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    y, x = np.mgrid[0:40, 0:40]
    picture = np.stack([((np.hypot(x - 20, y - 20) // 5) % 2 * 220).astype(np.uint8)] * 3, axis=2)
    Image.fromarray(picture).save(tmp_path / "rings.png")
    page.find_element("css selector", '.tab[data-mode="txt2img"]').click()
    WebDriverWait(page, 30).until(lambda d: len(d.find_elements("css selector", "#cn_model option")) == 1)
    page.find_element("id", "cn_enable").click()
    page.find_element("id", "cn-file").send_keys(str(tmp_path / "rings.png"))
    Select(page.find_element("id", "cn_module")).select_by_visible_text("canny")
    for name, value in {"cn_weight": 0.8, "width": 32, "height": 32, "steps": 2, "seed": 3, "batch_size": 1}.items():
        set_field(page, name, value)
    page.find_element("id", "cn-preview-button").click()
    preview = page.find_element("id", "cn-preview")
    WebDriverWait(page, 30).until(lambda d: (preview.get_attribute("src") or "").startswith("data:image/png"))
    shown = Image.open(io.BytesIO(base64.b64decode(preview.get_attribute("src").partition(",")[2])))
    assert np.array_equal(np.asarray(shown.convert("RGB")), detect(picture, "canny"))
    before = len(results(page))
    page.find_element("id", "generate").click()
    detected, image = wait_for_results(page, before + 2)[:2]
    caption = image.find_element("tag name", "figcaption").text
    assert 'ControlNet 0: "Module: canny, Model: control_canny [' in caption and "Weight: 0.8" in caption
    assert "Resize Mode: Crop and Resize" in caption and "Control Mode: Balanced" in caption  # (the defaults)
    assert detected.find_element("tag name", "figcaption").text == "ControlNet detected map"
    assert shown_image(detected).size == (32, 32) and len(np.unique(np.asarray(shown_image(detected)))) == 2
    Select(page.find_element("id", "cn_module")).select_by_visible_text("reference_only")  # (a module of no model)
    Select(page.find_element("id", "cn_control_mode")).select_by_visible_text("ControlNet is more important")
    Select(page.find_element("id", "cn_resize_mode")).select_by_visible_text("Resize and Fill")
    page.find_element("id", "cn_pixel_perfect").click()
    page.find_element("id", "generate").click()
    caption = wait_for_results(page, before + 4)[1].find_element("tag name", "figcaption").text
    assert 'ControlNet 0: "Module: reference_only, Model: None, Weight: 0.8' in caption
    assert "Resize Mode: Resize and Fill" in caption and "Pixel Perfect: True" in caption
    assert "Control Mode: ControlNet is more important" in caption
    for name, text in (("cn_control_mode", "Balanced"), ("cn_resize_mode", "Crop and Resize")):
        Select(page.find_element("id", name)).select_by_visible_text(text)
    page.find_element("id", "cn_pixel_perfect").click()
    # a mask beside the image, for inpaint_only: its preview shows the masked part, and the image keeps the rest
    mask = np.zeros((40, 40), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    page.find_element("id", "cn-mask-file").send_keys(str(tmp_path / "mask.png"))
    Select(page.find_element("id", "cn_module")).select_by_visible_text("inpaint_only")
    page.find_element("id", "cn-preview-button").click()
    WebDriverWait(page, 30).until(lambda d: (preview.get_attribute("src") or "").startswith("data:image/png"))
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(preview.get_attribute("src").partition(",")[2]))))
    assert np.array_equal(shown[:, :, 3], 255 - mask // 2)  # (the extension's display: masked pixels half clear)
    page.find_element("id", "generate").click()
    image = wait_for_results(page, before + 6)[1]
    assert (
        'ControlNet 0: "Module: inpaint_only, Model: control_canny ['
        in image.find_element("tag name", "figcaption").text
    )
    drawn = np.asarray(shown_image(image).convert("RGB")).astype(int)
    hint = control_hint(picture, "inpaint_only", size=(32, 32), mask=mask)[0][0, :3]  # (the map, RGBA: its colours)
    outside = (hint.permute(1, 2, 0).numpy() * 255).round().astype(int)[28:]  # (rows the softened mask misses)
    assert np.abs(drawn[28:] - outside).max() <= 1
    page.find_element("id", "cn_enable").click()  # off again
