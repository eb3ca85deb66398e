"""Redraw docs/serve-page.png: `ldm serve` with the built-in model, its page in headless Chromium, two prompts
generated from the page as a user would (a short form, then the training template), and a screenshot.

    .venv/bin/python docs/serve_page.py      # after `make test` (selenium, Debian's chromium and chromium-driver)

The server is the real CLI in a subprocess on a free port; the page is driven only through its fields and buttons.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SHOT = Path(__file__).resolve().parent / "serve-page.png"
PROMPTS = ("a yellow circle on a purple background", "a large blue triangle at the top on a white background")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen) -> None:
    for _ in range(300):
        if server.poll() is not None:
            sys.exit(f"ldm serve exited with code {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"ldm serve did not answer at {url}")


def main() -> None:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        sys.exit("needs Debian's chromium and chromium-driver (make test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium never downloads a driver
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    ldm = Path(sys.executable).with_name("ldm")
    server = subprocess.Popen([str(ldm), "serve", "--port", str(port)], stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960"):
        options.add_argument(argument)
    driver = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base + "/sdapi/v1/options", server)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
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
        print(f"wrote {SHOT}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
