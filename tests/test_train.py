"""Training: the pieces against their formulas, loss going down on the shapes data, exact resume, atomic
checkpoints, DDP equivalence, and the saved model in diffusers."""

import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latent_diffusion import LatentDiffusion, load_model, preset, save_model
from latent_diffusion.cli import main
from latent_diffusion.devices import has_native_bfloat16
from latent_diffusion.sampling import noise_schedule as schedule
from latent_diffusion.sampling.parameterization import min_snr_weight
from latent_diffusion.training.checkpoints import run_fingerprint
from latent_diffusion.training.common import TrainError, resolve_precision
from latent_diffusion.training.config import TrainConfig
from latent_diffusion.training.data import HELD_OUT_PAIRS, ImageCaptionFolder, ShapesDataset
from latent_diffusion.training.diffusion import ema_update, train
from latent_diffusion.training.step import Batch, diffusion_loss, global_batch_indices

from conftest import tiny_model
from test_reference import diffusers_unet

# Adam divides each coordinate's step by its gradient's running RMS: where a gradient is near zero, the float
# rounding of the same sum taken in another order (other processes, micro-batches) changes the direction of the
# first steps, and each step moves a weight by up to its learning rate. The tests below run 3 warm-up steps
# (lr 2e-4, 4e-4, 6e-4: up to 1.2e-3 in all); runs that differ only so agree to a quarter of that. Seen: 1.09e-4
# (output_blocks.3's biases, whose gradients nearly cancel after the GroupNorm that follows), on AMD EPYC, 2 cores.
SAME_RUN_ATOL = 3e-4

FAST = dict(image_size=32, shapes_count=64, batch_size=8, lr=1e-3, warmup=5, log_every=5, quiet=True,
            device="cpu")  # fmt: skip


