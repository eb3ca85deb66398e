"""Tiny-width models of the real architecture, one per variant, with every weight perturbed from its init; and
spandrel for the upscaler tests, with a stand-in for the torchvision it imports where torchvision does not import."""

import contextlib
import dataclasses
import enum
import importlib.machinery
import os
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch

from latent_diffusion import LatentDiffusion, LatentDiffusionConfig, TextEncoderConfig, UNetConfig, preset, save_model
from latent_diffusion.models.config import SDXL_MICRO, SDXL_REFINER_MICRO
from latent_diffusion.pipeline import annotators

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per process a test starts): two workers on two cores, each with a pool of two
    # threads, spin against each other and run many times slower than one thread each.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def tiny_config(variant: str) -> LatentDiffusionConfig:
    cfg = preset("tiny")
    if variant == "inpaint":
        cfg.unet.in_channels = 9
    elif variant == "sd2":
        cfg.unet = UNetConfig(**{**dataclasses.asdict(cfg.unet), "num_heads": None, "num_head_channels": 16,
                                 "use_linear_in_transformer": True, "transformer_depth": 2})  # fmt: skip
        cfg.text = TextEncoderConfig(kind="openclip", width=32, layers=3, heads=2, mlp_width=64, activation="gelu",
                                     layer="penultimate", pad_token=0, embed_dim=24)  # fmt: skip
    elif variant in ("sdxl", "sdxl-refiner"):  # SDXL's options: a first level without attention, depth per level
        clip = TextEncoderConfig(width=32, layers=3, heads=2, mlp_width=64, layer="penultimate", final_norm=False)
        big_g = TextEncoderConfig(
            kind="openclip",
            width=48,
            layers=3,
            heads=3,
            mlp_width=96,
            activation="gelu",
            layer="penultimate",
            final_norm=False,
            pad_token=0,
            embed_dim=40,
            pooled=True,
        )
        refiner = variant == "sdxl-refiner"
        micro = SDXL_REFINER_MICRO if refiner else SDXL_MICRO
        cfg.unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=1,
                              num_heads=None, num_head_channels=16, transformer_depth=(1, 1, 2) if refiner else (1, 2, 3),
                              context_dim=48 if refiner else 80, use_linear_in_transformer=True,
                              adm_in_channels=40 + (5 if refiner else 6) * 8)  # fmt: skip
        cfg = dataclasses.replace(cfg, text=big_g if refiner else clip, text2=None if refiner else big_g,
                                  micro_conditioning=micro, micro_conditioning_width=8, scale_factor=0.13025)  # fmt: skip
    elif variant != "sd1":
        raise ValueError(variant)
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (norm scales and zero biases included) so that no term of the forward is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@contextlib.contextmanager
def seeded(seed: int):
    """The global generator seeded with `seed` inside, restored after: a module built inside draws the same init in
    every run (torch seeds that generator at random in each process)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test, and every fixture its setup builds, starts from the same global generator: a module a test builds
    from its default init (`randomize(ControlNet(...))`) is the same in every run and on every xdist worker."""
    torch.manual_seed(0)


def tiny_model(variant: str, seed: int) -> LatentDiffusion:
    """A randomized tiny LatentDiffusion that is the same in every run: its init drawn with `seed`, then perturbed by
    `randomize`."""
    with seeded(seed):
        return randomize(LatentDiffusion(tiny_config(variant)), seed=seed).eval()


@pytest.fixture(scope="session")
def tiny_models():
    """variant -> a randomized tiny LatentDiffusion (built once per session; tests must not modify it)."""
    return {v: tiny_model(v, seed=i) for i, v in enumerate(("sd1", "sd2", "inpaint"))}


