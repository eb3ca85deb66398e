"""GGUF files (`weights/gguf_files.py`, `weights/ggml_quants.py`, `weights/gguf_convert.py`): city96's quantized
U-Nets beside a checkpoint, stable-diffusion.cpp's whole models, and `ldm convert --to gguf`.

The references are independent of our reader: the gguf package's own writer makes the files, its reader and numpy
dequantizer (`gguf.quants.dequantize`) give the numbers each tensor holds, and the float32 "twin" is the float32
model with its weights replaced by those numbers. A GGUF model must compute exactly what its twin computes (the
only difference is where the dequantization happens); against the float32 model it was made from, each weight
must lie within its format's step, and the output error is measured (in the docstrings).
"""

import copy
import struct

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusion, load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.models.family import family_of_keys
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.weights import ggml_quants
from latent_diffusion.weights.checkpoint import BUILTIN_MODEL, CheckpointError
from latent_diffusion.weights.ggml_quants import QuantizedConv2d, QuantizedLinear, dequantize
from latent_diffusion.weights.gguf_convert import convert_to_gguf
from latent_diffusion.weights.gguf_files import read_gguf
from latent_diffusion.weights.lora import apply_lora, read_lora, remove_lora
from latent_diffusion.weights.storage import CastConv2d, CastLinear

from conftest import outputs

