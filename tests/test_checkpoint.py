"""Checkpoint I/O: round trips, .ckpt forms, EMA, dtype, variant detection, memory mapping and bad files."""

import copy
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from latent_diffusion import CheckpointError, LatentDiffusion, load_model, preset, save_model
from latent_diffusion.models.yaml_config import to_ldm_config
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.prompts.encoding import encode_prompts
from latent_diffusion.weights.architecture import infer_config
from latent_diffusion.weights.checkpoint import ema_key

from conftest import randomize, tiny_config, tiny_model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_identical(tmp_path, tiny_models):
    model = tiny_models["sd2"]
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    assert_same_weights(loaded, model)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        # Equal weights; the outputs agree to float rounding only: the loaded weights are views of the memory-mapped
        # file, whose addresses (set by the header's length) steer CPU kernels to other vectorised paths (2e-6 seen).
        torch.testing.assert_close(loaded(x, t, {"crossattn": c}), model(x, t, {"crossattn": c}), atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_with_and_without_state_dict_wrapper(tmp_path, tiny_models, wrapped):
    model = tiny_models["sd1"]
    sd = dict(model.state_dict())
    # What original CompVis files carry beside the weights: schedule buffers, the old position_ids buffer.
    sd["alphas_cumprod"] = model.alphas_cumprod.double()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1} if wrapped else sd, path)
    loaded = load_model(path, config=to_ldm_config(model.cfg))
    assert_same_weights(loaded, model)


def test_lightning_training_checkpoint_loads_without_running_its_classes(tmp_path, tiny_models, monkeypatch):
    """Full CompVis training checkpoints pickle Lightning callbacks and numpy scalars beside the weights.
    The class is importable here (a stand-in registered under Lightning's module path) and would leave a
    marker if the loader built or restored it."""
    marker = tmp_path / "ran"

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 0.25  # non-empty state, so the pickle carries a BUILD instruction

        def __setstate__(self, state):
            marker.write_text("setstate ran")

        def __reduce_ex__(self, protocol):
            return (ModelCheckpoint, (), self.__dict__)

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module)

    model = tiny_models["sd1"]
    path = tmp_path / "full-ema.ckpt"
    callbacks = {ModelCheckpoint: {"best_model_score": np.float32(0.1)}, "obj": ModelCheckpoint()}
    torch.save({"state_dict": model.state_dict(), "global_step": np.int64(470000), "callbacks": callbacks}, path)
    loaded = load_model(path, config=to_ldm_config(model.cfg))
    assert_same_weights(loaded, model)
    assert not marker.exists()


def test_text_encoder_keys_without_the_text_model_level(tmp_path, tiny_models):
    """Older SD 1.x files: `cond_stage_model.transformer.embeddings.*` (no `text_model.`)."""
    model = tiny_models["sd1"]
    old = "cond_stage_model.transformer."
    sd = {k.replace(old + "text_model.", old): v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "old.ckpt")
    assert_same_weights(load_model(tmp_path / "old.ckpt", config=to_ldm_config(model.cfg)), model)