def outputs(model: LatentDiffusion) -> list[torch.Tensor]:
    """Every text encoder's hidden states (and SDXL's pooled vector), and the U-Net's prediction on fixed inputs:
    what a model that stores or quantizes its weights is compared on."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.text.vocab_size, (2, 77), generator=g)
    results = []
    with torch.no_grad():
        for encoder in model.text_encoders:
            out = encoder(tokens, pooled=encoder.cfg.pooled)
            results += list(out) if isinstance(out, tuple) else [out]
        x = torch.randn(2, model.cfg.unet.in_channels, 16, 16, generator=g)
        cond = {"crossattn": torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)}
        if model.cfg.unet.adm_in_channels:
            cond["vector"] = torch.randn(2, model.cfg.unet.adm_in_channels, generator=g)
        results.append(model(x, torch.tensor([10, 900]), cond))
    return results


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models):
    """variant -> (a float32 tiny model, its .safetensors file): SD 1.x, 2.x and SDXL (its two text encoders)."""
    folder = tmp_path_factory.mktemp("variants")
    models = {**tiny_models, "sdxl": tiny_model("sdxl", seed=5)}
    for variant in ("sd1", "sd2", "sdxl"):
        save_model(models[variant], folder / f"{variant}.safetensors")
    return {variant: (models[variant], folder / f"{variant}.safetensors") for variant in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_models):
    """The tiny SD 1.x model as a .safetensors file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_models["sd1"], path)
    return path


@pytest.fixture(scope="session")
def serve():
    """serve(app): a context manager running a real uvicorn server for `app` -> its base URL."""
    from latent_diffusion.serving.http_edge import serving

    return serving


def torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The three names spandrel imports from torchvision.transforms.functional at import time, for its LaMa and
    RestoreFormer architectures, which no test runs: `InterpolationMode` (torchvision's values), `normalize`
    (computed as torchvision does) and `rotate` (raises). Nothing else of torchvision is there."""

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def normalize(tensor, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std) if inplace else (tensor - mean) / std

    def rotate(*args, **kwargs):
        raise NotImplementedError(
            "the tests' torchvision stand-in cannot rotate (spandrel's LaMa): install torchvision"
        )

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode, functional.normalize, functional.rotate = InterpolationMode, normalize, rotate
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms, torchvision.__stand_in__ = transforms, True
    return {"torchvision": torchvision, "torchvision.transforms": transforms, functional.__name__: functional}


@pytest.fixture(scope="session")
def spandrel():
    """spandrel, imported as `pipeline/upscalers.py` imports it. spandrel imports torchvision when it is imported;
    here the only torchvision on the package index is a CUDA build that fails beside the CPU torch ("operator
    torchvision::nms does not exist"), so the Makefile installs spandrel without its dependencies and, where
    torchvision does not import, this puts `torchvision_stand_in()` in its place for the rest of the session. The
    architectures under test (ESRGAN, Compact, SPAN, SwinIR) use nothing of torchvision; a working torchvision, where
    one is installed, is used as it is."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # what a failed import left behind
        sys.modules.update(torchvision_stand_in())
    import spandrel

    return spandrel


# ---- controlnet_aux, stood in for (the annotator hook: `pipeline/annotators.py`) ------------------------------


class FakeDetector:
    """Stands in for a controlnet_aux detector: records how it was built and called."""

    built: ClassVar[list] = []
    calls: ClassVar[list] = []

    @classmethod
    def from_pretrained(cls, folder):
        cls.built.append(folder)
        return cls()

    def __call__(self, image, **options):
        FakeDetector.calls.append(options)
        return np.full((options["detect_resolution"], options["detect_resolution"], 3), 7, np.uint8)


@pytest.fixture
def fake_controlnet_aux(monkeypatch):
    module = types.ModuleType("controlnet_aux")
    module.__spec__ = importlib.machinery.ModuleSpec("controlnet_aux", None)
    module.LeresDetector = module.MidasDetector = FakeDetector
    monkeypatch.setitem(sys.modules, "controlnet_aux", module)
    annotators._load.cache_clear()
    FakeDetector.built, FakeDetector.calls = [], []
    yield
    annotators._load.cache_clear()
