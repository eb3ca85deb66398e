# The two commands of the README: `make demo` (the main job) and `make test`. Each creates the virtual
# environment it needs on a fresh machine. torch is pinned to 2.13.0, the CPU build this machine has on disk;
# any other version would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench builtin-model builtin-controlnet clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# Test-only: diffusers and transformers (the independent reference), pytest with pytest-xdist (two workers), ruff, selenium (drives the page
# test's browser), OpenAI's CLIP tokenizer (openai-clip without its dependencies: we load only its tokenizer file)
# and k-diffusion's samplers (without its training dependencies: the tests load only its sampling module).
# spandrel (the `upscale` extra) without torchvision: the only torchvision on this machine's package index is a CUDA
# build that fails to import beside the CPU torch, so the tests put a stand-in for the three names spandrel imports
# from it (tests/conftest.py, the `spandrel` fixture); einops is spandrel's one other dependency not already here.
# lycoris-lora's own network modules (LoHa, LoKr, OFT, BOFT, IA3) are the reference of tests/test_lycoris.py: without
# its training dependencies; its package imports toml at the top, the one it needs that is not already here.
# The `gguf` extra (the gguf package) is a run-time option that tests/test_gguf.py exercises: installed with them.
$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test,gguf]"
	$(BIN)/pip install -q --no-deps openai-clip==1.0.1 k-diffusion==0.1.1.post1 spandrel==0.4.2 einops==0.8.2
	$(BIN)/pip install -q --no-deps lycoris-lora==4.1.3 toml==0.10.2
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/ldm demo --outdir out

# The page test's browser: Debian's Chromium and its driver (root installs them; otherwise through sudo).
/usr/bin/chromedriver:
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

test: $(VENV)/.test /usr/bin/chromedriver
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(VENV)/.test
	$(BIN)/python benchmarks/unet_step.py

# Retrain the built-in model from scratch (both stages: 35 minutes to well over an hour on 2 CPU cores, by the CPU;
# BENCHMARKS.md) and score it.
builtin-model: $(VENV)/.runtime
	bash benchmarks/builtin_model.sh runs/builtin

# Retrain the built-in model's ControlNet from the shipped model, and score it with and without it (BENCHMARKS.md).
builtin-controlnet: $(VENV)/.runtime
	bash benchmarks/builtin_controlnet.sh runs/builtin-controlnet

clean:
	rm -rf $(VENV) out