def run_torchrun(processes: int, ldm_args: list[str]) -> None:
    """`torchrun --nproc_per_node N -m latent_diffusion.cli ...` on a free local port (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes), "--master_addr",
         "127.0.0.1", "--master_port", str(port), "-m", "latent_diffusion.cli", *ldm_args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def weights(path: Path) -> dict:
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


def test_min_snr_weights_follow_the_formula():
    a = schedule.alphas_cumprod(schedule.scaled_linear_betas(0.00085, 0.012, 1000))[[0, 100, 500, 999]]
    snr = a / (1 - a)
    torch.testing.assert_close(min_snr_weight(a, 5.0, "eps"), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(min_snr_weight(a, 5.0, "v"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert min_snr_weight(a, 5.0, "eps")[-1] == 1.0  # high noise: SNR < γ, weight 1
    # a floor f: the x0 weight clamp(SNR, f, γ); at t = 999 (SNR 0.0047) the v weight is f/(SNR + 1), not ≈ SNR
    floored = min_snr_weight(a, 5.0, "v", floor=0.1)
    torch.testing.assert_close(floored, snr.clamp(0.1, 5.0) / (snr + 1))
    assert min_snr_weight(a, 5.0, "v")[-1] < 0.005 and 0.099 < floored[-1] < 0.1
    torch.testing.assert_close(floored[:2], min_snr_weight(a, 5.0, "v")[:2])  # SNR above the floor: unchanged


def test_ema_update_rule():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    ema_update(ema, model, decay=0.9999, num_updates=1)
    d = min(0.9999, 2 / 11)  # LitEma's warm-up: (1 + n) / (10 + n)
    torch.testing.assert_close(ema.weight, before - (1 - d) * (before - model.weight.detach()))
    before = ema.weight.detach().clone()
    ema_update(ema, model, decay=0.99, num_updates=10_000)
    torch.testing.assert_close(ema.weight, before - 0.01 * (before - model.weight.detach()))


def test_data_order_is_a_permutation_per_epoch():
    seen = global_batch_indices(0, 4, 10, 0) + global_batch_indices(1, 4, 10, 0) + global_batch_indices(2, 4, 10, 0)
    assert sorted(seen[:10]) == list(range(10))  # the first epoch visits each item once
    assert global_batch_indices(1, 4, 10, 0) == global_batch_indices(1, 4, 10, 0)


def test_diffusion_loss_against_the_formula():
    """An oracle that recovers the target from x_t (knowing z) has loss 0; a network that predicts 0 has the mean
    square of the target, ε or v = √ᾱ·ε − √(1−ᾱ)·z, weighted per sample by min-SNR-γ."""
    g = torch.Generator().manual_seed(0)
    alphas_cumprod = schedule.alphas_cumprod(schedule.scaled_linear_betas(0.00085, 0.012, 1000)).float()
    z, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    batch = Batch(z, {}, torch.tensor([5, 400, 990]), noise)
    a = alphas_cumprod[batch.timesteps][:, None, None, None]
    for parameterization, expected_target in (("eps", noise), ("v", a.sqrt() * noise - (1 - a).sqrt() * z)):

        def oracle(x_t, t, cond, p=parameterization):
            eps = (x_t - a.sqrt() * z) / (1 - a).sqrt()  # x_t = √ᾱ·z + √(1−ᾱ)·ε solved for ε
            return eps if p == "eps" else a.sqrt() * eps - (1 - a).sqrt() * z

        assert diffusion_loss(oracle, batch, alphas_cumprod, parameterization).item() < 1e-10
        zero = lambda x_t, t, cond: torch.zeros_like(x_t)  # noqa: E731
        per_sample = (expected_target**2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(diffusion_loss(zero, batch, alphas_cumprod, parameterization), per_sample.mean())
        for floor in (0.0, 0.3):  # t = 990 has SNR ≈ 0.005, below the floor
            weight = min_snr_weight(a.flatten(), 5.0, parameterization, floor)
            loss = diffusion_loss(zero, batch, alphas_cumprod, parameterization, min_snr_gamma=5.0, min_snr_floor=floor)
            torch.testing.assert_close(loss, (weight * per_sample).mean())


def test_resume_fingerprint_holds_every_field_but_the_resumable_ones():
    model = LatentDiffusion(preset("tiny"))
    base = TrainConfig(outdir="a")
    same = TrainConfig(outdir="b", steps=5000, log_every=1, save_every=7, sample_every=3, quiet=True, device="cpu")
    assert run_fingerprint(base, model) == run_fingerprint(same, model)
    for changed in ({"max_grad_norm": 0.5}, {"caption_default": "x"}, {"lr": 2e-4}, {"flip": True}):
        assert run_fingerprint(TrainConfig(outdir="a", **changed), model) != run_fingerprint(base, model), changed


def test_flip_with_cached_latents_is_refused_by_the_library(tmp_path):
    with pytest.raises(TrainError, match="--flip needs --no-cache-latents"):
        train(TrainConfig(outdir=str(tmp_path), flip=True, **FAST))
    assert list(tmp_path.iterdir()) == []


def test_min_snr_floor_outside_its_range_is_refused_before_any_work(tmp_path):
    with pytest.raises(TrainError, match="--min-snr-floor needs --min-snr-gamma"):
        train(TrainConfig(outdir=str(tmp_path), min_snr_floor=0.1, **FAST))
    with pytest.raises(TrainError, match="min-snr-floor must be between 0 and the gamma 5, not 6"):
        train(TrainConfig(outdir=str(tmp_path), min_snr_gamma=5, min_snr_floor=6, **FAST))
    assert list(tmp_path.iterdir()) == []


def test_prompt_dropout_rate(tmp_path, monkeypatch):
    """Over many steps, the share of empty prompts the model sees is the configured rate."""
    seen = []
    import latent_diffusion.training.diffusion as t

    real = t.TrainedParts.forward

    def spy(self, x_t, t_, cond):
        seen.extend((cond["tokens"][:, 0, 1:] == 49407).all(dim=1).tolist())  # "" = [sot, eot, eot, ...]
        return real(self, x_t, t_, cond)

    monkeypatch.setattr(t.TrainedParts, "forward", spy)
    cfg = TrainConfig(outdir=str(tmp_path), steps=40, prompt_dropout=0.25, train_text_encoder=True, ema_decay=0,
                      save_every=1000, **{**FAST, "batch_size": 16})  # fmt: skip
    train(cfg)
    rate = sum(seen) / len(seen)
    assert len(seen) == 640 and abs(rate - 0.25) < 4 * (0.25 * 0.75 / 640) ** 0.5  # 4 binomial standard errors


def test_sdxl_text_encoders_train_through_the_context_and_the_pooled_text(tmp_path):
    """`--train-text-encoder` on SDXL: the trained module encodes the tokens of both encoders in its forward into
    the conditioning the frozen path gives (dropped captions zeros, the vector from the pooled text and the sizes);
    two steps change both encoders, all but ViT-L's last block, which the context does not read."""
    from latent_diffusion.training.common import build_dataset
    from latent_diffusion.training.diffusion import TrainedParts, text_part
    from latent_diffusion.training.latent_cache import build_cache
    from latent_diffusion.training.step import Run, make_batch

    model, cpu = tiny_model("sdxl", seed=4), torch.device("cpu")
    save_model(model, tmp_path / "base.safetensors")
    cfg = TrainConfig(outdir=str(tmp_path / "run"), ckpt=str(tmp_path / "base.safetensors"), steps=2, ema_decay=0,
                      prompt_dropout=0.5, train_text_encoder=True, **FAST)  # fmt: skip
    frozen = TrainConfig(**{**cfg.__dict__, "train_text_encoder": False})
    data = build_dataset(cfg)
    with torch.no_grad():
        batches = [make_batch(Run(c, model, data, build_cache(model, data, cpu, c, True), cpu, 0, 1), 0, slice(0, 8))
                   for c in (cfg, frozen)]  # fmt: skip
        encoded = TrainedParts(model.model, text_part(model), {"device_type": "cpu", "enabled": False}).encode(
            batches[0].cond
        )
    dropped = batches[0].cond["dropped"]
    assert 0 < dropped.sum() < 8 and encoded.keys() == batches[1].cond.keys() == {"crossattn", "vector"}
    for key in encoded:
        torch.testing.assert_close(encoded[key], batches[1].cond[key], atol=1e-6, rtol=1e-6)
    assert (encoded["crossattn"][dropped] == 0).all() and (
        encoded["vector"][dropped, : model.cfg.text2.embed_dim] == 0
    ).all()

    train(cfg)
    before, after = model.state_dict(), load_model(tmp_path / "run" / "model.safetensors").state_dict()
    text = [k for k in before if k.startswith("conditioner.embedders.")]
    unchanged = {k for k in text if torch.equal(before[k], after[k])}
    # unread by the conditioning: ViT-L's last block and final norm (SDXL reads its penultimate hidden state raw),
    # OpenCLIP's logit scale (for image-text similarity); ViT-bigG's last block trains through the pooled text
    clip = "conditioner.embedders.0.transformer.text_model."
    unread = (
        f"{clip}encoder.layers.{model.cfg.text.layers - 1}.",
        f"{clip}final_layer_norm.",
        "conditioner.embedders.1.model.logit_scale",
    )
    assert unchanged == {k for k in text if k.startswith(unread)}


