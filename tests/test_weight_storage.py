"""Weight storage (`weights/storage.py`): the U-Net's and text encoders' Linear and Conv weights kept in float8,
float16, bfloat16 or Q8_0 blocks and cast to float32 as each layer runs.

The reference is the float32 model itself with the same weights rounded to the stored form and back (`rounded`):
the stored model must compute exactly what it computes, since the only difference is where the cast happens. The
image differences against the unrounded float32 model are measured on the built-in model.
"""

import copy
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latent_diffusion import LatentDiffusion, load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.files import model_hash
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.infotext import parse_parameters
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.weights import ggml_quants
from latent_diffusion.weights import storage as storage_module
from latent_diffusion.weights.checkpoint import BUILTIN_MODEL, CheckpointError
from latent_diffusion.weights.ggml_quants import QuantizedConv2d, QuantizedLinear, dequantize, quantize_q8_0
from latent_diffusion.weights.lora import apply_lora, read_lora, remove_lora
from latent_diffusion.weights.storage import Q8_0, CastConv2d, CastLinear, cast, stored_keys

from conftest import outputs

E4M3, E5M2, F16, BF16 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16


def rounded(model: LatentDiffusion, keys: dict[str, torch.dtype | str]) -> LatentDiffusion:
    """A float32 copy of the model whose weights at `keys` are float32(stored(W)): the reference."""
    reference = copy.deepcopy(model)
    sd = reference.state_dict()
    reference.load_state_dict({k: round_trip(v, keys[k]) if k in keys else v for k, v in sd.items()})
    return reference


def round_trip(w: torch.Tensor, form: torch.dtype | str) -> torch.Tensor:
    if form == Q8_0:
        return dequantize(quantize_q8_0(w), "Q8_0", w.shape)  # tests/test_gguf.py checks both against gguf's
    return w.to(form).float()


