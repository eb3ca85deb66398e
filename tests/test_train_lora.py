"""LoRA training (`ldm train --lora`): the trained file is kohya's (its names from diffusers' and transformers' own module
names, its metadata and hashes as kohya computes them), loads in diffusers (`load_lora_weights` + `fuse_lora`) to what
our merge gives; an adapter's gradients are the closed form's; resume is exact; bad input is one line."""

import dataclasses
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from latent_diffusion import LatentDiffusion, load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.training.config import TrainConfig
from latent_diffusion.training.data import CORNERS, POSITIONS
from latent_diffusion.training.evaluate import prompt_adherence
from latent_diffusion.training.lora import Adapter, Dropouts, LoRANetwork, lora_targets, train_lora
from latent_diffusion.weights.checkpoint import BUILTIN_LORA, BUILTIN_MODEL
from latent_diffusion.weights.lora import apply_lora, parse_lora, read_lora, remove_lora
from test_lora import compare, lora_layers, pipes  # noqa: F401 (pipes: the fixture)
from test_train import SAME_RUN_ATOL, run_torchrun

from conftest import tiny_config, tiny_model
from test_sdxl import reference_conditioning, xl_pipeline

FAST = dict(image_size=32, shapes_count=8, batch_size=4, warmup=1, log_every=1, quiet=True, device="cpu")


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def metadata(path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def kohya_names(pipe, conv: bool) -> set[str]:
    """The modules kohya's networks/lora.py adapts, named from diffusers' U-Net and transformers' CLIPTextModel (not
    from our tables): Linear and Conv2d layers inside Transformer2DModel blocks, with `conv` also inside ResnetBlock2D,
    Downsample2D and Upsample2D; the text encoder's CLIPAttention and CLIPMLP layers."""
    blocks = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ())
    names = set()
    for path, block in pipe.unet.named_modules():
        if type(block).__name__ in blocks:
            for inner, layer in block.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    names.add("lora_unet_" + f"{path}.{inner}".replace(".", "_"))
    for name in lora_layers(pipe):
        part, _, path = name.partition(".")
        if part == "text_encoder" and (".self_attn." in path or ".mlp." in path):
            names.add("lora_te_" + path.replace(".", "_"))
    return names


def two_steps_of_locon(model, tmp_path):
    """LoCon with the text encoder(s), two steps at a high rate -> (the file, its tensors, its module names)."""
    save_model(model, tmp_path / "base.safetensors")
    cfg = TrainConfig(outdir=str(tmp_path / "run"), ckpt=str(tmp_path / "base.safetensors"), steps=2, lr=0.05,
                      lora=4, lora_alpha=2, lora_conv_rank=4, lora_conv_alpha=2, train_text_encoder=True,
                      text_encoder_lr=0.02, **FAST)  # fmt: skip
    path = train_lora(cfg)
    trained = tensors(path)
    return path, trained, {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in trained}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_a_trained_lora_is_kohyas_file_and_diffusers_fuses_it_as_we_merge_it(pipes, variant, tmp_path):  # noqa: F811
    """LoCon with the text encoder, two steps at a high rate: the file's modules are the ones kohya adapts (SD 2.x's
    text encoder without the last block, which its context skips), and diffusers, fusing it, gives our merge's U-Net
    prediction and text hidden states."""
    model, pipeline = pipes[variant]
    path, trained, names = two_steps_of_locon(model, tmp_path)
    pipe = pipeline(model)
    expected = kohya_names(pipe, conv=True)
    if variant == "sd2":  # the last block of the text encoder is not read: kohya's SD 2.x encoder has one block less
        last = f"lora_te_text_model_encoder_layers_{model.cfg.text.layers - 1}_"
        expected = {n for n in expected if not n.startswith(last)}
    assert names == expected
    assert all(float(trained[f"{n}.alpha"]) == 2.0 for n in names)
    assert all(trained[f"{n}.lora_up.weight"].abs().max() > 0 for n in names)  # every adapter trained

    plain = compare(model, pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    applied = apply_lora(model, read_lora(path), 1.0)
    assert applied.warnings == [] and applied.layers == len(names)
    merged = compare(model, pipe)  # ours and diffusers' agree to test_lora's ATOL
    remove_lora(model, applied)
    for a, b in zip(merged, plain):
        assert (a - b).abs().mean() > 1e-3  # the LoRA changed both parts


def test_an_sdxl_lora_with_both_text_encoders_is_kohyas_and_diffusers_fuses_it_as_we_merge_it(tmp_path):
    """SDXL, LoCon and both text encoders, two steps: the text modules are those kohya adapts in transformers'
    CLIPTextModel (ViT-L, every block) and CLIPTextModelWithProjection (ViT-bigG), as `lora_te1_` and `lora_te2_`;
    the last block of ViT-L, which the context does not read, stays untrained, as in kohya's files. diffusers' SDXL
    pipeline, fusing the file, gives our merge's contexts, pooled text and U-Net prediction."""
    model = tiny_model("sdxl", seed=7)
    path, trained, names = two_steps_of_locon(model, tmp_path)
    pipe = xl_pipeline(model)
    expected = set()
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, layer in encoder.named_modules():
            if isinstance(layer, nn.Linear) and (".self_attn." in name or ".mlp." in name):
                expected.add(
                    prefix + ("" if name.startswith("text_model.") else "text_model_") + name.replace(".", "_")
                )
    assert {n for n in names if n.startswith("lora_te")} == expected
    unread = f"lora_te1_text_model_encoder_layers_{model.cfg.text.layers - 1}_"
    for n in names:
        assert (trained[f"{n}.lora_up.weight"].abs().max() > 0) != n.startswith(unread), n

    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 700])
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]])
    prompts = ["a red circle", "a blue square"]

    def outputs(fused: bool):
        with torch.no_grad():
            if fused:
                encoders = [pipe.text_encoder, pipe.text_encoder_2]
                context, pooled = (
                    torch.cat(c) for c in zip(*(reference_conditioning(model, encoders, p) for p in prompts))
                )
                added = {"text_embeds": pooled, "time_ids": time_ids}
                return context, pooled, pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            context, pooled = model.get_text_conditioning(prompts, pooled=True)
            y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
            return context, pooled, model(x, t, {"crossattn": context, "vector": y})

    plain = outputs(fused=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0)
    applied = apply_lora(model, read_lora(path), 1.0)
    assert applied.warnings == [] and applied.layers == len(names)
    for ours, theirs, before in zip(outputs(fused=False), outputs(fused=True), plain):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # test_lora's tolerance
        assert (ours - before).abs().mean() > 1e-3  # the LoRA changed each