def test_config_from_compvis_yaml_file(tmp_path, tiny_models):
    model = tiny_models["inpaint"]
    torch.save(model.state_dict(), tmp_path / "m.ckpt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"model": to_ldm_config(model.cfg)}))
    loaded = load_model(tmp_path / "m.ckpt", config=tmp_path / "m.yaml")
    assert loaded.cfg == model.cfg


def test_vector_conditioning_width_from_keys_and_yaml(tmp_path):
    """`label_emb` (CompVis num_classes="sequential") is read off the keys, and written to and read from YAML."""
    cfg = tiny_config("sd1")
    cfg.unet.adm_in_channels = 12
    model = LatentDiffusion(cfg)
    assert infer_config(model.state_dict()).unet.adm_in_channels == 12
    torch.save(model.state_dict(), tmp_path / "m.ckpt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"model": to_ldm_config(cfg)}))
    assert load_model(tmp_path / "m.ckpt", config=tmp_path / "m.yaml").cfg == cfg


def test_ema_selection(tmp_path, tiny_models):
    model = tiny_models["sd1"]
    ema = tiny_model("sd1", seed=99).model.diffusion_model
    path = tmp_path / "m.safetensors"
    save_model(model, path, ema_unet=ema)
    assert_same_weights(load_model(path).model.diffusion_model, model.model.diffusion_model)
    with_ema = load_model(path, ema=True)
    assert_same_weights(with_ema.model.diffusion_model, ema)
    assert_same_weights(with_ema.first_stage_model, model.first_stage_model)

    partial = tmp_path / "partial.ckpt"
    sd = dict(load_model(path).state_dict())
    sd.update({ema_key(k): v for k, v in list(sd.items())[:5] if k.startswith("model.diffusion_model.")})
    torch.save(sd, partial)
    with pytest.raises(CheckpointError, match="EMA weights are missing"):
        load_model(partial, config=to_ldm_config(model.cfg), ema=True)

    save_model(model, tmp_path / "no_ema.safetensors")
    with pytest.raises(CheckpointError, match="no model_ema"):
        load_model(tmp_path / "no_ema.safetensors", ema=True)


def test_ema_key_is_compvis_flattened_name():
    assert ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight") == (
        "model_ema.diffusion_modelinput_blocks11proj_inweight"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype(tmp_path, tiny_models, dtype):
    path = tmp_path / "m.safetensors"
    save_model(tiny_models["sd1"], path)
    model = load_model(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.alphas_cumprod.dtype == torch.float32  # the schedule stays float32
    if dtype == torch.bfloat16:  # CPU kernels for the whole forward exist in bf16
        with torch.no_grad():
            out = model(torch.randn(1, 4, 8, 8, dtype=dtype), torch.tensor([10]), encode_prompts(model, ["a"])[0])
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_with_to_keeps_its_schedule_in_float32(tiny_models, dtype):
    """`model.to(dtype)` / `.half()` cast every floating buffer: ᾱ in bfloat16 rounded its first values to 1 (σ = 0,
    log σ = -inf), so sampling asked the U-Net for timestep NaN; in float16 every σ moved by up to 1e-3."""
    model = copy.deepcopy(tiny_models["sd1"])
    schedule = model.alphas_cumprod.clone()
    model.to(dtype)
    assert next(model.parameters()).dtype == dtype
    assert model.alphas_cumprod.dtype == torch.float32 and torch.equal(model.alphas_cumprod, schedule)
    if dtype == torch.bfloat16:  # CPU kernels for the whole model exist in bf16
        request = GenerationRequest(["a red circle"], [0], width=64, height=64, steps=2, sampler="ddim")
        assert torch.isfinite(generate(model, request).images).all()


@pytest.mark.parametrize(
    "name,file_name,parameterization",
    [
        ("sd-v1.5", "v1-5-pruned-emaonly.safetensors", "eps"),
        ("sd-v1.5-inpaint", "sd-v1-5-inpainting.ckpt", "eps"),
        ("sd-v2.1", "v2-1_512-ema-pruned.safetensors", "eps"),
        ("sd-v2.1", "v2-1_768-ema-pruned.safetensors", "v"),
        ("sd-v2.1", "768-v-ema.ckpt", "v"),
        ("sdxl-base", "sd_xl_base_1.0.safetensors", "eps"),
        ("sdxl-refiner", "sd_xl_refiner_1.0.safetensors", "eps"),
    ],
)
def test_variant_detected_from_keys_alone(name, file_name, parameterization):
    with torch.device("meta"):
        sd = dict(LatentDiffusion(preset(name)).state_dict())
    # What released files carry beside the model: schedule buffers, LitEma's counters, transformers' old buffer.
    sd.update({"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000), "alphas_cumprod_prev": torch.zeros(1000),
               "model_ema.decay": torch.zeros(()), "model_ema.num_updates": torch.zeros((), dtype=torch.int64)})  # fmt: skip
    if name.startswith("sd-v1"):
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    if name == "sdxl-base":
        sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    cfg = infer_config(sd, path=file_name)
    expected = preset(name)
    expected.parameterization = parameterization
    assert cfg == expected


def test_safetensors_is_memory_mapped_not_copied(tmp_path):
    """Load a ~190 MB checkpoint in a fresh process: peak memory must grow by far less than the file size."""
    cfg = tiny_config("sd1")
    cfg.unet.model_channels, cfg.unet.channel_mult, cfg.unet.num_res_blocks = 128, (1, 2, 4, 4), 2
    cfg.unet.transformer_depth = (1, 1, 1, 1)  # one per level
    path = tmp_path / "medium.safetensors"
    save_model(LatentDiffusion(cfg), path)
    size_mb = os.path.getsize(path) / 1e6
    assert size_mb > 150
    probe = (
        "import sys, torch, latent_diffusion as ld\n"
        f"before = {memory_kb('VmHWM')}\n"
        "m = ld.load_model(sys.argv[1])\n"
        f"print(({memory_kb('VmHWM')} - before) / 1e3)\n"
    )
    grown_mb = float(subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                                    check=True).stdout)  # fmt: skip
    # A copy would grow by the file's size or more. What does grow (114 MB of 444 here) is the load's fixed cost,
    # about 64 MB (the tokenizer's tables, Python objects), and the pages of the file that loading reads. (This
    # bound was 0.25 when the probe read ru_maxrss, which a child inherits from its parent: it measured nothing.)
    assert grown_mb < 0.35 * size_mb, f"peak memory grew {grown_mb:.0f} MB loading a {size_mb:.0f} MB file"


def memory_kb(field: str) -> str:
    """Python source that reads this process's VmHWM (peak) or VmRSS (now) in kB. (Not ru_maxrss: a child
    process starts with its parent's, inherited across fork and exec.)"""
    return f"int(next(l for l in open('/proc/self/status') if l.startswith('{field}:')).split()[1])"


def test_a_float16_file_loads_as_float32_without_holding_the_file(tmp_path):
    """Converting while loading (float16 file, float32 model) reads each tensor into a buffer instead of converting
    the memory-mapped view, so the file's pages do not stay resident: the peak memory of the load is that of the
    loaded model, not that plus the whole file (1.4x here when converting the mapped views)."""
    cfg = tiny_config("sd1")
    cfg.unet.model_channels, cfg.unet.channel_mult, cfg.unet.num_res_blocks = 128, (1, 2, 4, 4), 2
    cfg.unet.transformer_depth = (1, 1, 1, 1)  # one per level
    path = tmp_path / "medium-fp16.safetensors"
    save_model(LatentDiffusion(cfg).half(), path)
    assert os.path.getsize(path) > 150e6
    probe = (
        "import sys, torch, latent_diffusion as ld\n"
        f"before = {memory_kb('VmHWM')}\n"
        "m = ld.load_model(sys.argv[1], dtype=torch.float32)\n"
        "assert all(p.dtype == torch.float32 for p in m.parameters())\n"
        f"print({memory_kb('VmHWM')} - before, {memory_kb('VmRSS')} - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True).stdout
    peak_kb, loaded_kb = map(int, out.split())
    assert loaded_kb > 2 * os.path.getsize(path) / 1e3 * 0.95  # the float32 weights are resident
    assert peak_kb < 1.1 * loaded_kb, f"the load peaked at {peak_kb / 1e3:.0f} MB for {loaded_kb / 1e3:.0f} MB loaded"


def test_a_first_load_builds_no_initialisers_and_imports_no_compiler():
    """load_model builds the module tree on the meta device with nn.init skipped: the meta `normal_` and the like
    import torch._dynamo on first use, 2-3 s (and sympy's memory) of every `ldm` process's first load. After the
    load, nn.init is whole again."""
    probe = (
        "import sys, torch, latent_diffusion as ld\n"
        "from latent_diffusion.weights.checkpoint import BUILTIN_MODEL\n"
        "normal = torch.nn.init.normal_\n"
        "m = ld.load_model(BUILTIN_MODEL)\n"
        "assert torch.nn.init.normal_ is normal and m.alphas_cumprod.device.type == 'cpu'\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# Bad input --------------------------------------------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle below
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": payload}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: .*(posix|os)\.system"):
        load_model(path)
    assert not marker.exists()
    # The same with a raw pickle (not a torch zip archive).
    raw = tmp_path / "evil_raw.ckpt"
    raw.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        load_model(raw)
    assert not marker.exists()


def test_truncated_files(tmp_path, tiny_models):
    good = tmp_path / "good.safetensors"
    save_model(tiny_models["sd1"], good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable \.safetensors file"):
        load_model(cut)
    torch.save(tiny_models["sd1"].state_dict(), tmp_path / "good.ckpt")
    ckpt = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "cut.ckpt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00hello world, not a model")
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable"):
        load_model(tmp_path / "garbage.safetensors")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path)


def test_other_model_families(tmp_path):
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "llm.safetensors")
    with pytest.raises(CheckpointError, match="llm.safetensors: not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "llm.safetensors")
    save_file({"conv_in.weight": torch.zeros(2, 2), "down_blocks.0.x": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="diffusers-format"):
        load_model(tmp_path / "unet.safetensors")


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_models):
    sd = dict(tiny_models["sd1"].state_dict())
    del sd["model.diffusion_model.out.2.bias"]
    del sd["first_stage_model.quant_conv.bias"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "m.ckpt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, config=to_ldm_config(tiny_models["sd1"].cfg))
    message = str(info.value)
    assert "\n" not in message
    assert "m.ckpt: does not fit the sd1 model" in message
    assert "2 missing keys (first: model.diffusion_model.out.2.bias, first_stage_model.quant_conv.bias)" in message
    assert "1 unexpected keys (first: model.diffusion_model.extra.weight)" in message


def test_wrong_shapes_are_listed(tmp_path, tiny_models):
    path = tmp_path / "m.ckpt"
    torch.save(tiny_models["sd1"].state_dict(), path)
    cfg = to_ldm_config(tiny_models["sd1"].cfg)
    cfg["params"]["unet_config"]["params"]["in_channels"] = 9
    with pytest.raises(CheckpointError, match=r"does not fit the sd1-inpaint model: 1 wrong shape keys"):
        load_model(path, config=cfg)


def test_save_refuses_bad_destinations(tmp_path, tiny_models):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_model(tiny_models["sd1"], tmp_path / "no" / "m.safetensors")
    with pytest.raises(CheckpointError, match="use that suffix"):
        save_model(tiny_models["sd1"], tmp_path / "m.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_zip_bomb_like_non_checkpoint_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.ckpt", "w") as z:
        z.writestr("hello.txt", "not a torch archive")
    with pytest.raises(CheckpointError, match=r"a\.ckpt: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "a.ckpt")


def test_vae_attention_stored_as_linear_weights_is_reshaped(tmp_path, tiny_models):
    """Files converted back from diffusers hold the VAE's attention q, k, v, proj_out as [c, c] (Linear) instead of
    [c, c, 1, 1]: the same numbers, loaded exactly."""
    model = tiny_models["sd1"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    linear = [k for k in sd if ".attn_1." in k and k.endswith(".weight") and sd[k].ndim == 4]
    assert len(linear) == 8  # encoder and decoder: q, k, v, proj_out
    for k in linear:
        sd[k] = sd[k][:, :, 0, 0].contiguous()
    save_file(sd, tmp_path / "converted.safetensors")
    loaded = load_model(tmp_path / "converted.safetensors", config=to_ldm_config(model.cfg))
    assert_same_weights(loaded, model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pipeline_reads_the_vae_encoder_when_it_first_encodes(tmp_path, tiny_models, dtype):
    """txt2img never runs the autoencoder's encoder: a generation pipeline leaves its weights in the file (meta
    tensors) until an image is encoded, then reads the file's numbers, in the model's dtype, the VAE attention
    stored as Linear weights reshaped as at load; a file changed in between is one clear error."""
    model = tiny_models["sd1"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.startswith("first_stage_model.encoder.mid.attn_1.") and sd[k].ndim == 4]:
        sd[k] = sd[k][:, :, 0, 0].contiguous()
    save_file(sd, tmp_path / "m.safetensors")
    pipeline = load_pipeline(tmp_path / "m.safetensors", dtype=dtype)
    autoencoder = pipeline.model.first_stage_model
    assert all(p.is_meta for p in [*autoencoder.encoder.parameters(), *autoencoder.quant_conv.parameters()])
    assert not any(p.is_meta for p in autoencoder.decoder.parameters())

    pipeline.model.to(torch.float64).to("cpu", dtype)  # (as a server's unload and reload move it) leaves it there
    assert autoencoder.encoder.conv_in.weight.is_meta and autoencoder.decoder.conv_in.weight.dtype == dtype
    image, noise = (torch.rand(1, 3, 32, 32) * 2 - 1).to(dtype), torch.randn(1, 4, 4, 4)
    whole = load_model(tmp_path / "m.safetensors", dtype=dtype)
    expected = whole.autoencoder_encode(image, noise=noise)
    assert torch.equal(pipeline.model.autoencoder_encode(image, noise=noise), expected)
    assert_same_weights(pipeline.model, whole)

    changed = load_pipeline(tmp_path / "m.safetensors")
    save_file({k: v for k, v in sd.items() if "encoder.conv_in" not in k}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="changed since it was loaded.*encoder.conv_in"):
        changed.model.autoencoder_encode(image, noise=noise)


def test_a_pipeline_keeps_a_half_precision_autoencoder_as_filed(tmp_path, tiny_models):
    """A float16 file's autoencoder in a float32 generation pipeline: its Conv weights and biases stay float16 (half
    the memory) and are cast to float32 as each layer runs, its norms are float32, and decoding and encoding give
    the float32 model's numbers exactly."""
    save_model(copy.deepcopy(tiny_models["sd1"]).half(), tmp_path / "half.safetensors")
    pipeline, whole = load_pipeline(tmp_path / "half.safetensors"), load_model(tmp_path / "half.safetensors")
    autoencoder = pipeline.model.first_stage_model
    assert autoencoder.decoder.conv_in.weight.dtype == autoencoder.post_quant_conv.bias.dtype == torch.float16
    assert (
        autoencoder.decoder.norm_out.weight.dtype
        == whole.first_stage_model.decoder.conv_in.weight.dtype
        == torch.float32
    )
    z, image, noise = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(pipeline.model.autoencoder_decode(z), whole.autoencoder_decode(z))
        assert torch.equal(pipeline.model.autoencoder_encode(image, noise), whole.autoencoder_encode(image, noise))
    assert (
        autoencoder.encoder.conv_in.weight.dtype == torch.float16
        and pipeline.model.unet.out[2].weight.dtype == torch.float32
    )


def test_sd2_converted_back_from_diffusers_loads(tmp_path, tiny_models):
    """An SD 2.x file converted back from diffusers has one text block fewer and no text_projection or logit_scale:
    the blocks it has are the ones SD 2.x uses, so it loads as their last layer and conditions exactly as the
    original. Read off the keys (full size, on the meta device) and run (tiny)."""
    with torch.device("meta"):
        sd = dict(LatentDiffusion(preset("sd-v2.1")).state_dict())
    prefix = "cond_stage_model.model."
    sd = {k: v for k, v in sd.items() if not k.startswith((prefix + "transformer.resblocks.23.", prefix + "text_projection",
                                                            prefix + "logit_scale"))}  # fmt: skip
    text = infer_config(sd).text
    assert (text.layers, text.layer, text.projection) == (23, "last", False)

    model = tiny_models["sd2"]  # 3 blocks, the penultimate layer
    last = f"{prefix}transformer.resblocks.{model.cfg.text.layers - 1}."
    converted = {k: v for k, v in model.state_dict().items()
                 if not k.startswith((last, prefix + "text_projection", prefix + "logit_scale"))}  # fmt: skip
    cfg = to_ldm_config(model.cfg)
    cfg["params"]["cond_stage_config"]["params"] |= {"layers": 2, "layer": "last", "projection": False}
    save_file(converted, tmp_path / "sd2-from-diffusers.safetensors")
    loaded = load_model(tmp_path / "sd2-from-diffusers.safetensors", config=cfg)
    with torch.no_grad():
        expected = encode_prompts(model, ["a red circle", ""])[0]["crossattn"]
        torch.testing.assert_close(encode_prompts(loaded, ["a red circle", ""])[0]["crossattn"], expected)


def test_sdxl_round_trips_with_and_without_our_metadata(tmp_path):
    """Our file (config in the metadata), and a plain state dict read with generative-models' YAML."""
    from conftest import tiny_config as config

    for i, variant in enumerate(("sdxl", "sdxl-refiner")):
        model = randomize(LatentDiffusion(config(variant)), seed=20 + i)
        save_model(model, tmp_path / f"{variant}.safetensors")
        loaded = load_model(tmp_path / f"{variant}.safetensors")
        assert loaded.cfg == model.cfg
        assert_same_weights(loaded, model)
        torch.save(model.state_dict(), tmp_path / f"{variant}.ckpt")
        (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump({"model": to_ldm_config(model.cfg)}))
        plain = load_model(tmp_path / f"{variant}.ckpt", config=tmp_path / f"{variant}.yaml")
        assert plain.cfg == model.cfg
        assert_same_weights(plain, model)


def test_load_pipeline_takes_the_files_beside_the_model_as_strings_or_paths(ckpt):
    """`load_pipeline(..., controlnets={"name": "file"})` from Python: the names map to Paths, as the CLI passes them
    (a str compares unequal to its Path)."""
    pipeline = load_pipeline(ckpt, loras={"a": str(ckpt)}, upscalers={"b": str(ckpt)}, controlnets={"c": ckpt})
    assert (pipeline.loras, pipeline.upscalers, pipeline.controlnets) == ({"a": ckpt}, {"b": ckpt}, {"c": ckpt})
