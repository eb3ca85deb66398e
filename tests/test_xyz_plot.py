"""The web UI's X/Y/Z plot: its value syntax (ranges, counts, CSV) against its own regular expressions' results
worked out by hand, each cell equal to the same request generated alone, cells batched, the grid's shape and
infotext; through the command line and its script through the API with an existing client."""

import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import from_pil
from latent_diffusion.pipeline.loading import Pipeline, load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest, RequestError
from latent_diffusion.pipeline.xyz_plot import axis_values, find_axis, xyz_plot
from latent_diffusion.serving.server import create_app
from test_server import call, decode


@pytest.mark.parametrize(
    ("label", "text", "values"),
    [
        ("Steps", "10, 20,30", [10, 20, 30]),
        ("Steps", "1-5", [1, 2, 3, 4, 5]),
        ("Steps", "1-9 (+3)", [1, 4, 7]),
        ("Steps", "10-20 [3]", [10, 15, 20]),
        ("Seed", "5-3 (-1)", [5]),  # (its end is always the second number + 1)
        ("CFG Scale", "1-2 (+0.5)", [1.0, 1.5, 2.0]),
        ("CFG Scale", "0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("CFG Scale", "3, 7.5", [3.0, 7.5]),
        ("Prompt S/R", 'red,"blue, dark",green', ["red", "blue, dark", "green"]),
        ("Prompt S/R", 'red, "blue, dark"', ["red", '"blue', 'dark"']),  # (a quote after a space is text, as CSV's)
        ("Sampler", "Euler a,DPM++ 2M", ["Euler a", "DPM++ 2M"]),
        ("Nothing", "", [None]),
    ],
)
def test_values_read_as_the_web_ui_reads_them(label, text, values):
    assert axis_values(find_axis(label), text) == pytest.approx(values) if values != [None] else [None]


def test_axes_by_label_or_the_web_uis_index_and_bad_axes():
    assert find_axis(4).label == "Steps" and find_axis(6).label == "CFG Scale" and find_axis("cfg scale").label
    for bad, message in ((2, "axis 2 is not one this project varies"), ("Colour", "no axis 'Colour'")):
        with pytest.raises(RequestError, match=message):
            find_axis(bad)
    with pytest.raises(RequestError, match="Steps values must be ints"):
        axis_values(find_axis("Steps"), "ten")


def test_each_cell_is_its_request_alone_and_the_grid_holds_them(tiny_models):
    """Seeds x prompt replacements x samplers: each cell equals the same request generated alone (the seed and S/R
    cells share U-Net batches); the grid is the cells with a legend."""
    pipe = Pipeline(tiny_models["sd1"])
    request = GenerationRequest(["a red circle"], [7], negative_prompts=["dark red"], width=32, height=32, steps=3,
                                sampler="euler", cfg_scale=4.0)  # fmt: skip
    axes = [(find_axis("Seed"), "7-8"), (find_axis("Prompt S/R"), "red,blue"), (find_axis("Sampler"), "Euler,Heun")]
    plot = xyz_plot(pipe, request, axes)
    assert plot.images.shape == (8, 3, 32, 32) and plot.seeds == [7, 8] * 4
    expected = []
    for sampler in ("euler", "heun"):
        for colour in ("red", "blue"):
            for seed in (7, 8):
                alone = GenerationRequest([f"a {colour} circle"], [seed], negative_prompts=[f"dark {colour}"],
                                          width=32, height=32, steps=3, sampler=sampler, cfg_scale=4.0)  # fmt: skip
                expected.append(generate(pipe, alone).images[0])
    torch.testing.assert_close(plot.images, torch.stack(expected), atol=2e-5, rtol=0)  # (batched matmuls)
    assert plot.grid.size[0] > 2 * 2 * 32 and plot.grid.size[1] > 2 * 32  # two grids of 2 x 2, with a legend
    assert "Script: X/Y/Z plot, X Type: Seed, X Values: 7-8, Y Type: Prompt S/R" in plot.grid_infotext
    with pytest.raises(RequestError, match="Prompt S/R did not find 'green'"):
        xyz_plot(pipe, request, [(find_axis("Prompt S/R"), "green,blue")])


def test_the_command_line_plot(tmp_path, ckpt, capsys):
    args = ["xyz", "--ckpt", ckpt, "--prompt", "a red circle", "--seed", 3, "--width", 32, "--height", 32,
            "--sampler", "euler", "--x", "steps:2,3", "--y", "cfg:2,4", "--quiet", "--outdir"]  # fmt: skip
    assert main([str(a) for a in [*args, tmp_path / "a"]]) == 0
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) == 5 and files[-1].name.endswith("-xyz.png")
    with Image.open(files[-1]) as grid, Image.open(files[3]) as last:
        assert 'X Type: Steps, X Values: "2,3", Y Type: CFG Scale' in grid.text["parameters"]
        assert "Steps: 3" in last.text["parameters"] and "CFG scale: 4.0" in last.text["parameters"]
    for axis, message in (("steps", "--x: write LABEL:VALUES"), ("colour:1", "--x: no axis 'colour'"),
                          ("steps:a", "--x: Steps values must be ints")):  # fmt: skip
        assert main([str(a) for a in [*args[:-6], "--x", axis, "--quiet", "--outdir", tmp_path / "b"]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "b").exists()


def test_the_script_through_the_api_with_an_existing_client(ckpt, serve):
    import webuiapi

    pipe = load_pipeline(ckpt)
    with serve(create_app(pipe)) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler", steps=2)
        result = api.txt2img(prompt="a red circle", seed=4, width=32, height=32, cfg_scale=3,
                             script_name="X/Y/Z plot", script_args=[4, "2,3", [], 6, "2,5", [], 0, "", [], True, True])  # fmt: skip
        assert len(result.images) == 5 and result.info["ignored"] == []  # the grid, then the 4 cells
        assert "Script: X/Y/Z plot" in result.info["infotexts"][0]
        cell = GenerationRequest(["a red circle"], [4], width=32, height=32, steps=3, sampler="euler", cfg_scale=5.0)
        alone = generate(pipe, cell).images[0]
        assert (from_pil(result.images[4])[0] - alone).abs().max() <= 1 / 255 + 1e-6
        body = {"prompt": "x", "width": 32, "height": 32, "steps": 2, "script_name": "X/Y/Z plot"}
        for args, message in (([2, "1,2", []], "axis 2 is not one this project varies"),
                              ([4, "a,b", []], "Steps values must be ints"),
                              ([4, "1-100", [], 6, "1-100", []], "cells, over this server's limit")):  # fmt: skip
            status, answer = call(base, "/sdapi/v1/txt2img", {**body, "script_args": args})
            assert status == 422 and message in answer["detail"], (args, answer)
        status, answer = call(base, "/sdapi/v1/txt2img", {**body, "script_args": [4, "1,2", []]})
        assert status == 200 and len(answer["images"]) == 1 and decode(answer["images"][0]).size[0] > 64
        assert call(base, "/sdapi/v1/scripts")[1] == {
            "txt2img": ["x/y/z plot"],
            "img2img": ["sd upscale", "outpainting mk2", "poor man's outpainting", "x/y/z plot"],
        }
        info = call(base, "/sdapi/v1/script-info")[1]
        choices = next(s for s in info if s["name"] == "x/y/z plot")["args"][0]["choices"]
        assert choices.index("Steps") == 4 and choices.index("CFG Scale") == 6 and choices[2] is None
