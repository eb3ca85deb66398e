"""--fsdp (FSDP2): two sharded processes give the weights of one unsharded process, a sharded checkpoint resumes
exactly (and on another number of processes), LoRA and ControlNet training shard too, and what does not combine
with it is refused before any work. A run without torchrun shards over a group of one, which checks the plan and
the checkpoint format in-process."""

import pytest
import torch
from safetensors.torch import load_file

from latent_diffusion import load_model
from latent_diffusion.cli import main
from latent_diffusion.training.common import TrainError
from latent_diffusion.training.config import TrainConfig
from latent_diffusion.training.controlnet import ControlNetTrainConfig, train_controlnet
from latent_diffusion.training.diffusion import train
from latent_diffusion.training.lora import train_lora
from test_train import FAST, SAME_RUN_ATOL, run_torchrun, weights

ARGS = ["--image-size", "32", "--shapes-count", "32", "--batch-size", "4", "--quiet", "--device", "cpu"]


def ema_weights(path) -> dict:
    return load_model(path, ema=True).unet.state_dict()


def assert_same_run(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=SAME_RUN_ATOL, rtol=0)


def test_two_sharded_processes_give_the_weights_of_one_and_resume_on_one(tmp_path):
    """The U-Net and its EMA sharded over two processes train as one process without sharding (SAME_RUN_ATOL:
    the gradients are summed in another order); the two processes' checkpoint, resharded onto one, goes on as the
    unsharded run goes on (resuming may leave the disk cache: it is the in-memory cache's latents)."""
    assert main(["train", "--outdir", str(tmp_path / "one"), "--steps", "3", *ARGS]) == 0
    # (and the latents cached on disk: rank 0 writes the files, both processes read them, the resume too)
    run_torchrun(
        2, ["train", "--outdir", str(tmp_path / "two"), "--fsdp", "--cache-latents-to-disk", "--steps", "3", *ARGS]
    )
    one, two = tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors"
    assert_same_run(weights(one), weights(two))
    assert_same_run(ema_weights(one), ema_weights(two))
    checkpoint = tmp_path / "two" / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "sharded", "state.pt"]
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    assert main(["train", "--outdir", str(tmp_path / "one"), "--steps", "4", "--resume", *ARGS]) == 0
    assert main(["train", "--outdir", str(tmp_path / "two"), "--fsdp", "--steps", "4", "--resume", *ARGS]) == 0
    assert len(list((tmp_path / "two" / "cache" / "latents").rglob("*.safetensors"))) == 32
    assert_same_run(weights(one), weights(two))
    assert_same_run(ema_weights(one), ema_weights(two))


def test_sharded_checkpoint_resumes_bit_for_bit(tmp_path):
    """3 steps + resume + 3 steps equal 6 steps exactly: weights, EMA, optimizer state all come back from the
    shards; a half-written checkpoint is ignored; an unsharded run cannot resume a sharded one."""
    common = dict(save_every=3, fsdp=True, train_text_encoder=True, **FAST)
    train(TrainConfig(outdir=str(tmp_path / "straight"), steps=6, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=3, **common))
    (tmp_path / "resumed" / "checkpoints" / ".tmp-step-0000006").mkdir()  # a crash while writing the next one
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=6, resume=True, **common))
    for read in (weights, ema_weights):
        a, b = read(tmp_path / "straight" / "model.safetensors"), read(tmp_path / "resumed" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainError, match="other settings \\(fsdp\\)"):
        train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=7, resume=True, **{**common, "fsdp": False}))


@pytest.mark.parametrize("kind", ["lora", "controlnet"])
def test_lora_and_controlnet_training_shard_too(tmp_path, kind):
    """On a group of one, sharded training of a LoRA (the frozen U-Net's blocks sharded, the adapters in the root
    unit, with dropout and the text encoder's adapters at their own rate) and of a ControlNet (its blocks and the
    frozen U-Net's) gives the unsharded run's file, and resumes exactly: the frozen weights are not in the shards."""
    if kind == "lora":
        config, run = TrainConfig, train_lora
        common = dict(lora=2, lora_dropout=0.3, train_text_encoder=True, text_encoder_lr=5e-3, **FAST)
    else:
        config, run = ControlNetTrainConfig, train_controlnet
        common = dict(**{**FAST, "shapes_count": 32})
    plain = run(config(outdir=str(tmp_path / "plain"), steps=3, save_every=3, **common))
    common["fsdp"] = True
    straight = run(config(outdir=str(tmp_path / "straight"), steps=6, save_every=3, **common))
    assert_same_run(load_file(plain), load_file(straight.parent / "checkpoints" / "step-0000003" / plain.name))
    run(config(outdir=str(tmp_path / "resumed"), steps=3, save_every=3, **common))
    resumed = run(config(outdir=str(tmp_path / "resumed"), steps=6, save_every=3, resume=True, **common))
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optimizer", "adamw8bit"], "--optimizer adamw8bit does not combine with --fsdp"),
        (["--sample-every", "1"], "--sample-every does not combine with --fsdp"),
        (["--compile"], "--compile does not combine with --fsdp yet"),
    ],
)
def test_what_does_not_combine_with_fsdp_exits_2(tmp_path, capsys, args, message):
    assert main(["train", "--outdir", str(tmp_path / "run"), "--fsdp", "--steps", "1", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_mixed_precision_casts_the_gathered_weights(tmp_path, monkeypatch):
    """--precision bf16 under --fsdp: the blocks run on bfloat16 copies of the gathered weights (FSDP's
    MixedPrecisionPolicy), the shards, the optimizer and the file stay float32. Against autocast alone (float32
    weights, cast op by op) only the rounding differs; coordinates whose gradient nearly cancels may step the other
    way, so the check is on the mean difference, a tenth of the 3 steps' largest movement (1.2e-3)."""
    import latent_diffusion.training.diffusion as stage2

    seen = []
    real = stage2.TrainedParts.forward

    def spy(self, x_t, t, cond):
        seen.append(self.wrapper.diffusion_model.out[2].weight.dtype)
        return real(self, x_t, t, cond)

    monkeypatch.setattr(stage2.TrainedParts, "forward", spy)
    common = dict(steps=3, save_every=3, ema_decay=0, **{**FAST, "precision": "bf16"})
    a = weights(train(TrainConfig(outdir=str(tmp_path / "autocast"), **common)))
    b = weights(train(TrainConfig(outdir=str(tmp_path / "sharded"), fsdp=True, **common)))
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in b.values())
    difference = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()]).mean()
    assert difference < 1.2e-4, difference