def test_loss_decreases_on_shapes(tmp_path):
    cfg = TrainConfig(outdir=str(tmp_path), steps=200, save_every=1000, train_text_encoder=True, **FAST)
    train(cfg)
    rows = [line.split(",") for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    first, last = float(rows[0][1]), sum(float(r[1]) for r in rows[-4:]) / 4
    assert last < 0.6 * first, (first, last)


def test_resume_is_exact_and_checkpoints_are_atomic(tmp_path):
    common = dict(save_every=3, train_text_encoder=True, **FAST)
    train(TrainConfig(outdir=str(tmp_path / "straight"), steps=6, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=3, **common))
    # A crash while writing the next checkpoint: a half-written temp folder is left behind and ignored.
    (tmp_path / "resumed" / "checkpoints" / ".tmp-step-0000006").mkdir()
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=6, resume=True, **common))
    a, b = weights(tmp_path / "straight" / "model.safetensors"), weights(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_model(tmp_path / "straight" / "model.safetensors", ema=True).unet.state_dict()
    ema_b = load_model(tmp_path / "resumed" / "model.safetensors", ema=True).unet.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-0000003", "step-0000006"]  # fmt: skip


def test_resume_refuses_another_config(tmp_path):
    train(TrainConfig(outdir=str(tmp_path), steps=2, save_every=2, **FAST))
    with pytest.raises(TrainError, match="other settings \\(lr\\)"):
        train(TrainConfig(outdir=str(tmp_path), steps=4, resume=True, **{**FAST, "lr": 5e-4}))


def test_two_processes_give_the_weights_of_one(tmp_path):
    common = ["--steps", "3", "--image-size", "32", "--shapes-count", "32", "--batch-size", "4", "--quiet",
              "--device", "cpu", "--ema-decay", "0"]  # fmt: skip
    assert main(["train", "--outdir", str(tmp_path / "one"), *common]) == 0
    run_torchrun(2, ["train", "--outdir", str(tmp_path / "two"), *common])
    a, b = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)


