"""`ldm merge` against the web UI's Checkpoint Merger (`modules/extras.py`, `run_modelmerger`) restated below over whole
state dicts, and SuperMerger's block map (`scripts/mergers/mergers.py`, `blockfromkey`) written out as a table."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latent_diffusion import load_model, save_model
from latent_diffusion.cli import main
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.weights.block_weights import BLOCKS, block_of, parse_block_weights
from latent_diffusion.weights.merge import MergeOptions, merge_checkpoints

from conftest import tiny_model

SD1_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def web_ui_merge(a, b=None, c=None, *, method, multiplier, save_as_half=False, vae=None, discard=""):
    """The web UI's run_modelmerger (v1.10), its loops restated over dicts of tensors: B − C into B, then A with B
    key by key, the inpainting case on the first 4 input channels, to_half, the VAE baked in, the discard expression."""
    import re

    def to_half(t):
        return t.half() if save_as_half and t.dtype == torch.float else t

    skip = [SD1_POSITION_IDS]
    difference = (lambda t1, t2: t1 - t2) if method == "Add difference" else None
    combine = {
        "Weighted sum": lambda t0, t1, alpha: ((1 - alpha) * t0) + (alpha * t1),
        "Add difference": lambda t0, diff, alpha: t0 + (alpha * diff),
    }.get(method)
    theta_1 = dict(b) if combine else None
    if difference:
        for key in theta_1:
            if key in skip:
                continue
            if "model" in key:
                theta_1[key] = difference(theta_1[key], c[key]) if key in c else torch.zeros_like(theta_1[key])
    theta_0 = {k: v.clone() for k, v in a.items()}
    for key in theta_0:
        if theta_1 and "model" in key and key in theta_1:
            if key in skip:
                continue
            x, y = theta_0[key], theta_1[key]
            if x.shape != y.shape and x.shape[0:1] + x.shape[2:] == y.shape[0:1] + y.shape[2:]:
                theta_0[key][:, 0:4, :, :] = combine(x[:, 0:4, :, :], y, multiplier)
            else:
                theta_0[key] = combine(x, y, multiplier)
            theta_0[key] = to_half(theta_0[key])
    for key in vae or {}:
        if "first_stage_model." + key in theta_0:
            theta_0["first_stage_model." + key] = to_half(vae[key])
    if save_as_half and not combine:
        theta_0 = {k: to_half(v) for k, v in theta_0.items()}
    return {k: v for k, v in theta_0.items() if not (discard and re.search(discard, k))}


def assert_same_dicts(got, expected):
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def metadata_of(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def write(path, tensors, metadata):
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD 1.x models A, B, C, an inpainting one, an SD 2.x one, as our files (config in the metadata)."""
    folder = tmp_path_factory.mktemp("merge")
    paths = {}
    for name, variant, seed in (
        ("a", "sd1", 1),
        ("b", "sd1", 2),
        ("c", "sd1", 3),
        ("inpaint", "inpaint", 4),
        ("sd2", "sd2", 5),
    ):
        paths[name] = folder / f"{name}.safetensors"
        save_model(tiny_model(variant, seed=seed), paths[name])
    return paths


def merged(tmp_path, models, **options):
    out = tmp_path / "merged.safetensors"
    merge_checkpoints([str(m) for m in models], out, MergeOptions(**options))
    return out


def test_weighted_sum_is_the_web_uis_and_generates(tmp_path, files):
    out = merged(tmp_path, [files["a"], files["b"]], alpha=0.3)
    a, b = load_file(files["a"]), load_file(files["b"])
    assert_same_dicts(load_file(out), web_ui_merge(a, b, method="Weighted sum", multiplier=0.3))
    model = load_model(out)
    request = GenerationRequest(["a red circle"], [0], width=64, height=64, steps=2, sampler="ddim")
    assert torch.isfinite(generate(model, request).images).all()


def test_add_difference_with_a_key_c_lacks(tmp_path, files):
    """A key B has and C lacks adds nothing (the web UI takes B − C as zeros there)."""
    c = load_file(files["c"])
    lacking = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    del c[lacking]
    c_path = write(tmp_path / "c-lacking.safetensors", c, metadata_of(files["c"]))
    out = merged(tmp_path, [files["a"], files["b"], c_path], mode="add-difference", alpha=0.7)
    a, b = load_file(files["a"]), load_file(files["b"])
    result = load_file(out)
    assert_same_dicts(result, web_ui_merge(a, b, c, method="Add difference", multiplier=0.7))
    assert torch.equal(result[lacking], a[lacking])
    load_model(out)


