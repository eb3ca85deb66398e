"""`benchmarks/soak.py` for a minute: a real `ldm serve` process under a mix of clients (txt2img with and without a
LoRA, img2img with a mask, a model switch per request, progress polls, clients that leave, interrupts)."""

import importlib.util
from pathlib import Path

SOAK = Path(__file__).parents[1] / "benchmarks" / "soak.py"
RSS_GROWTH_MIB = 100  # the server's resident memory may grow this much from the first half to the second


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_minute_of_mixed_clients_gives_no_5xx_no_changed_image_and_flat_memory():
    report = load_soak().run(seconds=60, clients=4, check=12)
    assert report["server_alive"] and report["server_errors"] == 0, report
    assert report["images"] > 20 and report["checked_alone"] == 12, report
    assert report["changed"] == [], report  # each kept answer is the image its request gets alone (within 1 level)
    rss = report["rss_mib"]
    assert rss["second_half_max"] <= rss["first_half_max"] + RSS_GROWTH_MIB, report
    assert report["open_files"]["max"] < 100, report  # no descriptor left open per request