def test_saved_checkpoint_loads_in_diffusers(tmp_path):
    path = train(TrainConfig(outdir=str(tmp_path), steps=2, save_every=2, **FAST))
    model = load_model(path)
    theirs = diffusers_unet(model.cfg, model.state_dict())
    x, t, c = torch.randn(1, 4, 4, 4), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, {"crossattn": c}), theirs(x, t, encoder_hidden_states=c).sample, atol=1e-4, rtol=0
        )


# Data and bad input -------------------------------------------------------------------------------------------


def test_shapes_are_deterministic_and_captioned():
    a, b = ShapesDataset(5, 32, seed=3), ShapesDataset(5, 32, seed=3)
    assert [a[i][1] for i in range(5)] == [b[i][1] for i in range(5)]
    assert torch.equal(a[0][0], b[0][0]) and a[0][0].shape == (3, 32, 32)
    assert [a[i][1] for i in range(5)] == a.captions  # the wordings: tests/test_evaluate.py
    assert a.specs[0].caption == "a small yellow triangle at the top on a purple background"  # the template
    held_out = ShapesDataset(300, 32, exclude={("red", "circle")})
    assert not any(s.color == "red" and s.shape == "circle" for s in held_out.specs)


def test_only_the_autoencoder_sees_the_held_out_pairs(tmp_path, monkeypatch):
    """The held-out colour-shape pairs test the denoiser's composition of words, so its captions never name them;
    the autoencoder reads no captions and trains on every pair (stage 1 of benchmarks/builtin_model.sh)."""
    import latent_diffusion.training.autoencoder as stage1
    import latent_diffusion.training.diffusion as stage2
    from latent_diffusion.training import common as training

    seen = {}  # stage -> the (colour, shape) pairs of its data set

    def record(stage):
        def build(cfg, **kwargs):
            seen[stage] = {(s.color, s.shape) for s in training.build_dataset(cfg, **kwargs).specs}
            raise TrainError("stop")

        return build

    monkeypatch.setattr(stage1, "build_dataset", record("autoencoder"))
    monkeypatch.setattr(stage2, "build_dataset", record("denoiser"))
    with pytest.raises(TrainError, match="stop"):
        stage1.train_autoencoder(stage1.AutoencoderTrainConfig(outdir=str(tmp_path / "a"), shapes_count=400))
    with pytest.raises(TrainError, match="stop"):
        train(TrainConfig(outdir=str(tmp_path / "d"), **{**FAST, "shapes_count": 400}))
    assert seen["autoencoder"] >= HELD_OUT_PAIRS
    assert not HELD_OUT_PAIRS & seen["denoiser"] and len(seen["denoiser"]) == len(seen["autoencoder"]) - 3