def test_text_adapters_sit_in_the_blocks_the_context_reads():
    """SD 2.x's context skips its text encoder's last block, which takes no adapters (kohya's encoder has one block
    less); a checkpoint converted back from diffusers holds those blocks alone, read to the last: all take them."""
    cfg = tiny_config("sd2")
    converted = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, layer="last"))
    for config, blocks in ((cfg, cfg.text.layers - 1), (converted, cfg.text.layers)):
        targets = lora_targets(LatentDiffusion(config), TrainConfig(outdir="unused", lora=2, train_text_encoder=True))
        assert {int(t.name.split("_layers_")[1].split("_")[0]) for t in targets if t.text} == set(range(blocks))


def test_the_hooked_adapters_compute_the_merged_model():
    """What training runs (adapters hooked beside the frozen layers) is what the merged file computes: SDXL's U-Net
    with kohya's generative-models names, LoCon, both text encoders."""
    model = tiny_model("sdxl", seed=3)
    cfg = TrainConfig(outdir="unused", lora=2, lora_alpha=1.0, lora_conv_rank=3, train_text_encoder=True)
    targets = lora_targets(model, cfg)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in {t.name for t in targets}
    assert "lora_unet_output_blocks_1_2_conv" in {t.name for t in targets}  # an upsampler, generative-models' name
    assert "lora_unet_input_blocks_1_0_in_layers_2" in {t.name for t in targets}  # LoCon: a ResBlock's 3×3
    assert {t.name.split("_text_model")[0] for t in targets if t.text} == {"lora_te1", "lora_te2"}
    network = LoRANetwork(model, targets).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in network.state_dict().items():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 700])
    y = torch.randn(2, model.cfg.unet.adm_in_channels, generator=g)
    prompts = ["a red circle", "a blue square"]

    def outputs():
        with torch.no_grad():
            context = model.get_text_conditioning(prompts)
            return context, model.unet(x, t, context, y=y)

    plain = outputs()
    network.attach(model)
    hooked = outputs()
    network.detach()
    applied = apply_lora(model, parse_lora(network.state_dict(), source="trained"), 1.0)
    assert applied.warnings == [] and applied.layers == len(targets)
    merged = outputs()
    remove_lora(model, applied)
    after = outputs()
    for a, b, c in zip(hooked, merged, plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert (a - c).abs().mean() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(plain, after))  # detached: the model is itself again


