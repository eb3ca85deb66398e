"""The web UI's prompt styles: a styles.csv read as it writes them, applied as its `apply_styles_to_prompt` does
(written out here), through the library, the command line and the server's `styles` field and /prompt-styles."""

import json

import pytest
import torch
from PIL import Image

from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import to_pil
from latent_diffusion.pipeline.loading import Pipeline, load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest, RequestError
from latent_diffusion.prompts.styles import apply_styles, read_styles
from latent_diffusion.serving.server import create_app

CSV = (
    "name,prompt,negative_prompt\n"
    '"Cinematic","{prompt}, film grain, (dramatic light:1.2)","cartoon, lowres"\n'
    'Watercolor,"watercolor painting",\n'
    ',"a row without a name",x\n'
)


def web_ui_apply(prompt: str, style_prompts: list[str]) -> str:
    """The web UI's modules/styles.py merge_prompts, applied in turn, written out."""
    for style_prompt in style_prompts:
        if "{prompt}" in style_prompt:
            prompt = style_prompt.replace("{prompt}", prompt)
        else:
            prompt = ", ".join(filter(None, (prompt.strip(), style_prompt.strip())))
    return prompt


@pytest.fixture
def styles(tmp_path):
    (tmp_path / "styles.csv").write_text(CSV, encoding="utf-8")
    return read_styles(tmp_path / "styles.csv")


def test_a_styles_file_reads_and_applies_as_the_web_uis(styles):
    assert list(styles) == ["Cinematic", "Watercolor"]
    assert styles["Watercolor"].negative_prompt == ""
    texts = [styles["Cinematic"].prompt, styles["Watercolor"].prompt]
    for prompt in ("a cat", "", "  a dog  "):
        assert apply_styles(prompt, texts) == web_ui_apply(prompt, texts)
    assert apply_styles("a cat", texts) == "a cat, film grain, (dramatic light:1.2), watercolor painting"


def test_styles_through_the_library_the_command_line_and_the_server(tmp_path, styles, ckpt, serve):
    from latent_diffusion.cli import main
    from test_server import call, decode

    pipe = load_pipeline(ckpt, styles=styles)
    settings = dict(width=32, height=32, steps=2, sampler="euler", cfg_scale=3.0)
    styled = generate(pipe, GenerationRequest(["a cat"], [1], **settings, styles=["Cinematic", "Watercolor"]))
    written = "a cat, film grain, (dramatic light:1.2), watercolor painting"
    plain = generate(pipe, GenerationRequest([written], [1], negative_prompts=["cartoon, lowres"], **settings))
    assert torch.equal(styled.images, plain.images) and styled.infotexts == plain.infotexts
    with pytest.raises(RequestError, match="styles: no style 'Noir' here; these are: Cinematic, Watercolor"):
        generate(pipe, GenerationRequest(["a cat"], [1], **settings, styles=["Noir"]))
    with pytest.raises(RequestError, match="no style 'Noir' here; these are: none"):
        generate(Pipeline(pipe.model), GenerationRequest(["a cat"], [1], **settings, styles=["Noir"]))

    args = ["txt2img", "--ckpt", ckpt, "--prompt", "a cat", "--seed", 1, "--width", 32, "--height", 32, "--steps", 2,
            "--sampler", "euler", "--cfg-scale", 3, "--styles-file", tmp_path / "styles.csv", "--quiet"]  # fmt: skip
    assert (
        main([str(a) for a in [*args, "--style", "Cinematic", "--style", "Watercolor", "--outdir", tmp_path / "a"]])
        == 0
    )
    with Image.open(next((tmp_path / "a").iterdir())) as im:
        assert im.text["parameters"] == styled.infotexts[0]

    with serve(create_app(pipe)) as base:
        assert call(base, "/sdapi/v1/prompt-styles")[1][0] == {
            "name": "Cinematic", "prompt": "{prompt}, film grain, (dramatic light:1.2)",
            "negative_prompt": "cartoon, lowres"}  # fmt: skip
        body = {"prompt": "a cat", "seed": 1, "width": 32, "height": 32, "steps": 2, "sampler_name": "Euler",
                "cfg_scale": 3, "styles": ["Cinematic", "Watercolor"]}  # fmt: skip
        status, answer = call(base, "/sdapi/v1/txt2img", body)
        info = json.loads(answer["info"])
        assert status == 200 and info["ignored"] == [] and info["infotexts"] == styled.infotexts
        assert decode(answer["images"][0]).tobytes() == to_bytes(styled.images[0])
        status, answer = call(base, "/sdapi/v1/txt2img", {**body, "styles": ["Noir"]})
        assert status == 422 and "no style 'Noir'" in answer["detail"]


def to_bytes(image: torch.Tensor) -> bytes:
    return to_pil(image).tobytes()
