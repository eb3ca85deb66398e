"""Bad input, faults and concurrent use, tried as an adversarial user would: one line and exit code 2 for bad
input before any work, exit code 1 for a failure of the environment or of the run, nothing half-written."""

import dataclasses
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion import load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.pipeline.images import load_image
from latent_diffusion.pipeline.infotext import parse_parameters


def ldm(*args) -> list[str]:
    return [sys.executable, "-m", "latent_diffusion.cli", *map(str, args)]


TINY = ["--width", 24, "--height", 24, "--steps", 1, "--quiet"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cfg-scale", "nan"], "--cfg-scale must be between -100 and 100, not nan"),
        (["--cfg-scale", "inf"], "--cfg-scale must be between -100 and 100, not inf"),
        (["--sampler", "ddim", "--eta", "nan"], "--eta must be between 0 and 10, not nan"),
        (["--width", 0], "--width and --height must be positive multiples of 8 up to 8192, not 0"),
        (["--width", 100000, "--height", 100000], "up to 8192, not 100000"),
        (["--sampler", "ddim", "--steps", 1001], "steps: 1001 steps with leading spacing do not fit the model's 1000"),
        (["--seed", 2**64], "seeds must be whole numbers in [0, 2^64)"),
        (["--seed", 2**64 - 1, "--batch-size", 2], "seeds must be whole numbers in [0, 2^64), not 18446744073709551616"),
        (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "prompts must be UTF-8 text"),
        (["--sampler", "DPM fast"], "--sampler: unknown sampler 'DPM fast'; choose one of DDPM, DDIM"),
        (["--scheduler", "linear"], "unknown scheduler 'linear'; choose one of automatic, uniform, karras"),
        (["--prompt", "x <lora:style:-1e30>"], "prompt: <lora:style> at a weight of -1e+30 is beyond ±100"),
    ],
)  # fmt: skip
def test_bad_generation_input_is_one_line_and_exit_2(tmp_path, ckpt, capsys, args, message):
    out = tmp_path / "out"
    argv = ["txt2img", "--ckpt", ckpt, "--prompt", "x", "--outdir", out, *TINY[4:], *args]
    if "--width" not in args:
        argv += TINY[:4]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_eval_batch_size_0_is_refused(capsys):
    assert main(["eval", "--batch-size", "0", "--count", "1", "--quiet"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_checkpoint_with_nan_weights_fails_with_exit_1_and_writes_nothing(tmp_path, tiny_models, capsys):
    broken = dataclasses.replace(tiny_models["sd1"].cfg)
    from latent_diffusion import LatentDiffusion

    model = LatentDiffusion(broken)
    model.load_state_dict(tiny_models["sd1"].state_dict())
    with torch.no_grad():
        model.unet.out[2].bias.fill_(float("nan"))
    save_model(model, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    assert main(["txt2img", "--ckpt", str(tmp_path / "nan.safetensors"), "--prompt", "x", "--outdir", str(out),
                 *map(str, TINY)]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "step 1 of 1 gave non-finite latents" in err and err.count("\n") == 1
    assert not out.exists()  # not even the folder the run made


def test_zero_scale_factor_in_metadata_is_refused(tmp_path, tiny_models, capsys):
    model = tiny_models["sd1"]
    from safetensors.torch import save_file

    cfg = dataclasses.asdict(model.cfg) | {"scale_factor": 0.0}
    import json

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, tmp_path / "zero.safetensors", metadata={"latent_diffusion.config": json.dumps(cfg)})
    assert main(["info", str(tmp_path / "zero.safetensors")]) == 2
    assert "scale_factor must be a positive finite number, not 0.0" in capsys.readouterr().err


def test_concurrent_runs_into_one_folder_keep_every_image(tmp_path, ckpt):
    """Three processes write 3 images each into one folder at once: 9 files, each with its own metadata."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(ldm("txt2img", "--ckpt", ckpt, "--prompt", f"run {k}", "--seed", 100 * k,
                                 "--batch-size", 3, "--outdir", out, *TINY), env=env, stderr=subprocess.PIPE)
            for k in (1, 2, 3)]  # fmt: skip
    assert all(run.wait(timeout=120) == 0 for run in runs)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 9 and sorted(n[:5] for n in names) == [f"{i:05d}" for i in range(1, 10)]
    for name in names:
        with Image.open(out / name) as im:
            info = parse_parameters(im.text["parameters"])
        seed = int(name[6:-4])
        assert info["Seed"] == str(seed) and info["prompt"] == f"run {seed // 100}"


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["txt2img", "train"])
def test_disk_full_is_one_line_exit_1_and_no_partial_file(tmp_path, ckpt, command):
    """A file-size limit of 4 KB: the PNG (txt2img) or the checkpoint (train) cannot be written."""
    out = tmp_path / "out"
    if command == "txt2img":
        args = ldm("txt2img", "--ckpt", ckpt, "--prompt", "x", "--outdir", out, "--width", 64, "--height", 64,
                   "--steps", 1, "--quiet")  # fmt: skip
    else:
        args = ldm("train", "--outdir", out, "--steps", 1, "--image-size", 16, "--shapes-count", 8, "--batch-size", 4,
                   "--quiet", "--device", "cpu", "--ema-decay", 0)  # fmt: skip
    run = subprocess.run(args, preexec_fn=_file_size_limit(4096), capture_output=True, text=True, check=False)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and "cannot write" in run.stderr and "File too large" in run.stderr, run.stderr
    written = [p for p in out.rglob("*") if p.name not in ("log.csv", ".lock") and not p.is_dir()]
    assert written == []


def test_images_of_every_mode_load_as_they_look(tmp_path):
    grey16 = np.array([[8000, 32768], [0, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    torch.testing.assert_close(load_image(tmp_path / "g16.png", "L")[0, 0],
                               torch.tensor([[31, 128], [0, 255]]) / 255.0)  # fmt: skip
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png")[0, :, 0].tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]  # white, red
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg")[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 255] * 256)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_image_pixel_count_is_checked_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    opened = []
    monkeypatch.setattr(Image.Image, "load", lambda self: opened.append(1))
    with pytest.raises(ValueError, match="the image is 20x20, over the limit of 100 pixels"):
        load_image(tmp_path / "big.png", max_pixels=100)
    assert opened == []  # refused from the header alone


# Training ------------------------------------------------------------------------------------------------------

FAST = dict(image_size=32, shapes_count=32, batch_size=4, lr=1e-3, warmup=5, log_every=1, quiet=True, device="cpu",
            ema_decay=0.9, train_text_encoder=True)  # fmt: skip


def test_a_second_run_in_one_outdir_is_refused_naming_the_first(tmp_path):
    from latent_diffusion.training.common import TrainError, lock_outdir
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.diffusion import train

    holder = lock_outdir(tmp_path)  # as a running training process holds it
    with pytest.raises(TrainError, match=f"in use by another training run \\(process {os.getpid()}\\)"):
        train(TrainConfig(outdir=str(tmp_path), steps=1, **FAST))
    holder.close()  # released (a killed process releases it too): the folder is free again
    train(TrainConfig(outdir=str(tmp_path), steps=1, save_every=1, **FAST))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.diffusion import train

    out = tmp_path_factory.mktemp("straight")
    train(TrainConfig(outdir=str(out), steps=6, save_every=2, **FAST))
    return out


@pytest.mark.parametrize("damage", ["truncated state", "empty state", "no state", "truncated model"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, straight_run, damage, capsys):
    """The newest checkpoint is damaged: resume takes the one before it, says so, and the run still ends with the
    weights of the straight run; log.csv holds each step once."""
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.diffusion import train

    train(TrainConfig(outdir=str(tmp_path), steps=4, save_every=2, **FAST))
    newest = tmp_path / "checkpoints" / "step-0000004"
    file = newest / ("model.safetensors" if "model" in damage else "state.pt")
    if damage == "no state":
        file.unlink()
    else:
        data = file.read_bytes()
        file.write_bytes(b"" if damage == "empty state" else data[: len(data) // 2])
    train(TrainConfig(outdir=str(tmp_path), steps=6, save_every=2, resume=True, **FAST))
    assert "resume skipped damaged checkpoints: step-0000004" in capsys.readouterr().err
    a, b = load_model(straight_run / "model.safetensors"), load_model(tmp_path / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    steps = [int(row.split(",")[0]) for row in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_no_checkpoint_that_verifies_is_refused(tmp_path):
    from latent_diffusion.training.common import TrainError
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.diffusion import train

    train(TrainConfig(outdir=str(tmp_path), steps=2, save_every=2, **FAST))
    (tmp_path / "checkpoints" / "step-0000002" / "state.pt").write_bytes(b"")
    with pytest.raises(TrainError, match=r"no checkpoint in .* verifies: step-0000002 \(state.pt: "):
        train(TrainConfig(outdir=str(tmp_path), steps=4, save_every=2, resume=True, **FAST))


def test_a_diverging_run_stops_with_exit_1_and_keeps_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--outdir", str(out), "--lr", "1e30", "--steps", "20", "--save-every", "1", "--image-size",
                 "32", "--shapes-count", "32", "--batch-size", "4", "--quiet", "--device", "cpu"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "not finite; the step was not applied" in err and err.count("\n") == 1
    model = load_model(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train-autoencoder", "--kl-weight", "nan"], "kl-weight must be a finite number, not nan"),
        (["train", "--lr", "inf"], "lr must be a finite number, not inf"),
    ],
)
def test_non_finite_training_flags_are_refused(tmp_path, capsys, argv, message):
    assert main([*argv, "--outdir", str(tmp_path / "o"), "--steps", "1", "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, ckpt, monkeypatch, capsys):
    import latent_diffusion.pipeline.plan as plan

    monkeypatch.setattr(plan, "available_memory", lambda device: 10 * 2**20)  # a device with 10 MiB free
    out = tmp_path / "out"
    argv = ["txt2img", "--ckpt", str(ckpt), "--prompt", "x", "--outdir", str(out), "--steps", "1", "--quiet"]
    assert main([*argv, "--width", "64", "--height", "64", "--batch-size", "4"]) == 2
    assert (
        "--batch-size: 4 images of 64x64 need about 16 MiB at once, more than the 10 MiB free"
        in capsys.readouterr().err
    )
    assert not out.exists()
    assert main([*argv, "--width", "24", "--height", "24", "--batch-size", "4"]) == 0  # 4 x 24 x 24 fits


@pytest.mark.parametrize(
    "change,message",
    [
        ({"timesteps": 300_000_000}, "LatentDiffusionConfig.timesteps must be whole numbers in [2, 100000]"),
        ({"unet": {"num_heads": 0}}, "UNetConfig.num_heads must be whole numbers in [1, 256], not 0"),
        ({"unet": {"out_channels": 8}}, "output channels do not fit the autoencoder's 4 latent channels"),
        ({"unet": {"model_channels": "32"}}, "UNetConfig.model_channels must be whole numbers"),
        ({"text": {"heads": 3}}, "width 32 does not split into 3 heads"),
        ({"autoencoder": None}, "is not a valid config"),
    ],
)  # fmt: skip
def test_config_metadata_out_of_range_is_refused_with_its_range(tmp_path, tiny_models, capsys, change, message):
    import json

    from safetensors.torch import save_file

    cfg = json.loads(tiny_models["sd1"].cfg.to_json())
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    tensors = {k: v.contiguous() for k, v in tiny_models["sd1"].state_dict().items()}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"latent_diffusion.config": json.dumps(cfg)})
    assert main(["info", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _folder(root, files: dict) -> str:
    root.mkdir()
    for name, content in files.items():
        if content is None:
            (root / name).mkdir()
        elif isinstance(content, Image.Image):
            content.save(root / name)
        else:
            (root / name).write_bytes(content)
    return str(root)


@pytest.mark.parametrize(
    "files,message",
    [
        ({"a.png": Image.new("RGB", (8, 8)), "a.txt": None}, "a.txt: cannot read it"),
        ({"a.png": Image.new("RGB", (8, 8)), "metadata.jsonl": None}, "metadata.jsonl: cannot read it"),
        ({"a.png": Image.new("RGB", (8, 8)), "metadata.jsonl": b'{"file_name": "a.png", "text": "caf\xe9"}\n'},
         "metadata.jsonl: not UTF-8 text (byte 35)"),
        ({"a.png": b"broken", "a.txt": b"x", "b.png": b"broken", "b.txt": b"y"},
         "none of the 2 images of the data set can be read"),
    ],
)  # fmt: skip
def test_bad_data_folders_are_one_line_exit_2(tmp_path, capsys, files, message):
    data = _folder(tmp_path / "data", files)
    argv = ["train", "--outdir", str(tmp_path / "run"), "--data", data, "--steps", "1", "--batch-size", "1",
            "--image-size", "8", "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_eval_json_into_a_missing_folder_is_refused_before_the_evaluation(tmp_path, capsys):
    assert main(["eval", "--json", str(tmp_path / "no" / "s.json"), "--count", "1", "--quiet"]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_a_float16_decode_that_overflows_is_done_again_in_float32(tiny_models):
    """Decoder activations past float16's 65504 (here: post_quant_conv scaled by 1e4) give NaN in float16; the
    decode is redone in float32 and matches the float32 model's (to float16's rounding of the weights)."""
    import copy

    from latent_diffusion.pipeline.generate import decode

    model = copy.deepcopy(tiny_models["sd1"])
    with torch.no_grad():
        model.first_stage_model.post_quant_conv.weight.mul_(1e4)
        z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        reference = model.autoencoder_decode(z)
        half = model.half()
        assert not torch.isfinite(half.autoencoder_decode(z.half())).all()  # the overflow is real
        torch.testing.assert_close(decode(half, z), reference, atol=1e-2, rtol=0)


def test_outdir_name_over_the_file_system_limit(tmp_path, ckpt, capsys):
    assert main(["txt2img", "--ckpt", str(ckpt), "--prompt", "x", "--outdir", str(tmp_path / ("a" * 300))]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_unreadable_held_out_images_in_stage_1(tmp_path, capsys):
    images = {f"{i}.png": Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(3)} | {"z.png": b"broken"}
    data = _folder(tmp_path / "data", images)  # the last image (sorted) is the held-out one
    assert main(["train-autoencoder", "--outdir", str(tmp_path / "ae"), "--data", data, "--steps", "1",
                 "--batch-size", "1", "--image-size", "8", "--quiet", "--device", "cpu"]) == 2  # fmt: skip
    assert "none of the 1 held-out images can be read" in capsys.readouterr().err