def test_folder_forms_and_unreadable_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    (tmp_path / "3.png").write_bytes(b"not a png")
    (tmp_path / "3.txt").write_text("broken")
    data = ImageCaptionFolder(tmp_path, 16)
    items = [data.load(i) for i in range(len(data))]
    assert [it[1] for it in items if it] == ["image 0", "image 1", "image 2"]
    assert data.skipped == 1 and items[0][0].shape == (3, 16, 16)
    jsonl = tmp_path / "j"
    jsonl.mkdir()
    shutil.copy(tmp_path / "0.png", jsonl / "a.png")
    (jsonl / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from jsonl"}\n')
    assert ImageCaptionFolder(jsonl, 16).load(0)[1] == "from jsonl"


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda d: None, ["--data", "{d}/missing"], "no such data folder"),
        (lambda d: (d / "empty").mkdir(), ["--data", "{d}/empty"], "no images"),
        (lambda d: ((d / "nocap").mkdir(), Image.new("RGB", (8, 8)).save(d / "nocap" / "x.png")),
         ["--data", "{d}/nocap"], "1 images have no caption file (first: x.png)"),
        (lambda d: None, ["--shapes-count", "4", "--batch-size", "8"], "batch size 8 is larger than the data set (4"),
        (lambda d: (d / "blocker").write_text(""), ["--outdir", "{d}/blocker/out"], "cannot write to the output folder"),
        (lambda d: None, ["--resume"], "--resume: no checkpoint"),
    ],
)  # fmt: skip
def test_bad_training_input_exits_2(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    argv = ["train", "--outdir", str(tmp_path / "run"), "--steps", "1", "--quiet", "--image-size", "16"]
    argv += [a.replace("{d}", str(tmp_path)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_flip_mirrors_the_image(tmp_path):
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 16))  # a white stripe at the left
    image.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("stripe")
    plain = ImageCaptionFolder(tmp_path, 16).load(0)[0]
    data = ImageCaptionFolder(tmp_path, 16, flip=True)
    loads = [data.load(0, random.Random(seed))[0] for seed in range(20)]
    flipped = [torch.equal(x, plain.flip(-1)) for x in loads]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, loads))  # each load is one or the other
    assert 0 < sum(flipped) < 20 and plain[:, :, 0].mean() > 0.9 and plain[:, :, -1].mean() < -0.9


def test_caption_default_accepts_uncaptioned_images(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (0, i * 60, 0)).save(tmp_path / "d" / f"{i}.png")
    assert main(["train", "--outdir", str(tmp_path / "run"), "--data", str(tmp_path / "d"), "--caption-default",
                 "a green square", "--steps", "1", "--batch-size", "2", "--image-size", "16", "--quiet"]) == 0  # fmt: skip