def test_inpainting_a_merges_its_four_latent_channels(tmp_path, files):
    out = merged(tmp_path, [files["inpaint"], files["b"], files["c"]], mode="add-difference", alpha=1.0)
    a, b, c = (load_file(files[k]) for k in ("inpaint", "b", "c"))
    result = load_file(out)
    assert_same_dicts(result, web_ui_merge(a, b, c, method="Add difference", multiplier=1.0))
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    assert result[conv].shape[1] == 9 and torch.equal(result[conv][:, 4:], a[conv][:, 4:])
    assert json.loads(metadata_of(out)["sd_merge_recipe"])["is_inpainting"] is True
    assert load_model(out).cfg.unet.in_channels == 9


def test_float16_halves_only_merged_tensors_and_skips_as_the_web_ui(tmp_path, files):
    """Keys without "model" in the name, keys B lacks and the skipped position ids stay as A has them (float32 and
    int64); keys only B has are left out."""
    a, b = load_file(files["a"]), load_file(files["b"])
    a |= {
        "alphas_cumprod": torch.rand(10),
        SD1_POSITION_IDS: torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9),
    }
    b |= {SD1_POSITION_IDS: torch.arange(77)[None] + 1, "model_ema.only_in_b": torch.ones(2)}
    paths = [write(tmp_path / f"{n}.safetensors", sd, metadata_of(files[n])) for n, sd in (("a", a), ("b", b))]
    result = load_file(merged(tmp_path, paths, alpha=0.5, float16=True))
    assert_same_dicts(result, web_ui_merge(a, b, method="Weighted sum", multiplier=0.5, save_as_half=True))
    assert result["alphas_cumprod"].dtype == torch.float32 and torch.equal(
        result[SD1_POSITION_IDS], a[SD1_POSITION_IDS]
    )
    assert result["model_ema.decay"].dtype == torch.float32 and "model_ema.only_in_b" not in result


def test_no_interpolation_bakes_a_vae_halves_and_discards(tmp_path, files):
    """A VAE file in the original layout (no prefix) replaces first_stage_model.*; --drop-ema is the discard
    expression ^model_ema\\. joined to the given one."""
    a = load_file(files["a"]) | {"model_ema.decay": torch.tensor(0.9)}
    a_path = write(tmp_path / "a.safetensors", a, metadata_of(files["a"]))
    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(files["b"]).items() if k.startswith("first_")}
    vae_path = write(tmp_path / "vae.safetensors", {**vae, "loss.logvar": torch.zeros(())}, {})
    out = merged(
        tmp_path,
        [a_path],
        mode="no-interpolation",
        float16=True,
        bake_vae=vae_path,
        discard_weights=r"\.attn2\.",
        drop_ema=True,
    )
    expected = web_ui_merge(
        a,
        method="No interpolation",
        multiplier=0.3,
        save_as_half=True,
        vae=vae,
        discard=r"(?:\.attn2\.)|(?:^model_ema\.)",
    )
    result = load_file(out)
    assert_same_dicts(result, expected)
    assert not any(".attn2." in k or k.startswith("model_ema.") for k in result)
    recipe = json.loads(metadata_of(out)["sd_merge_recipe"])
    assert recipe["bake_in_vae"] == "vae.safetensors" and recipe["discard_weights"] == r"(?:\.attn2\.)|(?:^model_ema\.)"


