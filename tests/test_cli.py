"""The `ldm` command: generation end to end on a tiny checkpoint, PNG metadata, exit codes and one-line errors."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from latent_diffusion import load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.files import model_hash
from latent_diffusion.pipeline.infotext import parameters_text, parse_parameters


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-inpainting.safetensors"
    save_model(tiny_models["inpaint"], path)
    return path


@pytest.fixture
def picture(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 40)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    mask.save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def run(*args) -> int:
    return main([str(a) for a in args])


def test_the_command_line_imports_no_training_until_it_trains():
    """Generation never trains: `ldm`'s start leaves the training modules, and torch.distributed's FSDP and DTensor
    they bring (0.5 s of each process's start), unimported."""
    probe = "import sys, latent_diffusion.cli\nprint(sorted(n for n in sys.modules if 'fsdp' in n or n.endswith('training.diffusion')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_never_picks_one_the_cpu_emulates(monkeypatch, capsys, native):
    """--dtype auto: bfloat16 on a CPU with AVX-512 BF16 or AMX (twice float32's speed there), float32 where
    bfloat16 would be emulated; no flag: float32 on a CPU, as the web UI; a dtype named that the CPU emulates (float16
    without AMX-FP16: 340x float32's time per convolution) runs after a warning."""
    from latent_diffusion import cli_common

    cpu = torch.device("cpu")
    monkeypatch.setattr("latent_diffusion.devices.has_native_bfloat16", lambda device: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert cli_common.pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert cli_common.pick_dtype(None, cpu) == torch.float32
    assert capsys.readouterr().err == ""
    assert cli_common.pick_dtype("float16", cpu) == torch.float16
    assert "no native float16 here" in capsys.readouterr().err


def test_txt2img_writes_pngs_with_parameters(tmp_path, ckpt):
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "a red, round thing", "--negative-prompt", "blurry, dark",
               "--width", 32, "--height", 40, "--steps", 3, "--seed", 7, "--batch-size", 2, "--n-iter", 2,
               "--grid", "--quiet", "--outdir", out) == 0  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00001-7.png", "00002-8.png", "00003-9.png", "00004-10.png", "grid-00004.png"]
    with Image.open(out / "00003-9.png") as im:
        assert im.size == (32, 40)
        params = parse_parameters(im.text["parameters"])
    assert params == {
        "prompt": "a red, round thing", "negative_prompt": "blurry, dark", "Steps": "3",
        "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": "9", "Size": "32x40",
        "Model hash": model_hash(ckpt), "Model": "tiny",
    }  # fmt: skip


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_without_native_support_warns(tmp_path, ckpt, capsys, monkeypatch, native):
    """--dtype bfloat16 generates either way; where the device would emulate it, one warning line says so."""
    monkeypatch.setattr("latent_diffusion.devices.has_native_bfloat16", lambda device: native)
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 1,
               "--dtype", "bfloat16", "--device", "cpu", "--seed", 0, "--quiet", "--outdir", tmp_path) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert ("no native bfloat16" in err) != native and err.count("\n") == (0 if native else 1)
    assert (tmp_path / "00001-0.png").is_file()


def test_image_of_a_batch_regenerates_alone(tmp_path, ckpt):
    common = ["--ckpt", ckpt, "--prompt", "x", "--width", 32, "--height", 32, "--steps", 3, "--quiet"]
    assert run("txt2img", *common, "--seed", 100, "--batch-size", 3, "--outdir", tmp_path / "a") == 0
    assert run("txt2img", *common, "--seed", 102, "--outdir", tmp_path / "b") == 0
    with Image.open(tmp_path / "a" / "00003-102.png") as a, Image.open(tmp_path / "b" / "00001-102.png") as b:
        diff = torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))
    assert diff.abs().max() <= 1  # batched and single U-Net calls may round differently, never by more than 1/255


