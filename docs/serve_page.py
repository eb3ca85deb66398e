"""Redraw docs/serve-page.png: the server with the built-in model (`serving.http_edge.serving`, as the tests and benchmarks run
it), its page in headless Chromium, two prompts generated from the page as a user would (a short form, then the
training template), and a screenshot.

    .venv/bin/python docs/serve_page.py      # after `make test` (selenium, Debian's chromium and chromium-driver)
"""

import os
import shutil
import sys
from pathlib import Path

from latent_diffusion import load_model
from latent_diffusion.serving.http_edge import serving
from latent_diffusion.serving.server import create_app
from latent_diffusion.weights.checkpoint import BUILTIN_MODEL

SHOT = Path(__file__).resolve().parent / "serve-page.png"
PROMPTS = ("a yellow circle on a purple background", "a large blue triangle at the top on a white background")


def main() -> None:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        sys.exit("needs Debian's chromium and chromium-driver (make test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium never downloads a driver
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        with serving(create_app(load_model(BUILTIN_MODEL))) as base:
            driver.get(base + "/")
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements("css selector", "#sampler_name option")) > 10)
            for done, prompt in enumerate(PROMPTS, 1):
                for name, value in {"prompt": prompt, "seed": 1, "batch_size": 3}.items():  # seeds 1, 2, 3
                    field = driver.find_element("id", name)
                    field.clear()
                    field.send_keys(str(value))
                driver.find_element("id", "generate").click()
                shown = 3 * done
                WebDriverWait(driver, 120).until(
                    lambda d, n=shown: len(d.find_elements("css selector", "#gallery figure")) >= n
                )
                WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "generate").is_enabled())
            driver.save_screenshot(str(SHOT))
    finally:
        driver.quit()
    print(f"wrote {SHOT}")


if __name__ == "__main__":
    main()