def test_both_stages_from_scratch(tmp_path, capsys):
    """Stage 1 improves held-out reconstruction; stage 2 trains on its frozen latents and loads everywhere."""
    assert main(["train-autoencoder", "--outdir", str(tmp_path / "ae"), "--image-size", "32", "--shapes-count", "64",
                 "--steps", "250", "--warmup", "10", "--batch-size", "8", "--loss", "l2", "--lr-schedule", "cosine",
                 "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    start, end = map(float, re.search(r"\(3 images\): ([\d.]+) dB at the start, ([\d.]+) dB now", out).groups())
    # The tiny KL autoencoder learns slowly at first (diffusers' AutoencoderKL of the same size too: 8.7 dB after
    # 200 steps). Measured after these 250 fp32 steps, seeds 0-3: +4.0, +2.7, +3.6, +0.9 dB; this is seed 0.
    # (fp32: bf16 autocast is emulated on CPUs without AVX-512 and took 5 minutes here; the GAN test runs bf16.)
    assert end > start + 0.5, out
    ae = tmp_path / "ae" / "autoencoder.safetensors"
    assert main(["train", "--outdir", str(tmp_path / "ldm"), "--autoencoder", str(ae), "--image-size", "32",
                 "--shapes-count", "64", "--steps", "80", "--batch-size", "8", "--lr", "1e-3", "--warmup", "5",
                 "--lr-schedule", "cosine", "--train-text-encoder", "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    rows = [line.split(",") for line in (tmp_path / "ldm" / "log.csv").read_text().splitlines()[1:]]
    first, last = float(rows[0][1]), sum(float(r[1]) for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert float(rows[-1][2]) < 1e-5  # the cosine schedule ends near 0
    model = load_model(tmp_path / "ldm" / "model.safetensors")
    # The scale factor is 1/std of the new autoencoder's latents (scale_by_std), not SD's 0.18215.
    z = torch.cat([model.first_stage_model.encode(ShapesDataset(64, 32)[i][0][None]).mean for i in range(64)])
    assert abs(model.cfg.scale_factor * z.std().item() - 1) < 1e-3
    trained_ae = load_model(tmp_path / "ldm" / "model.safetensors").first_stage_model.state_dict()
    from safetensors.torch import load_file

    stage1 = load_file(ae)
    assert all(torch.equal(trained_ae[k], stage1["first_stage_model." + k]) for k in trained_ae)  # frozen
    assert model.cfg.unet.model_channels == 32


def test_sample_images_during_training_and_resume_on_another_process_count(tmp_path):
    """Samples every K steps; a run checkpointed by one process continues on two, exactly as one would."""
    common = ["--image-size", "32", "--shapes-count", "32", "--batch-size", "4", "--quiet", "--device", "cpu",
              "--save-every", "2", "--ema-decay", "0"]  # fmt: skip
    assert main(["train", "--outdir", str(tmp_path / "one"), "--steps", "4", "--sample-every", "2", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "one" / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert main(["train", "--outdir", str(tmp_path / "mixed"), "--steps", "2", *common]) == 0
    run_torchrun(2, ["train", "--outdir", str(tmp_path / "mixed"), "--steps", "4", "--resume", *common])
    a, b = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "mixed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)


def test_autoencoder_with_the_patch_gan(tmp_path):
    """The adversarial term enters the loss from disc_start on, as −disc_weight·D(x̂); the discriminator's hinge
    step changes its weights; a run with it writes first_stage_model.* weights."""
    from latent_diffusion.models.autoencoder import AutoencoderKL
    from latent_diffusion.training.autoencoder import (
        AutoencoderTrainConfig,
        PatchDiscriminator,
        autoencoder_loss,
        discriminator_step,
        train_autoencoder,
    )

    cfg = AutoencoderTrainConfig(outdir=str(tmp_path), disc_start=2, disc_weight=0.5)
    torch.manual_seed(0)
    model, disc = AutoencoderKL(preset("tiny").autoencoder), PatchDiscriminator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before, _, parts = autoencoder_loss(model, disc, x, 1, cfg, torch.Generator().manual_seed(1))
    assert set(parts) == {"rec", "kl"} and torch.equal(before, parts["rec"] + parts["kl"])
    after, x_rec, parts = autoencoder_loss(model, disc, x, 2, cfg, torch.Generator().manual_seed(1))
    assert set(parts) == {"rec", "kl", "gan"} and torch.equal(after, parts["rec"] + parts["kl"] + parts["gan"])
    weights = [p.detach().clone() for p in disc.parameters()]
    discriminator_step(disc.train(), torch.optim.Adam(disc.parameters(), lr=1e-3), x, x_rec)
    # every convolution kernel moves (the last bias may not: with all hinges active its gradient is −1 + 1 = 0)
    assert all(not torch.equal(w, p) for w, p in zip(weights, disc.parameters()) if p.ndim == 4)

    path, report = train_autoencoder(AutoencoderTrainConfig(
        outdir=str(tmp_path), image_size=32, shapes_count=32, steps=3, batch_size=4, disc_start=1, precision="bf16",
        quiet=True, device="cpu"))  # fmt: skip
    assert math.isfinite(report["psnr"]) and math.isfinite(report["psnr_start"])
    assert all(k.startswith("first_stage_model.") for k in load_file(path))


def test_fine_tuning_from_a_checkpoint(tmp_path):
    """--ckpt: the checkpoint's U-Net is trained from its own weights; its autoencoder and (frozen) text encoder
    are saved unchanged, and the result loads with the checkpoint's config."""
    torch.manual_seed(0)
    start = LatentDiffusion(preset("tiny"))
    save_model(start, tmp_path / "start.safetensors")
    path = train(TrainConfig(outdir=str(tmp_path / "ft"), ckpt=str(tmp_path / "start.safetensors"), steps=2,
                             save_every=2, ema_decay=0, **FAST))  # fmt: skip
    tuned = load_model(path)
    assert tuned.cfg == start.cfg
    a, b = start.state_dict(), tuned.state_dict()
    for prefix in ("first_stage_model.", "cond_stage_model."):
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)), prefix
    moved = [k for k in a if k.startswith("model.diffusion_model.") and not torch.equal(a[k], b[k])]
    assert len(moved) > 0.9 * sum(k.startswith("model.diffusion_model.") for k in a)


def test_gradient_accumulation_and_bf16(tmp_path):
    """Accumulating 2 micro-batches of 4 gives the weights of one batch of 8; bf16 autocast trains too."""
    common = dict(steps=3, save_every=3, ema_decay=0, **{**FAST, "batch_size": 8})
    train(TrainConfig(outdir=str(tmp_path / "one"), **common))
    train(TrainConfig(outdir=str(tmp_path / "acc"), grad_accum=2, **common))
    a, b = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "acc" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)
    train(TrainConfig(outdir=str(tmp_path / "bf16"), precision="bf16", **common))
    rows = (tmp_path / "bf16" / "log.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows)  # neither NaN nor ±inf


def test_native_bfloat16_is_read_from_the_cpu_flags():
    """The CPU probe agrees with the kernel's list of the CPU's features (Linux)."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert has_native_bfloat16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_tile"})


def test_precision_auto_is_bf16_only_where_native(tmp_path, monkeypatch, capsys):
    """auto: bf16 on a device with native bfloat16, else fp32, and a run records what it resolved to (so a resume
    elsewhere cannot change it silently); an explicit bf16 without native support runs, with one warning line."""
    cpu = torch.device("cpu")
    monkeypatch.setattr("latent_diffusion.training.common.has_native_bfloat16", lambda device: True)
    assert resolve_precision("auto", cpu) == "bf16" and resolve_precision("bf16", cpu) == "bf16"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("latent_diffusion.training.common.has_native_bfloat16", lambda device: False)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp16", cpu) == "fp16"
    assert capsys.readouterr().err == ""
    assert resolve_precision("bf16", cpu) == "bf16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no native bfloat16" in err and "--precision auto" in err
    train(TrainConfig(outdir=str(tmp_path), steps=2, save_every=2, precision="auto", **FAST))
    train(TrainConfig(outdir=str(tmp_path), steps=3, save_every=3, precision="fp32", resume=True, **FAST))


def test_compiled_training_gives_the_weights_of_eager(tmp_path, monkeypatch):
    """--compile with the text encoder trained: the same weights as eager after 3 steps, and the same keys.
    aot_eager traces the forward and backward graphs that inductor would build kernels for (minutes on 2 cores)."""
    monkeypatch.setattr("latent_diffusion.training.diffusion.COMPILE_BACKEND", "aot_eager")
    common = dict(steps=3, save_every=3, ema_decay=0, train_text_encoder=True, **FAST)
    train(TrainConfig(outdir=str(tmp_path / "eager"), **common))
    train(TrainConfig(outdir=str(tmp_path / "compiled"), compile=True, **common))
    a, b = weights(tmp_path / "eager" / "model.safetensors"), weights(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)


def test_new_run_refuses_an_outdir_with_checkpoints(tmp_path):
    train(TrainConfig(outdir=str(tmp_path), steps=1, save_every=1, **FAST))
    with pytest.raises(TrainError, match="holds checkpoints of an earlier run: pass --resume"):
        train(TrainConfig(outdir=str(tmp_path), steps=1, save_every=1, **FAST))


def test_uncached_training_with_flips_and_an_unreadable_image(tmp_path):
    """Without the cache every step encodes its images; an unreadable one is replaced, never a crash."""
    (tmp_path / "d").mkdir()
    for i in range(4):
        Image.new("RGB", (24, 16), (i * 60, 0, 200)).save(tmp_path / "d" / f"{i}.png")
        (tmp_path / "d" / f"{i}.txt").write_text(f"picture {i}")
    (tmp_path / "d" / "4.png").write_bytes(b"broken")
    (tmp_path / "d" / "4.txt").write_text("broken")
    assert main(["train", "--outdir", str(tmp_path / "run"), "--data", str(tmp_path / "d"), "--no-cache-latents",
                 "--flip", "--steps", "3", "--batch-size", "5", "--image-size", "16", "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_loss_plot_is_drawn_from_log_csv(tmp_path):
    """loss.png from log.csv's rows (a torn last row left out), with a moving average as written; one row: none."""
    from latent_diffusion.training.loss_plot import HEIGHT, WIDTH, moving_average, plot_loss, read_log

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    log = tmp_path / "log.csv"
    log.write_text("step,loss,lr,steps_per_s\n10,0.5,1e-4,3\n20,0.25,1e-4,3\n30,0.2,1e-4,3\n40,0.")
    assert read_log(log) == [(10, 0.5), (20, 0.25), (30, 0.2)]  # "0." is 0: no loss on a log scale
    plot_loss(log, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (WIDTH, HEIGHT)
    log.write_text("step,loss,lr,steps_per_s\n10,0.5,1e-4,3\n")
    plot_loss(log, tmp_path / "one.png")
    assert not (tmp_path / "one.png").exists()