def test_img2img_and_inpaint(tmp_path, ckpt, inpaint_ckpt, picture):
    image, mask = picture
    assert run("img2img", "--ckpt", ckpt, "--prompt", "x", "--init-image", image, "--strength", 0.5,
               "--steps", 4, "--seed", 1, "--quiet", "--outdir", tmp_path / "i2i") == 0  # fmt: skip
    with Image.open(tmp_path / "i2i" / "00001-1.png") as im:
        assert im.size == (64, 48) and parse_parameters(im.text["parameters"])["Denoising strength"] == "0.5"
    for model in (ckpt, inpaint_ckpt):
        out = tmp_path / model.stem
        assert run("inpaint", "--ckpt", model, "--prompt", "x", "--init-image", image, "--mask", mask,
                   "--steps", 3, "--seed", 2, "--quiet", "--outdir", out) == 0  # fmt: skip
        with Image.open(out / "00001-2.png") as im:
            kept = im.crop((32, 0, 64, 48)).getcolors()
        assert kept == [(32 * 48, (200, 30, 40))]  # black in the mask: the input's pixels, exactly


def test_long_prompt_with_emphasis_runs_whole(tmp_path, ckpt, capsys):
    prompt = "word " * 74 + "the (end:1.2) of this [prompt]"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", prompt, "--width", 24, "--height", 24, "--steps", 1,
               "--clip-skip", 2, "--quiet", "--outdir", tmp_path) == 0  # fmt: skip
    assert capsys.readouterr().err == ""
    with Image.open(tmp_path / f"00001-{next(tmp_path.iterdir()).name[6:]}") as im:
        assert parse_parameters(im.text["parameters"])["Clip skip"] == "2"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", 500], "--width and --height must be positive multiples of 8, not 500x512"),
        (["--steps", 0], "--steps must be between 1 and 10000"),
        (["--steps", 10**12], "--steps must be between 1 and 10000"),
        (["--sampler", "k_dpm_fast"], "--sampler: unknown sampler 'k_dpm_fast'; choose one of DDPM, DDIM, PLMS, Euler"),
    ],
)
def test_bad_txt2img_arguments_exit_2(tmp_path, ckpt, capsys, args, message):
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x", "--outdir", out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", 70000], "--port must be in 1..65535, not 70000"),
        (["--max-steps", 0], "--max-steps must be positive"),
        (["--api-auth", "nocolon"], "--api-auth must be USER:PASSWORD"),
        (["--models-dir", "/nonexistent"], "--models-dir /nonexistent: not a folder"),
        (["--controlnet-dir", "/nonexistent"], "--controlnet-dir /nonexistent: no such folder"),
    ],
)
def test_bad_serve_arguments_exit_2_before_loading(capsys, args, message):
    assert run("serve", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("img2img", ["--strength", 0], r"--strength must be in (0, 1]"),
        ("img2img", ["--strength", 1.5], r"--strength must be in (0, 1]"),
        ("inpaint", ["--mask", "{small_mask}"], "the mask is 8x8 but the image is 64x48"),
        ("img2img", ["--init-image", "{not_an_image}"], "cannot read the image"),
        ("img2img", ["--init-image", "{odd_image}"], "the image is 60x48: its sides must be multiples of 8"),
        ("img2img", ["--eta", "-1"], "--eta must be between 0 and 10, not -1"),
        ("inpaint", ["--width", "32"], "--width and --height ask for 32x48, the init image is 64x48: add --resize"),
        ("inpaint", ["--mask", "{lab_mask}"], "lab.tif: a LAB image, which cannot be read as L"),
    ],
)
def test_bad_image_arguments_exit_2(tmp_path, ckpt, picture, capsys, command, args, message):
    image, mask = picture
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    Image.new("LAB", (64, 48)).save(tmp_path / "lab.tif")  # a mode Pillow converts to no greyscale
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (60, 48)).save(tmp_path / "odd.png")
    fill = {"{small_mask}": tmp_path / "small.png", "{not_an_image}": tmp_path / "text.png",
            "{odd_image}": tmp_path / "odd.png", "{lab_mask}": tmp_path / "lab.tif"}  # fmt: skip
    base = {"--init-image": image, **({"--mask": mask} if command == "inpaint" else {})}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = fill.get(value, value)
    out = tmp_path / "out"
    flat = [x for kv in base.items() for x in kv]
    assert run(command, "--ckpt", ckpt, "--prompt", "x", "--steps", 2, "--outdir", out, *flat) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unwritable_outdir_and_missing_ckpt_exit_2(tmp_path, ckpt, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x", "--outdir", blocker / "sub") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert run("txt2img", "--ckpt", tmp_path / "missing.safetensors", "--prompt", "x", "--outdir", tmp_path / "o") == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a failed run leaves no folder behind
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x", "--device", "cuda:7", "--outdir", tmp_path / "o") == 2
    assert "is not available here" in capsys.readouterr().err


def test_an_inpainting_checkpoint_draws_txt2img(tmp_path, inpaint_ckpt):
    """As the web UI lets one: all of the image is the hole (`generate.prepare`)."""
    assert run("txt2img", "--ckpt", inpaint_ckpt, "--prompt", "x", "--steps", "1", "--outdir", tmp_path) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_parameters_round_trip_with_multiline_prompts():
    text = parameters_text("line one\nline two", "neg: a, b", {"Steps": 20, "Sampler": "Euler a", "Seed": 3})
    assert parse_parameters(text) == {"prompt": "line one\nline two", "negative_prompt": "neg: a, b",
                                      "Steps": "20", "Sampler": "Euler a", "Seed": "3"}  # fmt: skip


def test_info(ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    assert "variant sd1 (SD 1.x, eps-prediction)" in capsys.readouterr().out


def test_bad_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    run_ = subprocess.run([sys.executable, "-m", "latent_diffusion.cli", "info", str(tmp_path / "bad.safetensors")],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert run_.returncode == 2
    assert run_.stderr.count("\n") == 1 and "bad.safetensors: not a readable .safetensors file" in run_.stderr


def test_help_is_usable(capsys):
    for argv in (["--help"], ["txt2img", "--help"], ["inpaint", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("txt2img", "img2img", "inpaint", "--cfg-scale", "--negative-prompt", "white = repaint", "dpmpp_2m"):
        assert word in out


def test_infotext_reproduces_an_image(tmp_path, ckpt, capsys):
    """An image's own infotext, given back with --infotext, gives the same image; flags given beside it win."""
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "a (red:1.3) [round] thing", "--negative-prompt", "dark",
               "--sampler", "euler_ancestral", "--no-karras", "--cfg-scale", 3, "--clip-skip", 2, "--seed", 11,
               "--width", 32, "--height", 24, "--steps", 3, "--quiet", "--outdir", tmp_path / "a") == 0  # fmt: skip
    (original,) = (tmp_path / "a").iterdir()
    assert run("txt2img", "--ckpt", ckpt, "--infotext", original, "--quiet", "--outdir", tmp_path / "b") == 0
    (again,) = (tmp_path / "b").iterdir()
    with Image.open(original) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes() and a.text["parameters"] == b.text["parameters"]
    assert capsys.readouterr().err == ""  # every field of ours is used (Model hash and Model only inform)
    assert (
        run("txt2img", "--ckpt", ckpt, "--infotext", original, "--steps", 2, "--quiet", "--outdir", tmp_path / "c") == 0
    )
    with Image.open(next((tmp_path / "c").iterdir())) as c:
        assert parse_parameters(c.text["parameters"])["Steps"] == "2"
    capsys.readouterr()
    other, model = tmp_path / "other.safetensors", load_model(ckpt)
    model.cfg.image_size = 32  # another config in the metadata: another file, another hash
    save_model(model, other)
    assert run("txt2img", "--ckpt", other, "--infotext", original, "--quiet", "--outdir", tmp_path / "d") == 0
    assert "the infotext's image was made with model hash" in capsys.readouterr().err


def test_an_infotext_path_that_is_a_folder_or_missing_exits_2(tmp_path, ckpt, capsys):
    """A path is not taken for the infotext's text: a folder is an error, as a missing file is."""
    out = tmp_path / "out"
    for path, message in [(tmp_path, f"{tmp_path}: a folder, not"), (tmp_path / "missing.png", "missing.png: no such")]:
        assert run("txt2img", "--ckpt", ckpt, "--infotext", path, "--quiet", "--outdir", out) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_web_ui_infotexts_map_onto_our_settings():
    from latent_diffusion.pipeline.infotext import read_infotext, sampler_from_web_ui, settings_from_infotext

    text = (
        "a (cat:1.2), BREAK sitting\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 5, Seed: 7, Size: 32x48, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, Version: v1.10.1, "
        "Hires upscale: 2, Face restoration: CodeFormer"
    )
    settings, ignored = settings_from_infotext(text)
    assert settings.pop("model_hash") == "6ce0161689"
    assert settings == {
        "prompt": "a (cat:1.2), BREAK sitting",
        "negative_prompt": "blurry",
        "steps": 4,
        "cfg_scale": 5.0,
        "seed": 7,
        "clip_skip": 2,
        "width": 32,
        "height": 48,
        "sampler": "dpmpp_2m",
        "scheduler": "karras",
        "hires_scale": 2.0,
        "hires_denoise": 0.7,
    }  # fmt: skip  (the web UI's default strength where none is written)
    assert ignored == ["Face restoration"]  # a setting this project does not have; Model and Version only inform
    assert sampler_from_web_ui("Euler a", None) == ("euler_ancestral", "automatic")  # no schedule type: automatic
    assert sampler_from_web_ui("DPM++ 2M Karras", None) == ("dpmpp_2m", "karras")  # legacy names
    assert sampler_from_web_ui("DPM++ 2M SDE Heun Exponential", None) == ("dpmpp_2m_sde_heun", "exponential")
    assert sampler_from_web_ui("k_dpm_2_a", "SGM Uniform") == ("dpm2_ancestral", "sgm_uniform")  # aliases
    assert sampler_from_web_ui("DPM++ 2M", "Automatic") == ("dpmpp_2m", "automatic")
    with pytest.raises(ValueError, match="missing.png: no such file"):
        read_infotext("missing.png")
    with pytest.raises(ValueError, match="unknown sampler 'DPM fast'"):
        sampler_from_web_ui("DPM fast", "Karras")
    with pytest.raises(ValueError, match="unknown scheduler 'Linear'"):
        sampler_from_web_ui("Euler", "Linear")


def test_lora_from_a_folder_and_from_a_flag(tmp_path, ckpt, tiny_models, capsys):
    """--lora-dir serves <lora:name:w> tags; --lora FILE:W adds the tag itself; both write the same image, the tag in
    the infotext's prompt and the file's hash; the infotext alone makes that image again."""
    from safetensors.torch import save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    shape = tiny_models["sd1"].unet.input_blocks[1][1].proj_in.weight.shape
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    g = torch.Generator().manual_seed(0)
    save_file({f"{key}.lora_down.weight": torch.randn(2, shape[1], 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(shape[0], 2, 1, 1, generator=g)},
              folder / "grain.safetensors")  # fmt: skip
    common = ["--ckpt", ckpt, "--width", 24, "--height", 24, "--steps", 2, "--seed", 5, "--quiet"]
    assert run("txt2img", *common, "--prompt", "a cat <lora:grain:0.5>", "--lora-dir", folder,
               "--outdir", tmp_path / "a") == 0  # fmt: skip
    assert run("txt2img", *common, "--prompt", "a cat", "--lora", f"{folder / 'grain.safetensors'}:0.5",
               "--outdir", tmp_path / "b") == 0  # fmt: skip
    assert run("txt2img", *common, "--prompt", "a cat", "--outdir", tmp_path / "c") == 0
    (a,), (b,), (c,) = ((tmp_path / d).iterdir() for d in "abc")
    with Image.open(a) as ia, Image.open(b) as ib, Image.open(c) as ic:
        assert ia.tobytes() == ib.tobytes() != ic.tobytes()
        params = parse_parameters(ib.text["parameters"])
    assert params["prompt"] == "a cat <lora:grain:0.5>" and params["Lora hashes"].startswith("grain: ")
    assert (
        run("txt2img", "--ckpt", ckpt, "--infotext", a, "--lora-dir", folder, "--quiet", "--outdir", tmp_path / "d")
        == 0
    )
    with Image.open(a) as ia, Image.open(next((tmp_path / "d").iterdir())) as idd:
        assert ia.tobytes() == idd.tobytes()
    assert capsys.readouterr().err == ""
    assert run("txt2img", *common, "--prompt", "a cat <lora:missing:1>", "--outdir", tmp_path / "e") == 2
    assert "<lora:missing> names no LoRA file here" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # a file name that a tag cannot hold (`:` ends the name) is tagged under a name it can
    (folder / "grain.safetensors").rename(folder / "gr:ain.safetensors")
    assert run("txt2img", *common, "--prompt", "a cat", "--lora", f"{folder / 'gr:ain.safetensors'}:0.5",
               "--outdir", tmp_path / "f") == 0  # fmt: skip
    with Image.open(a) as ia, Image.open(next((tmp_path / "f").iterdir())) as iff:
        assert ia.tobytes() == iff.tobytes() and "<lora:gr_ain:0.5>" in iff.text["parameters"]
    nan = torch.full((2, shape[1], 1, 1), float("nan"))
    save_file({f"{key}.lora_down.weight": nan, f"{key}.lora_up.weight": torch.ones(shape[0], 2, 1, 1)},
              folder / "nan.safetensors")  # fmt: skip
    assert run("txt2img", *common, "--prompt", "a cat <lora:nan:1>", "--lora-dir", folder,
               "--outdir", tmp_path / "g") == 2  # fmt: skip
    assert "its weights are not all finite numbers" in capsys.readouterr().err


def test_web_ui_infotext_with_lora_embedding_and_sde_sampler_runs_as_written(tmp_path, ckpt, tiny_models, capsys):
    """The issue's acceptance case: a web UI infotext with emphasis, prompt editing, a LoRA tag, an embedding in the
    negative prompt, "DPM++ 2M SDE" and "Karras", pasted into --infotext, runs with those settings."""
    from safetensors.torch import save_file

    width = tiny_models["sd1"].cfg.text.width
    shape = tiny_models["sd1"].unet.input_blocks[1][1].proj_in.weight.shape
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = {
        f"{key}.lora_down.weight": torch.randn(2, shape[1], 1, 1),
        f"{key}.lora_up.weight": torch.randn(shape[0], 2, 1, 1),
    }
    save_file(lora, loras / "film-grain.safetensors")
    save_file({"emb_params": torch.randn(2, width)}, embeddings / "easynegative.safetensors")
    infotext = (
        "a (cozy:1.2) cabin in a snowy forest, [dusk:night:0.5], <lora:film-grain:0.7>\n"
        "Negative prompt: easynegative, blurry\n"
        "Steps: 4, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 6, Seed: 1234, Size: 24x16, "
        'Model: v1-5-pruned-emaonly, Lora hashes: "film-grain: 0123456789ab", TI hashes: "easynegative: c74b4e810b03", '
        "Version: v1.10.1"
    )
    assert run("txt2img", "--ckpt", ckpt, "--infotext", infotext, "--lora-dir", loras, "--embeddings-dir", embeddings,
               "--quiet", "--outdir", tmp_path / "out") == 0  # fmt: skip
    assert capsys.readouterr().err == ""  # every field used or only informative
    with Image.open(next((tmp_path / "out").iterdir())) as im:
        params = parse_parameters(im.text["parameters"])
        assert im.size == (24, 16)
    assert params["prompt"] == "a (cozy:1.2) cabin in a snowy forest, [dusk:night:0.5], <lora:film-grain:0.7>"
    assert params["negative_prompt"] == "easynegative, blurry"
    assert (params["Sampler"], params["Schedule type"], params["Steps"], params["CFG scale"], params["Seed"]) == (
        "DPM++ 2M SDE", "Karras", "4", "6.0", "1234"
    )  # fmt: skip
    assert params["Lora hashes"].startswith("film-grain: ") and params["TI hashes"].startswith("easynegative: ")


def test_a_run_that_fails_after_making_its_folders_leaves_none_of_them(tmp_path, ckpt, capsys):
    """The folder is made before any work (to prove it writable); a failure later, here a LoRA file that is not
    one, read when the batch starts, takes away every folder the run made, parents included."""
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "p" / "q" / "r"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x <lora:broken:1>", "--lora-dir", loras, "--steps", 1,
               "--width", 32, "--height", 32, "--quiet", "--outdir", out) == 2  # fmt: skip
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_ctrl_c_is_one_line_and_exit_130_and_leaves_no_empty_folder(tmp_path, ckpt, capsys, monkeypatch):
    import latent_diffusion.cli_generate as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_plan", interrupted)
    out = tmp_path / "out"
    assert run("txt2img", "--ckpt", ckpt, "--prompt", "x", "--quiet", "--outdir", out) == 130
    assert capsys.readouterr().err == "ldm: interrupted\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["txt2img", "--prompt", "x", "--n-iter", 10**12, "--outdir", "OUT"], "--batch-size × --n-iter must be at most"),
        (["info", "CKPT", "--device", "bogus"], "bogus"),
        (["info", "CKPT", "--config", "CKPT"], "tiny.safetensors: cannot read the config"),
        (["train", "--max-grad-norm", -1, "--outdir", "OUT"], "max-grad-norm must be above 0, not -1"),
        (["train", "--lr", 0, "--outdir", "OUT"], "lr must be above 0, not 0"),
        (["train", "--prompt-dropout", 2, "--outdir", "OUT"], "prompt-dropout is a probability, in [0, 1], not 2"),
        (["train", "--data", "/nonexistent", "--outdir", "OUT"], "/nonexistent: no such data folder"),  # after the lock
        (["train", "--device", "bogus", "--outdir", "OUT"], "unknown device 'bogus'"),
        (["train-autoencoder", "--device", "bogus", "--outdir", "OUT"], "unknown device 'bogus'"),
        (["serve", "--host", "no-such-host.invalid", "--outdir", "OUT"],
         "--host no-such-host.invalid: not an address of this machine"),
    ],
)  # fmt: skip
def test_more_bad_arguments_exit_2_in_one_line(tmp_path, ckpt, capsys, args, message):
    assert run(*[{"OUT": tmp_path / "out", "CKPT": ckpt}.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_folder_as_its_json_file_before_any_work(tmp_path, capsys):
    assert run("eval", "--json", tmp_path) == 2
    assert f"--json {tmp_path}: a folder, not a file" in capsys.readouterr().err


def test_serve_refuses_a_taken_port_and_an_unwritable_folder_before_loading(tmp_path, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert run("serve", "--host", "127.0.0.1", "--port", port, "--outdir", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Address already in use" in err and err.count("\n") == 1
    (tmp_path / "file").write_text("")
    assert run("serve", "--port", port, "--outdir", tmp_path / "file" / "sub") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_numbering_goes_on_past_99999(tmp_path):
    from latent_diffusion.files import claim_numbered

    (tmp_path / "99999-5.png").write_bytes(b"")
    assert claim_numbered(tmp_path, "5.png").name == "100000-5.png"
    assert claim_numbered(tmp_path, "5.png").name == "100001-5.png"  # once looped for ever on 100000


def test_infotext_values_round_trip_and_are_read_as_the_web_ui_reads_them():
    """Values with a comma, colon or newline are written as JSON strings (the web UI's quoting) and read back
    whole; the last line holds the settings only with three `Key: value` pairs or more; lines are stripped; keys
    may hold `-` and `/`. The expected readings are what the web UI's parse_generation_parameters gives."""
    for value in ['a: b, "c"', "C:\\dir", "a\nb", "é:x", 'x"y']:
        text = parameters_text("p", "", {"Steps": 20, "Sampler": "Euler", "Model": value})
        assert parse_parameters(text)["Model"] == value
    assert parse_parameters("prompt\nSteps: 20") == {"prompt": "prompt\nSteps: 20", "negative_prompt": ""}
    read = parse_parameters("  a cat  \n  Negative prompt: ugly\nCFG scale: 7, Seed: 1, Hires-fix thing: 3")
    assert read == {"prompt": "a cat", "negative_prompt": "ugly", "CFG scale": "7", "Seed": "1",
                    "Hires-fix thing": "3"}  # fmt: skip


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "--seed", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "ldm: error: txt2img: argument --seed: invalid int value: 'abc' (see ldm txt2img --help)\n"


def test_serve_makes_no_output_folder_it_does_not_need(tmp_path, capsys):
    """The folder is checked (it could be made and written) but not made: save_images is off by default."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    assert run("serve", "--port", port, "--ckpt", tmp_path / "missing.safetensors", "--outdir", out) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not out.exists()


def test_img2img_infotext_keeps_the_init_images_size_without_resize(tmp_path, ckpt, picture, capsys):
    image, _ = picture  # 64x48
    infotext = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 32x32"
    assert run("img2img", "--ckpt", ckpt, "--init-image", image, "--infotext", infotext, "--quiet",
               "--outdir", tmp_path / "out") == 0  # fmt: skip
    with Image.open(next((tmp_path / "out").iterdir())) as im:
        assert im.size == (64, 48)
