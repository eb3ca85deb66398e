"""LoRA merging against diffusers' LoRA loading (through peft) as the independent reference: the same random LoRA
file, loaded by `pipe.load_lora_weights` and fused with `pipe.fuse_lora`, and merged by ours into the same weights.

The LoRA files are made from the module names of diffusers' U-Net and transformers' CLIPTextModel (not from our
name table), every Linear and Conv2d layer of both: attention, proj_in/out, feed-forward, ResBlock convolutions
(3×3 LoCon), time embedding, down/up-samplers, stem and output convolutions, and the text encoder's q/k/v/out
and MLP. For SD 2.x the text encoder's q/k/v land in thirds of our fused OpenCLIP `in_proj_weight`.
"""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from torch import nn

from latent_diffusion import LatentDiffusion, load_model, preset, save_model
from latent_diffusion.weights.lora import LoRAError, apply_lora, module_table, read_lora, remove_lora

from test_reference import diffusers_unet, diffusers_vae, transformers_text_encoder

ATOL = 1e-4  # float32; diffusers (peft) and we add the same products in different orders
RANK = 4


@pytest.fixture(scope="module")
def pipes(tiny_models):
    """variant -> (a copy of our tiny model, a function that builds diffusers' pipeline on its current weights)."""

    def pipeline(model):
        sd = model.state_dict()
        return StableDiffusionPipeline(
            vae=diffusers_vae(model.cfg, sd), text_encoder=transformers_text_encoder(model.cfg, sd),
            unet=diffusers_unet(model.cfg, sd), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip

    return {v: (copy.deepcopy(tiny_models[v]), pipeline) for v in ("sd1", "sd2")}


def lora_layers(pipe) -> dict[str, nn.Module]:
    """Every layer a LoRA file can change, by diffusers' name: "unet.<path>", "text_encoder.text_model.<path>"."""
    layers = {}
    for part, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if part == "text_encoder" and not path.startswith("text_model."):
                    path = "text_model." + path  # transformers >= 5.6 has no text_model level; kohya writes one
                layers[f"{part}.{path}"] = module
    return layers


def random_halves(layers: dict[str, nn.Module], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (down, up): down (r, in) or (r, in, k, k), up (out, r) or (out, r, 1, 1), so that up·down is about a
    tenth of a unit-variance weight."""
    g = torch.Generator().manual_seed(seed)
    halves = {}
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d):
            down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) / m.weight[0].numel() ** 0.5
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * 0.3 / RANK**0.5
        else:
            down = torch.randn(RANK, m.in_features, generator=g) / m.in_features**0.5
            up = torch.randn(m.out_features, RANK, generator=g) * 0.3 / RANK**0.5
        halves[name] = (down, up)
    return halves


def kohya_file(path, halves, alphas: dict[str, float]):
    """kohya-ss: lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha (missing alpha: α = r)."""
    sd = {}
    for name, (down, up) in halves.items():
        part, _, module = name.partition(".")
        key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + module.replace(".", "_")
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        if name in alphas:
            sd[key + ".alpha"] = torch.tensor(alphas[name])
    save_file(sd, path)
    return path


def peft_file(path, halves, alpha: float | None = None, *, alpha_pattern=None, text_model_level=False, prefix=""):
    """diffusers' save_lora_weights: unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.<path>..., and with
    `alpha` the adapter metadata diffusers writes (lora_alpha per part, alpha_pattern: {part: {path end: α}});
    no alpha: scale 1."""
    sd, targets = {}, {"unet": [], "text_encoder": []}
    for name, (down, up) in halves.items():
        part, _, module = name.partition(".")
        if part == "text_encoder" and not text_model_level:
            module = module.removeprefix("text_model.")  # as transformers >= 5.6 names the modules
        sd[f"{prefix}{part}.{module}.lora_A.weight"], sd[f"{prefix}{part}.{module}.lora_B.weight"] = down, up
        targets[part].append(module)
    metadata = None
    if alpha is not None:
        config = {}
        for part, modules in targets.items():
            config.update({f"{part}.r": RANK, f"{part}.lora_alpha": alpha, f"{part}.target_modules": modules})
            config[f"{part}.alpha_pattern"] = (alpha_pattern or {}).get(part, {})
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file(sd, path, metadata=metadata)
    return path


def compare(model, pipe):
    """Our U-Net prediction and text hidden states against diffusers', on the same inputs."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    tokens, _ = model.cond_stage_model.tokenize(["a red circle", "a cat"])
    with torch.no_grad():
        ours = model(x, t, {"crossattn": context}), model.cond_stage_model(tokens)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(tokens).last_hidden_state
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return ours


def snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {k: (v, v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_restored(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (_, copy_, ptr) in before.items():
        assert torch.equal(after[k], copy_) and after[k].data_ptr() == ptr, k


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_table_names_every_diffusers_layer(pipes, variant):
    """Each Linear/Conv2d of diffusers' U-Net and transformers' text encoder (converted from our weights by their own
    converters) has an entry, kohya spelling included, whose weight is exactly that layer's weight."""
    model, pipeline = pipes[variant]
    pipe = pipeline(model)
    table, params = module_table(model), model.state_dict()
    for name, module in lora_layers(pipe).items():
        part, _, path = name.partition(".")
        target = table[name]
        assert table[f"{part}.{path.replace('.', '_')}"] == target
        ours = params[target.param] if target.rows is None else params[target.param][slice(*target.rows)]
        assert torch.equal(ours.reshape(module.weight.shape), module.weight), name


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_kohya_locon_matches_diffusers(pipes, variant, tmp_path):
    """kohya-ss LoCon on every layer, at strength 0.7; then every weight is back, bit for bit."""
    model, pipeline = pipes[variant]
    before = snapshot(model)
    pipe = pipeline(model)
    layers = lora_layers(pipe)
    halves = random_halves(layers, seed=2)
    # One α for all: diffusers maps per-layer alphas of kohya's attention layers to names peft does not find.
    path = kohya_file(tmp_path / "kohya.safetensors", halves, dict.fromkeys(halves, 2.0))
    assert any(m.kernel_size == (3, 3) for m in layers.values() if isinstance(m, nn.Conv2d))  # LoCon on 3×3 convs

    plain = compare(model, pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7)
    applied = apply_lora(model, read_lora(path), 0.7)
    assert applied.warnings == [] and applied.layers == len(halves)
    merged = compare(model, pipe)
    for a, b in zip(merged, plain):
        assert (a - b).abs().mean() > 0.02  # the LoRA changed both parts visibly
    remove_lora(model, applied)
    assert_restored(model, before)


def test_peft_matches_diffusers_with_separate_weights(pipes, tmp_path):
    """diffusers' own format, α from its adapter metadata (one per part, and other values by alpha_pattern); the text
    encoder at another strength."""
    model, pipeline = pipes["sd2"]
    before = snapshot(model)
    pipe = pipeline(model)
    pattern = {"unet": {"mid_block.attentions.0.proj_in": 6.0}, "text_encoder": {"layers.1.mlp.fc2": 0.5}}
    path = peft_file(tmp_path / "p.safetensors", random_halves(lora_layers(pipe), 3), alpha=2.0, alpha_pattern=pattern)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet"], lora_scale=0.8)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=-0.5)
    applied = apply_lora(model, read_lora(path), 0.8, te_weight=-0.5)
    compare(model, pipe)
    remove_lora(model, applied)
    assert_restored(model, before)


def merged_weights(model, path, weight=1.0) -> dict[str, torch.Tensor]:
    applied = apply_lora(model, read_lora(path), weight)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    remove_lora(model, applied)
    return merged


# diffusers' attention-processor LoRA (before PEFT): `attn1.processor.to_q_lora.down.weight`, text `to_k_lora`.
OLD_DIFFUSERS = (("attn1.to_q", "attn1.processor.to_q_lora"), ("attn2.to_out.0", "attn2.processor.to_out_lora"),
                 ("self_attn.k_proj", "self_attn.to_k_lora"), ("self_attn.out_proj", "self_attn.to_out_lora"))  # fmt: skip


def keyed(module: str, down, up, down_suffix: str, up_suffix: str, alpha_key: str | None = None) -> dict:
    """A layer's keys in one spelling, with α = 3 (a tensor of its own: safetensors refuses shared ones)."""
    return {module + down_suffix: down, module + up_suffix: up, alpha_key or module + ".alpha": torch.tensor(3.0)}


def test_spellings_of_one_lora_merge_alike(pipes, tmp_path):
    """PEFT with `.alpha` keys; a bare PEFT adapter under base_model.model. with text_model.; diffusers' older
    `.lora.down` and `to_q_lora` names; kohya with the U-Net's CompVis names, as a .pt: each merges into the same
    weights as PEFT with α in diffusers' metadata."""
    model, pipeline = pipes["sd1"]
    halves = random_halves(lora_layers(pipeline(model)), seed=4)
    reference = merged_weights(model, peft_file(tmp_path / "reference.safetensors", halves, alpha=3.0))
    table = module_table(model)
    files = {"alpha.safetensors": {}, "bare.safetensors": {}, "old.safetensors": {}, "compvis.pt": {}}
    for name, (down, up) in halves.items():
        part, _, path = name.partition(".")
        peft = f"{part}.{path.removeprefix('text_model.')}"
        files["alpha.safetensors"] |= keyed(peft, down, up, ".lora_A.weight", ".lora_B.weight")
        files["bare.safetensors"] |= keyed(f"base_model.model.{path}", down, up, ".lora_A.weight", ".lora_B.weight")
        old = next((name.replace(new, older) for new, older in OLD_DIFFUSERS if name.endswith(new)), name + ".lora")
        files["old.safetensors"] |= keyed(old, down, up, ".down.weight", ".up.weight", alpha_key=name + ".alpha")
        compvis = table[name].param.removesuffix(".weight").removeprefix("model.diffusion_model.")
        kohya = ("lora_unet_" + compvis if part == "unet" else "lora_te_" + path).replace(".", "_")
        files["compvis.pt"] |= keyed(kohya, down, up, ".lora_down.weight", ".lora_up.weight")
    assert all(any(older in k for k in files["old.safetensors"]) for _, older in OLD_DIFFUSERS)
    for file, sd in files.items():
        torch.save(sd, tmp_path / file) if file.endswith(".pt") else save_file(sd, tmp_path / file)
        merged = merged_weights(model, tmp_path / file)
        for k in reference:  # equal up to the GEMM's rounding, which may vary with the inputs' memory alignment
            torch.testing.assert_close(merged[k], reference[k], atol=1e-6, rtol=0, msg=f"{file}: {k}")


def test_memory_mapped_checkpoint_is_never_written(tiny_models, tmp_path):
    """A model loaded from .safetensors holds views of the mapped file: merging gives each touched weight a new
    tensor, leaves the original storage and the file as they were, and removal hands back the original tensors."""
    path = tmp_path / "model.safetensors"
    save_model(tiny_models["sd1"], path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_model(path)
    before = snapshot(model)
    halves = {f"unet.{k}": v for k, v in random_halves({"conv_in": model.unet.input_blocks[0][0]}, 5).items()}
    lora = read_lora(kohya_file(tmp_path / "lora.safetensors", halves, {}))
    applied = apply_lora(model, lora, 1.0)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(model.state_dict()[key], before[key][1])
    for k, (original, copy_, _) in before.items():
        assert torch.equal(original, copy_), k  # nothing written in place
    remove_lora(model, applied)
    assert_restored(model, before)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_stacked_loras_come_off_in_reverse_order(pipes, tmp_path):
    """Two LoRAs merged one on top of the other; taking the first off first would drop the second: refused."""
    model, pipeline = pipes["sd2"]
    before = snapshot(model)
    layers = lora_layers(pipeline(model))
    first = apply_lora(model, read_lora(kohya_file(tmp_path / "a.safetensors", random_halves(layers, 6), {})), 1.0)
    second = apply_lora(model, read_lora(kohya_file(tmp_path / "b.safetensors", random_halves(layers, 7), {})), 0.5)
    with pytest.raises(LoRAError, match="reverse order"):
        remove_lora(model, first)
    remove_lora(model, second)
    remove_lora(model, first)
    assert_restored(model, before)


def test_unmatched_layers_are_listed(tiny_models, tmp_path):
    """Layers of another model part (SDXL's second text encoder) or of no module, and keys that make no layer (a
    lone LoHa factor), come back as warnings; the layers that match are merged."""
    model = copy.deepcopy(tiny_models["sd1"])
    halves = random_halves({"unet.conv_in": model.unet.input_blocks[0][0]}, 8)
    halves |= {f"unet.down_blocks.7.attentions.0.proj_in{i}": halves["unet.conv_in"] for i in range(3)}
    halves["text_encoder2.text_model.encoder.layers.0.mlp.fc1"] = halves["unet.conv_in"]
    sd = {}
    for name, (down, up) in halves.items():
        key = name.replace("unet.", "lora_unet_").replace("text_encoder2.", "lora_te2_").replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up.clone()}
    sd["lora_unet_conv_out.hada_w1_a"] = torch.zeros(1)
    save_file(sd, tmp_path / "partly.safetensors")
    applied = apply_lora(model, read_lora(tmp_path / "partly.safetensors"))
    assert applied.layers == 1 and len(applied.warnings) == 2
    assert "4 LoRA layers match nothing" in applied.warnings[0] and "down_blocks_7" in applied.warnings[0]
    assert "1 keys of kinds not merged" in applied.warnings[1] and "hada_w1_a" in applied.warnings[1]
    remove_lora(model, applied)


def test_nothing_matching_or_not_a_lora_raises(tiny_models, tmp_path):
    model = copy.deepcopy(tiny_models["sd1"])
    before = snapshot(model)
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(RANK, 32),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(32, RANK)}, path)  # fmt: skip
    with pytest.raises(LoRAError, match=r"no layer of this LoRA matches the SD 1\.x model.*single_blocks_0"):
        apply_lora(model, read_lora(path))
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(3)}, path)
    with pytest.raises(LoRAError, match="not a LoRA"):
        read_lora(path)
    path.write_bytes(b"not a file of tensors")
    with pytest.raises(LoRAError, match="other.safetensors"):
        read_lora(path)
    assert_restored(model, before)


def test_lora_of_another_family_raises_before_changing_anything(tmp_path):
    """An SD 1.x-shaped LoRA (768-wide text context and text encoder) on the full-size SD 2.1 model (built on
    the meta device: only names and shapes are needed to refuse it)."""
    with torch.device("meta"):
        model = LatentDiffusion(preset("sd-v2.1"))
    g = torch.Generator().manual_seed(9)
    sd = {}
    for key, out, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
                            ("lora_unet_mid_block_attentions_0_proj_in", 1280, 1280),
                            ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)):  # fmt: skip
        sd |= {f"{key}.lora_down.weight": torch.randn(RANK, width, generator=g),
               f"{key}.lora_up.weight": torch.randn(out, RANK, generator=g)}  # fmt: skip
    save_file(sd, tmp_path / "sd15.safetensors")
    params = dict(model.named_parameters())
    with pytest.raises(LoRAError, match=r"made for SD 1\.x, not this SD 2\.x model: 2 of its layers do not fit"):
        apply_lora(model, read_lora(tmp_path / "sd15.safetensors"))
    assert all(p is params[k] and p.is_meta for k, p in model.named_parameters())