def stored_bytes(model: LatentDiffusion, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the tensors in `dtype`, bytes those numbers would take in float32)."""
    stored = [t for t in model.state_dict().values() if t.dtype == dtype]
    return sum(t.nbytes for t in stored), sum(4 * t.numel() for t in stored)


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2, F16, BF16])
def test_stored_layers_are_narrow_and_compute_as_the_rounded_float32_model(files, variant, dtype):
    """Every Linear and Conv2d weight and bias of the U-Net and the text encoders (and OpenCLIP's fused in_proj) is
    in the stored dtype, a quarter (float8) or half (float16, bfloat16) of float32's bytes; norms, embeddings and the
    autoencoder stay float32; the keys are the same; and the text encoders' and U-Net's outputs equal the float32
    model's on the rounded weights, bit for bit (the same float32 numbers go through the same kernels)."""
    model, path = files[variant]
    fp8 = load_model(path, unet_weights_dtype=dtype, text_weights_dtype=dtype)
    keys = stored_keys(fp8, dtype, dtype)
    assert list(fp8.state_dict()) == list(model.state_dict())
    for k, t in fp8.state_dict().items():
        assert t.dtype == (dtype if k in keys else torch.float32), k
    assert all(k.endswith((".weight", ".bias", "in_proj_weight", "in_proj_bias")) for k in keys)
    assert not any(k.startswith("first_stage_model.") or ".norm" in k or "embedding" in k for k in keys)
    if variant == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    stored, as_float32 = stored_bytes(fp8, dtype)
    assert stored * 4 == as_float32 * dtype.itemsize > 0
    layers = [m for m in fp8.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    cast = [m for m in layers if isinstance(m, (CastLinear, CastConv2d))]
    assert len(cast) == sum(m.weight.dtype == dtype for m in layers) > 0
    assert fp8.dtype == torch.float32
    for ours, reference in zip(outputs(fp8), outputs(rounded(model, keys)), strict=True):
        assert torch.equal(ours, reference)


def test_one_part_alone(files):
    """--unet-weights-dtype alone leaves the text encoder in float32, and the other way round."""
    _, path = files["sd1"]
    unet_only = load_model(path, unet_weights_dtype=E4M3)
    text_only = load_model(path, text_weights_dtype=E5M2)
    assert {p.dtype for p in unet_only.cond_stage_model.parameters()} == {torch.float32}
    assert unet_only.unet.input_blocks[0][0].weight.dtype == E4M3
    assert {p.dtype for p in text_only.unet.parameters()} == {torch.float32}
    assert text_only.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype == E5M2


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_q8_0_layers_compute_as_the_dequantized_float32_model(files, variant):
    """Q8_0 storage, quantized at load: every Linear and Conv2d weight whose numbers fill blocks of 32 is held in
    GGML blocks (uint8, 34 bytes a block) by a quantized layer, its bias in float32, OpenCLIP's fused in_proj in
    float16, and so the token embeddings; the outputs equal the float32 model's on the dequantized weights, bit for bit; the state dict, what
    `save_model` writes, has float32 weights under the same keys."""
    model, path = files[variant]
    q8 = load_model(path, unet_weights_dtype=Q8_0, text_weights_dtype=Q8_0)
    keys = stored_keys(model, Q8_0, Q8_0)  # of the float32 model: a quantized weight is its blocks
    layers = [m for m in q8.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    quantized = [m for m in layers if isinstance(m, (QuantizedLinear, QuantizedConv2d))]
    plain = [m for m in layers if m not in quantized]
    assert quantized and all(m.weight.numel() % 32 != 0 and m.weight.dtype == torch.float32 for m in plain)
    assert all(m.weight.dtype == torch.uint8 and m.bias.dtype == torch.float32 for m in quantized if m.bias is not None)
    assert all(m.weight.shape == (m.weight_shape.numel() // 32, 34) for m in quantized)
    assert {keys[k] for k in keys if k.endswith("in_proj_weight")} <= {F16} and Q8_0 in keys.values()
    assert {keys[k] for k in keys if "embedding" in k} == {F16}  # the token embeddings, not the positions'
    assert {k for k in keys if "embedding" in k} == {k for k in model.state_dict() if "token_embedding" in k}
    assert list(q8.state_dict()) == list(model.state_dict()) and q8.dtype == torch.float32
    for ours, reference in zip(outputs(q8), outputs(rounded(model, keys)), strict=True):
        assert torch.equal(ours, reference)


def test_q8_0_weights_in_bfloat16_are_rounded_once_from_float32(files):
    """Under --dtype bfloat16 a Q8_0 weight is its float32 dequantization rounded to bfloat16 once, as `dequantize`
    makes it (not the int8 numbers and scale each rounded first)."""
    model = load_model(files["sd1"][1], dtype=torch.bfloat16, unet_weights_dtype=Q8_0)
    layers = [m for m in model.unet.modules() if isinstance(m, (QuantizedLinear, QuantizedConv2d))]
    assert layers
    with torch.no_grad():
        for m in layers:
            expected = dequantize(m.weight, "Q8_0", m.weight_shape, torch.bfloat16)
            assert torch.equal(ggml_quants.weight(m, torch.bfloat16), expected)


def test_the_cast_reuses_one_buffer_per_thread_outside_autograd():
    """Outside autograd a stored weight is cast into the thread's one reused buffer (module docstring); under
    autograd, and in another thread, into a tensor of its own; a layer's output is the same either way, and the
    gradient under autograd is the float32 layer's."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g).half(), torch.randn(16, 8, generator=g).half()
    with torch.no_grad():
        first = cast(a, torch.float32)
        assert torch.equal(first, a.float())
        assert cast(b, torch.float32).data_ptr() == first.data_ptr()  # the same memory, overwritten
        other = []
        worker = threading.Thread(target=lambda: other.append(cast(b, torch.float32).data_ptr()))
        worker.start(), worker.join()
        assert other[0] != first.data_ptr()
    assert cast(a, torch.float32).data_ptr() != cast(b, torch.float32).data_ptr()  # autograd: one each
    assert cast(a, torch.float16) is a
    layer, reference = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
    reference.weight.data = a.float()
    layer.weight.data, layer.bias.data = a, reference.bias.data
    layer.__class__ = CastLinear
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))
    layer(x).square().sum().backward()
    assert torch.equal(x.grad, torch.autograd.grad(reference(x).square().sum(), x)[0])


def test_image_differs_from_float32_by_little(tmp_path):
    """The built-in model's 64x64 image, 10 steps, U-Net and text encoder stored narrow: the mean absolute difference
    from float32's image, in [0, 1] pixels, measured 0.000022 for float16, 0.00018 for bfloat16, 0.00044 for Q8_0,
    0.0032 for e4m3fn and 0.0057 for e5m2 (0.8 and 1.5 levels of 255; largest pixel 0.085 and 0.079): in the order
    of their precision. Bounded at 0.015 (4 levels); only float8 writes the web UI's "FP8 weight" field."""
    request = GenerationRequest(["a red square on a blue background"], [3], steps=10)
    reference = generate(load_pipeline(BUILTIN_MODEL), request).images
    diffs = {}
    for form in (F16, BF16, Q8_0, E4M3, E5M2):
        result = generate(load_pipeline(BUILTIN_MODEL, unet_weights_dtype=form, text_weights_dtype=form), request)
        diffs[form] = (result.images - reference).abs().mean().item()
        assert ("FP8 weight: Enable" in result.infotexts[0]) == (form in (E4M3, E5M2))
    assert 0 < diffs[F16] < diffs[BF16] < diffs[Q8_0] < diffs[E4M3] < diffs[E5M2] < 0.015, diffs


def test_fp8_file_loads_as_it_is_or_in_float32(files, tmp_path):
    """A file whose Linear/Conv weights are float8 tensors, as the web UI's and ComfyUI's fp8 files, without our
    config metadata: read into float32 where no fp8 storage is asked for (the same numbers), kept as the file's
    very bytes where it is, and either way the same outputs. Saving an fp8 model writes such a file."""
    model, _ = files["sd2"]
    keys = stored_keys(model, E4M3, E4M3)
    path = tmp_path / "fp8.safetensors"
    save_file({k: v.to(keys[k]) if k in keys else v for k, v in model.state_dict().items()}, path)
    cfg = model.cfg
    as_float32 = load_model(path, cfg)
    as_fp8 = load_model(path, cfg, unet_weights_dtype=E4M3, text_weights_dtype=E4M3)
    reference = rounded(model, keys)
    for k, t in as_float32.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, reference.state_dict()[k]), k
    file_tensors = load_file(path)
    for k in keys:
        assert as_fp8.state_dict()[k].view(torch.uint8).equal(file_tensors[k].view(torch.uint8)), k
    for a, b in zip(outputs(as_float32), outputs(as_fp8), strict=True):
        assert torch.equal(a, b)
    saved = tmp_path / "saved.safetensors"
    save_model(as_fp8, saved)
    again = load_model(saved, unet_weights_dtype=E4M3, text_weights_dtype=E4M3)
    assert all(again.state_dict()[k].view(torch.uint8).equal(as_fp8.state_dict()[k].view(torch.uint8)) for k in keys)


def kohya(path, model: LatentDiffusion, names: list[str], seed: int):
    """A kohya-ss LoRA of rank 4 and α = 2 on these Linear layers ("unet.<CompVis path>", "text_encoder.<transformers
    path>" of a width-32 encoder) -> (its file, {name: ΔW at strength 1})."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for name in names:
        part, _, module = name.partition(".")
        out_features, in_features = (
            (32, 32) if part == "text_encoder" else model.unet.get_submodule(module).weight.shape
        )
        down, up = torch.randn(4, in_features, generator=g) * 0.3, torch.randn(out_features, 4, generator=g) * 0.3
        key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + module.replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        deltas[name] = 0.5 * up @ down
    save_file(sd, path)
    return path, deltas


def test_lora_merges_in_float32_and_comes_off_bit_for_bit(files, tmp_path):
    """A LoRA on float8-stored layers: each merged weight is float32(float8(W)) + ΔW in float32 (not rounded back to
    float8), so the model computes what the rounded float32 model with the same LoRA computes, exactly; removing it
    puts back the very float8 tensors. SD 2.x, to cover a LoRA's q_proj in a third of OpenCLIP's fused in_proj."""
    model, path = files["sd2"]
    fp8 = load_model(path, unet_weights_dtype=E4M3, text_weights_dtype=E4M3)
    reference = rounded(model, stored_keys(fp8, E4M3, E4M3))
    text = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    lora_path, deltas = kohya(tmp_path / "lora.safetensors", fp8, ["unet.middle_block.1.proj_in", text], seed=1)
    before = {k: (v, v.clone(), v.data_ptr()) for k, v in fp8.state_dict().items()}
    applied = apply_lora(fp8, read_lora(lora_path), 1.0)
    applied_reference = apply_lora(reference, read_lora(lora_path), 1.0)
    proj_in = "model.diffusion_model.middle_block.1.proj_in.weight"
    merged = fp8.state_dict()[proj_in]
    assert merged.dtype == torch.float32
    expected = before[proj_in][1].float() + deltas["unet.middle_block.1.proj_in"].reshape(merged.shape)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    in_proj = fp8.state_dict()["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.dtype == torch.float32
    for ours, theirs in zip(outputs(fp8), outputs(reference), strict=True):
        assert torch.equal(ours, theirs)
    remove_lora(fp8, applied)
    remove_lora(reference, applied_reference)
    for k, (_, copy_, ptr) in before.items():
        after = fp8.state_dict()[k]
        assert after.dtype == copy_.dtype and after.data_ptr() == ptr, k
        assert after.view(torch.uint8).equal(copy_.view(torch.uint8)) if after.dtype == E4M3 else after.equal(copy_)


def run(*args) -> int:
    return main([str(a) for a in args])


def test_txt2img_writes_the_fp8_field(files, tmp_path):
    """--unet-weights-dtype and --text-weights-dtype run, and the infotext names fp8 storage as the web UI does."""
    _, path = files["sd1"]
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", path, "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 2,
               "--seed", 1, "--unet-weights-dtype", "fp8_e4m3fn", "--text-weights-dtype", "fp8_e5m2",
               "--quiet", "--outdir", out) == 0  # fmt: skip
    with Image.open(out / "00001-1.png") as im:
        params = parse_parameters(im.text["parameters"])
    assert list(params)[-3:] == ["Model hash", "Model", "FP8 weight"]  # after Model, as the web UI orders it
    assert params["FP8 weight"] == "Enable" and params["Model hash"] == model_hash(path)


@pytest.mark.parametrize("command", ["txt2img", "serve"])
@pytest.mark.parametrize("flag", ["--unet-weights-dtype", "--text-weights-dtype"])
def test_bad_values_exit_2_in_one_line(tmp_path, capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--prompt", "x", flag, "fp8", "--outdir", tmp_path / "out")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    choices = "'fp8_e4m3fn', 'fp8_e5m2', 'float16', 'bfloat16', 'q8_0'"
    assert f"argument {flag}: invalid choice: 'fp8' (choose from {choices})" in err
    assert not (tmp_path / "out").exists()


def test_a_device_without_float8_exits_2_writing_nothing(files, tmp_path, capsys, monkeypatch):
    """Where torch cannot hold float8 on the device (MPS: its error below), one line and exit 2, and no folder is
    left behind; the library raises CheckpointError."""
    storage_module.check_device("cpu")  # torch 2.13 stores float8 on the CPU

    def mps(device):
        raise TypeError(
            "Trying to convert Float8_e4m3fn to the MPS backend but it does not have support for that dtype."
        )

    monkeypatch.setattr(storage_module, "_round_trip", mps)
    _, path = files["sd1"]
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", path, "--prompt", "x", "--unet-weights-dtype", "fp8_e4m3fn", "--outdir", out) == 2
    err = capsys.readouterr().err
    assert "fp8 weight storage: this torch cannot hold float8 numbers on cpu (Trying to convert" in err
    assert err.count("\n") == 1 and not out.exists()
    with pytest.raises(CheckpointError, match="cannot hold float8"):
        load_model(path, text_weights_dtype=E5M2)
    assert load_model(path).dtype == torch.float32  # nothing asked of float8: no check