def test_metadata_and_merge_recipe_as_the_web_ui_writes_them(tmp_path, files):
    a, b = load_file(files["a"]), load_file(files["b"])
    a_meta = metadata_of(files["a"]) | {"modelspec.title": "A", "only_a": "1"}
    b_meta = metadata_of(files["b"]) | {"modelspec.title": "B", "latent_diffusion.config": "not A's"}
    paths = [write(tmp_path / "a.safetensors", a, a_meta), write(tmp_path / "b.safetensors", b, b_meta)]
    first = merged(tmp_path, paths, alpha=0.25)
    meta = metadata_of(first)
    assert meta["modelspec.title"] == "B" and meta["only_a"] == "1" and meta["format"] == "pt"
    assert meta["latent_diffusion.config"] == a_meta["latent_diffusion.config"]
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    legacy = [hashlib.sha256(p.read_bytes()[0x100000:0x110000]).hexdigest()[:8] for p in paths]
    assert json.loads(meta["sd_merge_recipe"]) == {
        "type": "webui",
        "primary_model_hash": sha[0],
        "secondary_model_hash": sha[1],
        "tertiary_model_hash": None,
        "interp_method": "Weighted sum",
        "multiplier": 0.25,
        "save_as_half": False,
        "custom_name": "merged",
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
    }
    assert json.loads(meta["sd_merge_models"]) == {
        sha[0]: {"name": "a.safetensors", "legacy_hash": legacy[0], "sd_merge_recipe": None},
        sha[1]: {"name": "b.safetensors", "legacy_hash": legacy[1], "sd_merge_recipe": None},
    }
    # a merge of the merge carries the first merge's recipe and models
    again = tmp_path / "again.safetensors"
    renamed = first.rename(tmp_path / "first.safetensors")
    merge_checkpoints([renamed, files["c"]], again, MergeOptions(alpha=0.5, copy_metadata=False))
    models = json.loads(metadata_of(again)["sd_merge_models"])
    assert set(models) == {
        *sha,
        hashlib.sha256(renamed.read_bytes()).hexdigest(),
        hashlib.sha256(files["c"].read_bytes()).hexdigest(),
    }
    assert models[hashlib.sha256(renamed.read_bytes()).hexdigest()]["sd_merge_recipe"]["multiplier"] == 0.25
    assert "modelspec.title" not in metadata_of(again)


def test_a_pickle_input_merges_as_its_safetensors(tmp_path, files):
    torch.save({"state_dict": load_file(files["b"])}, tmp_path / "b.ckpt")
    from_ckpt = load_file(merged(tmp_path, [files["a"], tmp_path / "b.ckpt"], alpha=0.4))
    expected = web_ui_merge(load_file(files["a"]), load_file(files["b"]), method="Weighted sum", multiplier=0.4)
    assert_same_dicts(from_ckpt, expected)


def test_sdxl_merges_and_keeps_its_integer_position_ids(tmp_path):
    """SDXL's CLIP position ids (int64) are not on the web UI's skip list, which would turn them into floats; A's stay."""
    ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    paths = []
    for i in range(2):
        save_model(tiny_model("sdxl", seed=30 + i), tmp_path / f"x{i}.safetensors")
        sd = load_file(tmp_path / f"x{i}.safetensors") | {ids: torch.arange(77)[None] + i}
        paths.append(write(tmp_path / f"x{i}.safetensors", sd, metadata_of(tmp_path / f"x{i}.safetensors")))
    result = load_file(merged(tmp_path, paths, alpha=0.6))
    a, b = load_file(paths[0]), load_file(paths[1])
    expected = web_ui_merge({k: v for k, v in a.items() if k != ids}, b, method="Weighted sum", multiplier=0.6)
    assert_same_dicts({k: v for k, v in result.items() if k != ids}, expected)
    assert result[ids].dtype == torch.int64 and torch.equal(result[ids], a[ids])


# SuperMerger's block of a key (its blockfromkey), read off its code; None: not merged (A's kept)
SD_BLOCKS = {
    "model.diffusion_model.input_blocks.0.0.weight": "IN00",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": "IN04",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": "IN11",
    "model.diffusion_model.middle_block.1.proj_in.weight": "M00",
    "model.diffusion_model.output_blocks.3.0.in_layers.2.weight": "OUT03",
    "model.diffusion_model.output_blocks.11.1.norm.bias": "OUT11",
    "model.diffusion_model.out.2.weight": "OUT11",
    "model.diffusion_model.time_embed.0.weight": "OUT11",  # its index -2, read as BLOCKID[-2 + 1]: the last
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": "BASE",
    "first_stage_model.decoder.conv_in.weight": "BASE",
    "cond_stage_model.model.positional_embedding": None,  # neither "weight" nor "bias" in the name
}
SDXL_BLOCK_OF_KEY = {
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_q.weight": "IN07",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias": "M00",
    "model.diffusion_model.output_blocks.8.0.skip_connection.bias": "OUT08",
    "model.diffusion_model.out.0.weight": "OUT08",
    "model.diffusion_model.label_emb.0.0.weight": None,
    "model.diffusion_model.time_embed.2.bias": None,
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": "BASE",
    "first_stage_model.encoder.conv_in.weight": "BASE",
}


