"""Composable prompts (AND): the web UI's split of a prompt into weighted parts, and its combination of the parts'
outputs, out = out_u + s·Σ_k w_k·(out_k − out_u), shown against closed-form identities through the whole
pipeline and against its `combine_denoised` written out."""

import pytest
import torch

from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest, RequestError
from latent_diffusion.prompts.syntax import split_and
from latent_diffusion.sampling.denoiser import Denoiser


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
        ("a cat:1.5 AND a dog", [("a cat", 1.5), (" a dog", 1.0)]),  # (as the web UI: a whole prompt's too)
        ("(a cat:1.2) AND [a:b:0.5]", [("(a cat:1.2)", 1.0), (" [a:b:0.5]", 1.0)]),  # emphasis and edits stay text
        ("ANDROID AND BAND", [("ANDROID", 1.0), (" BAND", 1.0)]),  # AND only as a word
        ("x :-0.5 AND y :.25", [("x", -0.5), (" y", 0.25)]),
        ("x:abc", [("x:abc", 1.0)]),  # not a number: text, as the web UI's pattern leaves it
    ],
)
def test_prompts_split_as_the_web_ui_splits_them(prompt, parts):
    assert split_and(prompt) == parts


def web_ui_combine_denoised(x_out, conds_list, uncond_rows, cond_scale):
    """The web UI's CFGDenoiser.combine_denoised, written out: x_out holds the parts' outputs, then the
    unconditional ones."""
    denoised_uncond = x_out[-uncond_rows:]
    denoised = torch.clone(denoised_uncond)
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
    return denoised


def test_the_denoiser_combines_as_the_web_ui_does():
    """Two images, of 3 and 1 parts: our prediction-space combination, mapped to x0, equals the web UI's combination
    of the x0 estimates (the map is affine, its x term cancels in the differences)."""
    g = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.999, 0.01, 1000).cumprod(0)
    table = torch.randn(8, 4, 4, 4, generator=g)  # a fixed output per conditioning row

    def net(x, t, cond):  # depends on the input, the timestep and the row's conditioning
        return x * 0.3 + t[:, None, None, None] * 1e-3 + table[cond["crossattn"][:, 0, 0].long()]

    cond = {"crossattn": torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]}
    uncond = {"crossattn": torch.tensor([6.0, 7.0])[:, None, None]}
    weights = [[1.0, 0.5, -0.3], [0.8]]
    x, sigma = torch.randn(2, 4, 4, 4, generator=g), torch.tensor(3.0, dtype=torch.float64)
    ours = Denoiser(net, alphas, "eps", cond, uncond, cfg_scale=6.0, weights=weights)(x, sigma)
    # The web UI: each part's x0 and each unconditional x0 from the same net, then combine_denoised.
    plain = Denoiser(net, alphas, "eps", {**cond, "crossattn": torch.cat([cond["crossattn"], uncond["crossattn"]])})
    x_rows = torch.cat([x[[0, 0, 0, 1]], x])
    x_out = plain(x_rows, sigma)
    theirs = web_ui_combine_denoised(x_out, [[(0, 1.0), (1, 0.5), (2, -0.3)], [(3, 0.8)]], 2, 6.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


SETTINGS = dict(width=32, height=32, steps=4, sampler="euler_ancestral", negative_prompts=["dark"], batch_size=1)


def images(model, prompt, cfg_scale=5.0, **fields):
    request = GenerationRequest([prompt], [3], **{**SETTINGS, **fields}, cfg_scale=cfg_scale)
    return generate(model, request).images


def test_closed_form_identities_through_the_pipeline(tiny_models):
    """u + s·Σ w_k·(c_k − u): a prompt AND itself at half weight each is the prompt; a weight of 2 is twice the
    guidance; a part at weight 0 adds nothing; at CFG 1, one part at weight 0.5 is halfway to the negative prompt's
    image in prediction space (checked against CFG 0.5)."""
    model = tiny_models["sd1"]
    alone = images(model, "a red circle")
    close = dict(atol=2e-5, rtol=0)  # (the parts run in a larger U-Net batch, which rounds differently)
    torch.testing.assert_close(images(model, "a red circle :0.5 AND a red circle :0.5"), alone, **close)
    torch.testing.assert_close(images(model, "a red circle :2", cfg_scale=2.5), alone, **close)
    torch.testing.assert_close(images(model, "a red circle AND a blue square :0"), alone, **close)
    torch.testing.assert_close(images(model, "a red circle :0.5", cfg_scale=1.0), images(model, "a red circle", 0.5),
                               **close)  # fmt: skip
    mixed = images(model, "a red circle AND a blue square")
    assert (mixed - alone).abs().max() > 0.01


def test_prompt_editing_inside_parts_and_a_batch_of_mixed_prompts(tiny_models):
    """Each part has its own edits; images of one and of two parts share a U-Net batch and each equals itself alone."""
    model = tiny_models["sd1"]
    prompts = ["[a red:a blue:0.5] circle AND a square :0.7", "a green circle"]
    request = GenerationRequest(prompts, [3, 4], **{**SETTINGS, "negative_prompts": ["dark"] * 2, "batch_size": 2},
                                cfg_scale=5.0)  # fmt: skip
    batch = generate(model, request).images
    for i, prompt in enumerate(prompts):
        alone = generate(model, GenerationRequest([prompt], [3 + i], **SETTINGS, cfg_scale=5.0)).images
        torch.testing.assert_close(batch[i : i + 1], alone, atol=2e-5, rtol=0)
    edited = images(model, "[a blue:a red:0.5] circle AND a square :0.7")  # blue for the first 2 of 4 steps
    assert (edited - images(model, "a red circle AND a square :0.7")).abs().max() > 0.01


def test_an_and_weight_beyond_the_guidance_limit_is_refused(tiny_models):
    with pytest.raises(RequestError, match="an AND part's weight of 1000 is beyond ±100"):
        images(tiny_models["sd1"], "a cat AND a dog :1000")


def test_and_through_the_command_line_and_an_existing_client(tmp_path, ckpt, serve):
    """The same composed prompt through `ldm txt2img` and through webuiapi over a real socket: the library's image."""
    import webuiapi
    from PIL import Image

    from latent_diffusion.cli import main
    from latent_diffusion.pipeline.images import from_pil
    from latent_diffusion.pipeline.loading import load_pipeline
    from latent_diffusion.serving.server import create_app

    prompt = "a red circle AND [a blue:a green:0.5] square :0.6"
    pipe = load_pipeline(ckpt)
    request = GenerationRequest([prompt], [5], width=32, height=32, steps=3, sampler="euler", cfg_scale=4.0)
    library = generate(pipe, request).images
    assert main([str(a) for a in ("txt2img", "--ckpt", ckpt, "--prompt", prompt, "--seed", 5, "--width", 32,
                                  "--height", 32, "--steps", 3, "--sampler", "euler", "--cfg-scale", 4, "--quiet",
                                  "--outdir", tmp_path)]) == 0  # fmt: skip
    with Image.open(next(tmp_path.iterdir())) as im:
        assert (from_pil(im) - library).abs().max() <= 1 / 255 + 1e-6
        assert im.text["parameters"].startswith(prompt + "\n")
    with serve(create_app(pipe)) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler", steps=3)
        result = api.txt2img(prompt=prompt, seed=5, width=32, height=32, cfg_scale=4)
        assert (from_pil(result.image) - library).abs().max() <= 1 / 255 + 1e-6
        assert result.info["ignored"] == []
        status = api.session.post(base + "/sdapi/v1/txt2img", json={"prompt": "x AND y :500", "steps": 1}).status_code
        assert status == 422