@pytest.mark.parametrize("conv", [False, True])
def test_an_adapters_gradients_are_the_closed_forms(conv):
    """y = W x + s·B A x (s = α/r): for the loss ⟨y, G⟩, dL/dB = s·G (A x)ᵀ and dL/dA = s·Bᵀ G xᵀ, summed over the
    batch; for a 3×3 convolution the same with A a convolution (stride 2, padding 1 as the layer's), checked
    against the convolution of the merged weight W + s·B·A."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(6, 5, 3, stride=2, padding=1) if conv else nn.Linear(6, 5)
    adapter = Adapter(layer, 5, rank=3, alpha=1.5, dropouts=Dropouts())
    with torch.no_grad():
        adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    s = 1.5 / 3
    A, B = adapter.lora_down.weight, adapter.lora_up.weight
    if conv:
        x = torch.randn(2, 6, 7, 7, generator=g)
        y = layer(x) + adapter(x)
        merged = layer.weight + s * (B.flatten(1) @ A.flatten(1)).reshape(layer.weight.shape)
        torch.testing.assert_close(y, F.conv2d(x, merged, layer.bias, stride=2, padding=1), atol=1e-5, rtol=1e-5)
        return
    x = torch.randn(4, 6, generator=g)
    G = torch.randn(4, 5, generator=g)
    y = layer(x) + adapter(x)
    (y * G).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(B.grad, s * G.T @ (x @ A.T), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(A.grad, s * B.T @ G.T @ x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, x @ (layer.weight + s * B @ A).T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_the_three_dropouts_are_kohyas(conv):
    """kohya's LoRAModule.forward written out, drawing from the global generator in its order: module dropout
    (torch.rand(1) < p: the adapter left out), network dropout on down(x), then rank dropout (a (b, r) mask,
    unsqueezed onto the rank axis; the scale times 1/(1 − p))."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(6, 5)
    adapter = Adapter(layer, 5, rank=4, alpha=2.0, dropouts=Dropouts(hidden=0.2, rank=0.3, module=0.4)).train()
    with torch.no_grad():
        adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    x = torch.randn(3, 6, 5, 5, generator=g) if conv else torch.randn(3, 7, 6, generator=g)

    def kohya(x):
        if torch.rand(1) < 0.4:
            return None
        lx = F.dropout(adapter.lora_down(x), p=0.2)
        mask = torch.rand((lx.size(0), 4)) > 0.3
        lx = lx * (mask.unsqueeze(-1).unsqueeze(-1) if lx.dim() == 4 else mask.unsqueeze(1))
        return adapter.lora_up(lx) * (0.5 * (1.0 / (1.0 - 0.3)))

    left_out = 0
    for seed in range(12):
        torch.manual_seed(seed)
        ours = adapter(x)
        torch.manual_seed(seed)
        theirs = kohya(x)
        assert (ours is None) == (theirs is None)
        left_out += ours is None
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert 0 < left_out < 12
    assert torch.equal(adapter.eval()(x), adapter.lora_up(adapter.lora_down(x)) * 0.5)  # none of them in eval


