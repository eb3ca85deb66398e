"""Training in less memory: bitsandbytes' 8-bit AdamW (its state 8-bit, resumed exactly, refused in one line
where the device has none) and the latent cache on disk (the in-memory cache's weights bit for bit, each image
encoded once, again when it or the autoencoder changes)."""

import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latent_diffusion.training.latent_cache as latent_cache
import latent_diffusion.training.optimizers as optimizers
from latent_diffusion import LatentDiffusion, preset
from latent_diffusion.cli import main
from latent_diffusion.training.config import TrainConfig
from latent_diffusion.training.diffusion import train
from test_train import FAST, weights


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adamw8bit_keeps_8_bit_states_and_resumes_exactly(tmp_path, monkeypatch):
    bitsandbytes = pytest.importorskip("bitsandbytes")  # (the test extra installs it)
    states = []
    real = optimizers.build_optimizer

    def keep(*args):
        states.append(optimizer := real(*args))
        return optimizer

    monkeypatch.setattr("latent_diffusion.training.diffusion.build_optimizer", keep)
    common = dict(save_every=3, optimizer="adamw8bit", ema_decay=0, **FAST)
    train(TrainConfig(outdir=str(tmp_path / "straight"), steps=6, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=3, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=6, resume=True, **common))
    assert same(
        weights(tmp_path / "straight" / "model.safetensors"), weights(tmp_path / "resumed" / "model.safetensors")
    )
    assert all(isinstance(o, bitsandbytes.optim.AdamW8bit) for o in states)
    kinds = {v.dtype for state in states[0].state.values() for k, v in state.items() if k in ("state1", "state2")}
    assert kinds == {torch.uint8, torch.float32}  # 8-bit moments, 32-bit ones for tensors under 4096 values
    plain = train(TrainConfig(outdir=str(tmp_path / "adamw"), steps=6, **{**common, "optimizer": "adamw"}))
    a, b = weights(plain), weights(tmp_path / "straight" / "model.safetensors")
    assert not same(a, b) and max((a[k] - b[k]).abs().max().item() for k in a) < 0.05  # the same steps, roughly
    with pytest.raises(Exception, match="other settings \\(optimizer\\)"):
        train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=7, resume=True, **{**common, "optimizer": "adamw"}))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optimizer", "sgd"], "optimizer must be one of adamw, adamw8bit, not 'sgd'"),
        (["--optimizer", "adamw8bit"], "bitsandbytes 0.0 has no 8-bit AdamW for device cpu (no kernel)"),
        (["--no-cache-latents", "--cache-latents-to-disk"], "--cache-latents-to-disk needs --cache-latents"),
        (["--cache-text-encoder-outputs-to-disk", "--train-text-encoder"], "--cache-text-encoder-outputs-to-disk"),
        (["--cache-text-encoder-outputs-to-disk", "--shuffle-caption"], "captions encoded once: not with"),
    ],
)
def test_bad_memory_options_exit_2(tmp_path, capsys, monkeypatch, args, message):
    class NoKernel:  # a bitsandbytes without this device's kernels
        __version__ = "0.0"

        class optim:
            class AdamW8bit:
                def __init__(self, params):
                    pass

                def step(self):
                    raise RuntimeError("no kernel")

    monkeypatch.setattr(optimizers, "import_bitsandbytes", lambda: NoKernel)
    argv = ["train", "--outdir", str(tmp_path / "run"), "--steps", "1", "--quiet", "--image-size", "16", "--device"]
    assert main([*argv, "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_latents_cached_on_disk_train_as_in_memory_and_are_encoded_once(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    encoded = []
    real = latent_cache.encode

    def count(model, dataset, indices, device, quiet):
        encoded.append(len(indices))
        yield from real(model, dataset, indices, device, quiet)

    monkeypatch.setattr(latent_cache, "encode", count)
    common = dict(data=str(data), save_every=2, **{**FAST, "batch_size": 2})
    memory = train(TrainConfig(outdir=str(tmp_path / "memory"), steps=4, **common))
    disk = tmp_path / "disk"
    train(TrainConfig(outdir=str(disk), steps=2, cache_latents_to_disk=True, **common))
    assert len(list((disk / "cache" / "latents").rglob("*.safetensors"))) == 4
    train(TrainConfig(outdir=str(disk), steps=4, resume=True, cache_latents_to_disk=True, **common))
    assert encoded == [4, 4, 0]  # in memory; the disk cache's first run; its resume reads the files
    assert same(weights(memory), weights(disk / "model.safetensors"))

    # A changed image is encoded again (its size and modification time changed), the others are read
    Image.new("RGB", (48, 32), (0, 0, 0)).save(data / "1.png")
    os.utime(data / "1.png", ns=(1, 1))
    train(TrainConfig(outdir=str(disk), steps=5, resume=True, cache_latents_to_disk=True, **common))
    assert encoded[3:] == [1]
    # and every image is encoded again for another autoencoder (a new run in the same folder)
    shutil.rmtree(disk / "checkpoints")
    vae = LatentDiffusion(preset("tiny")).first_stage_model.state_dict()
    save_file({f"first_stage_model.{k}": v + 0.01 for k, v in vae.items()}, tmp_path / "vae.safetensors")
    other = dict(common, autoencoder=str(tmp_path / "vae.safetensors"))
    train(TrainConfig(outdir=str(disk), steps=1, cache_latents_to_disk=True, **other))
    assert encoded[4:] == [4] and len(list((disk / "cache" / "latents").rglob("*.safetensors"))) == 9


def test_text_embeddings_cached_on_disk_train_as_in_memory_and_are_encoded_once(tmp_path, monkeypatch):
    """SDXL (context and pooled text): each distinct caption, the empty one too, a file under OUTDIR/cache/text/,
    written by the first run, read by its resume; the weights those runs give are the in-memory cache's, bit for
    bit; another text encoder's captions are encoded again."""
    from latent_diffusion import save_model

    from conftest import tiny_model

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i % 3}")  # 3 distinct captions
    model = tiny_model("sdxl", seed=6)
    save_model(model, tmp_path / "base.safetensors")
    encoded = []
    real = LatentDiffusion.get_text_conditioning
    monkeypatch.setattr(
        LatentDiffusion, "get_text_conditioning", lambda self, p, **k: encoded.append(len(p)) or real(self, p, **k)
    )
    common = dict(data=str(data), ckpt=str(tmp_path / "base.safetensors"), save_every=2, ema_decay=0,
                  prompt_dropout=0.5, **{**FAST, "batch_size": 2})  # fmt: skip
    memory = train(TrainConfig(outdir=str(tmp_path / "memory"), steps=4, **common))
    disk, flag = tmp_path / "disk", dict(cache_text_encoder_outputs_to_disk=True)
    encoded.clear()
    train(TrainConfig(outdir=str(disk), steps=2, **common, **flag))
    assert encoded == [4] and len(list((disk / "cache" / "text").rglob("*.safetensors"))) == 4
    train(TrainConfig(outdir=str(disk), steps=4, resume=True, **common, **flag))
    assert encoded == [4]  # the resume read the files
    assert same(weights(memory), weights(disk / "model.safetensors"))

    model.conditioner.embedders[0].transformer.text_model.final_layer_norm.weight.data += 0.01  # another encoder
    save_model(model, tmp_path / "base.safetensors")
    shutil.rmtree(disk / "checkpoints")
    train(TrainConfig(outdir=str(disk), steps=1, **common, **flag))
    assert encoded == [4, 4] and len(list((disk / "cache" / "text").rglob("*.safetensors"))) == 8