def test_alpha_per_layer_and_locon_as_kohya_runs_it(tiny_models, tmp_path):
    """kohya's forward, W·x + (α/r)·up(down(x)) with down a 3×3 convolution of the layer's stride and padding and up
    a 1×1 one, equals the merged convolution; a layer without alpha has α = r (scale 1). Each layer has its own α,
    which diffusers cannot be the reference for (it loses kohya's per-layer alphas on attention layers)."""
    model = copy.deepcopy(tiny_models["sd1"])
    conv = model.unet.input_blocks[2][0].op  # the stride-2 Downsample: diffusers' down_blocks.0.downsamplers.0.conv
    linear = model.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    halves = random_halves({"unet.down_blocks.0.downsamplers.0.conv": conv}, 10)
    halves |= random_halves({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": linear}, 11)
    w_conv, w_linear = conv.weight.detach().clone(), linear.weight.detach().clone()
    path = kohya_file(tmp_path / "k.safetensors", halves, {"unet.down_blocks.0.downsamplers.0.conv": 1.5})
    applied = apply_lora(model, read_lora(path), 0.6)

    down, up = halves["unet.down_blocks.0.downsamplers.0.conv"]
    x = torch.randn(2, conv.in_channels, 9, 11, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        kohya = F.conv2d(x, w_conv, conv.bias, stride=2, padding=1)
        kohya = kohya + 0.6 * 1.5 / RANK * F.conv2d(F.conv2d(x, down, stride=2, padding=1), up)
        torch.testing.assert_close(conv(x), kohya, atol=1e-5, rtol=0)
    down, up = halves["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    torch.testing.assert_close(linear.weight, w_linear + 0.6 * up @ down, atol=1e-6, rtol=0)
    remove_lora(model, applied)


def test_half_precision_weights_get_a_float32_delta(tiny_models, tmp_path):
    """W' = float16(float32(W) + w·(α/r)·up·down): the product and the sum in float32, one rounding at the end."""
    model = copy.deepcopy(tiny_models["sd1"]).half()
    before = snapshot(model)
    linear = model.unet.middle_block[1].transformer_blocks[0].ff.net[2]
    halves = random_halves({"unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": linear}, 13)
    applied = apply_lora(model, read_lora(kohya_file(tmp_path / "h.safetensors", halves, {})), 0.9)
    down, up = next(iter(halves.values()))
    expected = (before["model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight"][1].float()
                + 0.9 * up @ down).half()  # fmt: skip
    assert linear.weight.dtype == torch.float16
    # addmm's fused float32 sum may round the other way where the value sits on a float16 tie: one ulp at most
    ulps = (linear.weight.detach().view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99
    remove_lora(model, applied)
    assert_restored(model, before)


def web_ui_dora(w: torch.Tensor, updown: torch.Tensor, dora_scale: torch.Tensor, scale: float, strength: float):
    """The web UI's DoRA merge, written out from its extensions-builtin/Lora/network.py (finalize_updown, then
    apply_weight_decompose): the reference for `test_dora_merges_as_the_web_ui`."""
    updown = updown.reshape(w.shape) * scale
    merged = updown + w
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return w + (merged * (dora_scale / norm) - w) * strength


def test_dora_merges_as_the_web_ui(tiny_models, tmp_path):
    """LyCORIS's `.dora_scale` beside a kohya pair: per input channel (its default, (1, in[, 1, 1])) on a 3×3
    convolution and a Linear layer, per output ((out, 1), its wd_on_output) on another; removed bit for bit."""
    from safetensors.torch import load_file

    model = copy.deepcopy(tiny_models["sd1"])
    names = {"unet.down_blocks.0.resnets.0.conv1": model.unet.input_blocks[1][0].in_layers[2],
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
                 model.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k,
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                 model.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q}  # fmt: skip
    halves = random_halves(names, 13)
    path = kohya_file(tmp_path / "d.safetensors", halves, dict.fromkeys(names, 2.0))
    sd, g, magnitudes = load_file(path), torch.Generator().manual_seed(14), {}
    for (name, module), per_output in zip(names.items(), (False, False, True)):
        w = module.weight
        shape = (w.shape[0], *[1] * (w.dim() - 1)) if per_output else (1, w.shape[1], *[1] * (w.dim() - 2))
        magnitudes[name] = torch.rand(shape, generator=g) + 0.5
        sd["lora_unet_" + name.partition(".")[2].replace(".", "_") + ".dora_scale"] = magnitudes[name]
    save_file(sd, path)
    before = {name: m.weight.detach().clone() for name, m in names.items()}
    applied = apply_lora(model, read_lora(path), 0.7)
    assert applied.warnings == []
    for name, module in names.items():
        down, up = halves[name]
        updown = up.flatten(1) @ down.flatten(1)
        expected = web_ui_dora(before[name], updown, magnitudes[name], 2.0 / RANK, 0.7)
        torch.testing.assert_close(module.weight, expected, atol=1e-5, rtol=0)
    remove_lora(model, applied)
    assert all(torch.equal(m.weight, before[n]) for n, m in names.items())


def test_cp_decomposed_locon_merges_to_lycoris_forward(tiny_models, tmp_path):
    """LyCORIS's CP LoCon runs a 1×1 down, a k×k mid (the layer's stride and padding) and a 1×1 up; the merged
    convolution equals W·x + (α/r)·up(mid(down(x)))."""
    model = copy.deepcopy(tiny_models["sd1"])
    conv = model.unet.input_blocks[2][0].op  # stride 2, padding 1
    name = "lora_unet_down_blocks_0_downsamplers_0_conv"
    g = torch.Generator().manual_seed(15)
    down = torch.randn(RANK, conv.in_channels, 1, 1, generator=g) / conv.in_channels**0.5
    mid = torch.randn(RANK, RANK, 3, 3, generator=g) / 3
    up = torch.randn(conv.out_channels, RANK, 1, 1, generator=g) * 0.3 / RANK**0.5
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(2.0)}, tmp_path / "cp.safetensors")  # fmt: skip
    w = conv.weight.detach().clone()
    applied = apply_lora(model, read_lora(tmp_path / "cp.safetensors"), 0.8)
    x = torch.randn(2, conv.in_channels, 9, 11, generator=g)
    with torch.no_grad():
        lycoris = F.conv2d(x, w, conv.bias, stride=2, padding=1)
        lycoris = lycoris + 0.8 * 2.0 / RANK * F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2, padding=1), up)
        torch.testing.assert_close(conv(x), lycoris, atol=1e-5, rtol=0)
    remove_lora(model, applied)
    assert torch.equal(conv.weight, w)


def test_a_base_model_lora_widens_onto_an_inpainting_models_input_convolution(tiny_models, tmp_path):
    """The web UI pads a LoRA's change to conv_in from the base model's 4 latent channels to the inpainting model's
    9 with zeros: the mask and masked-image channels keep their weights."""
    model = copy.deepcopy(tiny_models["inpaint"])
    conv = model.unet.input_blocks[0][0]
    assert conv.in_channels == 9
    base = nn.Conv2d(4, conv.out_channels, 3, padding=1)
    halves = random_halves({"unet.conv_in": base}, 16)
    w = conv.weight.detach().clone()
    applied = apply_lora(model, read_lora(kohya_file(tmp_path / "in.safetensors", halves, {})), 0.5)
    down, up = halves["unet.conv_in"]
    change = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(conv.out_channels, 4, 3, 3)
    torch.testing.assert_close(conv.weight[:, :4], w[:, :4] + change, atol=1e-6, rtol=0)
    assert torch.equal(conv.weight[:, 4:], w[:, 4:])
    remove_lora(model, applied)
    assert torch.equal(conv.weight, w)
    sd = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
          "lora_unet_conv_in.dora_scale": torch.ones(1, 4, 1, 1)}  # fmt: skip
    save_file(sd, tmp_path / "dora.safetensors")
    with pytest.raises(LoRAError, match="DoRA on an inpainting model's input convolution is not supported"):
        apply_lora(model, read_lora(tmp_path / "dora.safetensors"))