def test_resume_is_exact_with_dropout_and_metadata_is_kohyas(ckpt, tmp_path):
    """3 steps + resume + 3 steps equal 6 steps, with the adapters' three dropouts and the text encoder's own rate; the
    metadata is kohya's, its hashes computed as kohya's precalculate_safetensors_hashes computes them. The resumed run
    writes its file in fp16 (--save-precision): the same numbers rounded, hashed as written; its checkpoints stay
    float32."""
    data = tmp_path / "photos"
    data.mkdir()
    from PIL import Image

    for i, caption in enumerate(["sks dog, grass", "sks dog, beach", "sks dog, grass, sun", "sks dog"]):
        Image.new("RGB", (40, 36), (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    common = dict(ckpt=str(ckpt), data=str(data), save_every=3, lr=1e-2, lora=2, lora_dropout=0.3,
                  lora_rank_dropout=0.25, lora_module_dropout=0.1, train_text_encoder=True, text_encoder_lr=5e-3,
                  **FAST)  # fmt: skip
    straight = train_lora(TrainConfig(outdir=str(tmp_path / "straight"), steps=6, **common))
    train_lora(TrainConfig(outdir=str(tmp_path / "resumed"), steps=3, **common))
    resumed = train_lora(
        TrainConfig(outdir=str(tmp_path / "resumed"), steps=6, resume=True, save_precision="fp16", **common)
    )
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float16 and torch.equal(a[k].half(), b[k]) for k in a)
    kept = tensors(tmp_path / "resumed" / "checkpoints" / "step-0000006" / "lora.safetensors")
    assert all(torch.equal(a[k], kept[k]) for k in a)
    raw = resumed.read_bytes()
    assert (
        metadata(resumed)["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    )
    assert (tmp_path / "straight" / "loss.png").is_file()

    md = metadata(straight)
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "2"
    assert md["ss_network_alpha"] == "2.0" and md["ss_network_dropout"] == "0.3"
    assert json.loads(md["ss_network_args"]) == {"rank_dropout": "0.25", "module_dropout": "0.1"}
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_resolution"] == "(32, 32)"
    assert md["ss_num_train_images"] == "4" and md["ss_text_encoder_lr"] == "0.005"
    assert json.loads(md["ss_tag_frequency"]) == {"photos": {"sks dog": 4, "grass": 2, "beach": 1, "sun": 1}}
    # kohya: the file's bytes with only the ss_ fields, SHA-256 after the header, and of 64 KiB at 1 MiB
    whole = save(a, {k: v for k, v in md.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(whole[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(whole[header:]).hexdigest()
    assert md["sshs_legacy_hash"] == hashlib.sha256(whole[0x100000:0x110000]).hexdigest()[:8]
    raw = straight.read_bytes()  # the web UI's "Lora hashes": the same SHA-256, of the file as written
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest() == md["sshs_model_hash"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lora", "0"], "--lora is a rank, at least 1, not 0"),
        (["--lora", "4", "--lora-conv-rank", "0"], "--lora-conv-rank is a rank, at least 1, not 0"),
        (["--lora", "4000"], "--lora 4000 is above the width"),
        (["--lora", "2", "--lora-conv-rank", "900"], "--lora-conv-rank 900 is above the width"),
        (["--lora", "2", "--lora-dropout", "1"], "--lora-dropout is a probability"),
        (["--lora", "2", "--lora-rank-dropout", "-0.1"], "--lora-rank-dropout is a probability"),
        (["--lora-module-dropout", "0.1"], "--lora-module-dropout needs --lora RANK"),
        (["--lora", "2", "--lora-module-dropout", "0.1", "--fsdp"], "--lora-module-dropout does not combine with"),
        (["--lora", "2", "--lora-alpha", "-1"], "--lora-alpha must be above 0"),
        (["--lora-dropout", "0.1"], "--lora-dropout needs --lora RANK"),
        (["--lora", "2", "--parameterization", "v"], "LoRA training adapts a trained model"),
        (["--lora", "2", "--save-precision", "fp8"], "--save-precision must be one of float, fp16, bf16, not 'fp8'"),
    ],
)
def test_bad_lora_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    argv = ["train", "--outdir", str(out), "--ckpt", str(ckpt), "--steps", "1", "--quiet", "--image-size", "16",
            "--shapes-count", "8", *args]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_shipped_lora_puts_shapes_in_the_corners_and_leaves_the_rest():
    """A small check of the built-in LoRA (BENCHMARKS.md has the full measurement): over 32 prompts that put the shape
    in a corner (the template form), the shape is in that corner in far more images with the LoRA than without it,
    which never saw a corner; and over 32 prompts of the five places it knew, the place is the prompt's as often as
    without it (within 4 of 32 images). At n = 32 a share p has a binomial standard error of at most 0.09: 0.75 is
    the lower edge of a true 0.9 (1.645 errors, one-sided 95 %)."""
    assert BUILTIN_LORA.stat().st_size <= 2**20
    md = metadata(BUILTIN_LORA)
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1_v"  # v-prediction
    pipeline = Pipeline(load_model(BUILTIN_MODEL))
    settings = GenerationRequest([""], [0], width=64, height=64, steps=10, batch_size=16)

    def position(positions) -> float:
        report, _ = prompt_adherence(pipeline, 16, settings, forms=("template",), positions=positions)
        return sum(row["position"] for row in report["template"].values()) / 2

    without_corners, without_known = position(tuple(CORNERS)), position(tuple(POSITIONS))
    applied = apply_lora(pipeline.model, read_lora(BUILTIN_LORA))
    with_corners, with_known = position(tuple(CORNERS)), position(tuple(POSITIONS))
    remove_lora(pipeline.model, applied)
    assert with_corners >= 0.75 and without_corners <= 0.25, (with_corners, without_corners)
    assert abs(with_known - without_known) <= 4 / 32, (with_known, without_known)


def test_two_processes_give_the_lora_of_one(ckpt, tmp_path):
    """DDP under torchrun (gloo): the adapters alone take gradients, and two processes with half the batch each
    train the LoRA one process trains (within test_train.py's SAME_RUN_ATOL, for its written reason)."""
    common = ["--lora", "2", "--lora-conv-rank", "2", "--ckpt", str(ckpt), "--steps", "3", "--image-size", "32",
              "--shapes-count", "16", "--batch-size", "4", "--lr", "1e-3", "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(["train", "--outdir", str(tmp_path / "one"), *common]) == 0
    run_torchrun(2, ["train", "--outdir", str(tmp_path / "two"), *common])
    a, b = tensors(tmp_path / "one" / "lora.safetensors"), tensors(tmp_path / "two" / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)
    # with module dropout each process leaves out other adapters in a step: DDP reduces what was used, no hang
    run_torchrun(2, ["train", "--outdir", str(tmp_path / "dropped"), *common, "--lora-module-dropout", "0.5"])
    dropped = tensors(tmp_path / "dropped" / "lora.safetensors")
    assert dropped.keys() == a.keys() and any(not torch.equal(dropped[k], b[k]) for k in a)