def test_block_of_known_keys():
    assert {k: block_of(k, sdxl=False) for k in SD_BLOCKS} == SD_BLOCKS
    assert {k: block_of(k, sdxl=True) for k in SDXL_BLOCK_OF_KEY} == SDXL_BLOCK_OF_KEY


def test_block_weight_lists():
    values = [i / 100 for i in range(25)]
    assert parse_block_weights(",".join(map(str, values)), sdxl=False) == (None, dict(zip(BLOCKS, values)))
    base, blocks = parse_block_weights(",".join(map(str, [0.9, *values])), sdxl=False)
    assert base == 0.9 and blocks["OUT11"] == 0.24
    _, xl = parse_block_weights(",".join(map(str, values)), sdxl=True)  # SuperMerger's weighttoxl
    assert list(xl.values()) == values[:9] + values[12:22]
    assert list(xl) == [*BLOCKS[:9], "M00", *BLOCKS[13:22]]


def test_block_weights_merge_each_key_with_its_blocks_alpha(tmp_path, files):
    values = [round(0.04 * i, 2) for i in range(25)]
    out = merged(tmp_path, [files["a"], files["b"]], alpha=0.5, block_weights=",".join(map(str, [0.1, *values])))
    a, b, result = load_file(files["a"]), load_file(files["b"]), load_file(out)
    alphas = dict(zip(BLOCKS, values)) | {"BASE": 0.1}
    for key in a:
        expected = web_ui_merge(
            {key: a[key]}, {key: b[key]}, method="Weighted sum", multiplier=alphas[block_of(key, False)]
        )
        assert torch.equal(result[key], expected[key]), key
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(result[key], 0.96 * a[key] + 0.04 * b[key])
    assert json.loads(metadata_of(out)["sd_merge_recipe"])["block_weights"].startswith("0.1,0.0,0.04")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["a", "sd2"], "checkpoints of different families do not merge: A (a.safetensors) is SD 1.x, B (sd2"),
        (["a", "missing"], "missing.safetensors: no such file"),
        (["a", "b", "--alpha", "nan"], "--alpha must be a finite number, not nan"),
        (["a", "text"], "text.safetensors: not a readable .safetensors file"),
        (["a", "not-a-model"], "not a Stable Diffusion checkpoint"),
        (["b", "inpaint"], "When merging inpainting model with a normal one, A must be the inpainting model."),
        (["a", "b", "--mode", "add-difference"], "add-difference takes 3 models (A, B and C), not 2"),
        (["a", "b", "--block-weights", "0.5,0.5"], "--block-weights: 2 values; give 25"),
        (["a", "b", "--block-weights", ",".join(["0.5"] * 24 + ["x"])], "--block-weights: 'x' is not a number"),
        (["a", "b", "--discard-weights", "("], "--discard-weights '(': not a regular expression"),
        (["a", "b", "--bake-vae", "not-a-model"], "not a VAE of A's model: it lacks"),
        (["a", "b", "--out", "merged.ckpt"], "merged.ckpt: the merge is written as .safetensors"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, files, capsys, argv, message):
    (tmp_path / "text.safetensors").write_text("hello")
    save_file({"weight": torch.zeros(2)}, tmp_path / "not-a-model.safetensors")
    named = {
        **files,
        "missing": tmp_path / "missing.safetensors",
        "text": tmp_path / "text.safetensors",
        "not-a-model": tmp_path / "not-a-model.safetensors",
    }
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(named.get(a, a)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "merged.safetensors")]
    else:
        argv[argv.index("--out") + 1] = str(out / argv[argv.index("--out") + 1])
    assert main(["merge", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(out.iterdir()) == []


def test_the_command_writes_and_says_what_it_did(tmp_path, files, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(files["a"]), str(files["b"]), "--alpha", "0.3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 502 tensors, 502 merged, 0 left out")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
