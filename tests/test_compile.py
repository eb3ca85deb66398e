"""The compiled path (`--compile`, `compiling.py`) on CPU at tiny width: the same images as eager through the
request (with a ControlNet unit too), the same state-dict keys, one graph per module, and inductor's kernels equal
to eager and loaded from the on-disk cache by a second process instead of being compiled again; `ldm serve
--compile` compiles each model it loads."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from latent_diffusion import LatentDiffusion, load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.models.config import AutoencoderConfig, UNetConfig
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.pipeline.compiling import compile_model, is_compiled
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest
from latent_diffusion.serving.http_edge import serving
from test_server import call, decode

from conftest import randomize, seeded, tiny_config


def test_compiled_generation_equals_eager_and_keeps_the_layout(tiny_models, tmp_path):
    """aot_eager traces the graphs torch.compile runs, without inductor's minute of kernel building on 2 cores
    (that path is the next test's)."""
    save_model(tiny_models["sd1"], tmp_path / "m.safetensors")
    model = load_model(tmp_path / "m.safetensors")  # a private copy: compiling changes the modules in place
    request = GenerationRequest(["a red circle", "a blue square"], [1, 2], width=32, height=32, steps=3,
                                sampler="dpmpp_2m", cfg_scale=4.0, batch_size=2)  # fmt: skip
    eager = generate(model, request).images
    keys = list(model.state_dict())
    counters.clear()
    compile_model(model, backend="aot_eager")
    compiled = generate(model, dataclasses.replace(request, compile=True)).images  # compile=True: already done
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # one whole graph per module
    assert is_compiled(model.unet) and is_compiled(model.first_stage_model.decoder)
    assert list(model.state_dict()) == keys  # nn.Module.compile: no _orig_mod. prefix, saves as before
    assert (compiled - eager).abs().max() < 1e-5


def test_compiled_generation_with_a_controlnet_equals_eager(tiny_models, tmp_path):
    """A ControlNet unit whose window ends halfway: the compiled U-Net takes its residuals as inputs, without a
    graph break or a recompile, and draws eager generation's image."""
    save_model(tiny_models["sd1"], tmp_path / "m.safetensors")
    model = load_model(tmp_path / "m.safetensors")
    with seeded(1):
        save_file(randomize(ControlNet(model.cfg.unet), seed=1).state_dict(), tmp_path / "cn.safetensors")
    pipeline = Pipeline(model, controlnets={"cn": tmp_path / "cn.safetensors"})
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    unit = ControlUnit("cn", image, resize_mode="resize", guidance_end=0.5)
    request = GenerationRequest(["a cat"], [1], ["x"], width=32, height=32, steps=4, cfg_scale=5.0, controls=[unit])
    eager = generate(pipeline, request).images
    assert (eager - generate(pipeline, dataclasses.replace(request, controls=[])).images).abs().max() > 1e-3
    compile_model(model, backend="aot_eager")
    counters.clear()
    compiled = generate(pipeline, dataclasses.replace(request, compile=True)).images
    assert not counters["graph_break"] and not counters["recompiles"]
    assert (compiled - eager).abs().max() < 1e-5


CHILD = """
import json, sys, torch
from torch._dynamo.utils import counters
from latent_diffusion import load_model
from latent_diffusion.pipeline.compiling import compile_model
model = load_model(sys.argv[1])
x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
with torch.no_grad():
    eager = model.unet(x, t, context)
    compiled = compile_model(model).unet(x, t, context)
print(json.dumps({"difference": (compiled - eager).abs().max().item(), **counters["inductor"]}))
"""


def test_inductor_kernels_equal_eager_and_are_cached_across_processes(tmp_path):
    """A one-level U-Net (the fewest kernels to build) compiled by inductor in a fresh process; a second process
    with the same cache folder finds the compiled graph there (an FX-graph cache hit) instead of compiling it."""
    cfg = tiny_config("sd1")
    cfg.unet = UNetConfig(
        **{**dataclasses.asdict(cfg.unet), "channel_mult": (1,), "attention_resolutions": (1,), "transformer_depth": 1}
    )
    cfg.autoencoder = AutoencoderConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)
    save_model(randomize(LatentDiffusion(cfg)), tmp_path / "m.safetensors")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m.safetensors")], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0, first
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0, second
    # inductor fuses and reorders float32 arithmetic: agreement to rounding
    assert first["difference"] < 1e-5 and second["difference"] < 1e-5


def test_serve_compile_compiles_every_model_it_loads(tmp_path, tiny_models, monkeypatch):
    """`ldm serve --compile` through a real socket: the model it starts with and one a client switches to are
    compiled when loaded, and the served image is eager generation's (aot_eager, as in the first test)."""
    save_model(tiny_models["sd1"], tmp_path / "a.safetensors")
    save_model(tiny_models["sd2"], tmp_path / "b.safetensors")
    compiled = []

    def compile_fast(model):
        compiled.append(model)
        return compile_model(model, backend="aot_eager")

    # DPM++ 2M Karras: the library's default sampler
    body = {"prompt": "a cat", "seed": 3, "steps": 2, "width": 32, "height": 32, "cfg_scale": 4,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras"}  # fmt: skip
    answers = []

    def run_in_a_thread(app, host, port, log_level):  # instead of uvicorn.run, which would block the test
        with serving(app) as base:
            answers.append(call(base, "/sdapi/v1/txt2img", body))
            answers.append(call(base, "/sdapi/v1/options", {"sd_model_checkpoint": "b"}))

    monkeypatch.setattr("latent_diffusion.pipeline.loading.compile_model", compile_fast)
    monkeypatch.setattr("uvicorn.run", run_in_a_thread)
    args = ["serve", "--ckpt", tmp_path / "a.safetensors", "--models-dir", tmp_path, "--compile", "--device", "cpu"]
    assert main([str(a) for a in args]) == 0
    (status, answer), switched = answers
    assert status == 200 and switched == (200, {"ignored": []}), answers
    assert [m.cfg for m in compiled] == [tiny_models["sd1"].cfg, tiny_models["sd2"].cfg]  # a, then b
    assert all(is_compiled(m.unet) and is_compiled(m.first_stage_model.decoder) for m in compiled)
    eager = generate(load_model(tmp_path / "a.safetensors"), GenerationRequest(["a cat"], [3], width=32, height=32,
                                                                               steps=2, cfg_scale=4.0))  # fmt: skip
    served = np.asarray(decode(answer["images"][0]).convert("RGB"), dtype=np.int16)
    expected = (eager.images[0] * 255).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(served - expected).max() <= 1  # compiled within 1e-5 of eager: at most a rounding step apart