UNET = "model.diffusion_model."
QT = gguf.GGMLQuantizationType
LEGACY = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
K_QUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
SCALES = {  # where each block keeps its f16 scales (and mins): random bytes there could be inf or NaN
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_blocks(qtype: str, n_blocks: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Random blocks of a quantized type whose f16 scales are finite numbers of about `scale`."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, gguf.GGML_QUANT_SIZES[QT[qtype]][1]), dtype=np.uint8)
    for at in SCALES[qtype]:
        blocks[:, at : at + 2] = (rng.normal(size=(n_blocks, 1)) * scale).astype(np.float16).view(np.uint8)
    return blocks


def file_numbers(path) -> dict[str, torch.Tensor]:
    """What a GGUF file holds, by its own key, read by the gguf package and dequantized by its numpy code, in the
    shape the file records (city96's `comfy.gguf.orig_shape.<key>` where there is one)."""
    reader = gguf.GGUFReader(path)
    numbers = {}
    for t in reader.tensors:
        shape = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = shape.contents() if shape is not None else list(reversed(t.shape.tolist()))
        numbers[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape)
    return numbers


def twin(model: LatentDiffusion, numbers: dict[str, torch.Tensor]) -> LatentDiffusion:
    """A float32 copy of the model with the weights at these keys replaced by these numbers."""
    reference = copy.deepcopy(model)
    sd = reference.state_dict()
    reference.load_state_dict({k: numbers[k].reshape(v.shape) if k in numbers else v for k, v in sd.items()})
    return reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# The block formats -------------------------------------------------------------------------------------------------


def test_q8_0_and_q4_0_as_the_format_writes_them():
    """Q8_0 and Q4_0 blocks written out by hand from the format (blocks of 32 numbers: an f16 scale, then 32 int8
    for Q8_0, or 16 bytes of 4-bit numbers for Q4_0, numbers 0-15 in the low nibbles and 16-31 in the high): they
    are the very bytes the gguf package's quantizer writes, and they dequantize to d·q and d·(q − 8) exactly."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    blocks = w.reshape(-1, 32)  # (8, 32)

    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / 127
    x = blocks * (1 / d)
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)  # C's roundf: halves away from zero
    d16 = d.half()
    q8_0 = torch.cat([d16.view(torch.uint8), q.view(torch.uint8)], dim=1)  # (8, 34)
    assert np.array_equal(q8_0.numpy(), gguf.quants.quantize(w.numpy(), QT.Q8_0).reshape(-1, 34))
    assert torch.equal(dequantize(q8_0, "Q8_0", w.shape), (d16.float() * q.float()).reshape(w.shape))
    assert torch.equal(ggml_quants.quantize_q8_0(w), q8_0)  # `--unet-weights-dtype q8_0`'s quantizer, in torch
    edges = torch.zeros(2, 32)  # a block of zeros (d = 0), and one of halves (d = 1): each rounds away from 0
    edges[1] = torch.arange(-16, 16) + 0.5
    edges[1, 0] = 127
    assert np.array_equal(ggml_quants.quantize_q8_0(edges).numpy(), gguf.quants.quantize(edges.numpy(), QT.Q8_0))

    signed_max = torch.gather(blocks, 1, blocks.abs().argmax(dim=1, keepdim=True))
    d = signed_max / -8
    q = torch.trunc(blocks * (1 / d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    d16 = d.half()
    q4_0 = torch.cat([d16.view(torch.uint8), packed], dim=1)  # (8, 18)
    assert np.array_equal(q4_0.numpy(), gguf.quants.quantize(w.numpy(), QT.Q4_0).reshape(-1, 18))
    expected = d16.float() * (q.float() - 8)
    assert torch.equal(dequantize(q4_0, "Q4_0", w.shape), expected.reshape(w.shape))
    assert ((expected - blocks).abs() <= (1 + 2**-8) * signed_max.abs() / 8).all()  # a step of its block, at most


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS)
def test_dequantization_equals_the_gguf_packages(qtype):
    """Random blocks of each type ComfyUI-GGUF dequantizes in torch: ours, in torch, give the very numbers of the
    gguf package's numpy dequantizer (bit for bit: the same float32 products in the same order)."""
    blocks = random_blocks(qtype, 64, seed=1)
    reference = gguf.quants.dequantize(blocks, QT[qtype])
    ours = dequantize(torch.from_numpy(blocks), qtype, reference.shape)
    assert ours.dtype == torch.float32 and np.array_equal(ours.numpy(), reference)
    assert dequantize(torch.from_numpy(blocks), qtype, reference.shape, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS)
def test_each_quantized_layer_computes_as_its_dequantized_twin(qtype):
    """A Linear and a Conv2d holding GGML blocks: the blocks stay uint8 in memory, and the output is the float32
    layer's with the dequantized weight, bit for bit."""
    g = torch.Generator().manual_seed(2)
    linear, conv = torch.nn.Linear(256, 24), torch.nn.Conv2d(32, 16, 3, padding=1)  # 32·3·3·16 = 18·256 numbers
    for i, layer in enumerate((linear, conv)):
        blocks = torch.from_numpy(random_blocks(qtype, layer.weight.numel() // gguf.GGML_QUANT_SIZES[QT[qtype]][0], i))
        reference = copy.deepcopy(layer)
        reference.weight.data = dequantize(blocks, qtype, layer.weight.shape)
        ggml_quants.quantize_layer(layer, qtype, layer.weight.shape, torch.float32)
        layer.load_state_dict({"weight": blocks, "bias": reference.bias.data})
        assert type(layer) in (QuantizedLinear, QuantizedConv2d) and layer.weight.dtype == torch.uint8
        assert layer.weight.data_ptr() == blocks.data_ptr()
        x = torch.randn(2, 256, generator=g) if i == 0 else torch.randn(2, 32, 8, 8, generator=g)
        with torch.no_grad():  # dequantized into the thread's reused buffer (Q8_0) or a tensor of its own
            assert torch.equal(layer(x), reference(x))
        x.requires_grad_(True)  # under autograd, a tensor of its own, which the backward pass keeps
        layer(x).square().sum().backward()
        expected = torch.autograd.grad(reference(x).square().sum(), x)[0]
        assert torch.equal(x.grad, expected)
        assert torch.equal(layer.state_dict()["weight"], reference.weight)  # what save_model would write


# city96's U-Nets ---------------------------------------------------------------------------------------------------


def step_bound(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The largest error the format allows each number of `w` (in blocks of 32 in memory order): for a block of 32
    with values in [lo, hi] and largest magnitude a, Q8_0 rounds to steps of a/127 and Q5_1, Q4_1 to (hi − lo)/31,
    /15 (half a step, and a little for the f16 scale and min); Q5_0 and Q4_0 to a/16, a/8, the number farthest from
    zero on the other side clipped by up to one step; F16 and BF16 to their mantissa (F16's subnormals to 2⁻²⁴)."""
    if qtype in ("F32", "F16", "BF16"):
        return w.abs() * {"F32": 0.0, "F16": 2**-11, "BF16": 2**-8}[qtype] + (2**-25 if qtype == "F16" else 0)
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    a = blocks.abs().amax(dim=1, keepdim=True)
    bound = {
        "Q8_0": 0.57 * a / 127,
        "Q5_1": 0.52 * (hi - lo) / 31 + lo.abs() * 2**-10,
        "Q4_1": 0.52 * (hi - lo) / 15 + lo.abs() * 2**-10,
        "Q5_0": (1 + 2**-7) * a / 16,  # 16 steps of d: f16's rounding of d moves the clipped end by 16·d·2⁻¹¹
        "Q4_0": (1 + 2**-8) * a / 8,
    }[qtype]
    return bound.expand_as(blocks).reshape(w.shape)


@pytest.mark.parametrize(
    ("variant", "quant"),
    [("sd1", q) for q in [*LEGACY, "F16", "BF16", "F32"]] + [(v, q) for v in ("sd2", "sdxl") for q in ("Q8_0", "Q4_0")],
)
def test_converted_unet_loads_beside_its_checkpoint(files, tmp_path, variant, quant):
    """`convert_to_gguf` writes the U-Net with the gguf package's writer in city96's layout; loaded beside the
    checkpoint (which brings the VAE and text encoders), each weight keeps its type (quantized layers hold uint8
    blocks, F16/BF16 layers cast as they run), lies within its format's step of the float32 weight, and the model
    computes exactly what its float32 twin computes. The U-Net output's relative error against the float32 model,
    on these random tiny weights (every type on SD 1.x, Q8_0 and Q4_0 on 2.x and SDXL), measured over SD 1.x, 2.x
    and SDXL in two runs (the random init differs): Q8_0 0.017-0.022, Q5_1 0.12-0.15, Q5_0 0.14-0.17, Q4_1
    0.26-0.29, Q4_0 0.28-0.31, F16 0.0008-0.0009, BF16 0.0067-0.0074, F32 0; bounded at about twice those."""
    model, path = files[variant]
    out = tmp_path / f"unet-{quant}.gguf"
    result = convert_to_gguf(path, out, quant)
    numbers = file_numbers(out)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert result.types == {t: list(types.values()).count(t) for t in set(types.values())}
    loaded = load_model(path, unet_gguf=out)
    assert ggml_quants.storage(loaded.unet) == {t: n for t, n in result.types.items() if t in LEGACY}
    original = model.state_dict()
    for key, qtype in types.items():
        w, layer = original[UNET + key], loaded.unet.get_submodule(key.rpartition(".")[0])
        assert (numbers[key].reshape(w.shape) - w).abs().le(step_bound(w, qtype)).all(), key
        stored = layer.weight if key.endswith("weight") else layer.bias
        if qtype in LEGACY:
            assert isinstance(layer, (QuantizedLinear, QuantizedConv2d)) and stored.dtype == torch.uint8, key
        elif qtype in ("F16", "BF16") and key.endswith("weight"):
            assert isinstance(layer, (CastLinear, CastConv2d)) and stored.dtype == ggml_quants.FLOATS[qtype], key
        else:
            assert stored.dtype == torch.float32, key
    reference = twin(model, {UNET + k: v for k, v in numbers.items()})
    ours, theirs, exact = outputs(loaded), outputs(reference), outputs(model)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    bound = {"Q8_0": 0.045, "Q5_1": 0.3, "Q5_0": 0.35, "Q4_1": 0.6, "Q4_0": 0.6, "F16": 0.002, "BF16": 0.015}
    assert relative_error(ours[-1], exact[-1]) <= bound.get(quant, 0)


def test_the_file_is_in_city96s_layout(files, tmp_path):
    """What ComfyUI-GGUF's loader reads: its architecture key (sd1 for SD 1.x and 2.x, sdxl), the U-Net's keys
    without model.diffusion_model., F32 norms and biases, the 3x3 convolutions reshaped to rows of 256 with their
    shape in comfy.gguf.orig_shape, the feed-forward output one step finer for Q4_0, the file type."""
    for variant, architecture in (("sd1", "sd1"), ("sd2", "sd1"), ("sdxl", "sdxl")):
        out = tmp_path / f"{variant}.gguf"
        convert_to_gguf(files[variant][1], out, "Q4_0")
        reader = gguf.GGUFReader(out)
        assert reader.get_field("general.architecture").contents() == architecture
        assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_0
        tensors = {t.name: t for t in reader.tensors}
        assert "input_blocks.0.0.weight" in tensors and not any(k.startswith(UNET) for k in tensors)
        conv = "input_blocks.1.0.in_layers.2.weight"  # (32, 32, 3, 3)
        assert reader.get_field(f"comfy.gguf.orig_shape.{conv}").contents() == [32, 32, 3, 3]
        assert tensors[conv].shape.tolist() == [256, 36] and tensors[conv].tensor_type == QT.Q4_0
        assert tensors["input_blocks.1.0.in_layers.0.weight"].tensor_type == QT.F32  # a GroupNorm's
        ff = next(k for k in tensors if k.endswith("ff.net.2.weight"))
        assert tensors[ff].tensor_type == QT.Q4_1


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_unet_loads_as_its_twin(files, tmp_path, qtype):
    """The gguf package has no K-quant quantizer, so a city96 file of random K-quant blocks (every weight of whole
    super-blocks, reshaped to rows of 256 as his tools do; small ones F32) written with its writer: loaded beside the
    checkpoint, the model computes exactly what the float32 model with the gguf package's dequantized numbers
    computes."""
    model, path = files["sd1"]
    writer = gguf.GGUFWriter(path=None, arch="sd1")
    for i, (key, w) in enumerate(k for k in model.state_dict().items() if k[0].startswith(UNET)):
        name, n = key.removeprefix(UNET), w.numel()
        if w.ndim > 1 and n % 256 == 0:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(w.shape))
            writer.add_tensor(name, random_blocks(qtype, n // 256, seed=i, scale=1e-3), raw_dtype=QT[qtype])
        else:
            writer.add_tensor(name, w.numpy())
    out = tmp_path / f"{qtype}.gguf"
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_model(path, unet_gguf=out)
    assert ggml_quants.storage(loaded.unet)[qtype] > 20
    reference = twin(model, {UNET + k: v for k, v in file_numbers(out).items()})
    for a, b in zip(outputs(loaded), outputs(reference), strict=True):
        assert torch.equal(a, b)


# stable-diffusion.cpp's whole models -------------------------------------------------------------------------------

HF_CLIP = (  # OpenCLIP's names -> transformers' CLIP names, as stable-diffusion.cpp's name_conversion.cpp writes them
    ("transformer.resblocks.", "encoder.layers."), ("attn.in_proj_weight", "self_attn.in_proj.weight"),
    ("attn.in_proj_bias", "self_attn.in_proj.bias"), ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
    ("ln_final.", "final_layer_norm."), ("positional_embedding", "embeddings.position_embedding.weight"),
    ("token_embedding.", "embeddings.token_embedding."),
)  # fmt: skip


def sdcpp_name(key: str) -> str | None:
    """stable-diffusion.cpp's `--convert-name` name of a key (None: a tensor it leaves out)."""
    if key.endswith(".model.logit_scale"):
        return None
    prefixes = (
        ("conditioner.embedders.0.transformer.text_model.", "cond_stage_model.transformer.text_model.", False),
        ("conditioner.embedders.1.model.", "cond_stage_model.1.transformer.text_model.", True),
        ("cond_stage_model.model.", "cond_stage_model.transformer.text_model.", True),
    )
    for ours, theirs, openclip in prefixes:
        if key.startswith(ours):
            rest = key.removeprefix(ours)
            for a, b in HF_CLIP if openclip else ():
                rest = rest.replace(a, b)
            return theirs + rest
    return key


def sdcpp_type(key: str, w: torch.Tensor) -> str:
    """stable-diffusion.cpp's `--type q8_0`: every tensor whose first ggml dimension (torch's last) is whole blocks,
    but biases, embeddings and the U-Net's time and label embeddings; the others as the file had them."""
    if (
        w.ndim == 0
        or w.shape[-1] % 32
        or key.endswith(".bias")
        or "embedding" in key
        or "time_embed." in key
        or "label_emb." in key
    ):
        return "F32"
    return "Q8_0"


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("convert_name", [False, True])
def test_stable_diffusion_cpp_whole_model_loads(files, tmp_path, variant, convert_name):
    """A whole model in stable-diffusion.cpp's layout (no architecture key, its choice of Q8_0 tensors: norms
    included, 3x3 convolutions and biases not), with the checkpoint's names or with `--convert-name`'s (SD 2.x's
    OpenCLIP and SDXL's text encoders renamed to transformers' CLIP names, OpenCLIP's logit_scale left out): it
    loads as a checkpoint, and its text encoders and U-Net compute exactly what the float32 model with the file's
    numbers computes. SDXL's proj_in/proj_out stored as (c, c, 1, 1), as sd.cpp stores them, fit. (The tiny model's
    config is given: its head counts are not those the shapes of real models imply.)"""
    model, _ = files[variant]
    writer = gguf.GGUFWriter(path=None, arch="")  # an empty name writes no general.architecture
    numbers = {}
    for key, w in model.state_dict().items():
        name = sdcpp_name(key) if convert_name else key
        if key.endswith(".model.logit_scale"):  # left out by its converter, whatever the names
            continue
        data = w.numpy()
        if variant == "sdxl" and key.endswith((".proj_in.weight", ".proj_out.weight")):
            data = data.reshape(*data.shape, 1, 1)
        qtype = sdcpp_type(key, torch.from_numpy(data))
        writer.add_tensor(name, gguf.quants.quantize(data, QT[qtype]), raw_dtype=QT[qtype])
        numbers[key] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, QT[qtype]), QT[qtype]))
    out = tmp_path / f"{variant}-q8_0.gguf"
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = read_gguf(out)
    assert set(tensors) == set(model.state_dict()) and family_of_keys(tensors) == model.cfg.family  # names mapped back
    loaded = load_model(out, model.cfg)  # with the tiny model's head counts, which no weight shape shows
    assert ggml_quants.storage(loaded.unet)["Q8_0"] > 20
    assert sum(ggml_quants.storage(e).get("Q8_0", 0) for e in loaded.text_encoders) > 5
    for a, b in zip(outputs(loaded), outputs(twin(model, numbers)), strict=True):
        assert torch.equal(a, b)


# Through the pipeline and the command line -------------------------------------------------------------------------


def run(*args) -> int:
    return main([str(a) for a in args])


def test_ldm_convert_makes_a_file_that_loads_back(files, tmp_path, capsys):
    """`ldm convert --to gguf --quant Q8_0` writes MODEL-Q8_0.gguf beside it; `ldm info` and `ldm txt2img` take it
    with --unet-gguf, and the image's infotext names the checkpoint; a model loaded so saves as a float32 file of
    the dequantized weights that loads back to the same outputs."""
    _, path = files["sd1"]
    source = tmp_path / "model.safetensors"
    source.write_bytes(path.read_bytes())
    assert run("convert", source, "--to", "gguf", "--quant", "Q8_0") == 0
    out = tmp_path / "model-Q8_0.gguf"
    assert out.is_file() and f"wrote {out} (sd1, " in capsys.readouterr().out
    assert run("info", source, "--unet-gguf", out) == 0
    assert "U-Net layers in GGUF blocks, dequantized as they run: 87 Q8_0" in capsys.readouterr().out
    images = tmp_path / "images"
    assert run("txt2img", "--ckpt", source, "--unet-gguf", out, "--prompt", "a cat", "--width", 32, "--height", 32,
               "--steps", 2, "--seed", 1, "--quiet", "--outdir", images) == 0  # fmt: skip
    with Image.open(images / "00001-1.png") as im:
        assert "Model: model" in im.text["parameters"]
    loaded = load_model(source, unet_gguf=out)
    save_model(loaded, tmp_path / "dequantized.safetensors")
    again = load_model(tmp_path / "dequantized.safetensors")
    assert ggml_quants.storage(again) == {} and {p.dtype for p in again.parameters()} == {torch.float32}
    for a, b in zip(outputs(loaded), outputs(again), strict=True):
        assert torch.equal(a, b)


def test_fp8_text_encoder_beside_a_gguf_unet(files, tmp_path):
    """--text-weights-dtype applies to the checkpoint's text encoder beside a GGUF U-Net: both stored small at once,
    and the model computes what the float32 model with both formats' numbers computes."""
    model, path = files["sd1"]
    out = convert_to_gguf(path, tmp_path / "unet.gguf", "Q8_0").path
    both = load_model(path, unet_gguf=out, text_weights_dtype=torch.float8_e4m3fn)
    fc1 = both.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1
    assert fc1.weight.dtype == torch.float8_e4m3fn and ggml_quants.storage(both.unet)["Q8_0"] == 87
    numbers = {UNET + k: v for k, v in file_numbers(out).items()}
    numbers |= {k: v.float() for k, v in both.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    for a, b in zip(outputs(both), outputs(twin(model, numbers)), strict=True):
        assert torch.equal(a, b)


def kohya(path, names: list[tuple[str, int, int]], seed: int) -> tuple:
    """A kohya-ss LoRA of rank 4, α 2 on these U-Net Linear layers (CompVis path, in, out) -> (file, {path: ΔW})."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for name, in_features, out_features in names:
        down, up = torch.randn(4, in_features, generator=g) * 0.3, torch.randn(out_features, 4, generator=g) * 0.3
        key = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        deltas[name] = 0.5 * up @ down
    save_file(sd, path)
    return path, deltas


def test_lora_merges_onto_quantized_layers_and_comes_off(files, tmp_path):
    """A LoRA on layers held in Q4_0 blocks, merged as on float8 ones (`weights/lora.py`): the merged weight is the
    dequantized one plus ΔW in float32, so the model computes what its float32 twin with the same LoRA computes,
    exactly; removing it puts back the very blocks."""
    model, path = files["sd1"]
    out = tmp_path / "unet.gguf"
    convert_to_gguf(path, out, "Q4_0")
    loaded = load_model(path, unet_gguf=out)
    reference = twin(model, {UNET + k: v for k, v in file_numbers(out).items()})
    ff = "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # Linear 32 -> 256, in Q4_0
    assert ggml_quants.is_quantized(loaded.unet.get_submodule(ff))
    lora, deltas = kohya(tmp_path / "lora.safetensors", [(ff, 32, 256)], seed=3)
    before = {k: (p, p.data.clone(), p.data_ptr()) for k, p in loaded.named_parameters()}
    applied, applied_reference = apply_lora(loaded, read_lora(lora)), apply_lora(reference, read_lora(lora))
    merged = loaded.unet.get_submodule(ff).weight
    assert merged.dtype == torch.float32 and merged.shape == (256, 32)
    torch.testing.assert_close(merged, reference.unet.get_submodule(ff).weight, rtol=0, atol=0)
    expected = dequantize(before[f"{UNET}{ff}.weight"][1], "Q4_0", (256, 32)) + deltas[ff]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    for a, b in zip(outputs(loaded), outputs(reference), strict=True):
        assert torch.equal(a, b)
    remove_lora(loaded, applied)
    remove_lora(reference, applied_reference)
    for k, p in loaded.named_parameters():
        _, copy_, ptr = before[k]
        assert p.data_ptr() == ptr and p.dtype == copy_.dtype and torch.equal(p.data, copy_), k


def test_image_differs_from_float32_by_little(tmp_path):
    """The built-in model's 64x64 image, 10 steps, its U-Net from a Q8_0 and a Q4_0 GGUF file: the mean absolute
    difference from float32's image, in [0, 1] pixels, measured 0.00038 (Q8_0) and 0.0080 (Q4_0), 0.1 and 2.0 levels
    of 255 (largest pixel 0.006 and 0.088; Q5_1 0.0032, Q5_0 0.0046, Q4_1 0.0052, F16 0.00002); bounded at 0.002 and
    0.03."""
    request = GenerationRequest(["a red square on a blue background"], [3], steps=10)
    reference = generate(load_pipeline(BUILTIN_MODEL), request).images
    diffs = {}
    for quant in ("Q8_0", "Q4_0"):
        out = convert_to_gguf(BUILTIN_MODEL, tmp_path / f"builtin-{quant}.gguf", quant).path
        images = generate(load_pipeline(BUILTIN_MODEL, unet_gguf=out), request).images
        diffs[quant] = (images - reference).abs().mean().item()
    assert 0 < diffs["Q8_0"] < 0.002 and diffs["Q8_0"] < diffs["Q4_0"] < 0.03, diffs


# Bad input ---------------------------------------------------------------------------------------------------------


def write_gguf(path, arch: str | None, tensors: dict[str, tuple[np.ndarray, str]]):
    writer = gguf.GGUFWriter(path=None, arch=arch or "")  # an empty name writes no general.architecture
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=QT[qtype])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def with_type_id(path, name: str, type_id: int):
    """The GGUF file with one tensor's GGML type id in its header replaced (after the name: n_dims, dims, type)."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))
    return path


def bad_files(files, tmp_path) -> dict[str, tuple[list, str]]:
    """name -> (the txt2img flags, what the one line says)."""
    sd1, sd2, sdxl = (files[v][1] for v in ("sd1", "sd2", "sdxl"))
    conv = np.zeros((32, 4, 3, 3), np.float32)
    flux = write_gguf(tmp_path / "flux.gguf", "flux", {"img_in.weight": (np.zeros((64, 64), np.float32), "F32")})
    unknown = write_gguf(tmp_path / "unknown.gguf", "sd1", {"input_blocks.0.0.weight": (conv, "F32")})
    with_type_id(unknown, "input_blocks.0.0.weight", 99)
    tq = gguf.quants.quantize(np.zeros((32, 256), np.float32), QT.TQ2_0)
    tq2 = write_gguf(tmp_path / "tq2.gguf", "sd1", {"input_blocks.0.0.weight": (tq, "TQ2_0")})
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    unets = {}
    for variant, path in (("sd2", sd2), ("sdxl", sdxl), ("sd1", sd1)):
        unets[variant] = convert_to_gguf(path, tmp_path / f"{variant}-unet.gguf", "Q8_0").path
    return {
        "architecture": (["--ckpt", sd1, "--unet-gguf", flux], "a GGUF file of architecture 'flux'"),
        "unknown type": (["--ckpt", sd1, "--unet-gguf", unknown], "a tensor of an unknown GGML quantization type (99)"),
        "unread type": (["--ckpt", sd1, "--unet-gguf", tq2], "is TQ2_0, a GGML type this project does not read"),
        "not gguf": (["--ckpt", sd1, "--unet-gguf", tmp_path / "text.gguf"], "not a readable GGUF file"),
        "sd2 unet": (["--ckpt", sd1, "--unet-gguf", unets["sd2"]], "a U-Net for another model (linear projections"),
        "sdxl unet": (["--ckpt", sd1, "--unet-gguf", unets["sdxl"]], "not for the SD 1.x checkpoint"),
        "sd1 unet": (["--ckpt", sdxl, "--unet-gguf", unets["sd1"]], "not for the SDXL checkpoint"),
        "alone": (["--ckpt", unets["sd1"]], "a GGUF U-Net alone: load it as unet_gguf (--unet-gguf)"),
        "fp8": (["--ckpt", sd1, "--unet-gguf", unets["sd1"], "--unet-weights-dtype", "fp8_e4m3fn"],
                "weight storage applies to a checkpoint's weights, not a GGUF file's"),
        "ema": (["--ckpt", sd1, "--unet-gguf", unets["sd1"], "--ema"], "a GGUF file holds no EMA copy"),
    }  # fmt: skip


def test_bad_gguf_input_exits_2_in_one_line_writing_nothing(files, tmp_path, capsys):
    """A GGUF file of an unknown architecture, of a GGML type no reader knows or one this project does not read, a
    file named .gguf that is not one, a U-Net of another family than the checkpoint beside it, a U-Net alone as the
    checkpoint, fp8 storage or EMA asked of it: one line, exit 2, no output folder; the library raises
    CheckpointError."""
    for name, (flags, message) in bad_files(files, tmp_path).items():
        out = tmp_path / "out"
        assert run("txt2img", *flags, "--prompt", "x", "--steps", 1, "--outdir", out) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("ldm: error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert not out.exists(), name
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_model(files["sd1"][1], unet_gguf=tmp_path / "text.gguf")


def test_bad_convert_input_exits_2_writing_nothing(files, tmp_path, capsys):
    """ldm convert: an output that is not .gguf, a file with no U-Net (an autoencoder alone), a missing file: one
    line, exit 2, nothing written."""
    model, path = files["sd1"]
    vae = tmp_path / "vae.safetensors"
    save_file(model.first_stage_model.state_dict(), vae)
    cases = [
        ([path, "--to", "gguf", "--out", tmp_path / "unet.safetensors"], "the output must be a new .gguf file"),
        ([vae, "--to", "gguf"], "no Stable Diffusion U-Net (model.diffusion_model.*) to convert"),
        ([tmp_path / "missing.safetensors", "--to", "gguf"], "no such file"),
    ]
    for args, message in cases:
        assert run("convert", *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]
